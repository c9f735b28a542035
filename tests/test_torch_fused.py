"""The eager training Function (`cbam_multi.torch.fused`) computes what the composed ops compute.

Outputs, the gradients w.r.t. the input and every parameter, and the BatchNorm running statistics, for
every preset, both tie rules (on inputs built with many tied maxima), NCHW and channels_last, train and
eval mode, MLP/conv biases on and off; float64 within 1e-10 of the composed ops, float32 within
`cbam_multi.parity.TOLERANCES` of the float64 composed ops. The float64 oracle and the JAX gradients are
compared in parity_tests (the torch rows there run this path; "torch-fused~composed" is this check).
"""

from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")

from cbam_multi import CBAMSpec
from cbam_multi.parity import TOLERANCES
from cbam_multi.torch import CBAM, fused

CASES = list(itertools.product(["seed", "official", "timm", "paper"], ["split", "first"], [False, True]))


def _run(spec, state, x, ct, dtype, train, composed, channels_last=False, kernel=True):
    m = CBAM(spec, dtype=dtype)
    m.load_state_dict(state)
    m.train(train)
    xx = x.to(dtype).clone()
    if channels_last:
        xx = xx.contiguous(memory_format=torch.channels_last)
    xx.requires_grad_()
    with fused.disabled() if composed else torch.enable_grad(), fused.kernels(kernel):
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
@pytest.mark.parametrize("layout", ["kernel", "ops", "channels_last", "channels_last-ops"])
def test_fused_matches_composed_float64(preset, tie_rule, ties, train, layout):
    """kernel: NCHW through the CPU kernels (csrc/cbam_train.cpp); ops: the same Function with its full-size
    passes as torch ops (the kernels off, as on GPU); channels_last: its kernels (csrc/cbam_train_cl.cpp), and
    the torch ops."""
    spec = CBAMSpec.preset(preset, 16, tie_rule=tie_rule)
    state, x, ct = _inputs(spec, ties)
    ref = _run(spec, state, x, ct, torch.float64, train, composed=True)
    got = _run(spec, state, x, ct, torch.float64, train, composed=False, channels_last=layout.startswith("channels_last"),
               kernel=not layout.endswith("ops"))
    err = _err(got, ref)
    assert err <= TOLERANCES["float64"]["grad"], f"fused vs composed (float64): max abs err {err:.3e}"


@pytest.mark.parametrize("preset,tie_rule", [("seed", "first"), ("official", "first"), ("timm", "split")])
@pytest.mark.parametrize("overrides", [{}, {"mlp_bias": False, "spatial_bias": False}, {"gate": "hard_sigmoid"},
                                       {"mlp_act": "silu", "channel_pools": ("max", "avg")},
                                       {"channel_pools": ("max",)}, {"channel_pools": ("avg",)}])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fused_float32_within_tolerance(preset, tie_rule, overrides, layout):
    spec = CBAMSpec.preset(preset, 16, tie_rule=tie_rule, **overrides)
    state, x, ct = _inputs(spec, ties=False, seed=3)
    ref = _run(spec, state, x, ct, torch.float64, True, composed=True)
    got = _run(spec, {k: v.float() for k, v in state.items()}, x, ct, torch.float32, True, composed=False,
               channels_last=layout == "channels_last")
    err_y = _err(got[:1], ref[:1])
    scale = max(r.abs().max().item() for r in ref[1:]) or 1.0
    err_g = _err(got[1:], ref[1:]) / scale
    tol = TOLERANCES["float32"]
    assert err_y <= tol["y"] and err_g <= tol["grad"], f"float32: y err {err_y:.3e}, grad rel err {err_g:.3e}"


@pytest.mark.parametrize("tie_rule", ["first", "split"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_float32_kernels_with_ties_past_one_vector(tie_rule, layout):
    """float32 at C = 40 (two and a half 16-lane vectors: the channels_last AVX-512 rows' masked tails) and
    12x11 positions (over 128: the NCHW compare loops' 32-lane form), integer inputs full of tied maxima over
    channels and over H, W: the kernels against the composed ops in float32, which see the same ties."""
    spec = CBAMSpec.preset("seed", 40, tie_rule=tie_rule)
    g = torch.Generator().manual_seed(5)
    x = torch.relu(torch.randn(3, 40, 12, 11, generator=g) * 2).round()
    ct = torch.randn(x.shape, generator=g)
    state = {k: v.float() for k, v in CBAM(spec, dtype=torch.float64, seed=6).state_dict().items()}
    ref = _run(spec, state, x, ct, torch.float32, True, composed=True)
    got = _run(spec, state, x, ct, torch.float32, True, composed=False, channels_last=layout == "channels_last")
    err_y = _err(got[:1], ref[:1])
    scale = max(r.abs().max().item() for r in ref[1:]) or 1.0
    err_g = _err(got[1:], ref[1:]) / scale
    tol = TOLERANCES["float32"]
    assert err_y <= tol["y"] and err_g <= tol["grad"], f"float32 with ties: y err {err_y:.3e}, grad rel err {err_g:.3e}"


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


# ResNet-50-CBAM's block shapes (batch 2, 64x64 input: layer1..layer4) and how the network uses the block:
# its output goes into ``out + shortcut`` and a ReLU, its gradient can arrive expanded (the global mean pool's
# backward) or channels_last, and at::parallel_for splits C up to 2048 planes. This was the first suspect for
# a float32 ResNet-50 gradient gap with the kernels on (tracked down to one ReLU kink crossing, RESULTS.md).
RESNET50_SHAPES = [(2, 256, 16, 16), (2, 512, 8, 8), (2, 1024, 4, 4), (2, 2048, 2, 2)]


@pytest.mark.parametrize("shape", RESNET50_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("grad_kind", ["dense", "expanded", "channels_last"])
def test_kernels_on_resnet50_block_shapes(shape, grad_kind):
    spec = CBAMSpec.preset("official", shape[1])
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    shortcut = torch.randn(shape, generator=g, dtype=torch.float64)
    ct = torch.randn(shape if grad_kind != "expanded" else (*shape[:2], 1, 1), generator=g, dtype=torch.float64)
    state = CBAM(spec, dtype=torch.float64, seed=5).state_dict()

    def run(dtype, composed):
        m = CBAM(spec, dtype=dtype)
        m.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
        xx = x.to(dtype).requires_grad_()
        with fused.disabled() if composed else fused.kernels(True):
            assert fused.applies(m, xx) == (not composed)
            out = m(xx)
            out += shortcut.to(dtype)  # in place on the Function's output, as a residual add may be written
            y = out.tanh_()  # in place again; smooth (a ReLU here could flip at a kink in float32: not the check)
            c = ct.to(dtype)
            c = c.expand(shape) if grad_kind == "expanded" else c
            c = c.contiguous(memory_format=torch.channels_last) if grad_kind == "channels_last" else c
            grads = torch.autograd.grad(y, [xx, *m.parameters()], c)
        return [y.detach(), *grads]

    ref = run(torch.float64, composed=True)
    got64 = run(torch.float64, composed=False)
    assert _err(got64, ref) <= TOLERANCES["float64"]["grad"], f"float64 kernels vs composed: {_err(got64, ref):.3e}"
    got32 = run(torch.float32, composed=False)
    scale = max(r.abs().max().item() for r in ref[1:])
    err_y, err_g = _err(got32[:1], ref[:1]), _err(got32[1:], ref[1:]) / scale
    tol = TOLERANCES["float32"]
    assert err_y <= tol["y"] and err_g <= tol["grad"], f"float32 kernels: y err {err_y:.3e}, grad rel err {err_g:.3e}"


def test_input_changed_in_place_after_the_forward_is_caught():
    """x is saved with save_for_backward: an in-place change before backward is autograd's version error,
    not a silently wrong gradient (kernels on and off)."""
    m = CBAM(CBAMSpec.preset("official", 32), dtype=torch.float64)
    for on in (True, False):
        h = torch.randn(2, 32, 4, 4, dtype=torch.float64, requires_grad=True)
        x = h * 1.0
        with fused.kernels(on):
            y = m(x)
        x.relu_()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_kink_check_separates_kernel_errors_from_relu_kinks():
    """benchmarks/kink_check.py on the quick ResNet-18-CBAM parity case: with every ReLU mask taken from
    float64, float32 gradients (kernels on and off) stay within the parity tolerance; a kernel bug would not."""
    import sys
    from pathlib import Path

    from cbam_multi.parity import RESNET_TOLERANCES
    from cbam_multi.parity_resnet import RESNET_CASES

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import kink_check

    out = kink_check.check(RESNET_CASES[0], kernels=(True,))  # kernels on only: the suite's time (each run is a ResNet-18 step)
    assert out["relu_calls"] > 0 and [(r["kernels"], r["relu"]) for r in out["runs"]] == [(True, "plain"), (True, "forced")]
    for r in out["runs"]:
        if r["relu"] == "forced":
            assert r["max_rel_grad_err"] <= RESNET_TOLERANCES["float32"]["grad"], r
