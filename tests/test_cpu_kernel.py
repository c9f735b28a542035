"""The fused CPU inference kernel (`cbam_multi.torch.cpu_kernel`): it runs where it should, computes what the
composed ops compute (values against the float64 oracle are in parity_tests: ``torch-infer~oracle``), and
everything it cannot do stays on the composed path.

The kernel must build here (a C++ compiler and ninja are part of the project's set-up); these tests fail
rather than skip when it does not, unless ``CBAM_MULTI_CPU_KERNEL=0`` turns it off on purpose.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cbam_multi import CBAMSpec
from cbam_multi.errors import InputError
from cbam_multi.parity import CASES, TOLERANCES
from cbam_multi.reference import cbam_forward
from cbam_multi.torch import CBAM, cpu_kernel, export_weights

if not cpu_kernel._env_enabled():
    pytest.skip(f"{cpu_kernel.ENV_VAR}=0 turns the fused kernel off", allow_module_level=True)

DTYPES = {"float32": torch.float32, "float64": torch.float64}

def _kernel_computes(spec) -> bool:
    """The options the kernel implements (the rest is routed to the composed ops)."""
    return spec.variant == "standard" and not spec.no_spatial and spec.mlp_act == "relu"


KERNEL_CASES = [c for c in CASES if set(c.spec.channel_pools) <= {"avg", "max"} and _kernel_computes(c.spec)]
ROUTED_CASES = [c for c in CASES if not _kernel_computes(c.spec)]


def _model(spec, dtype=torch.float32, seed=0, bn_state=True):
    model = CBAM(spec, dtype=dtype, seed=seed).eval()
    if spec.has_norm and bn_state:  # non-trivial running statistics, so the folded BatchNorm is exercised
        with torch.no_grad():
            bn = model.spatial.bn
            bn.weight.fill_(0.8), bn.bias.fill_(-0.3), bn.running_mean.fill_(0.15), bn.running_var.fill_(1.7)
    return model


def test_kernel_builds():
    assert cpu_kernel.available(), f"the fused kernel did not build: {cpu_kernel._state['error']!r}"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c.id)
def test_fused_matches_composed_ops_and_oracle(case, dtype, layout):
    spec = case.spec
    model = _model(spec, DTYPES[dtype], seed=1)
    rng = np.random.default_rng(0)
    x64 = rng.normal(size=(case.batch, spec.channels, case.height, case.width))
    x = torch.tensor(x64, dtype=DTYPES[dtype])
    if layout == "channels_last":  # as users do: the module too (it restrides the 4-D conv weights)
        x = x.contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert cpu_kernel.applies(model, x)
        fused = model(x)
        with cpu_kernel.disabled():
            assert not cpu_kernel.applies(model, x)
            composed = model(x)
    assert fused.shape == composed.shape and fused.dtype == x.dtype
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert fused.is_contiguous(memory_format=fmt)  # the output keeps the input's memory format
    weights = {n: a.astype(np.float64) for n, a in export_weights(model).items()}
    y_ref, _ = cbam_forward(x64, weights, spec, train=False)
    tol = TOLERANCES[dtype]["y"]
    err_ref = float(np.max(np.abs(fused.double().numpy() - y_ref)))
    err_ops = (fused - composed).abs().max().item()
    assert err_ref <= tol, f"fused vs float64 oracle: max abs err {err_ref:.3e} > {tol:.0e}"
    assert err_ops <= tol, f"fused vs composed ops: max abs err {err_ops:.3e} > {tol:.0e}"


@pytest.mark.parametrize("case", ROUTED_CASES, ids=lambda c: c.id)
def test_options_the_kernel_lacks_run_the_composed_ops(case):
    """timm_light, no_spatial and other MLP activations: eager inference takes the composed ops, and
    they match the oracle (the kernel is never asked for maths it does not have)."""
    spec = case.spec
    assert not _kernel_computes(spec)
    model = _model(spec, torch.float64, seed=1)
    x64 = np.random.default_rng(0).normal(size=(case.batch, spec.channels, case.height, case.width))
    x = torch.tensor(x64)
    with torch.inference_mode():
        assert not cpu_kernel.applies(model, x)
        y = model(x)
    y_ref, _ = cbam_forward(x64, {n: a.astype(np.float64) for n, a in export_weights(model).items()}, spec)
    err = float(np.max(np.abs(y.numpy() - y_ref)))
    assert err <= TOLERANCES["float64"]["y"], f"max abs err {err:.3e}"


@pytest.mark.parametrize("bn_in_front", [False, True], ids=["cbam", "bn-then-cbam"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_nan_and_inf_propagate_like_the_composed_ops(layout, bn_in_front):
    """Alone, and with an eval BatchNorm folded in front (`bn_then_cbam_infer`: the maps' affine rows)."""
    model = _model(CBAMSpec.official(16))
    bn = torch.nn.BatchNorm2d(16).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 16, 6, 5)
    x[0, 3, 2, 1] = float("nan")  # sample 0: NaN reaches the pools, so the whole sample is NaN
    x[1, 5, 0, 0] = float("inf")
    x[2, 7, 4, 4] = -float("inf")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused = cpu_kernel.bn_then_cbam_infer(bn, model, x) if bn_in_front else model(x)
        with cpu_kernel.disabled():
            composed = model(bn(x) if bn_in_front else x)
    assert torch.equal(fused.isnan(), composed.isnan()) and fused[0].isnan().all()
    finite = composed.isfinite()
    assert torch.equal(fused.isfinite(), finite)
    torch.testing.assert_close(fused[finite], composed[finite])


def test_input_is_left_alone_and_errors_are_the_same():
    model = _model(CBAMSpec.seed(8))
    x = torch.randn(2, 8, 5, 5)
    before = x.clone()
    with torch.no_grad():
        model(x)
        assert torch.equal(x, before)
        with pytest.raises(InputError, match="8 channels on axis 1"):
            model(torch.randn(2, 5, 5, 8))  # NHWC by mistake: the same message as the composed path


def _runs_kernel(model, x) -> bool:
    with torch.no_grad():
        return cpu_kernel.applies(model, x)


def test_where_the_kernel_does_not_apply():
    spec = CBAMSpec.official(32)
    model = _model(spec)
    x = torch.randn(2, 32, 6, 6)
    assert _runs_kernel(model, x)
    # autograd records: parameters require grad and grad mode is on
    assert not cpu_kernel.applies(model, x)
    assert model(x).grad_fn is not None
    # frozen weights and an input without grad: nothing to record, so the kernel runs
    frozen = _model(spec).requires_grad_(False)
    assert cpu_kernel.applies(frozen, x) and frozen(x).grad_fn is None
    assert not _runs_kernel(model, x.to(torch.bfloat16))  # dtype (the composed path raises the mismatch)
    assert not _runs_kernel(_model(spec, torch.bfloat16), x.to(torch.bfloat16))
    assert not _runs_kernel(model, x[:, :, ::2])  # neither NCHW- nor channels_last-contiguous
    assert not _runs_kernel(model, x[0])  # rank 3: the composed path raises the rank error
    assert not _runs_kernel(model, x.to_sparse())  # sparse: the composed ops decide what happens
    assert not _runs_kernel(_model(CBAMSpec.seed(32, channel_pools=("avg", "lp"))), x)  # pools the kernel lacks
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert not cpu_kernel.applies(model, x)
    for name in ("channel", "spatial", "spatial.conv", "spatial.bn", "channel.fc1"):  # a hook must see its call
        handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: None)
        assert not _runs_kernel(model, x), name
        handle.remove()
    assert _runs_kernel(model, x)


def test_torch_func_transforms_run_the_composed_ops():
    model = _model(CBAMSpec.official(32))
    x = torch.randn(3, 2, 32, 5, 5)
    with torch.no_grad():
        batched = torch.func.vmap(model)(x)  # vmap over a leading axis of 2-sample batches
        with cpu_kernel.disabled():
            looped = torch.stack([model(xi) for xi in x])
    torch.testing.assert_close(batched, looped)
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss = lambda p, xin: torch.func.functional_call(model, p, (xin,)).sum()
    grads = torch.func.grad(loss)(params, x[0])
    with cpu_kernel.disabled():
        expected = torch.func.grad(loss)(params, x[0])
    assert set(grads) == set(params)
    for name in params:
        torch.testing.assert_close(grads[name], expected[name])
        assert grads[name].abs().sum() > 0, name


def test_batchnorm_train_mode_under_no_grad_updates_running_stats():
    model = _model(CBAMSpec.official(32)).train()
    x = torch.randn(4, 32, 6, 6)
    assert not _runs_kernel(model, x)
    before = model.spatial.bn.running_mean.clone()
    with torch.no_grad():
        model(x)
    assert not torch.equal(model.spatial.bn.running_mean, before)


def test_env_var_turns_it_off(monkeypatch):
    model, x = _model(CBAMSpec.seed(8)), torch.randn(2, 8, 4, 4)
    monkeypatch.setenv(cpu_kernel.ENV_VAR, "0")
    assert not _runs_kernel(model, x)
    monkeypatch.setenv(cpu_kernel.ENV_VAR, "1")
    assert _runs_kernel(model, x)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_torch_jit_trace_records_standard_ops():
    model = _model(CBAMSpec.seed(8))
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
    assert "cbam_multi::" not in str(traced.inlined_graph)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    def broken_build():
        raise RuntimeError("Error building extension\nfoo.cpp:1:2: error: no compiler here\nninja: build stopped")

    monkeypatch.setattr(cpu_kernel, "_build", broken_build)
    monkeypatch.setitem(cpu_kernel._state, "loaded", None)
    monkeypatch.setitem(cpu_kernel._state, "error", None)
    model, x = _model(CBAMSpec.seed(8)), torch.randn(2, 8, 4, 4)
    with pytest.warns(RuntimeWarning, match="error: no compiler here") as record, torch.no_grad():
        y = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        with torch.no_grad():
            assert torch.equal(model(x), y)
    assert len(record) == 1 and not cpu_kernel.available()
    with cpu_kernel.disabled(), torch.no_grad():
        assert torch.equal(model(x), y)  # the composed ops ran


_PORTABLE_CHECK = """
import torch
from cbam_multi import CBAMSpec
from cbam_multi.torch import CBAM, cpu_kernel
assert cpu_kernel.available(), cpu_kernel._state["error"]
worst = 0.0
for spec, shape in [(CBAMSpec.seed(64), (3, 64, 7, 7)), (CBAMSpec.timm(48), (2, 48, 13, 11)),
                    (CBAMSpec.paper(32, hidden_rule="round"), (2, 32, 5, 9))]:
    model = CBAM(spec, seed=1).eval()
    for cl in (False, True):
        x = torch.randn(shape)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        x[0, 3, 1, 2] = float("nan")
        with torch.no_grad():
            assert cpu_kernel.applies(model, x)
            fused = model(x)
            with cpu_kernel.disabled():
                composed = model(x)
        assert torch.equal(fused.isnan(), composed.isnan())
        ok = ~composed.isnan()
        worst = max(worst, (fused[ok] - composed[ok]).abs().max().item())
print("max abs err", worst)
assert worst <= 1e-5, worst
# the training kernels' generic loops too (float32: AVX-512 builds take their intrinsics versions)
from cbam_multi.torch import fused
worst = 0.0
for spec, shape in [(CBAMSpec.seed(40), (3, 40, 7, 6)), (CBAMSpec.timm(17), (2, 17, 5, 9))]:
    model = CBAM(spec, seed=1).train()
    for cl in (False, True):
        x = torch.randn(shape).round()  # ties over channels and over H, W
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        ct = torch.randn(shape)
        runs = []
        for composed in (False, True):
            xx = x.clone().requires_grad_()
            with fused.disabled() if composed else torch.enable_grad():
                assert fused.applies(model, xx) == (not composed)
                y = model(xx)
                runs.append([y, *torch.autograd.grad(y, [xx, *model.parameters()], ct)])
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(*runs)))
print("train max abs err", worst)
assert worst <= 1e-4, worst
"""


def test_portable_build_without_avx512(tmp_path):
    """The generic loops (what a CPU without AVX-512 runs): built for x86-64-v3 (AVX2) in a fresh process."""
    import platform
    import subprocess
    import sys

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64-v3 is an x86 target")
    env = {**os.environ, cpu_kernel.ARCH_ENV_VAR: "x86-64-v3"}
    done = subprocess.run([sys.executable, "-c", _PORTABLE_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_resnet_eval_folds_the_last_batchnorm_into_the_kernel(dtype, layout):
    """Eval-mode ResNet-CBAM: every block's last BatchNorm, and its shortcut add and ReLU (and a downsample's
    BatchNorm), run inside the kernel call (`bn_then_cbam_infer` with the residual: the BNs' and the block's
    outputs formed in cache), and the network computes what the composed ops compute."""
    from cbam_multi import ResNetSpec
    from cbam_multi.torch.models import ResNet

    td = DTYPES[dtype]
    model = ResNet(ResNetSpec(50, "imagenet", num_classes=10, width=16), dtype=td).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():  # BN statistics and scales away from the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    x = torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64).to(td)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    calls = []
    real = cpu_kernel.bn_then_cbam_infer

    def recorded(*a, **kw):
        calls.append((a[3] is not None, a[4] is not None, kw.get("overwrite", False)))
        return real(*a, **kw)

    cpu_kernel.bn_then_cbam_infer = recorded
    held = []  # a hook holding layer2.0's last conv output: that block's kernel must not write over it
    hook = model.layer2[0].conv3.register_forward_hook(lambda mod, args, out: held.append((out, out.clone())))
    try:
        with torch.inference_mode():
            got = model(x)
            with cpu_kernel.disabled():
                ref = model(x)
    finally:
        cpu_kernel.bn_then_cbam_infer = real
        hook.remove()
    # once per block, with the shortcut (a stage's first block: its downsample's BN folded), the output written
    # over the last conv's (except where a hook holds it), not when disabled()
    assert calls == [(True, i in (0, 3, 7, 13), i != 3) for i in range(16)], calls
    assert torch.equal(held[0][0], held[0][1]), "the kernel wrote over a conv output a hook holds"
    err = (got - ref).abs().max().item()
    assert err <= TOLERANCES[dtype]["y"], f"folded BN + kernel vs composed: max abs err {err:.3e}"
    bn = model.layer1[0].bn3
    h = torch.randn(2, bn.num_features, 4, 4, dtype=td)
    with torch.no_grad():
        assert cpu_kernel.bn_then_cbam_applies(bn, model.layer1[0].cbam, h)
        model.train()
        assert not cpu_kernel.bn_then_cbam_applies(bn, model.layer1[0].cbam, h)  # train BN: batch statistics
    model.eval()
    assert not cpu_kernel.bn_then_cbam_applies(bn, model.layer1[0].cbam, h)  # autograd records: the training paths


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_residual_add_and_relu_in_the_kernel(dtype, layout):
    """``cbam_infer(..., residual=r)`` is ``relu(cbam(x) + r)`` (a NaN in r stays NaN, as torch.relu keeps
    it), with ``residual_affine`` ``relu(cbam(x) + bn(r))`` for an eval BN; a residual of another shape is
    refused by the kernel's own check."""
    td = DTYPES[dtype]
    model = _model(CBAMSpec.official(16), dtype=td).eval()
    g = torch.Generator().manual_seed(4)
    x, r = (torch.randn(3, 16, 9, 7, generator=g, dtype=torch.float64).to(td) for _ in range(2))
    r[0, 2, 3, 4] = float("nan")
    if layout == "channels_last":
        x, r = x.contiguous(memory_format=torch.channels_last), r.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert cpu_kernel.applies(model, x)
        got = cpu_kernel.cbam_infer(model, x, residual=r)
        with cpu_kernel.disabled():
            ref = torch.relu(model(x) + r)
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        err = (got - ref).nan_to_num().abs().max().item()
        assert err <= TOLERANCES[dtype]["y"], f"relu(cbam(x) + r) in the kernel vs composed: max abs err {err:.3e}"
        bn = torch.nn.BatchNorm2d(16, dtype=td).eval()
        bn.running_mean.normal_(generator=g)
        bn.running_var.uniform_(0.5, 1.5, generator=g)
        bn.weight.uniform_(-1.5, 1.5, generator=g)
        got = cpu_kernel.cbam_infer(model, x, residual=r, residual_affine=cpu_kernel.eval_bn_affine(bn))
        with cpu_kernel.disabled():
            ref = torch.relu(model(x) + bn(r))
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        err = (got - ref).nan_to_num().abs().max().item()
        assert err <= TOLERANCES[dtype]["y"], f"relu(cbam(x) + bn(r)) in the kernel vs composed: max abs err {err:.3e}"
        with pytest.raises(RuntimeError, match="residual must be"):
            cpu_kernel.cbam_infer(model, x, residual=r[:, :, :-1])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_overwrite_writes_the_output_over_the_input(dtype, layout):
    """``overwrite=True`` (the in-place op ``cbam_infer_``, for a ResNet block's last conv output) gives the
    out-of-place op's values exactly, in the input's own storage: with a BN in front and a residual, with a
    residual that is the input itself (taken before it is overwritten), and for strides the kernel does not read
    (computed on a copy and written back)."""
    td = DTYPES[dtype]
    model = _model(CBAMSpec.official(16), dtype=td).eval()
    g = torch.Generator().manual_seed(5)
    x, r = (torch.randn(3, 16, 9, 7, generator=g, dtype=torch.float64).to(td) for _ in range(2))
    if layout == "channels_last":
        x, r = x.contiguous(memory_format=torch.channels_last), r.contiguous(memory_format=torch.channels_last)
    scale, shift = torch.rand(16, generator=g, dtype=td) + 0.5, torch.randn(16, generator=g, dtype=td)
    with torch.no_grad():
        for args in [((scale, shift), r), (None, None)]:
            want = cpu_kernel.cbam_infer(model, x, *args)
            h = x.clone()
            got = cpu_kernel.cbam_infer(model, h, *args, overwrite=True)
            assert got is h and torch.equal(got, want), f"in place vs out of place: max abs err {(got - want).abs().max():.3e}"
        h = x.clone()
        want = cpu_kernel.cbam_infer(model, x, residual=x)
        assert torch.equal(cpu_kernel.cbam_infer(model, h, residual=h, overwrite=True), want)
        wide = torch.randn(3, 16, 9, 14, generator=g, dtype=torch.float64).to(td)
        view = wide[..., ::2]  # every other column: neither NCHW-contiguous nor channels_last
        want = cpu_kernel.cbam_infer(model, view.contiguous())
        cpu_kernel.cbam_infer(model, view, overwrite=True)
        assert torch.equal(wide[..., ::2], want) and torch.equal(view, want)
