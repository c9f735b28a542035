"""Whole-network parity: every case of `cbam_multi.parity_resnet.RESNET_CASES` crossed with float64/float32.

Torch and JAX against the float64 NumPy oracle (logits, BN running statistics in train mode), torch vs JAX
(logits and the gradient of every trainable tensor), and a 10-step SGD-with-momentum trajectory of
ResNet-18-CBAM (CIFAR stem, width 16, batch 4, 16x16) in float64. Tolerances: `cbam_multi.parity.RESNET_TOLERANCES`.
"""

import numpy as np
import pytest

pytest.importorskip("torch", reason="parity needs the torch extra")
pytest.importorskip("flax", reason="parity needs the jax extra")

from cbam_multi.models.resnet import ResNetSpec
from cbam_multi.parity import DTYPES, RESNET_TRAJECTORY_TOLERANCE, format_table
from cbam_multi.parity_resnet import RESNET_CASES, check_case, trajectory


def _marks(case):
    # one quick case (ResNet-18-CBAM, CIFAR stem, train-mode BN) outside the slow set; each case compiles its
    # JAX gradient function once per dtype (several seconds on 2 cores)
    return [] if case == RESNET_CASES[0] else [pytest.mark.slow]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [pytest.param(c, marks=_marks(c), id=c.id) for c in RESNET_CASES])
def test_resnet_parity(case, dtype):
    rows = check_case(case, dtype)
    print(format_table(rows))  # the figures (pytest -rA shows them)
    checks = {(r.check, r.quantity) for r in rows}
    assert {("torch~oracle", "logits"), ("jax~oracle", "logits"), ("torch~jax", "grad")} <= checks
    if case.train:
        assert {("torch~oracle", "stats"), ("jax~oracle", "stats")} <= checks
    bad = [r for r in rows if not r.ok]
    assert not bad, "parity failures:\n" + format_table(bad) + "\n\nall rows:\n" + format_table(rows)


@pytest.mark.slow
def test_resnet18_cbam_sgd_trajectory_float64():
    # width 16 at 16x16 runs the same code as width 64 (stem, all 8 blocks with CBAM, train BN, the jitted
    # donating step, torch.optim.SGD vs optax.sgd with momentum); layer4 is still 2x2 with batch 4, and 10 steps
    # let momentum build up over many updates: any divergence in the update rule compounds well past 1e-9.
    result = trajectory(ResNetSpec(18, "cifar", num_classes=10, width=16), steps=10, batch=4, size=16, dtype="float64")
    assert len(result["torch"]) == 10
    assert np.isfinite(result["torch"]).all() and np.ptp(result["torch"]) > 0.1  # the weights move (random labels: no trend)
    assert result["max_rel"] <= RESNET_TRAJECTORY_TOLERANCE, (result["max_rel"], result["torch"], result["jax"])
