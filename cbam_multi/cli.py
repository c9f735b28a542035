"""`cbam-multi` command line: a thin layer over the library. Each subcommand lives in one function.

    cbam-multi parity [--preset P ...] [--dtype D ...] [--backends torch jax] [--compile]
"""

from __future__ import annotations

import argparse
import sys

from cbam_multi.spec import CBAMSpec


def cmd_parity(args: argparse.Namespace) -> int:
    """Print max errors per case, backend pair and quantity; exit 1 if any exceeds its tolerance."""
    import jax

    # float64 cases need x64; parity is about exact maths, so no reduced-precision matmuls either.
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    from cbam_multi.parity import CASES, check_case, format_table

    cases = [c for c in CASES if c.preset in args.preset]
    rows = []
    for case in cases:
        for dtype in args.dtype:
            rows += check_case(case, dtype, backends=tuple(args.backends), with_compile=args.compile or None)
    print(format_table(rows))
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbam-multi", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("parity", help="cross-framework numerical parity report (CBAM block)")
    p.add_argument("--preset", nargs="+", choices=CBAMSpec.PRESETS, default=list(CBAMSpec.PRESETS))
    p.add_argument("--dtype", nargs="+", choices=("float64", "float32"), default=["float64", "float32"])
    p.add_argument("--backends", nargs="+", choices=("torch", "jax"), default=["torch", "jax"])
    p.add_argument("--compile", action="store_true", help="compare torch.compile with eager on every case (slow)")
    p.set_defaults(func=cmd_parity)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
