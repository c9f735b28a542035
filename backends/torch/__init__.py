"""PyTorch backend of cbam-multi: CBAM built from a `cbam_multi.CBAMSpec`.

Layout: NCHW, ``x`` of shape (batch, channels, height, width), floating point, same dtype as the module.
Weights move between backends as canonical NumPy dicts (see `cbam_multi.spec`):

    import torch
    from cbam_multi import CBAMSpec
    from cbam_multi.torch import CBAM, export_weights, import_weights
    model = CBAM(CBAMSpec.official(64), seed=0)      # or .paper / .timm / .seed; dtype=torch.float64
    y = model(torch.randn(8, 64, 32, 32))             # NCHW in, NCHW out; export_weights(model) -> NumPy dict

Official (Jongchan/attention-module) and timm checkpoints convert with ``from_official_state_dict`` /
``from_timm_state_dict`` (then ``import_weights``), and back with ``to_official_state_dict`` /
``to_timm_state_dict``.
"""

from cbam_multi._optional import require

require("torch", "cbam_multi.torch")  # a missing torch: an error naming the extra, not a bare ModuleNotFoundError

from .adapters import from_official_state_dict, from_timm_state_dict, to_official_state_dict, to_timm_state_dict  # noqa: E402
from .modules import CBAM, ChannelAttention, SpatialAttention  # noqa: E402
from .weights import export_grads, export_weights, import_weights, load_checkpoint  # noqa: E402

# The CBAM layer only: networks are in `cbam_multi.torch.models`, the trainer in `cbam_multi.torch.train`
# (loaded by `cbam_multi.training` when used).
__all__ = [
    # modules
    "CBAM", "ChannelAttention", "SpatialAttention",
    # canonical weights of one block; a checkpoint loaded with its spec checked
    "export_weights", "import_weights", "export_grads", "load_checkpoint",
    # anchor checkpoints
    "from_official_state_dict", "to_official_state_dict", "from_timm_state_dict", "to_timm_state_dict",
]
