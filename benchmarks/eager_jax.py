"""What an eager (un-jitted) Flax NNX CBAM call costs, with the JAX maths jitted as one program (the library)
against op-by-op dispatch of the same maths (``cbam_multi.jax.functional._cbam.__wrapped__``).

    python benchmarks/eager_jax.py [--shapes 4x32x14x14,2x64x7x7] [--dtype float32] [--rounds 5]

Per shape, in one process with no persistent compilation cache: the first call (its compilations included)
and the median of later calls (`benchmarks.common.Runner`, both variants interleaved) of
``nnx.value_and_grad`` of ``sum(y * g)`` on an NNX `CBAM` in train mode. Each variant gets shapes of its own
(channels + 1 for the op-by-op one), so neither reuses the other's compilations.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from benchmarks.common import Case


def _case(name, core, shape, dtype_name) -> Case:
    """One call of the eager gradient step with ``core`` as the library's CBAM maths (restored after)."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import cbam_multi.jax as cj
    from cbam_multi import CBAMSpec
    from cbam_multi.jax import functional as F

    b, c, h, w = shape
    dtype = getattr(jnp, dtype_name)
    model = cj.CBAM(CBAMSpec.official(c), param_dtype=dtype)
    rng = np.random.default_rng(0)
    x, g = (jnp.asarray(rng.normal(size=(b, h, w, c)), dtype) for _ in range(2))
    step = nnx.value_and_grad(lambda m, xin: (m(xin) * g).sum(), argnums=(0, 1))
    library = F._cbam

    def call():
        F._cbam = core
        try:
            common.jax_block(step(model, x))
        finally:
            F._cbam = library

    return Case(name, call)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4x32x14x14,2x64x7x7,8x16x28x28", help="BxCxHxW list, comma-separated")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    args = p.parse_args(argv)
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    from cbam_multi.jax import functional as F

    jitted = F._cbam
    variants = (("one jitted program", jitted, 0), ("op by op", jitted.__wrapped__, 1))
    cases = []
    for text in args.shapes.split(","):
        b, c, h, w = (int(v) for v in text.split("x"))
        cases += [_case(f"{text}|{variant}", core, (b, c + c_shift, h, w), args.dtype) for variant, core, c_shift in variants]
    results = common.Runner(rounds=args.rounds, reps_per_round=4, warmup=1, max_case_s=5.0).run(cases)
    rows = []
    for case in cases:
        text, variant = case.name.split("|")
        r = results[case.name]
        rows.append({"shape": text, "variant": variant, "first_s": r["first_call_s"], "later_ms": r["median_ms"]})
    print(f"jax {jax.__version__}, {jax.default_backend()}, {args.dtype}; NNX CBAM (official preset), train mode, value_and_grad")
    print(f"{'shape':>12}  {'variant':<20} {'first call (s)':>15} {'later calls (ms, median)':>25}")
    for r in rows:
        print(f"{r['shape']:>12}  {r['variant']:<20} {r['first_s']:15.2f} {r['later_ms']:25.2f}")
    return rows


if __name__ == "__main__":
    main()
