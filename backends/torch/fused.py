"""Eager training path of the CBAM block: one ``autograd.Function`` that keeps no full-size intermediate.

The composed ops let autograd save what each op needs: the channel-gated tensor ``y1 = x * ca``, the
spatial product's operands, float masks of the max pools, ... and run one backward kernel per op, each a
full pass over memory (64x64x28x28 float32 on 2 CPU cores: forward+backward ~20 ms, as slow as the seed
blog's plain code). Here the forward saves only ``x`` (often kept by a neighbouring layer anyway) and the small
maps: the channel gate ``ca`` (B, C), the spatial gate ``s`` (B, 1, H, W), the pooled maxima and, for
tie rule "first", their indices. The backward recomputes ``y1`` once and writes the input gradient in
place through four full-size passes.
For CPU input the full-size passes and the spatial conv run as CPU loops (csrc/cbam_train.cpp for NCHW,
csrc/cbam_train_cl.cpp for channels_last; ``CBAM_MULTI_FUSED_TRAIN_KERNEL=0`` runs them as torch ops, see
`_kernel_applies`).

Only the full-size work is written by hand. The small maps' maths (the shared MLP and its activation,
the gates, the spatial conv in ``concat_order``, BatchNorm in train or eval mode, biases on or off) runs
as ordinary autograd ops on detached leaves of the pooled vectors / maps, built in the forward under
``torch.enable_grad()`` and differentiated in the backward with ``torch.autograd.grad``: the same modules
and `functional` calls as the composed path, so every one of those options is honoured by construction.

Tie rules (`cbam_multi.spec`): "first" scatters a max pool's gradient to the index ``torch.max`` /
``F.adaptive_max_pool2d`` return (the lowest flat index); "split" divides it by the tie count among the
elements equal to the maximum, as ``torch.amax``'s backward does.

`CBAM.forward` takes this path where `applies` holds: eager autograd (not compiling, tracing or under a
functorch transform), float32/float64 strided NCHW or channels_last input, the standard variant with
both gates, pools among avg/max, no autocast, no hooks. Everything else (lp/lse pools, the light variant,
half precision, double backward, which this path does not support) runs the composed ops, which stay
the reference this path is tested against (tests/test_torch_fused.py). ``disabled()`` turns it off.
Under torch.compile on CPU, `compiled_train` runs the same kernel passes and small maps as traced code.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from cbam_multi.fastpath import FastPathSwitch

from . import cpu_kernel
from . import functional as CF
from .guards import functorch_wrapped, has_hooks

__all__ = ["applies", "cbam_train", "disabled", "ENV_VAR"]

ENV_VAR = "CBAM_MULTI_FUSED_TRAIN"
_FLOATS = (torch.float32, torch.float64)
_switch = FastPathSwitch(ENV_VAR)
_enabled = _switch.enabled
disabled = _switch.disabled  # `with fused.disabled():` composed ops inside the block (this thread)


def applies(cbam, x: torch.Tensor) -> bool:
    """Whether ``cbam(x)`` (autograd recording) may run `cbam_train`. Cheap checks first."""
    spec = cbam.spec
    if spec.no_spatial or spec.variant != "standard" or not all(p in ("avg", "max") for p in spec.channel_pools):
        return False
    return (
        torch.is_grad_enabled()
        and not torch.compiler.is_compiling()  # under torch.compile, `compiled_train` traces the same passes
        and not torch.jit.is_tracing()
        and type(x) is torch.Tensor
        and not functorch_wrapped(x)
        and x.layout == torch.strided
        and x.dtype in _FLOATS
        and x.dim() == 4
        and cbam.channel.fc1.weight.dtype == x.dtype
        and (x.requires_grad or any(p.requires_grad for p in cbam.parameters()))
        and not torch.is_autocast_enabled(x.device.type)
        and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
        and not any(has_hooks(m) for m in cbam.modules())
        and _enabled()
    )


def _max_hw(x: torch.Tensor, tie_rule: str):
    """(B, C) maximum over H, W and, for "first", the flat h * W + w index torch routes the gradient to."""
    if tie_rule == "first":
        v, i = F.adaptive_max_pool2d(x, 1, return_indices=True)
        return v.flatten(1), i.flatten(1)
    return x.amax((2, 3)), None


def _max_grad_(acc: torch.Tensor, src: torch.Tensor, m: torch.Tensor, idx, g: torch.Tensor, dim) -> None:
    """acc += d max(src over dim) / d src * g, in place. ``m`` and ``g`` keep the reduced dims (size 1).
    "first" (``idx`` given): g goes to the recorded index; "split": shared among the tied maxima."""
    if idx is not None:
        if dim == 1:
            acc.scatter_add_(1, idx, g)
        else:  # dims (2, 3): idx (B, C) is a flat h * W + w index; index_put_ works for any strides
            b, c = acc.shape[:2]
            w = acc.shape[3]
            bi = torch.arange(b, device=acc.device)[:, None].expand(b, c)
            ci = torch.arange(c, device=acc.device)[None, :].expand(b, c)
            acc.index_put_((bi, ci, idx // w, idx % w), g.reshape(b, c), accumulate=True)
        return
    mask = torch.eq(src, m, out=torch.empty_like(src))
    count = mask.sum(dim, keepdim=True)
    acc.addcmul_(mask, g / count)


class _CBAMTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cbam, *params):
        out, small = block_forward(ctx, x, cbam)
        ctx.save_for_backward(x, *small)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, *small = ctx.saved_tensors
        return (block_backward(ctx, g, x, small, ctx.needs_input_grad[0]), None, *ctx.param_grads)


def channel_gate(cbam, pooled: list) -> torch.Tensor:
    """The channel gate ``ca`` (B, C) from the pooled (B, C) vectors: the shared MLP on their stack, summed, gated."""
    spec, ch = cbam.spec, cbam.channel
    b, c = pooled[0].shape
    stacked = pooled[0] if len(pooled) == 1 else torch.cat(pooled, 0)
    logits = CF.shared_mlp(stacked, ch.fc1.weight, ch.fc1.bias, ch.fc2.weight, ch.fc2.bias, spec.mlp_act)
    if len(pooled) > 1:
        logits = logits.view(len(pooled), b, c).sum(0)
    return CF.apply_gate(logits, spec.gate)


def channel_graph(cbam, pooled: list):
    """`channel_gate` as a small autograd graph on detached leaves of the pooled vectors (differentiated in the
    backward with ``torch.autograd.grad``) -> (ca, leaves)."""
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_() for p in pooled]
        return channel_gate(cbam, leaves), leaves


def spatial_gate(cbam, mean_c: torch.Tensor, max_c: torch.Tensor, kern: bool) -> torch.Tensor:
    """The spatial gate ``s`` (B, 1, H, W) from the channel mean and max maps: the conv on them in
    ``concat_order`` (``kern``: as CPU loops, `_SpatialConv`), BN in train or eval mode, the gate."""
    spec, sp = cbam.spec, cbam.spatial
    maps = torch.cat([mean_c if name == "mean" else max_c for name in spec.concat_order], dim=1)
    z = _SpatialConv.apply(maps, sp.conv.weight, sp.conv.bias) if kern else sp.conv(maps)
    if sp.bn is not None:
        z = sp.bn(z)
    return CF.apply_gate(z, spec.gate)


def spatial_graph(cbam, mean_c: torch.Tensor, max_c: torch.Tensor, kern: bool):
    """`spatial_gate` as a small autograd graph on detached leaves of the maps -> (s, {"mean": leaf, "max": leaf})."""
    with torch.enable_grad():
        leaves = {"mean": mean_c.detach().requires_grad_(), "max": max_c.detach().requires_grad_()}
        return spatial_gate(cbam, leaves["mean"], leaves["max"], kern), leaves


def block_forward(ctx, x: torch.Tensor, cbam):
    """The block's forward on ``x`` -> (output, small tensors to save). The caller saves ``x``, or what it
    recomputes ``x`` from bit for bit (the max-pool masks of tie rule "split" compare against x), and hands
    both back to `block_backward`."""
    spec = cbam.spec
    ch, sp = cbam.channel, cbam.spatial
    tie = spec.tie_rule
    ctx.tie_first = tie == "first"
    pools = spec.channel_pools
    kern = _kernel_applies(x)
    # -- channel gate: the pools read x; the MLP and gate are a small autograd graph on detached leaves
    if kern:
        avg, mx, idx_hw, cnt_hw = _kernel("train_pool_hw", x)(x)
        # a NaN or inf in x (its plane's sum is not finite): the torch ops, whose NaN rules the kernels lack
        kern = bool(torch.isfinite(avg).all())
    if kern:
        pooled = [avg if kind == "avg" else mx for kind in pools]
    else:
        mx = idx_hw = cnt_hw = None
        pooled = []
        for kind in pools:
            if kind == "avg":
                pooled.append(x.mean((2, 3)))
            else:
                mx, idx_hw = _max_hw(x, tie)
                pooled.append(mx)
    ca, leaves1 = channel_graph(cbam, pooled)
    ca4 = ca.detach().contiguous()[:, :, None, None]
    # -- spatial gate: the maps of y1 = x * ca; conv, BN, gate again a small autograd graph
    cnt_c = y1 = None
    if kern:
        mean_c, max_c, idx_c, cnt_c = _kernel("train_maps", x)(x, ca4)
    else:
        y1 = x * ca4
        mean_c = y1.mean(1, keepdim=True)
        if tie == "first":
            max_c, idx_c = torch.max(y1, 1, keepdim=True)
        else:
            max_c, idx_c = y1.amax(1, keepdim=True), None
    s, leaves2 = spatial_graph(cbam, mean_c, max_c, kern)
    sd = s.detach().contiguous()
    if kern:
        out = _kernel("train_gate", x)(x, ca4, sd)
    else:
        out = y1.mul_(sd)  # y1 is ours: the product is written in place (same values as y1 * s)
    ctx.graphs = (ca, leaves1, pools, idx_hw, s, leaves2, idx_c, kern, cnt_hw, cnt_c)
    ctx.param_groups = (list(ch.parameters()), list(sp.parameters()))
    return out, (ca4, sd, mx, max_c)


def block_backward(ctx, g: torch.Tensor, x: torch.Tensor, small, need_input_grad: bool):
    """dL/dx (None unless ``need_input_grad``) from the cotangent ``g`` of the block's output; the gradients
    of the block's parameters (channel MLP, then spatial conv / BN) are left in ``ctx.param_grads``."""
    ca4, s, mx, max_c = small
    ca, leaves1, pools, idx_hw, s_graph, leaves2, idx_c, kern, cnt_hw, cnt_c = ctx.graphs
    ch_params, sp_params = ctx.param_groups
    ctx.graphs = None
    if kern:
        return _backward_kernel(ctx, g, x, ca4, s, mx, max_c, ca, leaves1, pools, idx_hw, s_graph, leaves2,
                                idx_c, cnt_hw, cnt_c, ch_params, sp_params, need_input_grad)
    c, h, w = x.shape[1:]
    g = g.contiguous(memory_format=_memory_format(x))
    y1 = x * ca4  # recomputed: one pass instead of a saved full-size tensor
    # spatial gate: dL/ds = sum_c g * y1, then the small graph gives the maps' and the conv/BN gradients
    gs = torch.mul(g, y1).sum(1, keepdim=True)
    sp_train = [p for p in sp_params if p.requires_grad]
    grads2 = torch.autograd.grad(s_graph, [leaves2["mean"], leaves2["max"], *sp_train], gs, allow_unused=True)
    g_mean, g_max = grads2[0], grads2[1]
    # dL/dy1 = g * s + g_mean / C + max-pool routing of g_max (over channels)
    gy1 = torch.mul(g, s)
    gy1.add_(g_mean / c)
    _max_grad_(gy1, y1, max_c, idx_c, g_max, 1)
    del y1
    # channel gate: dL/dca = sum_hw dL/dy1 * x, then the small MLP graph
    gca = torch.mul(gy1, x).sum((2, 3))
    ch_train = [p for p in ch_params if p.requires_grad]
    grads1 = torch.autograd.grad(ca, [*leaves1, *ch_train], gca, allow_unused=True)
    gx = None
    if need_input_grad:
        gx = gy1.mul_(ca4)
        for kind, gp in zip(pools, grads1[: len(pools)]):
            if kind == "avg":
                gx.add_((gp / (h * w))[:, :, None, None])
            else:
                _max_grad_(gx, x, mx[:, :, None, None], idx_hw, gp[:, :, None, None], (2, 3))
    ctx.param_grads = _param_grads(ch_params, sp_params, ch_train, sp_train, grads1[len(pools):], grads2[2:])
    return gx


def _param_grads(ch_params, sp_params, ch_train, sp_train, g1, g2):
    by_param = dict(zip(map(id, ch_train), g1))
    by_param.update(zip(map(id, sp_train), g2))
    return [by_param.get(id(p)) for p in (*ch_params, *sp_params)]


def _backward_kernel(ctx, g, x, ca4, s, mx, max_c, ca, leaves1, pools, idx_hw, s_graph, leaves2, idx_c, cnt_hw,
                     cnt_c, ch_params, sp_params, need_input_grad):
    """The backward through the CPU kernels (csrc/cbam_train.cpp): three passes over g and x."""
    first = ctx.tie_first
    c, hw = x.shape[1], x.shape[2] * x.shape[3]
    g = g.contiguous(memory_format=_memory_format(x))
    gs = _kernel("train_grad_s", x)(g, x, ca4)
    sp_train = [p for p in sp_params if p.requires_grad]
    grads2 = torch.autograd.grad(s_graph, [leaves2["mean"], leaves2["max"], *sp_train], gs, allow_unused=True)
    gm = (grads2[0] / c).contiguous()
    gr = (grads2[1] if first else grads2[1] / cnt_c).contiguous()
    gca = _kernel("train_grad_ca", x)(g, x, ca4, s, gm, gr, max_c, idx_c, first)
    ch_train = [p for p in ch_params if p.requires_grad]
    grads1 = torch.autograd.grad(ca, [*leaves1, *ch_train], gca, allow_unused=True)
    gx = None
    if need_input_grad:
        zeros = torch.zeros_like(mx)
        by_kind = dict(zip(pools, grads1[: len(pools)]))
        gavg = by_kind["avg"] / hw if "avg" in by_kind else zeros
        gmx = zeros if "max" not in by_kind else (by_kind["max"] if first else by_kind["max"] / cnt_hw)
        gx = _kernel("train_grad_x", x)(g, x, ca4, s, gm, gr, max_c, idx_c, gavg, gmx, mx, idx_hw, first)
    ctx.param_grads = _param_grads(ch_params, sp_params, ch_train, sp_train, grads1[len(pools):], grads2[2:])
    return gx


class _SpatialConv(torch.autograd.Function):
    """``F.conv2d(maps, weight, bias, padding=k // 2)`` (the spatial gate's conv) through direct CPU loops
    (csrc/cbam_train.cpp): oneDNN's general convolution spends far longer on this tiny 2 -> 1 channel
    shape, most of all in its backward (64x2x28x28, k=7, one core: ~20 ms vs well under 1 ms)."""

    @staticmethod
    def forward(ctx, maps, weight, bias):
        maps, weight = maps.contiguous(), weight.contiguous()
        ctx.save_for_backward(maps, weight)
        ctx.has_bias = bias is not None
        out = torch.ops.cbam_multi.spatial_conv_fwd(maps, weight)
        return out if bias is None else out.add_(bias.view(1, 1, 1, 1))

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        maps, weight = ctx.saved_tensors
        g = g.contiguous()
        g_maps, g_w = torch.ops.cbam_multi.spatial_conv_bwd(g, maps, weight)
        return g_maps, g_w, (g.sum().view(1) if ctx.has_bias else None)


KERNEL_ENV_VAR = "CBAM_MULTI_FUSED_TRAIN_KERNEL"
_kernel_switch_on = FastPathSwitch(KERNEL_ENV_VAR).env_enabled  # the variable alone (no disabled() block)


@contextlib.contextmanager
def kernels(on: bool):
    """The CPU kernels (``KERNEL_ENV_VAR``) on or off inside this block; the variable is put back after."""
    old = os.environ.get(KERNEL_ENV_VAR)
    os.environ[KERNEL_ENV_VAR] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[KERNEL_ENV_VAR]
        else:
            os.environ[KERNEL_ENV_VAR] = old


def _kernel_applies(x: torch.Tensor) -> bool:
    """The full-size passes run as CPU kernels for NCHW or channels_last CPU input when the library builds,
    unless ``CBAM_MULTI_FUSED_TRAIN_KERNEL=0``. They agree with the torch ops to float rounding (float64 to
    1e-13, whole ResNet-50 networks included); that different rounding can put a float32 pre-activation
    within ~1e-6 of zero on the other side of a later ReLU's kink, which any change of rounding (thread
    count, oneDNN version) can do too: benchmarks/kink_check.py tells such a crossing from a wrong gradient."""
    return (
        _kernel_switch_on()
        and x.device.type == "cpu"
        and x.numel() > 0
        and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
        and cpu_kernel.available()
    )


def _kernel(name: str, x: torch.Tensor):
    """The CPU kernel ``name`` for x's layout: csrc/cbam_train.cpp, cbam_bn_train.cpp (NCHW) or their ``_cl``
    versions in cbam_train_cl.cpp, cbam_bn_train_cl.cpp (channels_last)."""
    return getattr(torch.ops.cbam_multi, name if x.is_contiguous() else name + "_cl")


def _memory_format(x: torch.Tensor):
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


def cbam_train(cbam, x: torch.Tensor) -> torch.Tensor:
    """The block's forward through `_CBAMTrain` (call only where `applies`)."""
    return _CBAMTrain.apply(x, cbam, *cbam.channel.parameters(), *cbam.spatial.parameters())
