"""The eager training Function (`cbam_multi.torch.fused`) computes what the composed ops compute.

Outputs, the gradients w.r.t. the input and every parameter, and the BatchNorm running statistics, for
every preset, both tie rules (on inputs built with many tied maxima), NCHW and channels_last, train and
eval mode, MLP/conv biases on and off; float64 within 1e-10 of the composed ops, float32 within
`cbam_multi.parity.TOLERANCES` of the float64 composed ops. The float64 oracle and the JAX gradients are
compared in parity_tests (the torch rows there run this path; "torch-fused~composed" is this check).
"""

from __future__ import annotations

import contextlib
import itertools
import os

import pytest

torch = pytest.importorskip("torch")

from cbam_multi import CBAMSpec
from cbam_multi.parity import TOLERANCES
from cbam_multi.torch import CBAM, cpu_kernel, fused

CASES = list(itertools.product(["seed", "official", "timm", "paper"], ["split", "first"], [False, True]))


@contextlib.contextmanager
def _kernels(on: bool):
    """The opt-in CPU kernels of the Function (fused.KERNEL_ENV_VAR) on or off for this block."""
    old = os.environ.get(fused.KERNEL_ENV_VAR)
    os.environ[fused.KERNEL_ENV_VAR] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[fused.KERNEL_ENV_VAR]
        else:
            os.environ[fused.KERNEL_ENV_VAR] = old


def _run(spec, state, x, ct, dtype, train, composed, channels_last=False, kernel=True):
    m = CBAM(spec, dtype=dtype)
    m.load_state_dict(state)
    m.train(train)
    xx = x.to(dtype).clone()
    if channels_last:
        xx = xx.contiguous(memory_format=torch.channels_last)
    xx.requires_grad_()
    with fused.disabled() if composed else torch.enable_grad(), cpu_kernel.disabled() if not kernel else _kernels(True):
        assert fused.applies(m, xx) == (not composed)
        y = m(xx)
        grads = torch.autograd.grad(y, [xx, *m.parameters()], ct.to(dtype))
    return [y.detach(), *grads, *(b.clone() for b in m.buffers() if b.is_floating_point())]


def _inputs(spec, ties, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, spec.channels, 7, 6, generator=g, dtype=torch.float64)
    if ties:  # zeros and repeated integers: tied maxima over H, W and over channels
        x = torch.relu(x * 2).round()
    ct = torch.randn(x.shape, generator=g, dtype=torch.float64)
    state = CBAM(spec, dtype=torch.float64, seed=seed + 1).state_dict()
    return state, x, ct


def _err(a, b) -> float:
    return max((p.double() - q.double()).abs().max().item() for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("preset,tie_rule,ties", CASES)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("layout", ["kernel", "ops", "channels_last"])
def test_fused_matches_composed_float64(preset, tie_rule, ties, train, layout):
    """kernel: NCHW through the CPU kernels (csrc/cbam_train.cpp); ops: the same Function with its full-size
    passes as torch ops (the kernels off, as on GPU); channels_last: torch ops too."""
    spec = CBAMSpec.preset(preset, 16, tie_rule=tie_rule)
    state, x, ct = _inputs(spec, ties)
    ref = _run(spec, state, x, ct, torch.float64, train, composed=True)
    got = _run(spec, state, x, ct, torch.float64, train, composed=False, channels_last=layout == "channels_last",
               kernel=layout == "kernel")
    err = _err(got, ref)
    assert err <= TOLERANCES["float64"]["grad"], f"fused vs composed (float64): max abs err {err:.3e}"


@pytest.mark.parametrize("preset,tie_rule", [("seed", "first"), ("official", "first"), ("timm", "split")])
@pytest.mark.parametrize("overrides", [{}, {"mlp_bias": False, "spatial_bias": False}, {"gate": "hard_sigmoid"},
                                       {"mlp_act": "silu", "channel_pools": ("max", "avg")},
                                       {"channel_pools": ("max",)}, {"channel_pools": ("avg",)}])
def test_fused_float32_within_tolerance(preset, tie_rule, overrides):
    spec = CBAMSpec.preset(preset, 16, tie_rule=tie_rule, **overrides)
    state, x, ct = _inputs(spec, ties=False, seed=3)
    ref = _run(spec, state, x, ct, torch.float64, True, composed=True)
    got = _run(spec, {k: v.float() for k, v in state.items()}, x, ct, torch.float32, True, composed=False)
    err_y = _err(got[:1], ref[:1])
    scale = max(r.abs().max().item() for r in ref[1:]) or 1.0
    err_g = _err(got[1:], ref[1:]) / scale
    tol = TOLERANCES["float32"]
    assert err_y <= tol["y"] and err_g <= tol["grad"], f"float32: y err {err_y:.3e}, grad rel err {err_g:.3e}"


def test_frozen_parameters_and_input_without_grad():
    spec = CBAMSpec.seed(8)
    state, x, ct = _inputs(spec, ties=True)
    for freeze in ("channel", "spatial"):
        outs = []
        for composed in (True, False):
            m = CBAM(spec, dtype=torch.float64)
            m.load_state_dict(state)
            getattr(m, freeze).requires_grad_(False)
            with fused.disabled() if composed else torch.enable_grad():
                y = m(x)  # x itself needs no gradient
            outs.append([y.detach(), *torch.autograd.grad(y, [p for p in m.parameters() if p.requires_grad], ct)])
        assert _err(outs[0], outs[1]) <= 1e-12


@pytest.mark.parametrize(
    "overrides",
    [{"channel_pools": ("avg", "lp")}, {"channel_pools": ("lse",)}, {"variant": "light"}, {"no_spatial": True}],
)
def test_unsupported_options_route_to_composed_ops(overrides):
    spec = CBAMSpec.seed(8, **overrides)
    m = CBAM(spec, dtype=torch.float64)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    assert not fused.applies(m, x)
    y = m(x)
    assert "CBAMTrain" not in type(y.grad_fn).__name__


def test_routing_conditions():
    m = CBAM(CBAMSpec.seed(8))
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    assert fused.applies(m, x) and "CBAMTrain" in type(m(x).grad_fn).__name__
    assert not fused.applies(m, x.bfloat16())  # half precision: composed ops
    with torch.no_grad():
        assert not fused.applies(m, x)
    with fused.disabled():
        assert not fused.applies(m, x)
    h = m.spatial.register_forward_hook(lambda *a: None)
    assert not fused.applies(m, x)  # hooks see the composed calls
    h.remove()
    m.requires_grad_(False)
    assert not fused.applies(m, x.detach())  # nothing to differentiate: inference paths


def test_double_backward_is_refused_with_a_clear_error():
    m = CBAM(CBAMSpec.seed(4), dtype=torch.float64)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()
    with fused.disabled():  # the composed ops support it
        (gx,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
        gx.sum().backward()
