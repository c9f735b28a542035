"""BatchNorm then CBAM as one Function (`cbam_multi.torch.fused_bn`) computes what ``cbam(bn(h))`` computes.

Outputs, the gradients w.r.t. h, the BN's weight and bias and every CBAM parameter, the BN's running
statistics and ``num_batches_tracked``: every BN mode ``nn.BatchNorm2d`` has (train with momentum or the
cumulative average, eval, batch statistics without running ones), both tie rules on inputs with many tied
maxima, the CPU kernels and the torch-op passes, NCHW and channels_last; float64 within 1e-10 of the composed ops,
float32 within `cbam_multi.parity.TOLERANCES` of them in float64. The ResNet tests check that a ResNet block
takes this path and that it keeps the saved activations of ResNet-CBAM near those of the plain ResNet.
"""

from __future__ import annotations

import copy
import itertools
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from cbam_multi import CBAMSpec, ResNetSpec
from cbam_multi.parity import TOLERANCES
from cbam_multi.torch import CBAM, fused, fused_bn
from cbam_multi.torch.models import ResNet

BN_MODES = {
    "train": dict(train=True),
    "train-cumulative": dict(train=True, momentum=None),
    "eval": dict(train=False),
    "batch-stats-only": dict(train=True, track_running_stats=False),
    "eval-batch-stats-only": dict(train=False, track_running_stats=False),
}
CASES = [
    *itertools.product(["official", "timm"], ["first", "split"], [False, True], ["train", "eval"],
                       ["kernel", "channels_last"]),
    *itertools.product(["official"], ["split"], [True], list(BN_MODES),
                       ["kernel", "ops", "channels_last", "channels_last-ops"]),
]


def _id(case) -> str:
    preset, tie, ties, mode, path = case
    return f"{preset}-{tie}{'-ties' if ties else ''}-{mode}-{path}"


def _modules(spec, mode, dtype, seed=0):
    opts = BN_MODES[mode]
    bn = torch.nn.BatchNorm2d(spec.channels, momentum=opts.get("momentum", 0.1),
                              track_running_stats=opts.get("track_running_stats", True), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(spec.channels, generator=g, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(spec.channels, generator=g, dtype=torch.float64) * 0.1)
        if bn.track_running_stats:
            bn.running_mean.copy_(torch.randn(spec.channels, generator=g, dtype=torch.float64) * 0.1)
            bn.running_var.copy_(torch.rand(spec.channels, generator=g, dtype=torch.float64) + 0.5)
            bn.num_batches_tracked.fill_(3)
    cbam = CBAM(spec, dtype=torch.float64, seed=seed + 1)
    bn, cbam = bn.to(dtype).train(opts["train"]), cbam.to(dtype).train(opts["train"])
    return bn, cbam


def _inputs(spec, ties, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(4, spec.channels, 7, 6, generator=g, dtype=torch.float64)
    if ties:  # repeated values per channel: after the BN's per-channel affine map, tied maxima in x
        h = (h * 2).round().clamp(min=-1)
    return h, torch.randn(h.shape, generator=g, dtype=torch.float64)


def _run(spec, mode, h, ct, dtype, composed, path="kernel", steps=2):
    bn, cbam = _modules(spec, mode, dtype)
    hh = h.to(dtype).clone()
    if path.startswith("channels_last"):
        hh = hh.contiguous(memory_format=torch.channels_last)
    hh.requires_grad_()
    params = [bn.weight, bn.bias, *cbam.parameters()]
    outs = []
    with fused.disabled() if composed else fused.kernels(not path.endswith("ops")):
        for _ in range(steps):  # two calls: running statistics and num_batches_tracked move twice
            assert fused_bn.applies(bn, cbam, hh) == (not composed)
            y = cbam(bn(hh)) if composed else fused_bn.bn_cbam_train(bn, cbam, hh)
            outs += [y.detach(), *torch.autograd.grad(y, [hh, *params], ct.to(dtype))]
    return outs + [b.clone() for b in bn.buffers()]


def _err(a, b) -> float:
    return max(((p.double() - q.double()).abs().max().item() for p, q in zip(a, b, strict=True)), default=0.0)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_bn_then_cbam_matches_composed_float64(case):
    preset, tie, ties, mode, path = case
    spec = CBAMSpec.preset(preset, 16, tie_rule=tie)
    h, ct = _inputs(spec, ties)
    ref = _run(spec, mode, h, ct, torch.float64, composed=True)
    got = _run(spec, mode, h, ct, torch.float64, composed=False, path=path)
    err = _err(got, ref)
    assert err <= TOLERANCES["float64"]["grad"], f"BN+CBAM Function vs cbam(bn(h)) (float64): max abs err {err:.3e}"


@pytest.mark.parametrize("mode", list(BN_MODES))
@pytest.mark.parametrize("preset,tie", [("official", "first"), ("timm", "split")])
@pytest.mark.parametrize("path", ["kernel", "channels_last"])
def test_bn_then_cbam_float32_within_tolerance(preset, tie, mode, path):
    spec = CBAMSpec.preset(preset, 16, tie_rule=tie)
    h, ct = _inputs(spec, ties=False, seed=3)
    ref = _run(spec, mode, h, ct, torch.float64, composed=True, steps=1)
    got = _run(spec, mode, h, ct, torch.float32, composed=False, path=path, steps=1)
    n_out = 2 + len(list(CBAM(spec).parameters())) + 2  # y, h, BN weight and bias, CBAM parameters
    err_y = _err(got[:1], ref[:1])
    scale = max(r.abs().max().item() for r in ref[1:n_out])
    err_g = _err(got[1:n_out], ref[1:n_out]) / scale
    err_s = _err(got[n_out:], ref[n_out:])
    tol = TOLERANCES["float32"]
    assert err_y <= tol["y"] and err_g <= tol["grad"] and err_s <= tol["stats"], (
        f"float32: y err {err_y:.3e}, grad rel err {err_g:.3e}, stats err {err_s:.3e}")


def test_frozen_bn_and_no_input_grad():
    """Frozen BN parameters and an input that needs no gradient (a frozen backbone with CBAM training):
    the CBAM parameters' gradients as composed, no gradient for what does not ask for one."""
    spec = CBAMSpec.preset("official", 16)
    h, ct = _inputs(spec, ties=False)
    grads = []
    for composed in (True, False):
        bn, cbam = _modules(spec, "train", torch.float64)
        bn.weight.requires_grad_(False)
        bn.bias.requires_grad_(False)
        with fused.disabled() if composed else fused.kernels(True):
            assert fused_bn.applies(bn, cbam, h) == (not composed)
            y = cbam(bn(h)) if composed else fused_bn.bn_cbam_train(bn, cbam, h)
            (y * ct).sum().backward()
        assert bn.weight.grad is None and bn.bias.grad is None
        grads.append([p.grad for p in cbam.parameters()])
    assert _err(grads[1], grads[0]) <= TOLERANCES["float64"]["grad"]


def test_hooks_and_subclasses_keep_the_composed_ops():
    spec = CBAMSpec.preset("official", 16)
    bn, cbam = _modules(spec, "train", torch.float64)
    h = torch.randn(2, 16, 5, 5, dtype=torch.float64, requires_grad=True)
    assert fused_bn.applies(bn, cbam, h)
    handle = bn.register_forward_hook(lambda *a: None)
    assert not fused_bn.applies(bn, cbam, h)
    handle.remove()
    assert not fused_bn.applies(torch.nn.SyncBatchNorm(16, dtype=torch.float64), cbam, h)
    with fused.disabled():
        assert not fused_bn.applies(bn, cbam, h)


def _train_memory():
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import train_memory

    return train_memory


def test_resnet_block_takes_the_path_and_matches_composed():
    """A ResNet-50-CBAM (width 16) train step through the BN+CBAM Function equals the composed network's
    (float64: logits, every gradient, every BN buffer), and every block's last BN + CBAM took the Function."""
    spec = ResNetSpec(50, "imagenet", num_classes=10, width=16)
    torch.manual_seed(0)
    fast = ResNet(spec, dtype=torch.float64).train()
    slow = copy.deepcopy(fast)
    calls = []
    real = fused_bn.bn_cbam_train
    fused_bn.bn_cbam_train = lambda *a: calls.append(1) or real(*a)
    try:
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
        y1 = fast(x)
        y1.square().sum().backward()
    finally:
        fused_bn.bn_cbam_train = real
    with fused.disabled():
        y2 = slow(x)
        y2.square().sum().backward()
    assert len(calls) == len(spec.cbam_blocks()) == 16
    got = [y1.detach(), *(p.grad for p in fast.parameters()), *fast.buffers()]
    ref = [y2.detach(), *(p.grad for p in slow.parameters()), *slow.buffers()]
    assert _err(got, ref) <= TOLERANCES["float64"]["grad"], f"max abs err {_err(got, ref):.3e}"


def test_resnet_cbam_saves_about_what_resnet_saves():
    """Saved activations of one train forward (autograd's saved storages, parameters excluded): with the
    BN+CBAM Function, ResNet-50-CBAM saves the plain ResNet-50's tensors plus small maps only; the composed
    ops save two more full-size tensors per block."""
    tm = _train_memory()
    x = torch.randn(2, 3, 64, 64)
    saved = {}
    for name, attention, composed in (("plain", "none", False), ("fused", "cbam", False), ("composed", "cbam", True)):
        model = ResNet(ResNetSpec(50, "imagenet", num_classes=10, width=16, attention=attention)).train()
        with fused.disabled() if composed else fused.kernels(True):
            saved[name] = tm.saved_activation_bytes(model, x)
    # the small maps per block: gates, pooled vectors, spatial maps and indices, a few (B, 1, H, W) maps each
    assert saved["fused"] <= 1.10 * saved["plain"], saved
    assert saved["composed"] >= 1.3 * saved["plain"], saved  # the measure sees what the Function removes


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("with_bn", [False, True], ids=["cbam", "bn+cbam"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_nan_and_inf_follow_the_composed_ops(bad, with_bn, layout):
    """A NaN or inf in the input: the kernels lack torch's NaN rules for max pools, so such a call runs the
    torch ops; output and gradients hold NaN / inf exactly where the composed ops' do."""
    spec = CBAMSpec.preset("official", 16, tie_rule="split")
    h, ct = _inputs(spec, ties=False)
    h[1, 3, 2, 4] = bad
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    outs = []
    for composed in (True, False):
        bn, cbam = _modules(spec, "train", torch.float64)
        hh = h.clone().contiguous(memory_format=fmt).requires_grad_()
        with fused.disabled() if composed else fused.kernels(True):
            if with_bn:
                y = cbam(bn(hh)) if composed else fused_bn.bn_cbam_train(bn, cbam, hh)
            else:
                assert fused.applies(cbam, hh) == (not composed)
                y = cbam(hh)
            grads = torch.autograd.grad(y, [hh, *cbam.parameters()], ct)
        outs.append([y.detach(), *grads])
    y_ref = outs[0][0]
    assert not torch.isfinite(y_ref).all()  # the bad value reaches the output (train BN spreads it over the batch)
    for got, ref in zip(outs[1], outs[0], strict=True):
        assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.equal(torch.isinf(got), torch.isinf(ref))
        ok = torch.isfinite(ref)
        if ok.any():
            assert _err([got[ok]], [ref[ok]]) <= TOLERANCES["float64"]["grad"]


@pytest.mark.parametrize("tie", ["first", "split"])
@pytest.mark.parametrize("path", ["kernel", "channels_last"])
def test_bn_then_cbam_past_one_vector(tie, path):
    """C = 40 (the channels_last rows' masked tails) and 12x11 positions (the NCHW compare loops' 32 lanes),
    tied maxima, float64: the kernels against cbam(bn(h))."""
    spec = CBAMSpec.preset("official", 40, tie_rule=tie)
    g = torch.Generator().manual_seed(7)
    h = (torch.randn(3, 40, 12, 11, generator=g, dtype=torch.float64) * 2).round().clamp(min=-1)
    ct = torch.randn(h.shape, generator=g, dtype=torch.float64)
    ref = _run(spec, "train", h, ct, torch.float64, composed=True, steps=1)
    got = _run(spec, "train", h, ct, torch.float64, composed=False, path=path, steps=1)
    err = _err(got, ref)
    assert err <= TOLERANCES["float64"]["grad"], f"BN+CBAM kernels vs cbam(bn(h)), C=40: max abs err {err:.3e}"


@pytest.mark.parametrize("path", ["kernel", "channels_last"])
def test_kernels_run_in_both_layouts(path, monkeypatch):
    """With the kernels on, NCHW and channels_last h take `_BNThenCBAMKernels` (x never stored); the output and
    the input gradient keep h's layout."""
    spec = CBAMSpec.preset("official", 16)
    h, ct = _inputs(spec, ties=False)
    calls = []
    forward = fused_bn._BNThenCBAMKernels.forward
    monkeypatch.setattr(fused_bn._BNThenCBAMKernels, "forward",
                        staticmethod(lambda *a: calls.append(1) or forward(*a)))
    bn, cbam = _modules(spec, "train", torch.float64)
    hh = h.clone().contiguous(memory_format=torch.channels_last if path == "channels_last" else torch.contiguous_format)
    hh.requires_grad_()
    with fused.kernels(True):
        y = fused_bn.bn_cbam_train(bn, cbam, hh)
        (gh,) = torch.autograd.grad(y, [hh], ct)
    fmt = torch.channels_last if path == "channels_last" else torch.contiguous_format
    assert calls == [1]
    assert y.is_contiguous(memory_format=fmt) and gh.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("path", ["kernel", "channels_last"])
def test_float32_gradients_hold_for_a_large_mean_over_std(path):
    """BN input far from zero (mean / std ~ 1e3): the kernels' BN sums are centred on the mean, as the BN
    backward's sum of dy * (h - mean); uncentred float32 products lose ~6e-8 * mean / std of them.
    The input's and the BN's gradients, each relative to its own largest float64 value, and every gradient
    relative to the largest one (the parity measure)."""
    spec = CBAMSpec.preset("official", 16)
    h, ct = _inputs(spec, ties=False, seed=4)
    h = h + 1000.0
    ref = _run(spec, "train", h, ct, torch.float64, composed=True, steps=1)
    got = _run(spec, "train", h, ct, torch.float32, composed=False, path=path, steps=1)
    tol = TOLERANCES["float32"]["grad"]
    for i, what in ((1, "h"), (2, "BN weight"), (3, "BN bias")):
        err = _err(got[i : i + 1], ref[i : i + 1]) / ref[i].abs().max().item()
        assert err <= tol, f"{what} gradient: relative error {err:.3e}"
    n_out = 2 + len(list(CBAM(spec).parameters())) + 2
    scale = max(r.abs().max().item() for r in ref[1:n_out])
    assert _err(got[1:n_out], ref[1:n_out]) / scale <= tol


def test_a_nan_batchnorm_weight_takes_the_torch_ops():
    """Finite h but a NaN BN weight (a diverged run): the kernels' x would hold a NaN their max pools drop, so
    the pair runs the torch ops; NaN positions as the composed ops'."""
    spec = CBAMSpec.preset("official", 16)
    h, ct = _inputs(spec, ties=False)
    outs = []
    for composed in (True, False):
        bn, cbam = _modules(spec, "eval", torch.float64)
        with torch.no_grad():
            bn.weight[5] = float("nan")
        assert not fused_bn._finite_affine(bn)
        hh = h.clone().requires_grad_()
        with fused.disabled() if composed else fused.kernels(True):
            y = cbam(bn(hh)) if composed else fused_bn.bn_cbam_train(bn, cbam, hh)
            outs.append([y.detach(), *torch.autograd.grad(y, [hh, *cbam.parameters()], ct)])
    assert torch.isnan(outs[0][0]).any()
    for got, ref in zip(outs[1], outs[0], strict=True):
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
