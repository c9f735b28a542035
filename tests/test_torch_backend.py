"""cbam_multi.torch: parity with the NumPy reference, the official and timm CBAMs, weight transfer,
input validation, torch.compile and gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn

import cbam_multi.torch as ct
from cbam_multi import CBAMSpec, InputError, WeightsError, init_weights
from cbam_multi.reference import cbam_forward
from cbam_multi.torch import (
    CBAM,
    ChannelAttention,
    SpatialAttention,
    export_grads,
    export_weights,
    from_official_state_dict,
    from_timm_state_dict,
    import_weights,
    to_official_state_dict,
    to_timm_state_dict,
)

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


# The official CBAM (Jongchan/attention-module) and timm's CbamModule: faithful minimal copies live in
# benchmarks/anchors.py (timm itself is not importable everywhere); one copy serves tests and benchmarks.
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])  # the repository root, for `benchmarks`
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
from benchmarks.anchors import OfficialCBAM, TimmCbamModule


# --------------------------------------------------------------------------------------------------
# helpers
def randomise_(module: nn.Module, seed: int) -> nn.Module:
    """Random values for every float parameter and buffer (BN running var positive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.5)
    return module


def random_weights(spec: CBAMSpec, seed: int) -> dict[str, np.ndarray]:
    """Canonical float64 weights with no structure (unlike init: BN scale 0 for the official preset)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in spec.param_shapes().items():
        if name.endswith(".var"):
            out[name] = rng.uniform(0.5, 1.5, size=shape)
        else:
            out[name] = rng.normal(0.0, 0.6, size=shape)
    return out


def max_err(a, b) -> float:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    return float(np.max(np.abs(a - b)))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k} changed"


def randn(shape, seed=0, scale=1.0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


# --------------------------------------------------------------------------------------------------
def test_public_api():
    assert set(ct.__all__) == {
        "CBAM", "ChannelAttention", "SpatialAttention", "export_weights", "import_weights", "export_grads",
        "load_checkpoint", "from_official_state_dict", "to_official_state_dict", "from_timm_state_dict", "to_timm_state_dict",
    }
    for name in ct.__all__:
        assert hasattr(ct, name)
    assert "NCHW" in ct.__doc__


def test_torch_native_state_dict_and_init_from_canonical_seed():
    spec = CBAMSpec.official(32)
    rng_before = torch.get_rng_state()
    model = CBAM(spec, seed=7)
    assert torch.equal(torch.get_rng_state(), rng_before), "construction must not consume the global torch RNG"
    assert list(model.state_dict()) == [
        "channel.fc1.weight", "channel.fc1.bias", "channel.fc2.weight", "channel.fc2.bias",
        "spatial.conv.weight", "spatial.bn.weight", "spatial.bn.bias", "spatial.bn.running_mean",
        "spatial.bn.running_var", "spatial.bn.num_batches_tracked",
    ]
    assert isinstance(model.channel.fc1, nn.Linear) and isinstance(model.spatial.bn, nn.BatchNorm2d)
    assert model.spatial.bn.momentum == 0.01 and model.spatial.bn.eps == spec.norm_eps
    assert model.spatial.conv.padding == (3, 3) and model.spatial.conv.bias is None
    assert model.spec is spec and model.channel.spec is spec
    expected = init_weights(spec, 7)
    got = export_weights(model)
    assert list(got) == list(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    # standalone gates hold the same slice of the same draw
    ch, sp = export_weights(ChannelAttention(spec, seed=7)), export_weights(SpatialAttention(spec, seed=7))
    assert set(ch) == set(spec.param_shapes("channel")) and set(sp) == set(spec.param_shapes("spatial"))
    for name, arr in {**ch, **sp}.items():
        np.testing.assert_array_equal(arr, expected[name], err_msg=name)
    timm_model = CBAM(CBAMSpec.timm(32), dtype=torch.float64)
    assert isinstance(timm_model.channel.fc1, nn.Conv2d) and timm_model.channel.fc1.weight.shape == (2, 32, 1, 1)
    assert timm_model.channel.fc1.bias is None and timm_model.channel.fc1.weight.dtype == torch.float64


# ------------------------------------------------------------------- NumPy reference parity (float64)
REFERENCE_CASES = [
    ("seed", CBAMSpec.seed(8), (2, 8, 7, 5)),
    ("paper", CBAMSpec.paper(32), (2, 32, 7, 5)),
    ("official", CBAMSpec.official(32), (2, 32, 7, 5)),
    ("timm", CBAMSpec.timm(24), (2, 24, 7, 5)),
    ("lp_lse_hard", CBAMSpec.seed(8, channel_pools=("avg", "max", "lp", "lse"), gate="hard_sigmoid"), (2, 8, 6, 6)),
    ("lse_only", CBAMSpec.paper(16, channel_pools=("lse",)), (3, 16, 5, 4)),
    ("lp_max_official", CBAMSpec.official(16, channel_pools=("lp", "max")), (2, 16, 4, 5)),
    ("timm_hard_bias", CBAMSpec.timm(16, gate="hard_sigmoid", mlp_bias=True, spatial_bias=True), (2, 16, 7, 5)),
    ("1x1_no_bn", CBAMSpec.seed(8), (3, 8, 1, 1)),
    ("1x1_paper_k7", CBAMSpec.paper(16), (2, 16, 1, 1)),
    ("channels_1_round", CBAMSpec.seed(1, hidden_rule="round", reduction=16), (2, 1, 5, 3)),
    ("timm_channels_1", CBAMSpec.timm(1), (2, 1, 4, 4)),
    ("official_1x1_eval", CBAMSpec.official(16), (1, 16, 1, 1)),
]


@pytest.mark.parametrize("name,spec,shape", REFERENCE_CASES, ids=[c[0] for c in REFERENCE_CASES])
def test_forward_matches_reference_eval(name, spec, shape):
    weights = random_weights(spec, 1)
    model = import_weights(CBAM(spec, dtype=torch.float64), weights).eval()
    x = randn(shape, seed=2, scale=2.0)
    y = model(x)
    y_ref, stats = cbam_forward(x.numpy(), weights, spec, train=False)
    assert stats == {}
    assert y.dtype == torch.float64 and tuple(y.shape) == shape
    err = max_err(y, y_ref)
    assert err <= 1e-10, f"{name}: max abs error vs reference {err:.3e}"


TRAIN_CASES = [c for c in REFERENCE_CASES if c[1].has_norm and math.prod(c[2][i] for i in (0, 2, 3)) >= 2]


@pytest.mark.parametrize("name,spec,shape", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_mode_matches_reference_and_updates_running_stats(name, spec, shape):
    weights = random_weights(spec, 3)
    model = import_weights(CBAM(spec, dtype=torch.float64), weights).train()
    for step in range(2):
        x = randn(shape, seed=10 + step, scale=1.5)
        y = model(x)
        y_ref, stats = cbam_forward(x.numpy(), weights, spec, train=True)
        err = max_err(y, y_ref)
        assert err <= 1e-10, f"{name} step {step}: max abs error vs reference {err:.3e}"
        got = export_weights(model)
        assert set(stats) == {"spatial.bn.mean", "spatial.bn.var"}
        for stat, value in stats.items():
            e = max_err(got[stat], value)
            assert e <= 1e-12, f"{name} step {step}: {stat} max abs error {e:.3e}"
        weights = {**weights, **stats}
    assert int(model.spatial.bn.num_batches_tracked) == 2


def test_standalone_gates_match_reference_parts():
    from cbam_multi.reference import channel_attention, spatial_attention

    spec = CBAMSpec.official(16, gate="hard_sigmoid", channel_pools=("avg", "lse"))
    w = random_weights(spec, 4)
    x = randn((2, 16, 5, 6), seed=5, scale=3.0)
    ch = import_weights(ChannelAttention(spec, dtype=torch.float64), {n: w[n] for n in spec.param_shapes("channel")})
    sp = import_weights(SpatialAttention(spec, dtype=torch.float64), {n: w[n] for n in spec.param_shapes("spatial")})
    err = max_err(ch(x), channel_attention(x.numpy(), w, spec))
    assert err <= 1e-10, f"channel: {err:.3e}"
    err = max_err(sp.eval()(x), spatial_attention(x.numpy(), w, spec, train=False)[0])
    assert err <= 1e-10, f"spatial: {err:.3e}"


# ------------------------------------------------------------------------ official / timm parity
def _official_parts(channels=32, pools=("avg", "max")):
    official = randomise_(OfficialCBAM(channels, 16, list(pools)).double(), seed=11)
    spec = CBAMSpec.official(channels, channel_pools=pools)
    return official, spec


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("pools", [("avg", "max"), ("avg", "max", "lp", "lse")], ids=["avg_max", "all_pools"])
def test_official_cbam_parity(train, pools):
    official, spec = _official_parts(32, pools)
    ours = import_weights(CBAM(spec, dtype=torch.float64), from_official_state_dict(official.state_dict(), spec))
    official.train(train)
    ours.train(train)
    x = randn((3, 32, 9, 11), seed=12, scale=2.0)
    for step in range(2 if train else 1):
        y_off, y_ours = official(x + step), ours(x + step)
        err = max_err(y_ours, y_off)
        assert err <= 1e-12, f"official parity ({'train' if train else 'eval'}, step {step}): max abs error {err:.3e}"
    bn_off, bn_ours = official.SpatialGate.spatial.bn, ours.spatial.bn
    for attr in ("running_mean", "running_var"):
        err = max_err(getattr(bn_ours, attr), getattr(bn_off, attr))
        assert err <= 1e-14, f"{attr}: max abs error {err:.3e}"


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("channels,mlp_bias", [(32, False), (24, False), (16, True)])
def test_timm_cbam_parity(train, channels, mlp_bias):
    timm_mod = randomise_(TimmCbamModule(channels, mlp_bias=mlp_bias).double(), seed=21)
    spec = CBAMSpec.timm(channels, mlp_bias=mlp_bias)
    assert timm_mod.channel.fc1.out_channels == spec.hidden
    ours = import_weights(CBAM(spec, dtype=torch.float64), from_timm_state_dict(timm_mod.state_dict(), spec))
    timm_mod.train(train)
    ours.train(train)
    x = randn((2, channels, 8, 7), seed=22, scale=2.0)
    for step in range(2 if train else 1):
        err = max_err(ours(x - step), timm_mod(x - step))
        assert err <= 1e-12, f"timm parity ({'train' if train else 'eval'}, step {step}): max abs error {err:.3e}"
    for attr in ("running_mean", "running_var"):
        err = max_err(getattr(ours.spatial.bn, attr), getattr(timm_mod.spatial.conv.bn, attr))
        assert err <= 1e-14, f"{attr}: max abs error {err:.3e}"


@pytest.mark.parametrize(
    "make_spec, anchor_cls, to_anchor, seed",
    [
        pytest.param(CBAMSpec.official, OfficialCBAM, to_official_state_dict, 32, id="official"),
        pytest.param(CBAMSpec.timm, TimmCbamModule, to_timm_state_dict, 33, id="timm"),
    ],
)
def test_to_anchor_state_dict_loads_strictly_and_matches(make_spec, anchor_cls, to_anchor, seed):
    x = randn((2, 32, 6, 6), seed=31)
    spec = make_spec(32)
    ours = import_weights(CBAM(spec, dtype=torch.float64), random_weights(spec, seed)).eval()
    anchor = anchor_cls(32).double().eval()
    anchor.load_state_dict(to_anchor(export_weights(ours), spec), strict=True)
    err = max_err(anchor(x), ours(x))
    assert err <= 1e-12, f"{to_anchor.__name__}: max abs error {err:.3e}"


def test_adapters_reorder_spatial_kernel_for_other_concat_order():
    official, _ = _official_parts(16)
    official.eval()
    # the same official weights, described with the other concat order: the adapter swaps the kernel's inputs
    spec_mean_first = CBAMSpec.official(16, concat_order=("mean", "max"))
    w = from_official_state_dict(official.state_dict(), spec_mean_first)
    ours = import_weights(CBAM(spec_mean_first, dtype=torch.float64), w).eval()
    x = randn((2, 16, 5, 5), seed=41)
    err = max_err(ours(x), official(x))
    assert err <= 1e-12, f"reordered kernel: max abs error {err:.3e}"
    back = to_official_state_dict(w, spec_mean_first)
    torch.testing.assert_close(back["SpatialGate.spatial.conv.weight"], official.SpatialGate.spatial.conv.weight,
                               rtol=0, atol=0)


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.cbam = OfficialCBAM(c)


class _Net(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3)
        self.layer1 = nn.Sequential(_Block(c), _Block(c))


def test_official_resnet_checkpoint_module_prefix_and_nested_prefix():
    net = randomise_(_Net(32), seed=51)
    # DataParallel checkpoints: every key starts with "module.", wrapped in a training-checkpoint dict
    ckpt = {"epoch": 90, "arch": "resnet50", "state_dict": {"module." + k: v for k, v in net.state_dict().items()}}
    spec = CBAMSpec.official(32)
    w = from_official_state_dict(ckpt, spec, prefix="layer1.1.cbam.")
    direct = from_official_state_dict(net.layer1[1].cbam.state_dict(), spec)
    assert list(w) == list(spec.param_shapes())
    for name in w:
        np.testing.assert_array_equal(w[name], direct[name], err_msg=name)
    np.testing.assert_array_equal(w["channel.fc1.kernel"], net.layer1[1].cbam.ChannelGate.mlp[1].weight.detach().numpy().T)
    # the same without the "module." wrapper
    w2 = from_official_state_dict(net.state_dict(), spec, prefix="layer1.1.cbam.")
    for name in w:
        np.testing.assert_array_equal(w[name], w2[name], err_msg=name)

    with pytest.raises(WeightsError) as e:  # no prefix: the whole network is "unexpected"
        from_official_state_dict(ckpt, spec)
    msg = str(e.value)
    assert "missing" in msg and "unexpected" in msg and "conv1.weight" in msg and "layer1.0.cbam." in msg
    with pytest.raises(WeightsError, match="layer1.1.cbam."):  # a wrong prefix names the real ones
        from_official_state_dict(ckpt, spec, prefix="layer2.0.cbam.")


def test_adapter_errors_list_every_problem():
    official, spec = _official_parts(32)
    sd = dict(official.state_dict())
    del sd["ChannelGate.mlp.3.bias"]
    sd["ChannelGate.extra.weight"] = torch.zeros(3)
    sd["SpatialGate.spatial.conv.weight"] = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(WeightsError) as e:
        from_official_state_dict(sd, spec)
    msg = str(e.value)
    assert "missing ['ChannelGate.mlp.3.bias']" in msg
    assert "unexpected ['ChannelGate.extra.weight']" in msg
    assert "SpatialGate.spatial.conv.weight: shape (1, 2, 3, 3)" in msg and "(1, 2, 7, 7)" in msg
    # num_batches_tracked is ignored; a spec with the wrong hidden width is a shape error
    with pytest.raises(WeightsError, match=r"ChannelGate.mlp.1.weight: shape \(2, 32\), spec expects \(4, 32\)"):
        from_official_state_dict(official.state_dict(), CBAMSpec.official(32, reduction=8))
    # integer tensors fail the dtype check
    sd = dict(official.state_dict())
    sd["ChannelGate.mlp.1.bias"] = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(WeightsError, match="not floating point"):
        from_official_state_dict(sd, spec)
    timm_mod = TimmCbamModule(32)
    with pytest.raises(WeightsError, match="missing"):  # timm has no MLP bias; a spec with bias does
        from_timm_state_dict(timm_mod.state_dict(), CBAMSpec.timm(32, mlp_bias=True))


# ------------------------------------------------------------------------------- weights round trip
@pytest.mark.parametrize("preset", CBAMSpec.PRESETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_export_import_export_round_trip_is_exact(preset, dtype):
    spec = CBAMSpec.preset(preset, 32)
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    w = {k: v.astype(np_dtype) for k, v in random_weights(spec, 61).items()}
    a = import_weights(CBAM(spec, dtype=dtype), w)
    first = export_weights(a)
    b = import_weights(CBAM(spec, dtype=dtype, seed=5), first)
    second = export_weights(b)
    assert list(first) == list(spec.param_shapes()) == list(second)
    for name in first:
        assert first[name].dtype == np_dtype and first[name].shape == spec.param_shapes()[name]
        np.testing.assert_array_equal(first[name], w[name], err_msg=name)
        np.testing.assert_array_equal(second[name], first[name], err_msg=name)
    # exports are copies, not views of the parameters
    first["channel.fc1.kernel"][...] = 123.0
    assert not torch.any(a.channel.fc1.weight == 123.0)
    # the parts round-trip on their own too
    ch = import_weights(ChannelAttention(spec, dtype=dtype), {n: w[n] for n in spec.param_shapes("channel")})
    assert set(export_weights(ch)) == set(spec.param_shapes("channel"))


def test_import_accepts_torch_tensors_and_casts_to_module_dtype():
    spec = CBAMSpec.seed(8)
    w64 = random_weights(spec, 71)
    model = import_weights(CBAM(spec), {k: torch.from_numpy(v) for k, v in w64.items()})
    assert model.channel.fc1.weight.dtype == torch.float32
    np.testing.assert_allclose(export_weights(model)["spatial.conv.kernel"], w64["spatial.conv.kernel"], rtol=1e-6)


@pytest.mark.parametrize(
    "corrupt,words",
    [
        (lambda w: w.pop("channel.fc2.kernel"), ["missing", "channel.fc2.kernel"]),
        (lambda w: w.__setitem__("spatial.conv.kernel", np.zeros((3, 3, 2, 1))), ["spatial.conv.kernel", "(3, 3, 2, 1)"]),
        (lambda w: w.__setitem__("channel.fc1.kernel", np.zeros((32, 2), dtype=np.int32)), ["not floating point"]),
        (lambda w: w.__setitem__("channel.fc9.kernel", np.zeros(1)), ["unexpected", "channel.fc9.kernel"]),
    ],
    ids=["missing", "shape", "int_dtype", "unexpected"],
)
def test_bad_import_raises_and_leaves_module_unchanged(corrupt, words):
    spec = CBAMSpec.official(32)
    model = import_weights(CBAM(spec), random_weights(spec, 81))
    before = snapshot(model)
    w = random_weights(spec, 82)  # valid except for the corruption: nothing may be copied
    corrupt(w)
    with pytest.raises(WeightsError) as e:
        import_weights(model, w)
    for word in words:
        assert word in str(e.value)
    assert_same_state(model, before)


def test_bad_import_names_every_problem_at_once():
    spec = CBAMSpec.official(32)
    w = random_weights(spec, 83)
    del w["spatial.bn.var"]
    w["channel.fc1.bias"] = np.zeros(3)
    with pytest.raises(WeightsError) as e:
        import_weights(CBAM(spec), w)
    assert "spatial.bn.var" in str(e.value) and "channel.fc1.bias: shape (3,)" in str(e.value)
    with pytest.raises(WeightsError, match="unexpected"):  # a whole-block dict into one gate
        import_weights(ChannelAttention(spec), random_weights(spec, 84))
    with pytest.raises(TypeError):
        import_weights(nn.Linear(2, 2), w)


# -------------------------------------------------------------------------------- input validation
def test_bad_inputs_raise_input_error_with_clear_words():
    spec = CBAMSpec.official(16)
    model = CBAM(spec).eval()
    model(torch.randn(2, 16, 5, 5))  # a valid call first: the eager check cache must not hide later errors
    with pytest.raises(InputError, match=r"rank-4 NCHW.*rank 3.*x\[None\]"):
        model(torch.randn(16, 5, 5))
    with pytest.raises(InputError, match=r"looks like NHWC.*permute\(0, 3, 1, 2\)"):
        model(torch.randn(2, 5, 5, 16))
    with pytest.raises(InputError, match="16 channels"):
        model(torch.randn(2, 8, 5, 5))
    with pytest.raises(InputError, match="floating-point"):
        model(torch.ones(2, 16, 5, 5, dtype=torch.int64))
    with pytest.raises(InputError, match=r"input is float64 but module parameters are float32.*module.to\(torch.float64\)"):
        model(torch.randn(2, 16, 5, 5, dtype=torch.float64))
    for gate in (ChannelAttention(spec), SpatialAttention(spec)):
        with pytest.raises(InputError, match="float64 but module parameters are float32"):
            gate(torch.randn(2, 16, 5, 5, dtype=torch.float64))
    # BN in train mode needs B*H*W >= 2; eval mode is fine
    model.train()
    with pytest.raises(InputError, match=r"B\*H\*W >= 2"):
        model(torch.randn(1, 16, 1, 1))
    model.eval()
    model(torch.randn(1, 16, 1, 1))
    # after .double() the float32 shape that passed before is rejected and float64 accepted
    x = torch.randn(2, 16, 5, 5)
    model(x)
    model.double()
    with pytest.raises(InputError, match="input is float32 but module parameters are float64"):
        model(x)
    assert model(x.double()).dtype == torch.float64


def test_autocast_allows_lower_precision_input():
    model = CBAM(CBAMSpec.timm(16)).eval()
    x = torch.randn(2, 16, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x.bfloat16())
    assert y.shape == x.shape and torch.isfinite(y.float()).all()


# ---------------------------------------------------------------------------------- torch.compile
@pytest.mark.slow  # inductor's compile: ~10 s with a cold inductor cache, so start it early
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch internals
def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    spec = CBAMSpec.timm(16, channel_pools=("avg", "max", "lse"))
    model = import_weights(CBAM(spec), {k: v.astype(np.float32) for k, v in random_weights(spec, 91).items()}).eval()
    # inductor (fullgraph: the input checks cause no graph break), then the second shape's dynamic-size
    # recompile through dynamo and AOTAutograd only (aot_eager): symbolic sizes are what our Python meets there,
    # and inductor's symbolic code generation took ~25 s more to compile on 2 cores
    for backend in ("inductor", "aot_eager"):
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        with torch.no_grad():
            for shape in [(2, 16, 8, 8), (3, 16, 7, 5)][: 1 if backend == "inductor" else 2]:
                x = randn(shape, seed=92, dtype=torch.float32)
                eager, out = model(x), compiled(x)
                err = max_err(out, eager)
                assert err <= 1e-5, f"torch.compile ({backend}) vs eager {shape}: max abs error {err:.3e}"
    # without fullgraph, a bad input breaks the graph at the check and raises the usual InputError (dynamo's
    # behaviour: the eager backend is enough to see it)
    default = torch.compile(model, backend="eager")
    with pytest.raises(InputError, match="looks like NHWC"):
        default(torch.randn(2, 8, 8, 16))
    with pytest.raises(InputError, match="input is float64 but module parameters are float32"):
        default(torch.randn(2, 16, 8, 8, dtype=torch.float64))


# ------------------------------------------------------------------------------------- gradients
def _reference_loss(x, weights, spec, g):
    y, _ = cbam_forward(x, weights, spec, train=False)
    return float((y * g).sum())


@pytest.mark.parametrize("spec", [CBAMSpec.seed(8), CBAMSpec.timm(16, gate="hard_sigmoid")], ids=["seed_linear", "timm_conv1x1"])
def test_export_grads_match_finite_differences_of_reference(spec):
    weights = random_weights(spec, 101)
    model = import_weights(CBAM(spec, dtype=torch.float64), weights).eval()
    x = randn((2, spec.channels, 5, 4), seed=102)
    g = randn((2, spec.channels, 5, 4), seed=103)
    (model(x) * g).sum().backward()
    grads = export_grads(model)
    trainable = [n for n, k in spec.param_kinds().items() if k == "param"]
    assert list(grads) == trainable
    rng = np.random.default_rng(104)
    eps = 1e-6
    for name in trainable:
        assert grads[name].shape == spec.param_shapes()[name]
        idx = tuple(int(rng.integers(d)) for d in weights[name].shape)
        plus = {k: v.copy() for k, v in weights.items()}
        minus = {k: v.copy() for k, v in weights.items()}
        plus[name][idx] += eps
        minus[name][idx] -= eps
        fd = (_reference_loss(x.numpy(), plus, spec, g.numpy()) - _reference_loss(x.numpy(), minus, spec, g.numpy())) / (2 * eps)
        assert abs(grads[name][idx] - fd) <= 1e-6 * max(1.0, abs(fd)), f"{name}{idx}: autograd {grads[name][idx]} vs fd {fd}"


def test_export_grads_layouts_and_missing_grad():
    spec = CBAMSpec.official(16)
    model = CBAM(spec, dtype=torch.float64).train()
    with pytest.raises(WeightsError, match="backward"):
        export_grads(model)
    model(randn((2, 16, 4, 4), seed=111)).square().sum().backward()
    grads = export_grads(model)
    assert "spatial.bn.mean" not in grads and "spatial.bn.var" not in grads
    np.testing.assert_array_equal(grads["channel.fc1.kernel"], model.channel.fc1.weight.grad.numpy().T)
    np.testing.assert_array_equal(
        grads["spatial.conv.kernel"], model.spatial.conv.weight.grad.numpy().transpose(2, 3, 1, 0)
    )
    ch = ChannelAttention(spec, dtype=torch.float64)
    ch(randn((2, 16, 4, 4), seed=112)).sum().backward()
    assert set(export_grads(ch)) == set(spec.param_shapes("channel"))
