"""Is a float32 ResNet gradient gap a bug or a ReLU kink crossing? (diagnostic for the torch backend)

    python benchmarks/kink_check.py [--case ID] [--threads 2]

Runs one ResNet parity case in torch (``--case``: an id from `cbam_multi.parity_resnet.RESNET_CASES`, or
`DEFAULT_CASE`, ResNet-50-CBAM, official, B2, 64x64, train, where the gap was found): float64, then float32
with the eager training Function's CPU kernels off and on (`cbam_multi.torch.fused.KERNEL_ENV_VAR`), each
once with plain ReLUs and once with every ReLU's mask taken
from the float64 run. It prints, per run, the largest gradient error relative to float64 (each tensor's
error over its largest float64 gradient, as the parity check measures it) and the pre-activations whose
sign differs from float64. A gap that vanishes with the float64 masks is a kink crossing: a pre-activation
within float32 rounding of zero lands on the other side, and the gradient there is all or nothing.
A kernel bug would leave the forced-mask error large.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cbam_multi.parity_resnet import RESNET_CASES, ResNetCase


class _ReluProbe:
    """Stands in for ``torch.nn.functional`` inside the ResNet module: records or replays ReLU masks."""

    def __init__(self, functional):
        self._f = functional
        self.mode, self.calls, self.masks, self.values, self.flips = "record", 0, [], [], []

    def __getattr__(self, name):
        return getattr(self._f, name)

    def relu(self, t):
        i, self.calls = self.calls, self.calls + 1
        if self.mode == "record":  # the float64 run
            self.masks.append((t > 0).detach())
            self.values.append(t.detach().clone())
            return self._f.relu(t)
        if self.mode == "forced":
            return t * self.masks[i].to(t.dtype)
        flipped = ((t > 0).detach() != self.masks[i]).nonzero().tolist()  # "plain": note sign changes
        self.flips += [(i, tuple(p), float(self.values[i][tuple(p)]), float(t.detach()[tuple(p)])) for p in flipped]
        return self._f.relu(t)


# Full width: the parity suite's ResNet-50 case runs at width 16 (the suite's time); this one is where a float32
# pre-activation of layer3.0 lands on the other side of its ReLU's kink with the CPU kernels at 2+ threads.
DEFAULT_CASE = ResNetCase(50, "imagenet", 2, 64, train=True)


def find_case(case_id: str) -> ResNetCase:
    """The case named ``case_id`` (`DEFAULT_CASE` or one of `RESNET_CASES`); a one-line error names the ids."""
    cases = {c.id: c for c in (DEFAULT_CASE, *RESNET_CASES)}
    if case_id not in cases:
        raise SystemExit(f"kink_check: unknown case {case_id!r}; use one of: {', '.join(cases)}")
    return cases[case_id]


def check(case: ResNetCase = DEFAULT_CASE, kernels=(False, True)) -> dict:
    """{"case": id, "runs": [{"kernels", "relu", "max_rel_grad_err", "flips"}]} for one parity case, the CPU
    kernels off and/or on (``kernels``), each with plain and with float64-forced ReLU masks."""
    from cbam_multi.parity_resnet import case_inputs, run_torch
    from cbam_multi.torch import fused
    from cbam_multi.torch.models import resnet

    weights, x, g = case_inputs(case)
    probe = _ReluProbe(resnet.F)
    resnet.F = probe
    try:
        _, ref, _ = run_torch(case.spec, weights, x, g, "float64", case.train)
        runs = []
        for on in kernels:
            for mode in ("plain", "forced"):
                probe.mode, probe.calls, probe.flips = mode, 0, []
                with fused.kernels(on):
                    _, got, _ = run_torch(case.spec, weights, x, g, "float32", case.train)
                err = max(float(np.abs(got[n] - r).max() / max(np.abs(r).max(), 1e-300)) for n, r in ref.items())
                runs.append({"kernels": on, "relu": mode, "max_rel_grad_err": err, "flips": list(probe.flips)})
    finally:
        resnet.F = probe._f
    return {"case": case.id, "relu_calls": len(probe.masks), "runs": runs}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default=DEFAULT_CASE.id, help=f"case id (default {DEFAULT_CASE.id}, or one of RESNET_CASES)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (the float32 rounding depends on it)")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = check(find_case(args.case))
    print(f"{out['case']}, float32 vs float64, {torch.get_num_threads()} torch thread(s), {out['relu_calls']} ReLU calls")
    for r in out["runs"]:
        print(f"  kernels {'on ' if r['kernels'] else 'off'}  ReLU {r['relu']:6s}  max rel grad err {r['max_rel_grad_err']:.2e}")
        for call, pos, v64, v32 in r["flips"][:5]:
            print(f"      sign flip: ReLU call {call} at {pos}: float64 {v64:+.3e}, float32 {v32:+.3e}")
    return out


if __name__ == "__main__":
    main()
