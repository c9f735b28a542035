"""Parity suite: every case of `cbam_multi.parity.CASES` crossed with float64/float32.

Each test runs all comparisons for its case (backends vs the NumPy oracle, torch<->Flax weight transfer
with outputs and gradients, NNX vs linen, jit/compile vs eager) and fails with the full error table.
Tolerances live in `cbam_multi.parity.TOLERANCES`.
"""

import pytest

pytest.importorskip("torch", reason="parity needs the torch extra")
pytest.importorskip("flax", reason="parity needs the jax extra")

from cbam_multi.parity import CASES, DTYPES, check_case, format_table


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_parity(case, dtype):
    # torch.compile is slow to build on CPU: compare it with eager once per compile case, in float32.
    rows = check_case(case, dtype, with_compile=case.compile and dtype == "float32")
    checks = {r.check for r in rows}
    assert {"torch~oracle", "nnx~oracle", "linen~oracle", "torch->nnx", "nnx->torch", "linen~nnx",
            "torch-infer~oracle", "torch-infer-cl~oracle", "torch-fused~composed"} <= checks
    bad = [r for r in rows if not r.ok]
    assert not bad, "parity failures:\n" + format_table(bad) + "\n\nall rows:\n" + format_table(rows)
