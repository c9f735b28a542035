"""Under torch.compile the CBAM block (and a ResNet block's last BN with it) calls the CPU kernels as custom
ops (`cbam_multi.torch.compiled`) and computes what the composed eager ops compute.

One case table (CBAM alone or BN then CBAM, presets, tie rules, tied inputs, BN modes, layouts) crossed with
dtypes: two compiled train calls against two eager composed calls, comparing outputs, the gradients of the
input and of every parameter, and every buffer (running statistics, ``num_batches_tracked``). Most cases
compile with the ``aot_eager`` backend (dynamo, AOTAutograd and functionalization: everything but
inductor's code generation, which the ops are opaque to); parity_tests/ compile their torch.compile cases
with inductor, where the ops apply too (the "compile~eager" rows: outputs, gradients, BN statistics).
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch._dynamo")

from cbam_multi import CBAMSpec, ResNetSpec
from cbam_multi.parity import TOLERANCES
from cbam_multi.torch import CBAM, cpu_kernel, fused, fused_bn
from cbam_multi.torch.models import ResNet

pytestmark = pytest.mark.skipif(not cpu_kernel.available(), reason="the CPU kernel library did not build")

BN_MODES = {
    "train": dict(train=True),
    "train-cumulative": dict(train=True, momentum=None),
    "eval": dict(train=False),
    "batch-stats-only": dict(train=True, track_running_stats=False),
}
# (id, preset, tie rule, tied input values, block BN mode or None for CBAM alone, layout)
CASES = [
    ("alone-official-first", "official", "first", False, None, "nchw"),
    ("alone-timm-split-ties", "timm", "split", True, None, "nchw"),
    ("alone-official-split-ties-cl", "official", "split", True, None, "channels_last"),
    ("alone-official-eval", "official", "first", False, "eval-cbam", "nchw"),
    *[(f"bn-{m}-official-first", "official", "first", False, m, "nchw") for m in BN_MODES],
    ("bn-train-timm-split-ties", "timm", "split", True, "train", "nchw"),
    ("bn-train-official-first-ties", "official", "first", True, "train", "nchw"),
    ("bn-train-official-split-ties-cl", "official", "split", True, "train", "channels_last"),
]
DTYPES = ["float64", "float32"]
# float64 for every case (agreement to rounding); float32 (within the dtype's tolerance) for the cases that
# differ in kind: the BN modes differ only in bookkeeping that float64 already pins down
PARAMS = [pytest.param(c, d, id=f"{c[0]}-{d}") for c in CASES for d in DTYPES
          if d == "float64" or c[4] not in BN_MODES or c[4] == "train"]


def _modules(preset, tie, mode, dtype):
    spec = CBAMSpec.preset(preset, 16, tie_rule=tie)
    torch.manual_seed(0)
    cbam = CBAM(spec, dtype=torch.float64, seed=1)
    bn = None
    if mode in BN_MODES:
        opts = BN_MODES[mode]
        bn = torch.nn.BatchNorm2d(16, momentum=opts.get("momentum", 0.1),
                                  track_running_stats=opts.get("track_running_stats", True), dtype=torch.float64)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.1)
            if bn.track_running_stats:
                bn.running_mean.normal_(0, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
                bn.num_batches_tracked.fill_(3)
        bn.train(opts["train"])
    cbam.train(mode != "eval-cbam" and BN_MODES.get(mode, {}).get("train", True))
    model = torch.nn.Sequential(*([] if bn is None else [bn]), cbam)
    return model.to(getattr(torch, dtype))


class _Pair(torch.nn.Module):
    """BN then CBAM the way ResNet's block runs them (its ``last_bn_then_cbam``), for one module pair."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, h):
        from cbam_multi.torch import compiled

        bn, cbam = (self.model[0], self.model[1]) if len(self.model) == 2 else (None, self.model[0])
        if compiled.applies(bn, cbam, h):
            return compiled.bn_cbam(bn, cbam, h)
        return cbam(h if bn is None else bn(h))


def _graph_targets(backend_name, seen):
    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.lookup_backend(backend_name)(gm, example_inputs)

    return backend


def _steps(model, h, ct, compiled_backend=None, seen=None):
    params = list(model.parameters())
    run = model
    if compiled_backend is not None:
        torch._dynamo.reset()
        run = torch.compile(_Pair(model), fullgraph=True, backend=_graph_targets(compiled_backend, seen))
    outs = []
    for _ in range(2):  # twice: running statistics and num_batches_tracked move twice
        hh = h.clone().requires_grad_()
        y = run(hh)
        outs += [y.detach(), *torch.autograd.grad(y, [hh, *params], ct)]
    return outs + [b.clone() for b in model.buffers()]


def _inputs(ties, dtype, layout):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(4, 16, 7, 6, generator=g, dtype=torch.float64)
    if ties:  # repeated values per channel: tied maxima over H, W and over channels
        h = (h * 2).round().clamp(min=-1)
    ct = torch.randn(h.shape, generator=g, dtype=torch.float64)
    h, ct = h.to(getattr(torch, dtype)), ct.to(getattr(torch, dtype))
    if layout == "channels_last":
        h = h.contiguous(memory_format=torch.channels_last)
    return h, ct


def _err(got, ref, scale_grads=False):
    errs = []
    for a, b in zip(got, ref, strict=True):
        a, b = a.double(), b.double()
        scale = max(b.abs().max().item(), 1.0) if scale_grads and b.is_floating_point() else 1.0
        errs.append((a - b).abs().max().item() / scale)
    return max(errs)


@pytest.mark.parametrize("case,dtype", PARAMS)
def test_compiled_ops_match_composed_eager(case, dtype):
    _, preset, tie, ties, mode, layout = case
    model = _modules(preset, tie, mode, dtype)
    reference = copy.deepcopy(model).double()
    h, ct = _inputs(ties, dtype, layout)
    seen: list = []
    with fused.kernels(True):
        got = _steps(model, h, ct, "aot_eager", seen)
    with fused.disabled(), cpu_kernel.disabled():
        ref = _steps(reference, h.double(), ct.double())
    assert any("bn_cbam_fwd" in t for t in seen), f"the compiled graph did not call the op: {sorted(set(seen))}"
    tol = TOLERANCES[dtype]
    err = _err(got, ref, scale_grads=dtype != "float64")
    assert err <= tol["grad"], f"compiled ops vs composed eager ({dtype}): max err {err:.3e}"


def test_compiled_inference_calls_the_inference_kernel():
    """No autograd (``torch.inference_mode``), BNs in eval mode: the compiled ResNet block calls the
    inference kernel with the BN folded in, and its output is the composed eager one."""
    spec = ResNetSpec(18, "cifar", num_classes=10, width=16)
    model = ResNet(spec, dtype=torch.float64).eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    seen: list = []
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=_graph_targets("aot_eager", seen))
    with torch.inference_mode():
        y = compiled(x)
        with fused.disabled(), cpu_kernel.disabled():
            ref = model(x)
    assert sum("cbam_infer" in t for t in seen) == len(spec.cbam_blocks()), sorted(set(seen))
    err = (y - ref).abs().max().item()
    assert err <= TOLERANCES["float64"]["y"], f"compiled inference vs composed: max abs err {err:.3e}"


def test_switches_and_non_finite_input():
    """The kernels switched off: the compiled graph traces the composed ops. A NaN in the input: the op
    runs torch's ops inside (torch's NaN rules), so the output's NaNs are where the composed ops put them."""
    model = _modules("official", "first", "train", "float64")
    h, _ = _inputs(False, "float64", "nchw")
    seen: list = []
    with fused.kernels(False):
        torch._dynamo.reset()
        torch.compile(_Pair(model), fullgraph=True, backend=_graph_targets("aot_eager", seen))(h.requires_grad_())
    assert seen and not any("bn_cbam_fwd" in t for t in seen)
    h = h.detach().clone()
    h[1, 3, 2, 2] = float("nan")
    seen.clear()
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    y = torch.compile(_Pair(model), fullgraph=True, backend=_graph_targets("aot_eager", seen))(h.requires_grad_())
    with fused.disabled():
        ref = reference(h)
    assert any("bn_cbam_fwd" in t for t in seen)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.allclose(y, ref, equal_nan=True, atol=TOLERANCES["float64"]["y"], rtol=0)


def _compiled_step_vs_composed(model, x):
    """One loss-gradient step of ``model`` compiled (fullgraph, aot_eager) and of a copy with the composed ops
    -> (calls of the forward op in the compiled graph, max abs difference of output, gradients and buffers)."""
    reference = copy.deepcopy(model)
    seen: list = []
    torch._dynamo.reset()
    y = torch.compile(model, fullgraph=True, backend=_graph_targets("aot_eager", seen))(x)
    y.square().sum().backward()
    with fused.disabled():
        ref = reference(x)
        ref.square().sum().backward()
    got = [y.detach(), *(p.grad for p in model.parameters()), *model.buffers()]
    want = [ref.detach(), *(p.grad for p in reference.parameters()), *reference.buffers()]
    return sum("bn_cbam_fwd" in t for t in seen), _err(got, want)


def test_compiled_resnet_train_step_matches_composed():
    """A ResNet-18-CBAM (width 16, 32x32) train step under torch.compile (fullgraph; ``aot_eager``: inductor
    takes ~30 s to compile the network here, and parity_tests' compile rows run inductor with the ops): every
    block's last BN + CBAM is the op pair, and logits, every gradient and every buffer match the composed
    network."""
    spec = ResNetSpec(18, "cifar", num_classes=10, width=16)
    torch.manual_seed(0)
    calls, err = _compiled_step_vs_composed(ResNet(spec, dtype=torch.float64).train(),
                                            torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert calls == len(spec.cbam_blocks())
    assert err <= TOLERANCES["float64"]["grad"], f"compiled ResNet vs composed: max abs err {err:.3e}"


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_op_pair_takes_channels_last_buffers(mode, monkeypatch):
    """Inductor may hand the ops channels_last buffers where the traced model was NCHW (they are tagged
    flexible_layout): called so, the pair runs the channels_last BN + CBAM kernels, returns
    channels_last outputs (what its fake implementation promises) and computes what the composed ops do."""
    from cbam_multi.torch import compiled

    assert compiled.register()
    model = _modules("official", "first", mode, "float64")
    reference = copy.deepcopy(model)
    h, ct = _inputs(True, "float64", "channels_last")
    params = list(model.parameters())
    hh = h.clone().requires_grad_()
    kernels = []
    forward = fused_bn._BNThenCBAMKernels.forward
    monkeypatch.setattr(fused_bn._BNThenCBAMKernels, "forward", staticmethod(lambda *a: kernels.append(1) or forward(*a)))
    y = compiled.bn_cbam(model[0], model[1], hh)  # outside torch.compile: the op pair itself
    assert kernels == [1], "the op pair runs the channels_last BN + CBAM kernels"
    assert y.is_contiguous(memory_format=torch.channels_last)
    got = [y.detach(), *torch.autograd.grad(y, [hh, *params], ct), *(b.clone() for b in model.buffers())]
    assert got[1].is_contiguous(memory_format=torch.channels_last)
    hr = h.clone().requires_grad_()
    with fused.disabled():
        yr = reference(hr)
    want = [yr.detach(), *torch.autograd.grad(yr, [hr, *reference.parameters()], ct), *reference.buffers()]
    err = _err(got, want)
    assert err <= TOLERANCES["float64"]["grad"], f"op pair on channels_last vs composed: max abs err {err:.3e}"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("with_bn", [True, False], ids=["bn-cbam", "cbam"])
def test_ops_pass_torch_library_opcheck(layout, with_bn):
    """torch.library.opcheck: schema, autograd registration, fake implementation against the real one (shapes
    and strides, both layouts) and AOT dispatch with dynamic shapes, for the training op and the inference op."""
    from cbam_multi.torch import compiled

    assert compiled.register()
    model = _modules("official", "first", "train" if with_bn else None, "float64")
    bn, cbam = (model[0], model[1]) if with_bn else (None, model[0])
    h, _ = _inputs(False, "float64", layout)
    h.requires_grad_()
    sbn = cbam.spatial.bn
    results = torch.library.opcheck(torch.ops.cbam_multi.bn_cbam_fwd.default,
                                    (h, *compiled._compress(compiled.op_tensors(bn, cbam)), compiled._config(bn, cbam)))
    assert set(results.values()) == {"SUCCESS"}, results
    cbam.eval()
    x = h.detach()
    scale, shift = torch.rand(16, dtype=torch.float64) + 0.5, torch.randn(16, dtype=torch.float64)
    args = (x, cbam.channel.fc1.weight.detach().reshape(cbam.spec.hidden, 16), cbam.channel.fc1.bias,
            cbam.channel.fc2.weight.detach().reshape(16, cbam.spec.hidden), cbam.channel.fc2.bias, [0, 1],
            cbam.spatial.conv.weight.detach(), cbam.spatial.conv.bias, sbn.weight.detach(), sbn.bias.detach(),
            sbn.running_mean, sbn.running_var, sbn.eps, 0, False, scale, shift, torch.randn_like(x))
    results = torch.library.opcheck(torch.ops.cbam_multi.cbam_infer.default, args,
                                    test_utils=("test_schema", "test_faketensor"))
    assert set(results.values()) == {"SUCCESS"}, results


def test_export_keeps_standard_ops():
    """torch.export (and the exporters built on it) traces the composed ops: an exported program must run
    where this package's kernel library is not loaded."""
    model = _modules("official", "first", "eval-cbam", "float64")[0]
    h, _ = _inputs(False, "float64", "nchw")
    program = torch.export.export(model, (h,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("cbam_multi" in t for t in targets), sorted(targets)
    err = (program.module()(h) - model(h)).abs().max().item()
    assert err <= TOLERANCES["float64"]["y"], f"exported vs eager: max abs err {err:.3e}"


@pytest.mark.parametrize("preset", ["seed", "official"])
def test_compiled_mnist_net_train_step_matches_composed(preset):
    """The MNIST CNN compiles as one graph (fullgraph: its input check causes no graph break) and its CBAM
    blocks take the op pair; loss gradients match the composed eager network."""
    from cbam_multi.models import MNISTNetSpec
    from cbam_multi.torch.models import MNISTNet

    torch.manual_seed(0)
    model = MNISTNet(MNISTNetSpec(cbam_preset=preset), dtype=torch.float64).train()
    calls, err = _compiled_step_vs_composed(model, torch.randn(4, 1, 28, 28, dtype=torch.float64))
    assert calls == len(model.spec.conv_channels)
    assert err <= TOLERANCES["float64"]["grad"], f"compiled MNIST net vs composed: max abs err {err:.3e}"
