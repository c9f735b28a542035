"""A ResNet spec trains through the shared fit loop and the CLI in both backends (a cifar-stem ResNet-18-CBAM,
narrow, on a few MNIST-sized images padded to 32x32): a few steps, a bit-identical resume, the same init and
first-step loss in torch and JAX in float64, and `cbam-multi evaluate` on the checkpoint."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("flax")

from cbam_multi import load_weights
from cbam_multi.models import ResNetSpec
from cbam_multi.training import train_and_evaluate
from cbam_multi.training.config import MODEL_PRESETS, TrainConfig
from cbam_multi.training.data import Dataset
from cbam_multi.training.inputs import prepare_data

SPEC = ResNetSpec(18, stem="cifar", in_channels=1, num_classes=10, width=16)


def _data(n_train=32, n_test=16, seed=0) -> Dataset:
    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 255, size=(10, 28, 28))

    def split(n):
        labels = rng.integers(0, 10, size=n).astype(np.int64)
        return np.clip(protos[labels] * 0.7 + rng.uniform(0, 77, size=(n, 28, 28)), 0, 255).astype(np.uint8), labels

    (a, b), (c, d) = split(n_train), split(n_test)
    return Dataset("synthetic", "tests", a, b, c, d)


def _config(tmp_path, backend, **kw) -> TrainConfig:
    base = dict(backend=backend, model=SPEC, epochs=1, batch_size=16, optimizer="sgd", lr=0.05, schedule="constant",
                warmup_frac=0.0, augment_shift=1, eval_batch_size=16, progress=False, out=str(tmp_path / backend))
    return TrainConfig(**{**base, **kw})


def test_config_json_round_trip_and_padding():
    config = TrainConfig(model=SPEC)
    back = TrainConfig.from_json(config.to_json())
    assert back == config and isinstance(back.model, ResNetSpec)
    assert MODEL_PRESETS["resnet18"] == ResNetSpec(18, stem="cifar", in_channels=1, num_classes=10)
    prepared = prepare_data(config.replace(n_train=4, n_test=2), _data(4, 2))
    assert prepared.x_train.shape == (4, 32, 32, 1) and prepared.x_test.shape == (2, 32, 32, 1)
    border = prepared.x_train[:, :2].ravel()
    assert np.all(border == border[0])  # the pad is the background value (a normalized 0 pixel)


@pytest.mark.slow
def test_jax_fit_trains_a_resnet_and_writes_a_loadable_checkpoint(tmp_path):
    # (torch: the CLI test below; float64 so the JAX step compiled here serves the torch-vs-JAX test too)
    config = _config(tmp_path, "jax", dtype="float64")
    metrics = train_and_evaluate(config, data=_data())
    losses = metrics["epochs"][0]["train_losses"]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    weights, spec = load_weights(config.out_dir / "checkpoint.safetensors")
    assert spec == SPEC and any(not np.array_equal(weights[n], w) for n, w in _init(spec).items())
    assert 0.0 <= metrics["final"]["test_accuracy"] <= 1.0


def _init(spec):
    from cbam_multi.weights import init_weights

    return init_weights(spec, 0, np.float64)


def test_resume_is_bit_identical(tmp_path):
    data = _data(16, 8)  # one step per epoch
    full = train_and_evaluate(_config(tmp_path / "a", "torch", epochs=2), data=data)
    cut = _config(tmp_path / "b", "torch", epochs=2)
    train_and_evaluate(cut, data=data, stop_after_epoch=1)
    resumed = train_and_evaluate(cut.replace(resume=True), data=data)
    assert resumed["epochs"][1]["train_losses"] == full["epochs"][1]["train_losses"]
    a, _ = load_weights(tmp_path / "a" / "torch" / "checkpoint.safetensors")
    b, _ = load_weights(tmp_path / "b" / "torch" / "checkpoint.safetensors")
    assert all(np.array_equal(a[n], b[n]) for n in a)


@pytest.mark.slow  # collected right after the JAX fit test, whose float64 step compilation it then reuses
def test_torch_and_jax_same_init_and_first_step_float64(tmp_path):
    from cbam_multi.jax.train import JaxTrainer
    from cbam_multi.torch.train import TorchTrainer

    config = _config(tmp_path, "torch", dtype="float64")
    t, j = TorchTrainer(config), JaxTrainer(config.replace(backend="jax"))
    wt, wj = t.get_weights(), j.get_weights()
    assert all(np.array_equal(wt[n], wj[n]) for n in wt)
    x = prepare_data(config, _data()).x_train[:16]
    y = np.arange(16) % 10
    lt, lj = float(t.losses([t.train_step(x, y, 0.05)])[0]), float(j.losses([j.train_step(x, y, 0.05)])[0])
    assert abs(lt - lj) < 1e-10 * abs(lt), (lt, lj)
    wt, wj = t.get_weights(), j.get_weights()
    err = max(float(np.abs(wt[n] - wj[n]).max()) for n in wt)
    assert err < 1e-10, err  # the updated weights and BN running statistics agree too


def test_cli_trains_and_evaluates_a_resnet(tmp_path, capsys):
    from cbam_multi.training.cli import main

    out = tmp_path / "run"
    args = ["train", "--backend", "torch", "--model", "resnet18", "--width", "16", "--dataset", "sample",
            "--n-train", "32", "--n-test", "16", "--batch-size", "16", "--epochs", "1", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    _, spec = load_weights(out / "checkpoint.safetensors")
    assert spec == ResNetSpec(18, stem="cifar", in_channels=1, num_classes=10, width=16)
    assert (out / "train_state.safetensors").is_file()
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out), "--backend", "torch", "--dataset", "sample", "--n-test", "16",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 16 and len(result["predictions"]) == 16
