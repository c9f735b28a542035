"""Numerics settings shared by tests/ and parity_tests/: float64 available in JAX, no reduced-precision
matmuls anywhere (TF32 off in torch, 'highest' matmul precision in JAX)."""

import os

os.environ.setdefault("XLA_FLAGS", "")  # leave room for callers' flags (e.g. forced host device counts)

try:
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
except ImportError:  # the torch-only install still runs the framework-free and torch tests
    pass

try:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
except ImportError:
    pass
