"""Framework-free model specs and their float64 NumPy oracles, one file per family."""

from cbam_multi.models.mnist import MNISTNetSpec
from cbam_multi.models.resnet import ResNetSpec

__all__ = ["MNISTNetSpec", "ResNetSpec", "build_network"]


def build_network(networks, spec, **kwargs):
    """The network of ``spec``'s family from a backend's ``MODELS`` table (spec class -> network class, e.g.
    `cbam_multi.torch.models.MODELS`), ``kwargs`` (dtype, seed, ...) passed to its constructor."""
    if type(spec) not in networks:
        raise TypeError(f"no network for a {type(spec).__name__}: one of {[c.__name__ for c in networks]}")
    return networks[type(spec)](spec, **kwargs)
