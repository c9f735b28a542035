"""The torch backend's eager speed paths compute exactly what the plain ops compute:

* ``functional.amax`` (custom autograd backward) gives bit-identical values and gradients to ``torch.amax``,
  ties included (the gradient is shared equally among tied maxima);
* ``CBAM.forward`` without autograd, where the fused CPU kernel does not run (here: turned off with
  ``cpu_kernel.disabled()``; e.g. bf16, hooks, BatchNorm in train mode), applies the spatial gate in
  place on its own intermediate: the result is bit-identical to the autograd path, the caller's input is
  untouched, and hooks still see the un-gated intermediate. (The kernel: tests/test_cpu_kernel.py.)
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from cbam_multi import CBAMSpec
from cbam_multi.torch import CBAM, cpu_kernel, fused
from cbam_multi.torch.functional import amax

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims,keepdim", [((2, 3), False), ((2, 3), True), ((1,), True)])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_amax_matches_torch_amax_bitwise(dtype, dims, keepdim, ties, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, 6, generator=g).to(dtype)
    if ties:  # whole slots of zeros and repeated integers: many tied maxima
        x = torch.relu(x * 2).round()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a.amax(dims, keepdim=keepdim), amax(b, dims, keepdim)
    assert ya.shape == yb.shape and torch.equal(_bits(ya), _bits(yb))
    ct = torch.randn(ya.shape, generator=g).to(dtype)
    ya.backward(ct)
    yb.backward(ct)
    assert torch.equal(_bits(a.grad), _bits(b.grad))


def test_amax_gradcheck_and_no_grad_path():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: amax(t, (2, 3)), (x,))
    assert torch.autograd.gradgradcheck(lambda t: amax(t, (1,), True), (x,))
    with torch.no_grad():
        assert amax(x, (2, 3)).grad_fn is None


@pytest.mark.parametrize("preset", ["seed", "official", "timm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inplace_inference_path_is_exact_and_leaves_input_alone(preset, dtype):
    model = CBAM(CBAMSpec.preset(preset, 16), dtype=dtype, seed=3).eval()
    x = torch.randn(4, 16, 9, 7, dtype=dtype)
    x_before = x.clone()
    with fused.disabled():  # parameters require grad: the out-of-place composed autograd path
        with_grad = model(x)
    assert with_grad.requires_grad
    with torch.inference_mode(), cpu_kernel.disabled():
        fast = model(x)
    with torch.no_grad(), cpu_kernel.disabled():
        fast2 = model(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(_bits(fast), _bits(with_grad.detach()))
    torch.testing.assert_close(fast2, fast)  # channels_last reduces in another order: close, not equal
    assert torch.equal(_bits(x), _bits(x_before))


def test_inplace_path_respects_hooks_on_the_spatial_gate():
    model = CBAM(CBAMSpec.seed(8)).eval()
    x = torch.randn(2, 8, 5, 5)
    seen = {}

    def hook(mod, inputs, output):
        seen["input"] = inputs[0].clone()
        seen["aliased"] = inputs[0].data_ptr() == output.data_ptr()

    handle = model.spatial.register_forward_hook(hook)
    try:
        with torch.no_grad():
            y = model(x)
            gated = model.channel(x)
    finally:
        handle.remove()
    assert not seen["aliased"] and torch.equal(seen["input"], gated)
    with torch.no_grad(), cpu_kernel.disabled():
        assert torch.equal(model(x), y)


@pytest.mark.parametrize("tie_rule", ["split", "first"])
def test_autograd_through_fast_paths_matches_plain_ops(tie_rule):
    """The whole block's gradients equal those of the same maths written with plain ops: ``torch.amax`` for
    the "split" tie rule (against the fast amax), ``torch.max(x, dim)`` on flattened H*W and on channels for
    "first" (the official code's ``logsumexp_2d`` / ``ChannelPool`` ops, against our adaptive max pool)."""
    import torch.nn.functional as F

    spec = CBAMSpec.seed(8, tie_rule=tie_rule)

    def max_hw(t):
        return t.amax((2, 3)) if tie_rule == "split" else torch.max(t.flatten(2), 2)[0]

    def max_c(t):
        return t.amax(1, keepdim=True) if tie_rule == "split" else torch.max(t, 1, keepdim=True)[0]

    model = CBAM(spec, dtype=torch.float64, seed=1)
    x = torch.randn(3, 8, 6, 5, dtype=torch.float64)
    x = torch.relu(x).round().requires_grad_()  # ties in both max pools
    with fused.disabled():  # the composed ops (the training Function sums in another order: test_torch_fused.py)
        y = model(x)
    ct = torch.randn_like(y)
    gx, *gp = torch.autograd.grad(y, [x, *model.parameters()], ct)

    def plain(x, fc1w, fc1b, fc2w, fc2b, convw, convb):
        pooled = torch.cat([x.mean((2, 3)), max_hw(x)])
        logits = F.linear(F.relu(F.linear(pooled, fc1w, fc1b)), fc2w, fc2b).view(2, x.shape[0], -1).sum(0)
        y1 = x * torch.sigmoid(logits)[:, :, None, None]
        maps = torch.cat([y1.mean(1, keepdim=True), max_c(y1)], 1)
        return y1 * torch.sigmoid(F.conv2d(maps, convw, convb, padding=spec.padding))

    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    x2 = x.detach().clone().requires_grad_()
    y2 = plain(x2, *params)
    assert torch.equal(y, y2)
    gx2, *gp2 = torch.autograd.grad(y2, [x2, *params], ct)
    assert torch.equal(gx, gx2)
    for a, b in zip(gp, gp2):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ the unrolled spatial conv (torch.compile's form)
@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("bias", [True, False])
def test_unrolled_spatial_conv_matches_conv2d_values_and_gradients(k, bias):
    import torch.nn.functional as F

    from cbam_multi.torch.functional import spatial_conv

    g = torch.Generator().manual_seed(k)
    maps = torch.randn(3, 2, 9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 2, k, k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    ref = F.conv2d(maps, w, b, padding=k // 2)
    out = spatial_conv(maps, w, b, unrolled=True)
    err = (out - ref).abs().max().item()
    assert out.shape == ref.shape and err <= 1e-13, f"unrolled conv: max abs err {err:.3e}"
    assert torch.equal(spatial_conv(maps, w, b), ref)  # not unrolled: F.conv2d itself
    inputs = [maps, w] + ([b] if bias else [])
    ct = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for ga, gb in zip(torch.autograd.grad(ref, inputs, ct), torch.autograd.grad(out, inputs, ct)):
        err = (ga - gb).abs().max().item()
        assert err <= 1e-12, f"unrolled conv gradient: max abs err {err:.3e}"


def test_compiled_block_traces_the_unrolled_conv_unless_hooked():
    """Where torch.compile traces the composed ops (here: the CPU kernels' custom ops switched off by
    `fused.disabled`), the spatial conv is traced as shifted multiply-adds (no convolution op in the graph);
    a forward hook on the conv module keeps the module call, so the hook still fires."""
    import torch._dynamo

    spec = CBAMSpec.seed(8)
    x = torch.randn(2, 8, 6, 5)
    graphs: list = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for hooked in (False, True):
        torch._dynamo.reset()
        graphs.clear()
        model = CBAM(spec, seed=2)
        seen: list = []
        if hooked:
            model.spatial.conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        with fused.disabled():
            y = torch.compile(model, backend=backend, dynamic=False)(x)
        targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op in ("call_function", "call_module")}
        has_conv = any("conv" in t for t in targets)
        assert has_conv == hooked, sorted(targets)
        assert bool(seen) == hooked
        err = (y - model(x)).abs().max().item()
        assert err <= 1e-5, f"compiled vs eager: max abs err {err:.3e}"
