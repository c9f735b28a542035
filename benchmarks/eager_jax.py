"""What an eager (un-jitted) Flax NNX CBAM call costs, with the JAX maths jitted as one program (the library)
against op-by-op dispatch of the same maths (``cbam_multi.jax.functional._cbam.__wrapped__``).

    python benchmarks/eager_jax.py [--shapes 4x32x14x14,2x64x7x7] [--dtype float32]

Per shape, in one process with no persistent compilation cache: the first call (its compilations included)
and the median of 20 later calls of ``nnx.value_and_grad`` of ``sum(y * g)`` on an NNX `CBAM` in train mode.
Each variant gets shapes of its own (channels + 1 for the op-by-op one), so neither reuses the other's
compilations.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _time_calls(shape, dtype_name, reps=20):
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import cbam_multi.jax as cj
    from cbam_multi import CBAMSpec

    b, c, h, w = shape
    model = cj.CBAM(CBAMSpec.official(c), param_dtype=getattr(jnp, dtype_name))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, h, w, c)), getattr(jnp, dtype_name))
    g = jnp.asarray(rng.normal(size=(b, h, w, c)), getattr(jnp, dtype_name))
    step = nnx.value_and_grad(lambda m, xin: (m(xin) * g).sum(), argnums=(0, 1))

    def call():
        loss, _ = step(model, x)
        loss.block_until_ready()

    t = time.perf_counter()
    call()
    first = time.perf_counter() - t
    later = []
    for _ in range(reps):
        t = time.perf_counter()
        call()
        later.append(time.perf_counter() - t)
    return first, statistics.median(later)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4x32x14x14,2x64x7x7,8x16x28x28", help="BxCxHxW list, comma-separated")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    args = p.parse_args(argv)
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    from cbam_multi.jax import functional as F

    jitted = F._cbam
    rows = []
    for text in args.shapes.split(","):
        shape = tuple(int(v) for v in text.split("x"))
        for variant, core, c_shift in (("one jitted program", jitted, 0), ("op by op", jitted.__wrapped__, 1)):
            F._cbam = core
            try:
                first, later = _time_calls((shape[0], shape[1] + c_shift, *shape[2:]), args.dtype)
            finally:
                F._cbam = jitted
            rows.append({"shape": text, "variant": variant, "first_s": first, "later_ms": later * 1e3})
    print(f"jax {jax.__version__}, {jax.default_backend()}, {args.dtype}; NNX CBAM (official preset), train mode, value_and_grad")
    print(f"{'shape':>12}  {'variant':<20} {'first call (s)':>15} {'later calls (ms, median)':>25}")
    for r in rows:
        print(f"{r['shape']:>12}  {r['variant']:<20} {r['first_s']:15.2f} {r['later_ms']:25.2f}")
    return rows


if __name__ == "__main__":
    main()
