"""CBAM's CPU kernels under torch.compile: the block, and a ResNet block's last BatchNorm with it, as
``torch.library`` custom ops, so a compiled network calls the kernels eager code uses.

Without them the compiled graph traces the composed ops and inductor writes its own fused code: on
ResNet-50 that code costs more than the eager kernels, and compiling it takes minutes (benchmarks/RESULTS.md).

Training is two functional ops (torch.library gives an autograd formula only to an op that mutates nothing):
``cbam_multi::bn_cbam_fwd`` returns the output, the small maps the backward needs and the BatchNorms' new
running averages (traced code copies those into the buffers), and ``cbam_multi::bn_cbam_bwd`` returns the
gradients. Their bodies ARE the eager Functions' forward and backward (`fused`, `fused_bn`), run on
stand-ins of the modules made from the ops' tensors; the small autograd graphs the eager backward keeps from
its forward (the MLP on (B, C), the spatial conv on (B, 2, H, W)) are rebuilt in the backward op from the
saved maps. Inference is the C++ op ``cbam_multi::cbam_infer`` with a fake (shape) implementation.

The ops are tagged ``flexible_layout``: inductor may hand them channels_last buffers even where the traced
model is NCHW (its layout optimisation runs convolutions channels_last), and copying those back to the traced
strides cost more than CBAM itself. The bodies take either layout (each kernel has an NCHW and a channels_last
version) and return what the fake implementations promise.

`applies` holds under torch.compile where the eager fast paths would: CPU, float32/float64, NCHW or
channels_last, the standard two-gate variant with avg/max pools, no hooks, no
autocast, a built kernel library, no ``disabled()`` block or off switch, and not `torch.export` (an exported
program keeps standard ops, to run where this library is not loaded). Anything else traces the composed ops.
Module settings, shapes and dtypes are guarded by dynamo; the hooks, the switches and the BatchNorms'
momentum and eps are read when a graph is traced (change them, and call ``torch._dynamo.reset()``).
"""

from __future__ import annotations

import functools
import json
import threading
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_kernel, fused, fused_bn
from .guards import has_hooks

__all__ = ["applies", "bn_cbam", "infers", "op_tensors", "register"]

_FLOATS = (torch.float32, torch.float64)
_lock = threading.Lock()
_registered: list = []


def applies(bn: nn.Module | None, cbam, h: Tensor) -> bool:
    """Whether ``cbam(bn(h))`` (``cbam(h)`` for ``bn=None``) being traced by torch.compile may call the ops.
    Module settings, shapes and dtypes are read in traced code (dynamo guards them); the hooks, the kernel
    library and the switches (`fused.disabled`, the environment variables) once per trace."""
    if not torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False  # an exported program keeps standard ops: it must run where this library is not loaded
    spec = cbam.spec
    if spec.no_spatial or spec.variant != "standard" or not set(spec.channel_pools) <= {"avg", "max"}:
        return False
    if not (h.device.type == "cpu" and h.dtype in _FLOATS and h.dim() == 4 and not torch.is_autocast_enabled("cpu")):
        return False
    if not (h.is_contiguous() or h.is_contiguous(memory_format=torch.channels_last)):
        return False
    if bn is not None and not (type(bn) is nn.BatchNorm2d and bn.affine and bn.weight.dtype == h.dtype):
        return False
    if cbam.channel.fc1.weight.dtype != h.dtype:
        return False
    return infers(bn, cbam, h) or _switches_on(bn, cbam, False)


def _records(bn, cbam, h: Tensor) -> bool:
    return torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in _params(bn, cbam)))


def _infers(bn, cbam, h: Tensor) -> bool:
    """The inference kernel computes this call: nothing recorded, a ReLU MLP, BatchNorms in eval mode with
    running statistics (else the training op runs it, forward only)."""
    norms = [n for n in (bn, cbam.spatial.bn) if n is not None]
    return (not _records(bn, cbam, h) and cbam.spec.mlp_act == "relu"
            and all(not n.training and n.running_mean is not None for n in norms))


@torch.compiler.assume_constant_result
def _switches_on(bn, cbam, infer: bool) -> bool:
    # read once while tracing: dynamo cannot trace the build's lock or the switches' thread-locals
    modules = [*cbam.modules(), *([] if bn is None else [bn])]
    if any(has_hooks(m) for m in modules) or not register():
        return False
    return cpu_kernel._switch.enabled() if infer else fused._switch.enabled() and fused._kernel_switch_on()


def infers(bn, cbam, h: Tensor) -> bool:
    """Where `applies` holds: whether `bn_cbam` calls the inference kernel (which can also take a residual,
    `cpu_kernel.bn_then_cbam_infer`)."""
    return _infers(bn, cbam, h) and _switches_on(bn, cbam, True)


def _params(bn, cbam) -> list:
    return [*([] if bn is None else [bn.weight, bn.bias]), *cbam.parameters()]


def bn_cbam(bn: nn.BatchNorm2d | None, cbam, h: Tensor) -> Tensor:
    """``cbam(bn(h))`` (``cbam(h)`` for ``bn=None``) through the custom ops (call only where `applies`)."""
    if infers(bn, cbam, h):
        return cpu_kernel.cbam_infer(cbam, h) if bn is None else cpu_kernel.bn_then_cbam_infer(bn, cbam, h)
    out, *rest = torch.ops.cbam_multi.bn_cbam_fwd(h, *_compress(op_tensors(bn, cbam)), _config(bn, cbam))
    new_stats = iter(rest[len(_SLOTS):])
    with torch.no_grad():  # what nn.BatchNorm2d.forward writes: the counter, the running averages (from the op)
        for norm in (bn, cbam.spatial.bn):
            if norm is None:
                continue
            if norm.training and norm.num_batches_tracked is not None:
                norm.num_batches_tracked.add_(1)  # the op advanced a copy (its momentum rule read that)
            for buf in (norm.running_mean, norm.running_var):
                new = next(new_stats)
                if new.numel():
                    buf.copy_(new)
    return out


def op_tensors(bn: nn.BatchNorm2d | None, cbam) -> list:
    """The forward op's tensor slots (None where a module has no such tensor): block BN (weight, bias, running
    mean, running var, counter), fc1 (weight, bias), fc2 (weight, bias), spatial conv (weight, bias), spatial
    BN (weight, bias, running mean, running var, counter)."""
    def norm(m):
        return [None] * 5 if m is None else [m.weight, m.bias, m.running_mean, m.running_var, m.num_batches_tracked]

    ch, sp = cbam.channel, cbam.spatial
    return [*norm(bn), ch.fc1.weight, ch.fc1.bias, ch.fc2.weight, ch.fc2.bias, sp.conv.weight, sp.conv.bias, *norm(sp.bn)]


def _compress(full: list) -> tuple[list, str]:
    """(the tensors, which of the slots (`op_tensors`) hold one): torch.library's autograd takes lists of
    tensors, not of optional tensors."""
    return [t for t in full if t is not None], "".join("0" if t is None else "1" for t in full)


def _expand(tensors, present: str) -> list:
    it = iter(tensors)
    return [next(it) if flag == "1" else None for flag in present]


def _bn_config(bn) -> dict | None:
    if bn is None:
        return None
    return {"training": bn.training, "track": bn.track_running_stats, "momentum": bn.momentum, "eps": bn.eps}


@torch.compiler.assume_constant_result  # dynamo cannot trace json; the settings read here are guarded elsewhere
def _config(bn, cbam) -> str:
    s = cbam.spec
    return json.dumps({
        "pools": list(s.channel_pools), "act": s.mlp_act, "gate": s.gate, "tie_rule": s.tie_rule,
        "concat_order": list(s.concat_order), "bn": _bn_config(bn), "spatial_bn": _bn_config(cbam.spatial.bn),
    })


# ----------------------------------------------------------------------------- stand-ins of the modules
class _Ctx:
    """Stands in for an autograd Function's ctx: the eager Functions' forward and backward run on it."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


class _Dense:
    """nn.Linear / 1x1 nn.Conv2d / the spatial conv: the parameters, and the spatial conv's call."""

    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias

    def __call__(self, maps):
        return F.conv2d(maps, self.weight, self.bias, padding=self.weight.shape[-1] // 2)


class _BatchNorm:
    """nn.BatchNorm2d's choices on given tensors. ``replay``: the forward's normalisation again (batch or
    running statistics as the forward chose), updating nothing."""

    def __init__(self, tensors, cfg: dict, replay: bool):
        self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked = tensors
        self.training, self.track_running_stats = cfg["training"], cfg["track"]
        self.momentum, self.eps, self.replay = cfg["momentum"], cfg["eps"], replay

    def __call__(self, z):
        batch = self.training or self.running_mean is None
        if self.replay:
            stats = (None, None) if batch else (self.running_mean, self.running_var)
            return F.batch_norm(z, *stats, self.weight, self.bias, batch, 0.0, self.eps)
        factor = fused_bn.momentum_factor(self)
        return F.batch_norm(z, self.running_mean, self.running_var, self.weight, self.bias, batch, factor, self.eps)


def _live(tensors):
    """Copies of the running statistics the forward may update (the op returns them; the buffers stay)."""
    return [t if i < 2 or t is None else t.clone() for i, t in enumerate(tensors)]


def _stand_in(params, cfg: dict, replay: bool, leaves: bool):
    """A CBAM module's stand-in from the op's tensors; ``leaves``: its parameters as fresh autograd leaves."""
    params = list(params)
    if leaves:
        params[:8] = [None if p is None else p.detach().requires_grad_() for p in params[:8]]
    fc1, fc2, conv = _Dense(*params[0:2]), _Dense(*params[2:4]), _Dense(*params[4:6])
    bn = None
    if cfg["spatial_bn"] is not None:
        bn = _BatchNorm(params[6:11] if replay else _live(params[6:11]), cfg["spatial_bn"], replay)
    ch_params = [p for p in params[0:4] if p is not None]
    sp_params = [p for p in params[4:6] + ([] if bn is None else params[6:8]) if p is not None]
    spec = SimpleNamespace(channel_pools=tuple(cfg["pools"]), mlp_act=cfg["act"], gate=cfg["gate"],
                           tie_rule=cfg["tie_rule"], concat_order=tuple(cfg["concat_order"]))
    channel = SimpleNamespace(fc1=fc1, fc2=fc2, parameters=lambda: iter(ch_params))
    spatial = SimpleNamespace(conv=conv, bn=bn, parameters=lambda: iter(sp_params))
    return SimpleNamespace(spec=spec, channel=channel, spatial=spatial)


def _autograd_on():
    """Inside a custom op's implementation autograd's dispatch keys are excluded; the eager bodies build and
    differentiate small autograd graphs, so the keys are let back in for them."""
    ex = torch._C._dispatch_tls_local_exclude_set()
    for k in ("AutogradFunctionality", "AutogradOther", "ADInplaceOrView", "AutogradNestedTensor"):
        ex = ex.remove(getattr(torch._C.DispatchKey, k))
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), ex)


# ------------------------------------------------------------------------------ what the forward saves
# Fixed shapes and dtypes whichever path the forward takes (the fake implementation must know them):
# (name, shape from (B, C, H, W, P), dtype: None = the input's)
_SLOTS = (
    ("ca4", lambda b, c, h, w, p: (b, c, 1, 1), None), ("sd", lambda b, c, h, w, p: (b, 1, h, w), None),
    ("mx", lambda b, c, h, w, p: (b, c), None), ("max_c", lambda b, c, h, w, p: (b, 1, h, w), None),
    ("pooled", lambda b, c, h, w, p: (p, b, c), None), ("mean_c", lambda b, c, h, w, p: (b, 1, h, w), None),
    ("idx_hw", lambda b, c, h, w, p: (b, c), torch.int64), ("cnt_hw", lambda b, c, h, w, p: (b, c), None),
    ("idx_c", lambda b, c, h, w, p: (b, 1, h, w), torch.int64), ("cnt_c", lambda b, c, h, w, p: (b, 1, h, w), None),
    ("al", lambda b, c, h, w, p: (c,), None), ("be", lambda b, c, h, w, p: (c,), None),
    ("psum", lambda b, c, h, w, p: (b, c), torch.float64), ("mean", lambda b, c, h, w, p: (c,), torch.float64),
    ("var", lambda b, c, h, w, p: (c,), torch.float64), ("invstd", lambda b, c, h, w, p: (c,), torch.float64),
    ("flags", lambda b, c, h, w, p: (4,), torch.int64),
)
_CBAM, _BN_KERNELS, _BN_OPS = 0, 1, 2  # flags[0]: which eager Function's body ran


def _pack_graphs(slots: dict, graphs) -> tuple[bool, int]:
    """block_forward's graphs tuple into the slots -> (kernels used, which optional maps exist: bit flags)."""
    _ca, leaves1, _pools, idx_hw, _s, leaves2, idx_c, kern, cnt_hw, cnt_c = graphs
    slots.update(pooled=torch.stack(leaves1), mean_c=leaves2["mean"], idx_hw=idx_hw, idx_c=idx_c, cnt_hw=cnt_hw,
                 cnt_c=cnt_c)
    return kern, (idx_hw is not None) + 2 * (idx_c is not None) + 4 * (cnt_hw is not None)


def _fwd_impl(h: Tensor, tensors: list[Tensor], present: str, config: str) -> list[Tensor]:
    cfg, full = _parse(config), _expand(tensors, present)
    bn, params = (full[:5] if cfg["bn"] else []), full[5:]
    # autograd stays off here (custom op bodies run below it): the eager forward's small graphs are rebuilt
    # by the backward op, so they need not be recorded now
    ctx, slots, batch_stats = _Ctx(), {}, False
    cbam = _stand_in(params, cfg, replay=False, leaves=False)
    if cfg["bn"] is None:
        out, small = fused.block_forward(ctx, h, cbam)
        slots.update(zip(("ca4", "sd", "mx", "max_c"), small))
        kern, present_maps = _pack_graphs(slots, ctx.graphs)
        path = _CBAM
    else:
        bnm = _BatchNorm(_live(bn), cfg["bn"], replay=False)
        pool = fused_bn.kernel_pool(bnm, h)
        if pool is not None:
            out = fused_bn._BNThenCBAMKernels.forward(ctx, h, bnm, cbam, pool, bn[0], bn[1])
            names = ("h", "weight", "al", "be", "ca4", "sd", "mx", "max_c", "idx_c", "cnt_c", "psum", "mean", "invstd")
            slots.update(zip(names, ctx.saved_tensors))
            slots.update(pooled=torch.stack(ctx.graphs[1]), mean_c=ctx.graphs[3]["mean"])
            kern, present_maps, path = True, 0, _BN_KERNELS
        else:
            out = fused_bn._BNThenCBAM.forward(ctx, h, bnm, cbam, bn[0], bn[1])
            names = ("h", "weight", "al", "be", "mean", "var", "invstd", "ca4", "sd", "mx", "max_c")
            slots.update(zip(names, ctx.saved_tensors))
            kern, present_maps = _pack_graphs(slots, ctx.graphs)
            path = _BN_OPS
        batch_stats = ctx.batch_stats
    slots["flags"] = torch.tensor([path, kern, batch_stats, present_maps])
    dims = (*h.shape, len(cfg["pools"]))
    saved = []
    for name, shape, dtype in _SLOTS:  # what a path does not have: a zero placeholder of the slot's shape
        t, want, dt = slots.get(name), shape(*dims), dtype or h.dtype
        saved.append(h.new_zeros(want, dtype=dt) if t is None else t.detach().to(dt).reshape(want).contiguous())
    stats = []
    for norm, key in ((None if cfg["bn"] is None else bnm, "bn"), (cbam.spatial.bn, "spatial_bn")):
        if norm is not None:
            stats += [t.detach() if _updates(cfg[key], t) else h.new_empty(0) for t in (norm.running_mean, norm.running_var)]
    return [_layout_of(out.detach(), h), *saved, *stats]


def _layout_of(t: Tensor, like: Tensor) -> Tensor:
    """``t`` with the strides ``torch.empty_like(like)`` has (the fake implementations' promise to inductor,
    which may hand the ops any layout: they are tagged flexible_layout); a copy only where they differ."""
    want = torch.empty_like(like, device="meta").stride()
    return t if t.stride() == want else torch.empty_like(like).copy_(t)


@functools.lru_cache(maxsize=256)
def _parse(config: str) -> dict:
    return json.loads(config)  # shared by the calls with this config: read, never changed


def _updates(cfg: dict, running) -> bool:
    # where nn.BatchNorm2d.forward writes its running averages (else the op returns an empty tensor for them)
    return cfg["training"] and cfg["track"] and running is not None


def _fwd_fake(h, tensors, present, config):
    cfg, full = _parse(config), _expand(tensors, present)
    bn, params = full[:5], full[5:]
    dims = (*h.shape, len(cfg["pools"]))
    out = [torch.empty_like(h), *(h.new_empty(shape(*dims), dtype=dtype or h.dtype) for _, shape, dtype in _SLOTS)]
    for key, tensors in (("bn", bn), ("spatial_bn", params[6:11])):
        if cfg[key] is not None:
            out += [h.new_empty(t.shape if _updates(cfg[key], t) else (0,), dtype=h.dtype if t is None else t.dtype)
                    for t in tensors[2:4]]
    return out


# ------------------------------------------------------------------------------------------ the backward
def _bwd_impl(g: Tensor, h: Tensor, saved: list[Tensor], tensors: list[Tensor], present: str, need_h: bool,
              config: str) -> list[Tensor]:
    cfg, full = _parse(config), _expand(tensors, present)
    bn, params = full[:5], full[5:]
    slot = {name: t for (name, _, _), t in zip(_SLOTS, saved)}
    path, kern, batch_stats, maps = slot["flags"].tolist()
    dt, first, pools = h.dtype, cfg["tie_rule"] == "first", tuple(cfg["pools"])
    ctx = _Ctx()
    with _autograd_on():
        cbam = _stand_in(params, cfg, replay=True, leaves=True)
        ca, leaves1 = fused.channel_graph(cbam, list(slot["pooled"].unbind(0)))
        s_graph, leaves2 = fused.spatial_graph(cbam, slot["mean_c"], slot["max_c"], bool(kern))
        ctx.param_groups = (list(cbam.channel.parameters()), list(cbam.spatial.parameters()))
        small = [slot[n] for n in ("ca4", "sd", "mx", "max_c")]
        if path == _BN_KERNELS:
            ctx.graphs, ctx.batch_stats, ctx.first, ctx.pools = (ca, leaves1, s_graph, leaves2), bool(batch_stats), first, pools
            ctx.needs_input_grad = (need_h, False, False, False, True, True)
            ctx.saved_tensors = (h, bn[0], slot["al"], slot["be"], *small, slot["idx_c"], slot["cnt_c"], slot["psum"],
                                 slot["mean"], slot["invstd"])
            gh, _, _, _, gw, gb, *grads = fused_bn._BNThenCBAMKernels.backward(ctx, g)
        else:
            opt = [slot[n] if maps & bit else None for n, bit in (("idx_hw", 1), ("idx_c", 2), ("cnt_hw", 4), ("cnt_c", 4))]
            ctx.graphs = (ca, leaves1, pools, opt[0], s_graph, leaves2, opt[1], bool(kern), opt[2], opt[3])
            ctx.tie_first = first
            if path == _CBAM:
                gh, gw, gb = fused.block_backward(ctx, g, h, small, need_h), None, None
                grads = ctx.param_grads
            else:
                ctx.batch_stats, ctx.eps = bool(batch_stats), cfg["bn"]["eps"]
                ctx.needs_input_grad = (need_h, False, False, True, True)
                stats = [slot[n].to(dt) for n in ("al", "be", "mean", "var", "invstd")]
                ctx.saved_tensors = (h, bn[0], *stats, *small)
                gh, _, _, gw, gb, *grads = fused_bn._BNThenCBAM.backward(ctx, g)
    grads = iter(grads)
    by_param = [None if p is None else next(grads) for p in params[:8]]
    # a parameter the output does not depend on gets a zero gradient (the fake implementation's shapes are fixed)
    by_param = [g if g is not None or p is None else torch.zeros_like(p) for g, p in zip(by_param, params)]
    likes = (h, bn[0], bn[0], *params[:8])
    return [h.new_empty(0) if t is None else _layout_of(t.detach(), like)
            for t, like in zip((gh if need_h else None, gw, gb, *by_param), likes)]


def _bwd_fake(g, h, saved, tensors, present, need_h, config):
    full = _expand(tensors, present)
    return [torch.empty_like(t) if t is not None else h.new_empty(0)
            for t in (h if need_h else None, full[0], full[0], *full[5:13])]


# the forward's tensors the backward reads (slot numbers of `op_tensors`): the block BN's weight, the CBAM
# parameters, and the spatial BN's running statistics where the forward used them (eval mode: not updated)
_READ = (0, *range(5, 13))


def _setup_context(ctx, inputs, output):
    h, tensors, present, config = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.present, ctx.config = present, config
    cfg, full = _parse(config), _expand(tensors, present)
    sbn = cfg["spatial_bn"]
    read = (*_READ, 13, 14) if sbn is not None and not sbn["training"] else _READ
    kept, kept_present = _compress([t if i in read else None for i, t in enumerate(full)])
    ctx.kept_present = kept_present
    ctx.save_for_backward(h, *output[1:1 + len(_SLOTS)], *kept)


def _backward(ctx, grads):
    h, *rest = ctx.saved_tensors
    saved, kept = rest[:len(_SLOTS)], rest[len(_SLOTS):]
    out = torch.ops.cbam_multi.bn_cbam_bwd(grads[0], h, list(saved), list(kept), ctx.kept_present,
                                           bool(ctx.needs_input_grad[0]), ctx.config)
    gh, by_slot = out[0], [*out[1:3], None, None, None, *out[3:11], None, None, None]
    gh = gh if gh.numel() == h.numel() else None
    # one gradient per tensor the forward took; an empty one stands for None
    tensor_grads = [g if g is not None and g.numel() else None
                    for g, flag in zip(by_slot, ctx.present) if flag == "1"]
    return gh, tensor_grads, None, None


def register() -> bool:
    """Define the ops (and cbam_infer's fake implementation) once the kernel library is loaded."""
    if _registered:
        return _registered[0]
    with _lock:
        if not _registered:
            ok = cpu_kernel.available()
            if ok:
                lib = "cbam_multi::"
                torch.library.register_fake(lib + "cbam_infer")(lambda x, *args: torch.empty_like(x))
                # flexible_layout: inductor hands the ops its buffers as they are (channels_last after its layout
                # optimisation) instead of copying them to the traced strides; the bodies take any layout
                tags = (torch.Tag.flexible_layout,)
                fwd = torch.library.custom_op(lib + "bn_cbam_fwd", _fwd_impl, mutates_args=(), device_types="cpu",
                                              tags=tags)
                fwd.register_fake(_fwd_fake)
                bwd = torch.library.custom_op(lib + "bn_cbam_bwd", _bwd_impl, mutates_args=(), device_types="cpu",
                                              tags=tags)
                bwd.register_fake(_bwd_fake)
                fwd.register_autograd(_backward, setup_context=_setup_context)
            _registered.append(ok)
    return _registered[0]
