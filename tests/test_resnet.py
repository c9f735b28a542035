"""ResNetSpec (counts, names, inits, JSON, checkpoints), the torch and JAX modules against the float64 oracle,
and the jitted JAX steps. Checkpoint conversion: tests/test_resnet_convert.py; parity: parity_tests/."""

from __future__ import annotations

import numpy as np
import pytest

from cbam_multi import CBAMSpec, ResNetSpec, load_weights, save_weights
from cbam_multi.errors import InputError, SpecError, WeightsError
from cbam_multi.models.resnet import forward
from cbam_multi.weights import init_weights


# ------------------------------------------------------------------ spec
@pytest.mark.parametrize(
    "spec, count",
    [
        (ResNetSpec(depth=50, attention="none"), 25_557_032),  # torchvision resnet50
        (ResNetSpec(depth=50), 28_089_624),  # official ResidualNet('ImageNet', 50, 1000, 'CBAM')
        (ResNetSpec(depth=50, cbam_preset="timm"), 28_073_576),  # timm resnet50, attn_layer='cbam'
        (ResNetSpec(depth=18, attention="none"), 11_689_512),  # torchvision resnet18
        (ResNetSpec(depth=101, attention="none"), 44_549_160),
        (ResNetSpec(depth=152, attention="none"), 60_192_808),
        (ResNetSpec(depth=34, attention="none"), 21_797_672),
    ],
)
def test_parameter_counts(spec, count):
    assert spec.num_params() == count


def test_first_block_names_and_cbam_placement():
    spec = ResNetSpec(depth=50)
    shapes = spec.param_shapes()
    assert shapes["stem.conv.kernel"] == (7, 7, 3, 64)
    assert shapes["layer1.0.conv3.kernel"] == (1, 1, 64, 256)
    assert shapes["layer1.0.downsample.conv.kernel"] == (1, 1, 64, 256)
    assert shapes["layer1.0.cbam.channel.fc1.kernel"] == (256, 16)  # planes * expansion channels, r = 16
    assert shapes["layer4.2.cbam.channel.fc2.kernel"] == (128, 2048)
    assert "layer1.1.downsample.conv.kernel" not in shapes
    assert shapes["fc.kernel"] == (2048, 1000)
    cifar = ResNetSpec(depth=18, stem="cifar", num_classes=10)
    assert cifar.param_shapes()["stem.conv.kernel"] == (3, 3, 3, 64)
    assert cifar.param_shapes()["layer1.0.cbam.channel.fc1.kernel"] == (64, 4)
    assert "layer1.0.downsample.conv.kernel" not in cifar.param_shapes()  # basic block: 64 -> 64, stride 1
    assert cifar.param_kinds()["layer1.0.cbam.spatial.bn.var"] == "stat"


def test_bad_specs_name_the_problem():
    with pytest.raises(SpecError, match="depth"):
        ResNetSpec(depth=20)
    with pytest.raises(SpecError, match="stem"):
        ResNetSpec(stem="tiny")
    with pytest.raises(SpecError, match="hidden width is 0"):
        ResNetSpec(depth=18, width=4)  # 4 channels // 16
    with pytest.raises(SpecError, match="init scheme"):
        ResNetSpec().param_inits("xavier")


def test_json_round_trip_and_checkpoint(tmp_path):
    spec = ResNetSpec(depth=18, stem="cifar", num_classes=10, cbam_preset="paper", width=16, cbam_reduction=4)
    assert ResNetSpec.from_json(spec.to_json()) == spec
    w = init_weights(spec, seed=3)
    save_weights(tmp_path / "r.safetensors", w, spec)
    w2, spec2 = load_weights(tmp_path / "r.safetensors")
    assert spec2 == spec and all(np.array_equal(w[n], w2[n]) for n in w)


def test_official_init_statistics():
    spec = ResNetSpec(depth=50, num_classes=1000)
    w = init_weights(spec, seed=0, dtype=np.float64, scheme="official")
    k = w["layer3.0.conv2.kernel"]  # 3x3, 256 -> 256: kaiming normal, fan_out = 256 * 9
    assert abs(k.std() / np.sqrt(2 / (256 * 9)) - 1) < 0.02
    assert abs(w["fc.kernel"].std() / np.sqrt(2 / 2048) - 1) < 0.02  # kaiming normal, fan_in
    d = w["layer3.0.downsample.conv.kernel"]  # key 'downsample.0.weight' has no "conv": PyTorch default U(+-1/sqrt(fan_in))
    assert np.abs(d).max() <= 512**-0.5 and abs(d.std() / (512**-0.5 / np.sqrt(3)) - 1) < 0.02
    assert np.all(w["layer1.0.cbam.spatial.bn.scale"] == 0) and np.all(w["layer1.0.bn3.scale"] == 1)
    assert np.all(w["layer1.0.cbam.channel.fc1.bias"] == 0) and np.all(w["fc.bias"] == 0)
    assert abs(w["layer2.0.cbam.spatial.conv.kernel"].std() / np.sqrt(2 / 49) - 1) < 0.3  # 98 draws only


# ------------------------------------------------------------------ modules vs the oracle
SMALL = ResNetSpec(depth=18, stem="cifar", num_classes=10, width=16, cbam_reduction=4)


def _nontrivial(spec, seed=0):
    rng = np.random.default_rng(seed)
    w = init_weights(spec, seed, np.float64)
    for n in w:
        if n.endswith((".scale", ".var")):
            w[n] = rng.uniform(0.5, 1.5, w[n].shape)
        elif n.endswith(".mean"):
            w[n] = rng.normal(0, 0.1, w[n].shape)
    return w


def _torch_forward(w, x, train):
    """(logits, canonical weights after the call) of the torch ResNet holding ``w`` on NCHW ``x``."""
    torch = pytest.importorskip("torch")
    from cbam_multi.torch.models import ResNet, export_model_weights, import_model_weights

    model = import_model_weights(ResNet(SMALL, dtype=torch.float64), w).train(train)
    return model(torch.tensor(x)).detach().numpy(), export_model_weights(model)


def _jax_forward(w, x, train):
    """The same for the JAX ResNet (NHWC input)."""
    jnp = pytest.importorskip("jax.numpy")
    from cbam_multi.jax.models import ResNet, export_model_weights, import_model_weights

    model = import_model_weights(ResNet(SMALL, dtype=jnp.float64), w)
    model.train() if train else model.eval()
    return np.asarray(model(jnp.asarray(x.transpose(0, 2, 3, 1)))), export_model_weights(model)


@pytest.mark.parametrize(
    "backend, run", [pytest.param("torch", _torch_forward, id="torch"), pytest.param("jax", _jax_forward, id="jax")]
)
@pytest.mark.parametrize("train", [False, True])
def test_resnet_matches_oracle(backend, run, train):
    w = _nontrivial(SMALL)
    x = np.random.default_rng(1).normal(size=(2, 3, 16, 16))
    y_ref, stats = forward(x, w, SMALL, train=train)
    y, after = run(w, x, train)
    assert np.abs(y - y_ref).max() < 1e-12 * np.abs(y_ref).max(), backend
    for n, s in stats.items():  # train mode: the running statistics the oracle updated
        assert np.abs(after[n] - s).max() < 1e-12, (backend, n)
    assert bool(stats) == train


def test_torch_resnet_bad_input_and_seeded_init():
    torch = pytest.importorskip("torch")
    from cbam_multi.torch.models import ResNet, export_model_weights

    model = ResNet(SMALL, seed=4, init="official")
    ref = init_weights(SMALL, 4, np.float64, scheme="official")
    assert all(np.allclose(export_model_weights(model)[n], ref[n], atol=1e-7) for n in ref)
    with pytest.raises(InputError, match="NHWC"):
        model(torch.zeros(1, 16, 16, 3))
    with pytest.raises(WeightsError, match="missing"):
        from cbam_multi.torch.models import import_model_weights

        import_model_weights(model, {"fc.bias": np.zeros(10)})


def test_jax_resnet_seeded_init_is_the_canonical_one():
    jnp = pytest.importorskip("jax.numpy")
    from cbam_multi.jax.models import ResNet, export_model_weights

    fresh = export_model_weights(ResNet(SMALL, seed=4, init="official", dtype=jnp.float64))
    ref = init_weights(SMALL, 4, np.float64, scheme="official")
    assert all(np.array_equal(fresh[n], ref[n]) for n in ref)


@pytest.mark.slow
def test_jax_steps_are_jitted_donating_and_learn():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    from cbam_multi.jax.models.resnet import init_params, split_params
    from cbam_multi.jax.models.resnet_steps import make_eval_step, make_train_step

    spec = ResNetSpec(depth=18, stem="cifar", num_classes=4, width=16, cbam_reduction=4)
    step = make_train_step(spec, optax.sgd(0.05, momentum=0.9))
    params, stats = split_params(init_params(spec, 0, jax.numpy.float32), spec)
    params, stats, opt = step.place(params, stats, step.tx.init(params))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 16, 16, 3)).astype(np.float32)
    y = rng.integers(0, 4, 8).astype(np.int32)
    old = params["fc.kernel"]
    losses = []
    for _ in range(5):
        params, stats, opt, loss = step(params, stats, opt, x, y)
        losses.append(float(loss))
    assert old.is_deleted()  # donated
    assert losses[-1] < losses[0]
    assert step.fn._cache_size() == 1  # compiled once
    text = step.fn.lower(params, stats, opt, step.place(x)[0], step.place(y)[0]).as_text()
    assert "callback" not in text
    logits = make_eval_step(spec)(params, stats, x)
    assert logits.shape == (8, 4) and np.isfinite(np.asarray(logits)).all()


def test_cbam_spec_of_blocks():
    spec = ResNetSpec(depth=50, cbam_preset="timm")
    assert spec.cbam_blocks()["layer2.0.cbam"] == CBAMSpec.timm(512)
    assert ResNetSpec(attention="none").cbam_blocks() == {}


def test_cli_parity_resnet18_torch_float64(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    from cbam_multi.training.cli import main

    assert main(["parity", "--model", "resnet18", "--dtype", "float64", "--backends", "torch"]) == 0
    out = capsys.readouterr().out
    assert "resnet18-cifar-official-B2-32x32-train" in out and "torch~oracle" in out and "FAIL" not in out


_SHARDED = """
import sys, json, numpy as np, jax
jax.config.update("jax_enable_x64", True)
import optax
from cbam_multi import ResNetSpec
from cbam_multi.jax import sharding
from cbam_multi.jax.models.resnet import init_params, split_params
from cbam_multi.jax.models.resnet_steps import make_train_step
spec = ResNetSpec(depth=18, stem="cifar", num_classes=4, width=16, cbam_reduction=4)
runs = {}
for n in (1, 4):
    step = make_train_step(spec, optax.sgd(0.05, momentum=0.9), mesh=sharding.data_mesh(jax.devices()[:n]))
    params, stats = split_params(init_params(spec, 0, jax.numpy.float64), spec)
    params, stats, opt = step.place(params, stats, step.tx.init(params))
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(2):  # the second step takes the first's momentum and statistics
        x, y = rng.normal(size=(8, 16, 16, 3)), rng.integers(0, 4, 8).astype(np.int32)
        params, stats, opt, loss = step(params, stats, opt, x, y)
        losses.append(float(loss))
    runs[n] = {"devices": step.mesh.devices.size, "losses": losses, "var": float(stats["layer4.1.bn2.var"].sum())}
print(json.dumps(runs))
"""


@pytest.mark.slow
def test_jax_train_step_sharded_over_4_devices_matches_1(on_four_devices):
    """The batch split over 4 forced host devices (BN statistics all-reduced by XLA) gives the 1-device numbers.
    Both runs in one process with 4 forced host devices (a 1-device mesh and a 4-device mesh): one interpreter
    start and import instead of two."""
    runs = {int(n): r for n, r in on_four_devices(_SHARDED, timeout=600).items()}
    assert runs[4]["devices"] == 4 and runs[1]["devices"] == 1
    assert np.allclose(runs[4]["losses"], runs[1]["losses"], rtol=1e-12, atol=0)
    assert abs(runs[4]["var"] - runs[1]["var"]) <= 1e-12 * abs(runs[1]["var"])
