"""The MNIST CNN's 2x2 max-pool follows ``MNISTNetSpec.pool_tie_rule`` identically in both backends:
input gradients of torch and JAX agree on images with tied pooling windows (flat background, ReLU
zeros), for "first" (torch's F.max_pool2d) and "split"; and the two rules really differ there."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp

import cbam_multi.jax.models as jm
import cbam_multi.torch.models as tm
from cbam_multi.models import MNISTNetSpec
from cbam_multi.weights import init_weights


def _images():
    rng = np.random.default_rng(0)
    x = np.zeros((2, 1, 12, 12))  # flat background: every pooling window over it ties
    x[:, :, 3:9, 2:10] = np.round(rng.uniform(0, 1, size=(2, 1, 6, 8)) * 4) / 4  # quantised strokes
    return x


def _input_grads(spec, w, x):
    g = np.random.default_rng(1).normal(size=(2, spec.num_classes))
    tmod = tm.import_model_weights(tm.MNISTNet(spec, dtype=torch.float64), w).eval()
    xt = torch.tensor(x, requires_grad=True)
    (tmod(xt) * torch.tensor(g)).sum().backward()
    jmod = jm.import_model_weights(jm.MNISTNet(spec, dtype=jnp.float64), w)
    jmod.eval()
    gx = jax.jit(jax.grad(lambda v: (jmod(v) * jnp.asarray(g)).sum()))(jnp.asarray(np.transpose(x, (0, 2, 3, 1))))
    return xt.grad.numpy(), np.transpose(np.asarray(gx), (0, 3, 1, 2))


@pytest.mark.parametrize("cbam", [True, False], ids=["cbam", "no_cbam"])
def test_pool_tie_rule_is_the_same_in_both_backends(cbam):
    grads = {}
    for rule in ("first", "split"):
        spec = MNISTNetSpec(conv_channels=(4, 8), dense=16, image_size=12, cbam=cbam, cbam_reduction=2, pool_tie_rule=rule)
        w = init_weights(spec, 3, np.float64)
        gt, gj = _input_grads(spec, w, _images())
        err = float(np.abs(gt - gj).max() / np.abs(gt).max())
        assert err <= 1e-10, f"{rule}: torch vs JAX input gradient, relative error {err:.2e}"
        grads[rule] = gt
    assert np.abs(grads["first"] - grads["split"]).max() > 1e-3 * np.abs(grads["first"]).max()
