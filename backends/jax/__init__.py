"""JAX / Flax backend of cbam-multi: CBAM as Flax NNX modules (default), linen modules and pure functions.

Layout is NHWC (channels last, Flax's native layout); canonical weights need no transposes.
float64 needs ``jax.config.update("jax_enable_x64", True)`` before creating arrays, else JAX
silently computes in float32.

Usage::

    import jax.numpy as jnp
    from cbam_multi import CBAMSpec
    from cbam_multi.jax import CBAM, export_weights
    model = CBAM(CBAMSpec.paper(64), seed=0)           # NNX module, canonical seeded init
    y = model(jnp.ones((8, 32, 32, 64)))                 # NHWC in, NHWC out

Dtypes follow Flax: ``param_dtype`` (default float32) stores the parameters, ``dtype`` (default None: the
promoted dtype of input and parameters) is the computation's; ``CBAM(spec, param_dtype=jnp.float64)`` for
float64 weights, ``dtype=jnp.bfloat16`` for mixed precision.

Pure functions: ``cbam_multi.jax.functional.cbam(params, x, spec, train=False) -> (y, new_stats)``;
linen: ``cbam_multi.jax.linen.CBAM(spec, seed)``. BatchNorm follows PyTorch's momentum convention
(``spec.norm_momentum``); Flax's own ``BatchNorm`` momentum would be ``spec.flax_momentum``.
"""

from cbam_multi._optional import require

for _module in ("jax", "flax"):  # missing ones: an error naming the extra, not a bare ModuleNotFoundError
    require(_module, "cbam_multi.jax")

from . import functional, linen  # noqa: E402
from .modules import CBAM, ChannelAttention, SpatialAttention  # noqa: E402
from .weights import export_grads, export_weights, import_weights, load_checkpoint  # noqa: E402

# The CBAM layer only: networks are in `cbam_multi.jax.models`, the trainer in `cbam_multi.jax.train`
# (loaded by `cbam_multi.training` when used).
__all__ = [
    "CBAM", "ChannelAttention", "SpatialAttention", "export_weights", "import_weights", "export_grads",
    "load_checkpoint", "functional", "linen",
]
