"""Mixed precision: CBAM's gate is computed in float32 from half-precision logits, in both backends."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jnp = pytest.importorskip("jax.numpy")

from cbam_multi.jax import functional as JF
from cbam_multi.torch import functional as TF


@pytest.mark.parametrize("kind", ["sigmoid", "hard_sigmoid"])
def test_bf16_gate_is_float32_rounded_once(kind):
    z = np.random.default_rng(0).normal(scale=4.0, size=(64,)).astype(np.float32)
    zt = torch.tensor(z).to(torch.bfloat16)
    want_t = TF.apply_gate(zt.float(), kind).to(torch.bfloat16)
    got_t = TF.apply_gate(zt, kind)
    assert got_t.dtype == torch.bfloat16 and torch.equal(got_t, want_t)
    zj = jnp.asarray(z, jnp.bfloat16)
    got_j = JF._gate(zj, kind)
    assert got_j.dtype == jnp.bfloat16
    want_j = JF._gate(zj.astype(jnp.float32), kind).astype(jnp.bfloat16)
    assert np.array_equal(np.asarray(got_j, np.float32), np.asarray(want_j, np.float32))
    # both backends agree exactly on the rounded gate values
    assert np.array_equal(got_t.float().numpy(), np.asarray(got_j, np.float32))
