"""Our CBAM against the anchors' own ops, on inputs full of tied maxima: the official CBAM (``F.max_pool2d``,
``torch.max(x, 1)``, ``no_spatial``), the seed blog (``nn.AdaptiveMaxPool2d``, ``torch.max(dim)``), timm's
``CbamModule`` and ``LightCbamModule`` (``amax``; ``act_layer``, ``rd_channels``, ``rd_divisor``), from the
copies in benchmarks/anchors.py. For each case and dtype: outputs, BN running statistics and the gradients
with respect to the input and every parameter, torch modules and the jitted JAX functions (float64; the
Flax modules meet the same tie inputs against torch in parity_tests/), with the anchor's weights moved
through the state-dict adapters. A control run with the other tie rule shows the inputs' ties do matter.
Also: the tie rules' routing against the oracle's `max_routing`, and the hidden width against timm's
``make_divisible``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp
import torch.nn as nn

from benchmarks import anchors as A
from cbam_multi import CBAMSpec
from cbam_multi.jax import functional as JF
from cbam_multi.parity import TOLERANCES, RunResult, max_abs, rel_err, run_torch, tie_input
from cbam_multi.reference import cbam_forward, max_routing
from cbam_multi.torch import from_official_state_dict, from_timm_state_dict, to_timm_state_dict
from cbam_multi.torch import functional as TF


@dataclass(frozen=True)
class AnchorCase:
    name: str
    build: Callable[[], nn.Module]  # the anchor module
    spec: CBAMSpec
    adapter: Callable | None  # state_dict -> canonical weights; None: the blog (weights copied in)
    shape: tuple[int, int, int, int]
    train: bool = False


CASES = [
    AnchorCase("official", lambda: A.OfficialCBAM(32, 16), CBAMSpec.official(32), from_official_state_dict, (2, 32, 7, 6)),
    AnchorCase("official-train", lambda: A.OfficialCBAM(32, 16), CBAMSpec.official(32), from_official_state_dict,
               (2, 32, 7, 6), train=True),
    AnchorCase("official-all_pools", lambda: A.OfficialCBAM(16, 8, ["avg", "max", "lp", "lse"]),
               CBAMSpec.official(16, reduction=8, channel_pools=("avg", "max", "lp", "lse")), from_official_state_dict,
               (2, 16, 5, 5)),
    AnchorCase("official-no_spatial", lambda: A.OfficialCBAM(32, 16, no_spatial=True),
               CBAMSpec.official(32, no_spatial=True), from_official_state_dict, (2, 32, 6, 5)),
    AnchorCase("blog-seed", lambda: A.BlogCBAM(16), CBAMSpec.seed(16), None, (2, 16, 6, 5)),
    AnchorCase("timm", lambda: A.TimmCbamModule(32), CBAMSpec.timm(32), from_timm_state_dict, (2, 32, 6, 6), True),
    AnchorCase("timm_light", lambda: A.TimmLightCbamModule(32), CBAMSpec.timm_light(32), from_timm_state_dict,
               (2, 32, 6, 6), True),
    AnchorCase("timm-silu-rd_divisor", lambda: A.TimmCbamModule(40, rd_divisor=4, act_layer=nn.SiLU),
               CBAMSpec.timm(40, hidden_divisor=4, mlp_act="silu"), from_timm_state_dict, (2, 40, 5, 4)),
    AnchorCase("timm_light-relu6-rd_channels", lambda: A.TimmLightCbamModule(24, rd_channels=5, act_layer=nn.ReLU6),
               CBAMSpec.timm_light(24, hidden_channels=5, mlp_act="relu6"), from_timm_state_dict, (2, 24, 5, 5)),
    AnchorCase("timm-leaky_relu-bias", lambda: A.TimmCbamModule(16, act_layer=nn.LeakyReLU, mlp_bias=True),
               CBAMSpec.timm(16, mlp_act="leaky_relu", mlp_bias=True), from_timm_state_dict, (2, 16, 5, 6), True),
]
DTYPES = ("float64", "float32")
# float32 for the anchors whose tie rule differs (official: first, timm: split); float64 for every case
PARAMS = [pytest.param(c, d, id=f"{c.name}-{d}") for c in CASES for d in DTYPES
          if d == "float64" or c.name in ("official-train", "blog-seed", "timm_light")]


def _anchor(case: AnchorCase, dtype: torch.dtype):
    """The anchor in ``dtype`` with random weights, and those weights as float64 canonical weights."""
    torch.manual_seed(0)
    mod = case.build().to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
            if t.is_floating_point():
                low = 0.5 if name.endswith("running_var") else -1.0
                t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64).mul(1.5 - low).add(low).to(dtype))
    if case.adapter is None:  # the blog: canonical weights first, copied into its modules
        weights = {n: np.asarray(a, np.float64) for n, a in
                   _random_canonical(case.spec).items()}
        A.load_seed_weights(mod, weights)
    else:
        weights = {n: a.astype(np.float64) for n, a in case.adapter(mod.state_dict(), case.spec).items()}
    return mod, weights


def _random_canonical(spec: CBAMSpec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {n: rng.uniform(-1.0, 1.0, size=s) for n, s in spec.param_shapes().items()}


def _run_jax(spec, weights, x, g, dtype: str, train: bool) -> RunResult:
    """`cbam_multi.jax.functional.cbam` under one jit of its gradient (one compile per case: fast)."""
    nhwc = lambda a: jnp.asarray(np.transpose(a, (0, 2, 3, 1)), dtype)
    params = {n: jnp.asarray(a, dtype) for n, a in weights.items()}
    gj = nhwc(g)

    def loss(p, xin):
        y, stats = JF.cbam(p, xin, spec, train=train)
        return (y * gj).sum(), (y, stats)

    (gp, gx), (y, stats) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, nhwc(x))
    kinds = spec.param_kinds()
    grads = {"input": np.transpose(np.asarray(gx), (0, 3, 1, 2))}
    grads.update({n: np.asarray(a) for n, a in gp.items() if kinds[n] == "param"})
    return RunResult(np.transpose(np.asarray(y), (0, 3, 1, 2)), grads, {n: np.asarray(a) for n, a in stats.items()})


def _run_anchor(case, mod, x, g, dtype):
    mod.train(case.train)
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    y = mod(xt)
    (y * torch.tensor(g, dtype=dtype)).sum().backward()
    out = {"y": y.detach().double().numpy(), "input": xt.grad.double().numpy()}
    if case.adapter is not None:
        # the anchor's parameter gradients in canonical names: its state_dict with every parameter's
        # value replaced by its gradient, through the same adapter
        grads = dict(mod.state_dict())
        grads.update({n: p.grad for n, p in mod.named_parameters()})
        kinds = case.spec.param_kinds()
        canon = case.adapter(grads, case.spec)
        out["params"] = {n: a for n, a in canon.items() if kinds[n] == "param"}
        stats = case.adapter(mod.state_dict(), case.spec)
        out["stats"] = {n: stats[n] for n in kinds if kinds[n] == "stat"} if case.train else {}
    return out


@pytest.mark.parametrize("case, dtype", PARAMS)
def test_anchor_parity_with_ties(case, dtype):
    tol = TOLERANCES[dtype]
    tdtype = getattr(torch, dtype)
    mod, weights = _anchor(case, tdtype)
    rng = np.random.default_rng(5)
    x, g = tie_input(case.shape, rng), rng.normal(size=case.shape)
    want = _run_anchor(case, mod, x, g, tdtype)
    # the anchor's (rounded) weights are the weights under test, in every dtype
    rows = []
    runs = (("torch", run_torch), ("jax", _run_jax)) if dtype == "float64" else (("torch", run_torch),)
    for backend, run in runs:
        got = run(case.spec, weights, x, g, dtype, case.train)
        rows.append((backend, "y", max_abs(got.y, want["y"]), tol["y"]))
        rows.append((backend, "grad input", rel_err(got.grads["input"], want["input"]), tol["grad"]))
        for name, ref in want.get("params", {}).items():
            rows.append((backend, f"grad {name}", rel_err(got.grads[name], ref), tol["grad"]))
        for name, ref in want.get("stats", {}).items():
            rows.append((backend, name, rel_err(got.stats[name], ref), tol["stats"]))
    bad = [r for r in rows if not r[2] <= r[3]]
    assert not bad, "\n".join(f"{b:<6} {q:<28} {e:.2e} > {t:.0e}" for b, q, e, t in bad)
    # control: the other tie rule gives another input gradient on these inputs (so the ties are real)
    other = dataclasses.replace(case.spec, tie_rule="split" if case.spec.tie_rule == "first" else "first")
    wrong = run_torch(other, weights, x, g, dtype, case.train)
    assert rel_err(wrong.grads["input"], want["input"]) > 1e-3, "inputs without effective ties"


@pytest.mark.parametrize("rule", ["first", "split"])
@pytest.mark.parametrize("axes", [(2, 3), (1,)], ids=["hw", "channels"])
def test_max_reduce_routes_like_the_oracle(axes, rule):
    x = tie_input((2, 5, 4, 3), np.random.default_rng(8))
    want = max_routing(x, axes, rule)
    xt = torch.tensor(x, requires_grad=True)
    TF.max_reduce(xt, axes, rule).sum().backward()
    assert np.array_equal(xt.grad.numpy(), want)
    xt_cl = torch.tensor(x).contiguous(memory_format=torch.channels_last).requires_grad_()
    TF.max_reduce(xt_cl, axes, rule).sum().backward()
    assert np.array_equal(xt_cl.grad.numpy(), want)
    # JAX on NHWC: H, W are axes (1, 2), channels axis 3; reverse mode and forward mode (custom_jvp)
    jaxes = {(2, 3): (1, 2), (1,): (3,)}[axes]
    xn = jnp.asarray(np.transpose(x, (0, 2, 3, 1)))
    got = jax.grad(lambda v: JF.max_reduce(v, jaxes, rule).sum())(xn)
    assert np.array_equal(np.transpose(np.asarray(got), (0, 3, 1, 2)), want)
    t = jnp.asarray(np.random.default_rng(9).normal(size=xn.shape))
    _, tangent = jax.jvp(lambda v: JF.max_reduce(v, jaxes, rule), (xn,), (t,))
    expect = (np.transpose(want, (0, 2, 3, 1)) * np.asarray(t)).sum(axis=jaxes)
    assert np.allclose(np.asarray(tangent), expect, rtol=0, atol=1e-12)


def test_official_preset_now_matches_the_official_gradient_where_split_did_not():
    """The issue's measurement: a tie inside a channel moved the input gradient by ~0.5 under 'split'."""
    case = CASES[0]
    mod, weights = _anchor(case, torch.float64)
    rng = np.random.default_rng(5)
    x, g = tie_input(case.shape, rng), rng.normal(size=case.shape)
    want = _run_anchor(case, mod, x, g, torch.float64)["input"]
    first = run_torch(case.spec, weights, x, g, "float64", False).grads["input"]
    split = run_torch(dataclasses.replace(case.spec, tie_rule="split"), weights, x, g, "float64", False).grads["input"]
    assert max_abs(first, want) <= 1e-12 < 1e-2 < max_abs(split, want)


@pytest.mark.parametrize("channels", [1, 8, 24, 40, 64, 100, 256])
@pytest.mark.parametrize("reduction", [2, 3, 6, 16])
@pytest.mark.parametrize("divisor", [1, 4, 8])
def test_hidden_width_is_timms_make_divisible(channels, reduction, divisor):
    spec = CBAMSpec.timm(channels, reduction=reduction, hidden_divisor=divisor)
    assert spec.hidden == A.timm_make_divisible(channels * (1.0 / reduction), divisor, round_limit=0.0)


def test_light_and_no_spatial_state_dicts_round_trip_strictly():
    spec = CBAMSpec.timm_light(32)
    mod = A.TimmLightCbamModule(32).double()
    w = _random_canonical(spec)
    mod.load_state_dict(to_timm_state_dict(w, spec), strict=True)
    back = from_timm_state_dict(mod.state_dict(), spec)
    assert all(np.array_equal(back[n], w[n]) for n in w)
    with pytest.raises(Exception, match="variant='light'"):
        from_timm_state_dict(mod.state_dict(), CBAMSpec.timm(32))
    spec = CBAMSpec.official(32, no_spatial=True)
    off = A.OfficialCBAM(32, 16, no_spatial=True).double()
    assert sorted(from_official_state_dict(off.state_dict(), spec)) == sorted(spec.param_shapes())
    with pytest.raises(Exception, match="no light variant"):
        from_official_state_dict(off.state_dict(), CBAMSpec.official(32, variant="light"))


def test_oracle_runs_every_new_option():
    """The oracle itself against the anchors' forward (float64), for the options only it has not been
    compared on elsewhere: light maps, no_spatial, activations."""
    for case in CASES:
        if case.adapter is None:
            continue
        mod, weights = _anchor(case, torch.float64)
        x = tie_input(case.shape, np.random.default_rng(2))
        mod.eval()
        with torch.no_grad():
            want = mod(torch.tensor(x)).numpy()
        got, _ = cbam_forward(x, weights, case.spec, train=False)
        assert max_abs(got, want) <= 1e-12, case.name
