"""Under torch.compile the CBAM block (and a ResNet block's last BN with it) calls the CPU kernels
(`cbam_multi.torch.compiled`: training passes as custom ops in traced code, `compiled_train`; inference as
one op) and computes what the composed eager ops compute.

One case table (CBAM alone or BN then CBAM, presets, tie rules, tied inputs, BN modes, layouts) crossed with
dtypes: two compiled train calls against two eager composed calls, comparing outputs, the gradients of the
input and of every parameter, and every buffer (running statistics, ``num_batches_tracked``). Most cases
compile with the ``aot_eager`` backend (dynamo, AOTAutograd and functionalization: everything but
inductor's code generation, to which the kernel ops are opaque); parity_tests/ compile their torch.compile cases
with inductor, where the ops apply too (the "compile~eager" rows: outputs, gradients, BN statistics).
"""

from __future__ import annotations

import copy
import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch._dynamo")

from cbam_multi import CBAMSpec, ResNetSpec
from cbam_multi.parity import TOLERANCES
from cbam_multi.torch import CBAM, cpu_kernel, fused
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
        # the autograd Functions' bodies are subgraphs (dynamo's autograd_function_apply)
        for module in gm.modules():
            if isinstance(module, torch.fx.GraphModule):
                seen.extend(str(n.target) for n in module.graph.nodes if n.op == "call_function")
        return torch._dynamo.lookup_backend(backend_name)(gm, example_inputs)

    return backend


def _kernel_calls(seen) -> int:
    """How many blocks' kernel passes the traced graphs call (one channel-maps pass per block)."""
    return sum(t.startswith("cbam_multi.c_maps") for t in seen)


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
    assert _kernel_calls(seen) == 1, f"the compiled graph did not call the kernels: {sorted(set(seen))}"
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


def test_compiled_inference_writes_the_block_output_over_the_conv_output():
    """Under inductor a block's tail is the in-place op on its last conv's output (nothing else reads it), and
    inductor really runs it in place: the op writes the conv's buffer, which the graph returns, with no copy."""
    from torch._inductor.utils import run_and_get_code

    block = ResNet(ResNetSpec(50, "imagenet", num_classes=10, width=16)).eval().layer1[0]  # with a downsample
    x = torch.randn(2, 16, 8, 8)
    torch._dynamo.reset()
    with torch.inference_mode():
        y, (code,) = run_and_get_code(torch.compile(block, fullgraph=True), x)
        with fused.disabled(), cpu_kernel.disabled():
            ref = block(x)
    call = re.search(r"torch\.ops\.cbam_multi\.cbam_infer_\.default\((buf\d+),", code)
    assert call and f"return ({call.group(1)}, )" in code, "the tail is not the in-place op on the returned buffer"
    assert "clone" not in code and "copy_" not in code, "inductor copied the conv output instead of writing over it"
    err = (y - ref).abs().max().item()
    assert err <= TOLERANCES["float32"]["y"], f"compiled block vs composed: max abs err {err:.3e}"


def test_switches_off_trace_the_composed_ops():
    """The kernels switched off: the compiled graph traces the composed ops (dynamo's graph decides it; the
    ``eager`` backend runs that graph without AOTAutograd's tracing of the composed backward)."""
    model = _modules("official", "first", "train", "float64")
    h, _ = _inputs(False, "float64", "nchw")
    seen: list = []
    with fused.kernels(False):
        torch._dynamo.reset()
        torch.compile(_Pair(model), fullgraph=True, backend=_graph_targets("eager", seen))(h.requires_grad_())
    assert seen and _kernel_calls(seen) == 0


@pytest.mark.parametrize("mode,layout", [(None, "nchw"), (None, "channels_last"), ("train", "nchw"),
                                         ("train", "channels_last")])
def test_non_finite_input_like_the_composed_ops(mode, layout):
    """NaN and infinities in the input: the compiled kernels put NaN and infinities in the output and in every
    gradient where the composed ops put them, and the finite values agree. CBAM alone uses the seed preset (no
    spatial BN, so the samples stay apart); with a BN in train mode the batch statistics spread them."""
    model = _modules("seed" if mode is None else "official", "first", mode, "float64")
    reference = copy.deepcopy(model)
    h, ct = _inputs(False, "float64", layout)
    h = h.clone()
    h[0, 2, 1, 3] = float("nan")
    h[1, 0, 0, 5] = float("inf")
    h[2, 4, 4, 2] = -float("inf")
    seen: list = []
    got = _steps(model, h, ct, "aot_eager", seen)
    with fused.disabled():
        ref = _steps(reference, h, ct)
    assert _kernel_calls(seen) == 1
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isfinite(), b.isfinite())
        finite = b.isfinite()
        err = (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0
        assert err <= TOLERANCES["float64"]["grad"], f"finite values vs composed: max abs err {err:.3e}"


def _compiled_step_vs_composed(model, x):
    """One loss-gradient step of ``model`` compiled (fullgraph, aot_eager) and of a copy with the composed ops
    -> (blocks calling the kernel passes in the compiled graph, max abs difference of output, gradients and buffers)."""
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
    return _kernel_calls(seen), _err(got, want)


def test_compiled_resnet_train_step_matches_composed():
    """A ResNet-18-CBAM (width 16, 32x32) train step under torch.compile (fullgraph; ``aot_eager``: inductor
    takes ~30 s to compile the network here, and parity_tests' compile rows run inductor with the ops): every
    block's last BN + CBAM calls the kernel passes, and logits, every gradient and every buffer match the composed
    network."""
    spec = ResNetSpec(18, "cifar", num_classes=10, width=16)
    torch.manual_seed(0)
    calls, err = _compiled_step_vs_composed(ResNet(spec, dtype=torch.float64).train(),
                                            torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert calls == len(spec.cbam_blocks())
    assert err <= TOLERANCES["float64"]["grad"], f"compiled ResNet vs composed: max abs err {err:.3e}"


@pytest.mark.parametrize("mode", [None, "train", "eval"], ids=["cbam", "bn-train", "bn-eval"])
def test_kernel_passes_take_channels_last_buffers(mode):
    """Inductor may hand the kernel ops channels_last buffers where the traced model was NCHW (they are tagged
    flexible_layout), and a cotangent in another layout than the input: run on such tensors, the passes call
    the channels_last kernels, return channels_last results (what their fake implementations promise) and
    compute what the composed ops do."""
    from cbam_multi.torch import compiled, compiled_train

    assert compiled.register()
    model = _modules("official", "first", mode, "float64")
    bn, cbam = (model[0], model[1]) if mode else (None, model[0])
    reference = copy.deepcopy(model)
    h, ct = _inputs(True, "float64", "channels_last")
    hh = h.clone().requires_grad_()
    y = compiled_train.bn_cbam_traced(bn, cbam, hh)  # outside torch.compile: the stages run as they are
    assert y.is_contiguous(memory_format=torch.channels_last)
    got = [y.detach(), *torch.autograd.grad(y, [hh, *model.parameters()], ct.contiguous()),
           *(b.clone() for b in model.buffers())]
    assert got[1].is_contiguous(memory_format=torch.channels_last)
    hr = h.clone().requires_grad_()
    with fused.disabled():
        yr = reference(hr)
    want = [yr.detach(), *torch.autograd.grad(yr, [hr, *reference.parameters()], ct), *reference.buffers()]
    err = _err(got, want)
    assert err <= TOLERANCES["float64"]["grad"], f"kernel passes on channels_last vs composed: max abs err {err:.3e}"


def _recorded_op_calls(monkeypatch, bn, cbam, h, ct) -> dict:
    """The arguments each op `bn_cbam_traced` calls in traced code (``cbam_multi::c_*``, ``bn_pool_finish``) got in
    one forward and backward."""
    from cbam_multi.torch import compiled_train

    calls: dict = {}

    class Recorder:
        def __getattr__(self, name):
            op = getattr(torch.ops.cbam_multi, name)
            return lambda *args: calls.setdefault(name, args) and op(*args)

    monkeypatch.setattr(compiled_train, "_ops", Recorder())
    y = compiled_train.bn_cbam_traced(bn, cbam, h)
    torch.autograd.grad(y, [h, *cbam.parameters()], ct)
    return calls


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("with_bn", [True, False], ids=["bn-cbam", "cbam"])
def test_ops_pass_torch_library_opcheck(layout, with_bn, monkeypatch):
    """torch.library.opcheck on the arguments a training step gives each kernel op (schema, autograd
    registration, fake implementation against the real one: shapes and strides, both layouts, and AOT dispatch
    with dynamic shapes), and on the inference op."""
    from cbam_multi.torch import compiled

    assert compiled.register()
    model = _modules("official", "first", "train" if with_bn else None, "float64")
    bn, cbam = (model[0], model[1]) if with_bn else (None, model[0])
    h, ct = _inputs(False, "float64", layout)
    calls = _recorded_op_calls(monkeypatch, bn, cbam, h.requires_grad_(), ct)
    family = {"c_bn_pool", "c_bn_grad_s", "c_bn_plane_sums", "c_bn_grad_h"} if with_bn else {
        "c_pool_hw", "c_grad_s", "c_grad_ca", "c_grad_x"}
    assert set(calls) == family | {"c_maps", "c_gate"} | ({"bn_pool_finish"} if with_bn else set()), sorted(calls)
    maps = torch.randn(4, 2, 7, 6, dtype=torch.float64)
    calls["spatial_conv_fwd"] = (maps, cbam.spatial.conv.weight)
    calls["spatial_conv_bwd"] = (torch.randn(4, 1, 7, 6, dtype=torch.float64), maps, cbam.spatial.conv.weight)
    for name, args in calls.items():
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        results = torch.library.opcheck(getattr(torch.ops.cbam_multi, name).default, args)
        assert set(results.values()) == {"SUCCESS"}, (name, results)
    sbn = cbam.spatial.bn
    cbam.eval()
    x = h.detach()
    scale, shift = torch.rand(16, dtype=torch.float64) + 0.5, torch.randn(16, dtype=torch.float64)
    args = (x, cbam.channel.fc1.weight.detach().reshape(cbam.spec.hidden, 16), cbam.channel.fc1.bias,
            cbam.channel.fc2.weight.detach().reshape(16, cbam.spec.hidden), cbam.channel.fc2.bias, [0, 1],
            cbam.spatial.conv.weight.detach(), cbam.spatial.conv.bias, sbn.weight.detach(), sbn.bias.detach(),
            sbn.running_mean, sbn.running_var, sbn.eps, 0, False, scale, shift, torch.randn_like(x))
    for op, op_args in [(torch.ops.cbam_multi.cbam_infer, args), (torch.ops.cbam_multi.cbam_infer_, (x.clone(), *args[1:]))]:
        results = torch.library.opcheck(op.default, op_args, test_utils=("test_schema", "test_faketensor"))
        assert set(results.values()) == {"SUCCESS"}, (op, results)


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
    blocks call the kernel passes; loss gradients match the composed eager network."""
    from cbam_multi.models import MNISTNetSpec
    from cbam_multi.torch.models import MNISTNet

    torch.manual_seed(0)
    model = MNISTNet(MNISTNetSpec(cbam_preset=preset), dtype=torch.float64).train()
    calls, err = _compiled_step_vs_composed(model, torch.randn(4, 1, 28, 28, dtype=torch.float64))
    assert calls == len(model.spec.conv_channels)
    assert err <= TOLERANCES["float64"]["grad"], f"compiled MNIST net vs composed: max abs err {err:.3e}"
