"""Against the REAL timm and torchvision, not the copies in benchmarks/anchors*.py.

* timm's ``CbamModule`` / ``LightCbamModule`` (defaults and the arguments `CBAMSpec` models: ``rd_ratio``,
  ``rd_channels``, ``rd_divisor``, ``spatial_kernel_size``, ``act_layer``, ``gate_layer``, ``mlp_bias``)
  against the matching ``timm`` / ``timm_light`` spec, the weights moved by the timm state-dict adapter:
  outputs, input and parameter gradients and BN running statistics, torch and Flax NNX, eval and train,
  on plain inputs and on inputs full of tied maxima (timm's ``amax`` splits a tie's gradient); and the
  export: our weights load into timm's module with ``strict=True``.
* timm ResNet-18/50 with ``block_args=dict(attn_layer='cbam')`` (and ``'lcbam'``) and torchvision's
  ResNet-18/50 through `cbam_multi.models.resnet_convert`: logits (eval and train BN), gradients and
  running statistics, both directions; a torchvision backbone with CBAM added loads into timm's model.
* The copies the CPU suite uses instead (`benchmarks.anchors`, `benchmarks.anchors_resnet`) load the real
  modules' state_dicts strictly and compute the same, so wherever timm imports they are proven faithful.

timm needs torchvision; on this project's CPU machine the only reachable torchvision wheels are CUDA builds
whose import fails beside CPU torch ("operator torchvision::nms does not exist", a RuntimeError, not an
ImportError), so the module skips there, naming the reason. ``CBAM_REQUIRE_REAL_ANCHORS=1`` turns that skip
into an error (the device run sets it: a skip must not pass for a check). Everything runs on the CPU.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn


def _real(name: str):
    """Import ``name`` or skip the module (an error with CBAM_REQUIRE_REAL_ANCHORS set)."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # ImportError, or the RuntimeError of a torchvision built for another torch
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        reason = f"real {name} does not import here ({type(e).__name__}: {first[:200]})"
    if os.environ.get("CBAM_REQUIRE_REAL_ANCHORS"):
        raise RuntimeError(reason + "; CBAM_REQUIRE_REAL_ANCHORS is set, so this is an error, not a skip")
    pytest.skip(reason, allow_module_level=True)


timm = _real("timm")
torchvision = _real("torchvision")

import torchvision.models as tvm
from timm.layers.cbam import CbamModule, LightCbamModule  # timm.layers does not re-export them
from timm.layers.helpers import make_divisible

from benchmarks import anchors as A
from benchmarks.anchors_resnet import timm_resnet_cbam
from cbam_multi import CBAMSpec, ResNetSpec
from cbam_multi.models import resnet_convert as rc
from cbam_multi.parity import (
    RESNET_TOLERANCES,
    TOLERANCES,
    RunResult,
    max_abs,
    rel_err,
    run_nnx,
    run_torch,
    tie_input,
)
from cbam_multi.torch import from_timm_state_dict, to_timm_state_dict
from cbam_multi.torch.models import ResNet, export_model_grads, export_model_weights, import_model_weights

try:  # the JAX comparisons need flax; the torch ones run without it
    import flax  # noqa: F401
    import jax.numpy as jnp

    import cbam_multi.jax.models as jm
except ImportError:
    jm = None

# torch's CPU hardsigmoid_backward multiplies by a float32 1/6 even for float64 tensors (a 3e-8 relative
# error in timm's own gradient; our hard_sigmoid is exact), so the one case with gate_layer='hard_sigmoid'
# compares gradients at this bound; its outputs keep the float64 tolerance.
HARDSIGMOID_GRAD_TOL = 1e-7


# ------------------------------------------------------------------------------------------ the blocks
@dataclass(frozen=True)
class BlockCase:
    id: str
    real: Callable[[], nn.Module]  # timm's module
    copy: Callable[[], nn.Module]  # the benchmarks/anchors.py copy, same arguments
    spec: CBAMSpec
    shape: tuple[int, int, int, int]
    grad_tol: float | None = None  # None: TOLERANCES[dtype]["grad"]


BLOCKS = [
    BlockCase("cbam", lambda: CbamModule(32), lambda: A.TimmCbamModule(32), CBAMSpec.timm(32), (2, 32, 7, 6)),
    BlockCase("cbam-C1", lambda: CbamModule(1), lambda: A.TimmCbamModule(1), CBAMSpec.timm(1), (2, 1, 7, 5)),
    BlockCase(
        "cbam-rd_ratio-rd_divisor-k3-silu-bias",
        lambda: CbamModule(40, rd_ratio=0.25, rd_divisor=8, spatial_kernel_size=3, act_layer=nn.SiLU, mlp_bias=True),
        lambda: A.TimmCbamModule(40, rd_ratio=0.25, rd_divisor=8, spatial_kernel_size=3, act_layer=nn.SiLU, mlp_bias=True),
        CBAMSpec.timm(40, reduction=4, hidden_divisor=8, spatial_kernel=3, mlp_act="silu", mlp_bias=True),
        (2, 40, 5, 6),
    ),
    BlockCase(
        "cbam-rd_channels-leaky_relu-hard_sigmoid",
        lambda: CbamModule(24, rd_channels=5, act_layer=nn.LeakyReLU, gate_layer="hard_sigmoid"),
        lambda: A.TimmCbamModule(24, rd_channels=5, act_layer=nn.LeakyReLU, gate_layer="hard_sigmoid"),
        CBAMSpec.timm(24, hidden_channels=5, mlp_act="leaky_relu", gate="hard_sigmoid"),
        (2, 24, 6, 5),
        grad_tol=HARDSIGMOID_GRAD_TOL,
    ),
    BlockCase(
        "cbam-rd_ratio8-relu6-k5",
        lambda: CbamModule(16, rd_ratio=1.0 / 8, act_layer=nn.ReLU6, spatial_kernel_size=5),
        lambda: A.TimmCbamModule(16, rd_ratio=1.0 / 8, act_layer=nn.ReLU6, spatial_kernel_size=5),
        CBAMSpec.timm(16, reduction=8, mlp_act="relu6", spatial_kernel=5),
        (2, 16, 6, 6),
    ),
    BlockCase("light", lambda: LightCbamModule(32), lambda: A.TimmLightCbamModule(32), CBAMSpec.timm_light(32), (2, 32, 7, 6)),
    BlockCase(
        "light-rd_channels-relu6-k3-bias",
        lambda: LightCbamModule(24, rd_channels=5, act_layer=nn.ReLU6, spatial_kernel_size=3, mlp_bias=True),
        lambda: A.TimmLightCbamModule(24, rd_channels=5, act_layer=nn.ReLU6, spatial_kernel_size=3, mlp_bias=True),
        CBAMSpec.timm_light(24, hidden_channels=5, mlp_act="relu6", spatial_kernel=3, mlp_bias=True),
        (2, 24, 5, 5),
    ),
    # LightCbamModule does not use gate_layer (F.sigmoid in LightChannelAttn; LightSpatialAttn is not passed
    # it): the module with 'hard_sigmoid' is the sigmoid spec
    BlockCase(
        "light-gate_layer-unused",
        lambda: LightCbamModule(16, gate_layer="hard_sigmoid"),
        lambda: A.TimmLightCbamModule(16, gate_layer="hard_sigmoid"),
        CBAMSpec.timm_light(16),
        (2, 16, 5, 6),
    ),
]
_BY_ID = {c.id: c for c in BLOCKS}

# (case, dtype, train, inputs): every case in float64 eval and train; tied maxima where the tie rule acts
# through both pools (standard, light, an MLP with bias); float32 where cheap
RUNS = (
    [(c.id, "float64", train, "normal") for c in BLOCKS for train in (False, True)]
    + [(i, "float64", True, "ties") for i in ("cbam", "light", "cbam-rd_ratio-rd_divisor-k3-silu-bias")]
    + [("cbam", "float64", False, "ties"), ("light-rd_channels-relu6-k3-bias", "float64", False, "ties")]
    + [(i, "float32", True, "normal") for i in ("cbam", "light")]
)


def _randomised(module: nn.Module, dtype: torch.dtype, seed: int = 1) -> nn.Module:
    """``module`` in ``dtype`` with every parameter and buffer drawn from U(-1, 1) (running variances from
    U(0.5, 1.5)), so that no weight is at its init value and eval-mode BN is exercised."""
    module = module.to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point():
                low = 0.5 if name.endswith("running_var") else -1.0
                t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64).mul(1.5 - low).add(low).to(dtype))
    return module


def _run_module(mod: nn.Module, spec: CBAMSpec, x, g, dtype: torch.dtype, train: bool) -> RunResult:
    """A timm-format module's output, input and parameter gradients and (train) running statistics, in
    canonical names: its state_dict with each parameter replaced by its gradient, through the adapter."""
    mod.train(train)
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    y = mod(xt)
    (y * torch.tensor(g, dtype=dtype)).sum().backward()
    kinds = spec.param_kinds()
    grads = dict(mod.state_dict())
    grads.update({n: p.grad for n, p in mod.named_parameters()})
    canon = from_timm_state_dict(grads, spec)
    after = from_timm_state_dict(mod.state_dict(), spec)
    stats = {n: a for n, a in after.items() if kinds[n] == "stat"} if train else {}
    return RunResult(y.detach().numpy(), {"input": xt.grad.numpy(), **{n: a for n, a in canon.items() if kinds[n] == "param"}}, stats)


def _compare(got: RunResult, want: RunResult, tol: dict, grad_tol: float | None = None) -> list[str]:
    """Failure lines (empty when every quantity is within tolerance): outputs max abs, gradients and
    statistics relative to the reference's largest magnitude."""
    gtol = tol["grad"] if grad_tol is None else grad_tol
    rows = [("y", max_abs(got.y, want.y), tol["y"])]
    if set(got.grads) != set(want.grads):
        rows.append((f"grad names {sorted(got.grads)} vs {sorted(want.grads)}", float("inf"), 0.0))
    rows += [(f"grad {n}", rel_err(got.grads.get(n), ref), gtol) for n, ref in want.grads.items() if n in got.grads]
    rows += [(n, rel_err(got.stats.get(n), ref), tol["stats"]) for n, ref in want.stats.items()]
    return [f"{q:<36} {e:.2e} > {t:.0e}" for q, e, t in rows if not e <= t]


def _inputs(shape, inputs: str, seed: int = 5):
    rng = np.random.default_rng(seed)
    x = tie_input(shape, rng) if inputs == "ties" else rng.normal(size=shape)
    return x, rng.normal(size=shape)


@pytest.mark.parametrize("case_id, dtype, train, inputs", [pytest.param(*r, id="-".join(map(str, r))) for r in RUNS])
def test_block_matches_real_timm(case_id, dtype, train, inputs):
    case = _BY_ID[case_id]
    tdtype, tol = getattr(torch, dtype), TOLERANCES[dtype]
    mod = _randomised(case.real(), tdtype)
    weights = from_timm_state_dict(mod.state_dict(), case.spec)  # before a train step moves the statistics
    x, g = _inputs(case.shape, inputs)
    want = _run_module(mod, case.spec, x, g, tdtype, train)
    runners = [("torch", run_torch)]
    if jm is not None and dtype == "float64":  # jitted: one compile per case beats eager's one per op and shape
        runners.append(("nnx", lambda *a: run_nnx(*a, jit=True)))
    bad = []
    for name, run in runners:
        bad += [f"{name:<6} {line}" for line in _compare(run(case.spec, weights, x, g, dtype, train), want, tol, case.grad_tol)]
    assert not bad, "\n".join(bad)
    if inputs == "ties":  # control: the other tie rule moves the input gradient, so the ties are real
        other = dataclasses.replace(case.spec, tie_rule="first")
        assert rel_err(run_torch(other, weights, x, g, dtype, train).grads["input"], want.grads["input"]) > 1e-3


@pytest.mark.parametrize("case", BLOCKS, ids=[c.id for c in BLOCKS])
def test_our_weights_load_strictly_into_timm(case):
    """Canonical weights -> timm state_dict -> the real module with strict=True: the same tensors come back,
    and the module computes what our block computes."""
    spec = case.spec
    source = _randomised(case.real(), torch.float64, seed=7)
    weights = from_timm_state_dict(source.state_dict(), spec)
    fresh = case.real().double()
    fresh.load_state_dict(to_timm_state_dict(weights, spec), strict=True)
    back = from_timm_state_dict(fresh.state_dict(), spec)
    assert set(back) == set(weights) and all(np.array_equal(back[n], weights[n]) for n in weights)
    x, g = _inputs(case.shape, "normal", seed=9)
    want = _run_module(fresh, spec, x, g, torch.float64, False)
    bad = _compare(run_torch(spec, weights, x, g, "float64", False), want, TOLERANCES["float64"], case.grad_tol)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("case", BLOCKS, ids=[c.id for c in BLOCKS])
def test_anchor_copy_is_faithful(case):
    """benchmarks/anchors.py's copy takes the real module's state_dict strictly (same keys and shapes) and
    gives the same outputs, gradients and statistics, eval and train."""
    for train in (False, True):
        real = _randomised(case.real(), torch.float64, seed=3)
        copy = case.copy().double()
        copy.load_state_dict(real.state_dict(), strict=True)
        assert {k: tuple(v.shape) for k, v in copy.state_dict().items()} == {k: tuple(v.shape) for k, v in real.state_dict().items()}
        x, g = _inputs(case.shape, "ties" if train else "normal", seed=11)
        want = _run_module(real, case.spec, x, g, torch.float64, train)
        got = _run_module(copy, case.spec, x, g, torch.float64, train)
        bad = _compare(got, want, TOLERANCES["float64"])
        assert not bad, f"train={train}\n" + "\n".join(bad)


def test_hidden_width_is_real_make_divisible():
    for c in (1, 8, 24, 40, 64, 100, 256):
        for r in (2, 3, 6, 16):
            for d in (1, 4, 8):
                want = make_divisible(c * (1.0 / r), d, round_limit=0.0)
                assert CBAMSpec.timm(c, reduction=r, hidden_divisor=d).hidden == want, (c, r, d)
                assert A.timm_make_divisible(c * (1.0 / r), d, round_limit=0.0) == want
    for c, r, d in ((24, 16, 1), (40, 4, 8), (100, 6, 4), (8, 16, 4)):
        real = CbamModule(c, rd_ratio=1.0 / r, rd_divisor=d).channel.fc1.out_channels
        assert real == CBAMSpec.timm(c, reduction=r, hidden_divisor=d).hidden, (c, r, d)


# ------------------------------------------------------------------------------------------ the ResNets
def _x_shape(depth: int) -> tuple[int, int, int, int]:
    """Small inputs (float64 convolutions are slow on CPU): 64x64 for ResNet-18, 48x48
    for ResNet-50 (2x2 maps in layer4 either way: 8 values per channel for train-mode BN, whose 1 / std
    amplifies rounding where a channel has fewer)."""
    return (2, 3, 64, 64) if depth < 50 else (2, 3, 48, 48)


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN scales, shifts and running statistics everywhere (timm zero-inits the last BN of each block,
    and fresh statistics are 0 / 1), so that eval mode and every tensor's transfer are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # timm's BatchNormAct2d (CBAM's spatial BN) included
                ranges = ((m.weight, 0.5, 1.5), (m.bias, -0.1, 0.1), (m.running_mean, -0.1, 0.1), (m.running_var, 0.5, 1.5))
                for t, lo, hi in ranges:
                    t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64).mul(hi - lo).add(lo).to(t.dtype))
    return model.eval()


def _timm_resnet(depth: int, attn: str | None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    kwargs = {"block_args": dict(attn_layer=attn)} if attn else {}
    # attn_layer goes through block_args: timm's ResNet.__init__ takes no attn_layer argument
    model = timm.create_model(f"resnet{depth}", pretrained=False, num_classes=10, **kwargs).double()
    return _randomise_bn(model, seed)


def _torchvision_resnet(depth: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise_bn(getattr(tvm, f"resnet{depth}")(weights=None, num_classes=10).double(), seed)


def _load(build: Callable[[], nn.Module], state_dict) -> nn.Module:
    """``build()`` made on the meta device (no init: a float64 ResNet-50's costs seconds) and given
    ``state_dict`` with ``load_state_dict(strict=True, assign=True)``: the same key and shape checks."""
    with torch.device("meta"):
        model = build()
    # copies: assign=True adopts the tensors themselves, and the source model's must not be shared
    tensors = {k: v.detach().clone() if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v, copy=True))
               for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def _timm_build(depth: int, attn: str) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(f"resnet{depth}", pretrained=False, num_classes=10, block_args=dict(attn_layer=attn))


def _logits(model: nn.Module, x, train: bool = False):
    model.train(train)
    with torch.no_grad():
        return model(torch.tensor(x)).numpy()


def _ours(spec: ResNetSpec, weights) -> nn.Module:
    return import_model_weights(ResNet(spec, dtype=torch.float64), weights)


def _nnx_logits(spec: ResNetSpec, weights, x, train: bool):
    model = jm.import_model_weights(jm.ResNet(spec, dtype=jnp.float64), weights)
    model.train() if train else model.eval()
    logits = np.asarray(model(jnp.asarray(np.transpose(x, (0, 2, 3, 1)))))
    return logits, jm.export_model_weights(model)


RESNETS = [(18, "cbam", "timm"), (50, "cbam", "timm"), (18, "lcbam", "timm_light")]


@pytest.mark.parametrize("depth, attn, preset", RESNETS, ids=[f"resnet{d}-{a}" for d, a, _ in RESNETS])
def test_timm_resnet_cbam_both_ways(depth, attn, preset):
    tol = RESNET_TOLERANCES["float64"]
    model = _timm_resnet(depth, attn)
    weights, spec = rc.from_state_dict(model.state_dict(), "timm")
    assert spec == ResNetSpec(depth, num_classes=10, cbam_preset=preset)
    rng = np.random.default_rng(0)
    x, g = rng.normal(size=_x_shape(depth)), rng.normal(size=(2, 10))
    kinds = spec.param_kinds()

    want_eval = _logits(model, x)
    ours = _ours(spec, weights)
    assert rel_err(_logits(ours, x), want_eval) <= tol["logits"]
    # back: our weights in timm's format load strictly into a fresh timm model that computes the same
    fresh = _load(_timm_build(depth, attn), rc.to_state_dict(weights, spec, "timm"))
    assert rel_err(_logits(fresh, x), want_eval) <= tol["logits"]

    # train-mode BN: logits, every trainable tensor's gradient, the updated running statistics
    model.train()
    xt = torch.tensor(x)
    y = model(xt)
    (y * torch.tensor(g)).sum().backward()
    grads = dict(model.state_dict())
    grads.update({n: p.grad for n, p in model.named_parameters()})
    want_grads, _ = rc.from_state_dict(grads, "timm", spec=spec)
    want_stats = {n: a for n, a in rc.from_state_dict(model.state_dict(), "timm", spec=spec)[0].items() if kinds[n] == "stat"}
    ours.train()
    yo = ours(torch.tensor(x))
    (yo * torch.tensor(g)).sum().backward()
    assert rel_err(yo.detach().numpy(), y.detach().numpy()) <= tol["logits"]
    got_grads = export_model_grads(ours)
    assert set(got_grads) == {n for n in kinds if kinds[n] == "param"}
    worst = max(got_grads, key=lambda n: rel_err(got_grads[n], want_grads[n]))
    assert rel_err(got_grads[worst], want_grads[worst]) <= tol["grad"], worst
    after = export_model_weights(ours)
    assert max(rel_err(after[n], s) for n, s in want_stats.items()) <= tol["stats"]
    # the trained statistics go back too: timm's model with our exported weights evaluates as timm's own
    trained = _load(_timm_build(depth, attn), rc.to_state_dict(after, spec, "timm"))
    assert rel_err(_logits(trained, x), _logits(model, x)) <= tol["logits"]

    if jm is not None:  # the Flax NNX ResNet from the same canonical weights
        ye, _ = _nnx_logits(spec, weights, x, train=False)
        assert rel_err(ye, want_eval) <= tol["logits"]
        yt, nnx_after = _nnx_logits(spec, weights, x, train=True)
        assert rel_err(yt, y.detach().numpy()) <= tol["logits"]
        assert max(rel_err(nnx_after[n], s) for n, s in want_stats.items()) <= tol["stats"]


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_resnet_both_ways(depth):
    tol = RESNET_TOLERANCES["float64"]
    model = _torchvision_resnet(depth)
    weights, spec = rc.from_state_dict(model.state_dict(), "torchvision")
    assert spec == ResNetSpec(depth, num_classes=10, attention="none")
    x = np.random.default_rng(1).normal(size=_x_shape(depth))
    want_eval = _logits(model, x)
    ours = _ours(spec, weights)
    assert rel_err(_logits(ours, x), want_eval) <= tol["logits"]
    fresh = _load(lambda: getattr(tvm, f"resnet{depth}")(weights=None, num_classes=10), rc.to_state_dict(weights, spec, "torchvision"))
    assert rel_err(_logits(fresh, x), want_eval) <= tol["logits"]
    assert rel_err(_logits(ours, x, train=True), _logits(model, x, train=True)) <= tol["logits"]
    if jm is not None:
        assert rel_err(_nnx_logits(spec, weights, x, train=False)[0], want_eval) <= tol["logits"]


def test_cbam_added_to_a_torchvision_backbone_loads_into_timm():
    """add_cbam: a plain torchvision ResNet-50 state_dict -> ResNet-CBAM (timm preset); every backbone tensor
    is torchvision's, and the result exports to timm's format, loads strictly into timm's ResNet-50 with
    attn_layer='cbam', and computes what our model computes."""
    tol = RESNET_TOLERANCES["float64"]
    plain = _torchvision_resnet(50)
    backbone, _ = rc.from_state_dict(plain.state_dict(), "torchvision")
    weights, spec, initialised = rc.add_cbam(plain.state_dict(), preset="timm", seed=1)
    assert spec == ResNetSpec(50, num_classes=10, cbam_preset="timm")
    assert initialised == [n for n in spec.param_shapes() if ".cbam." in n] and len(initialised) == 16 * 7
    assert all(np.array_equal(weights[n], a) for n, a in backbone.items())
    x = np.random.default_rng(2).normal(size=_x_shape(50))
    ours = _logits(_ours(spec, weights), x)
    timm_model = _load(_timm_build(50, "cbam"), rc.to_state_dict(weights, spec, "timm"))
    assert rel_err(_logits(timm_model, x), ours) <= tol["logits"]
    assert rel_err(ours, _logits(plain, x)) > 1e-3  # the added blocks act


@pytest.mark.parametrize("depth, light", [(18, False), (50, False), (18, True)], ids=["resnet18", "resnet50", "resnet18-light"])
def test_resnet_copy_is_faithful(depth, light):
    """benchmarks/anchors_resnet.timm_resnet_cbam takes the real timm model's state_dict strictly and gives
    the same logits, eval and train."""
    real = _timm_resnet(depth, "lcbam" if light else "cbam")
    copy = _load(lambda: timm_resnet_cbam(depth, 10, light=light), real.state_dict())
    assert {k: tuple(v.shape) for k, v in copy.state_dict().items()} == {k: tuple(v.shape) for k, v in real.state_dict().items()}
    x = np.random.default_rng(3).normal(size=_x_shape(depth))
    for train in (False, True):
        assert rel_err(_logits(copy, x, train), _logits(real, x, train)) <= RESNET_TOLERANCES["float64"]["logits"], f"train={train}"
