"""Parity suite: every case of `cbam_multi.parity.CASES` crossed with float64/float32.

Each test runs all comparisons for its case (backends vs the NumPy oracle, torch<->Flax weight transfer
with outputs and gradients, NNX vs linen, jit/compile vs eager) and fails with the full error table.
Tolerances live in `cbam_multi.parity.TOLERANCES`.
"""

import pytest

pytest.importorskip("torch", reason="parity needs the torch extra")
pytest.importorskip("flax", reason="parity needs the jax extra")

import re
from pathlib import Path

import jax

from cbam_multi.parity import CASES, DTYPES, QUANTITIES, check_case, format_table, torch_device

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True)
def torch_threads_of_the_cli(cli_torch_threads):
    # conftest gives each pytest-xdist worker one torch thread; float32 rounding of some torch kernels
    # depends on the thread count, and README's table quotes `cbam-multi parity`, so these cases run with
    # the CLI's count (torch is a small part of their time)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(cli_torch_threads)
    yield
    torch.set_num_threads(before)


def readme_observed() -> dict[str, dict[str, float]]:
    """README's "largest error" table (the summary `cbam-multi parity` prints): {dtype: {quantity: value}}."""
    text = README.read_text()
    table = re.search(r"\| largest error \|(.*?)\|\n\|[-|]+\n((?:\|.*\|\n)+)", text)
    assert table, "README lost its table of observed parity errors"
    columns = [c.strip() for c in table.group(1).split("|")]
    observed = {}
    for line in table.group(2).splitlines():
        dtype, *values = [c.strip() for c in line.strip("|").split("|")]
        observed[dtype] = {q: float(v) for q, v in zip(columns, values)}
    assert set(observed) == set(DTYPES) and all(set(v) == set(QUANTITIES) for v in observed.values()), observed
    return observed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_parity(case, dtype):
    # torch.compile is slow to build on CPU: compare it with eager once per compile case, in float32.
    rows = check_case(case, dtype, with_compile=case.compile and dtype == "float32")
    checks = {r.check for r in rows}
    assert {"torch~oracle", "nnx~oracle", "linen~oracle", "torch->nnx", "nnx->torch", "linen~nnx",
            "torch-infer~oracle", "torch-infer-cl~oracle", "torch-fused~composed", "jax-infer~oracle"} <= checks
    bad = [r for r in rows if not r.ok]
    assert not bad, "parity failures:\n" + format_table(bad) + "\n\nall rows:\n" + format_table(rows)
    # README quotes the largest errors on CPU; a row above them means README understates them (update its
    # table from the summary `cbam-multi parity` prints). GPU runs (CBAM_MULTI_TORCH_DEVICE=cuda, JAX's GPU
    # backend) are held to the tolerances alone; benchmarks/RESULTS.md records their figures.
    if torch_device() != "cpu" or jax.default_backend() != "cpu":
        return
    observed = readme_observed()[dtype]
    above = [r for r in rows if r.quantity in observed and not r.error <= observed[r.quantity]]
    assert not above, "README's observed-error table is exceeded:\n" + format_table(above)
