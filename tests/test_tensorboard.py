"""`cbam-multi train --tensorboard`: the run's TensorBoard events, read back with TensorBoard's own loader,
hold the same per-step losses and learning rates and per-epoch test figures as metrics.json; a resumed run
continues the steps; a missing tensorboard package is named with its extra."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tensorboard")
pytest.importorskip("torch")

from cbam_multi.models import MNISTNetSpec
from cbam_multi.training import METRICS_FILE, TrainConfig, lr_at, train_and_evaluate
from cbam_multi.training.data import Dataset
from cbam_multi.training.tensorboard import EPOCH_TAGS, STEP_TAGS, SUBDIR, EventLog, read_scalars


def _tiny_data(n_train=96, n_test=40) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(
        name="synthetic", source="test",
        train_images=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), train_labels=np.arange(n_train) % 10,
        test_images=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), test_labels=np.arange(n_test) % 10,
    )


def _config(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(
        backend="torch", model=MNISTNetSpec(conv_channels=(4, 8), dense=8), epochs=2, batch_size=32, eval_batch_size=40,
        out=str(tmp_path / "run"), progress=False, tensorboard=True, **kw,
    )


def _check_events_match_metrics(run_dir, config):
    scalars = read_scalars(run_dir / SUBDIR)
    assert set(scalars) == set(STEP_TAGS) | set(EPOCH_TAGS)
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    losses = [v for e in metrics["epochs"] for v in e["train_losses"]]
    steps_per_epoch = metrics["steps_per_epoch"]
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, len(losses) + 1))  # each step once, in order
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], losses, rtol=1e-6)  # float32 in the event file
    want_lr = [lr_at(config, s, steps_per_epoch) for s in range(len(losses))]
    np.testing.assert_allclose([v for _, v in scalars["train/learning_rate"]], want_lr, rtol=1e-6)
    ends = [e["epoch"] * steps_per_epoch for e in metrics["epochs"]]
    for tag, key in (("test/accuracy", "test_accuracy"), ("test/loss", "test_loss"), ("train/epoch_loss", "train_loss"),
                     ("train/images_per_s", "images_per_s")):
        assert [s for s, _ in scalars[tag]] == ends, tag
        np.testing.assert_allclose([v for _, v in scalars[tag]], [e[key] for e in metrics["epochs"]], rtol=1e-6)


def test_training_writes_events_that_match_metrics(tmp_path):
    config = _config(tmp_path)
    train_and_evaluate(config, data=_tiny_data())
    _check_events_match_metrics(tmp_path / "run", config)


def test_resumed_run_continues_the_event_steps(tmp_path):
    config = _config(tmp_path)
    train_and_evaluate(config, data=_tiny_data(), stop_after_epoch=1)
    assert len(read_scalars(tmp_path / "run" / SUBDIR)["train/loss"]) == 3  # 96 // 32 steps
    train_and_evaluate(config.replace(resume=True), data=_tiny_data())
    _check_events_match_metrics(tmp_path / "run", config)  # steps 1..6, no step twice


def test_no_events_unless_asked(tmp_path):
    train_and_evaluate(_config(tmp_path, ).replace(tensorboard=False, epochs=1), data=_tiny_data())
    assert not (tmp_path / "run" / SUBDIR).exists()


def test_event_log_without_a_framework(tmp_path):
    record = {"train_losses": [2.0, 1.0], "test_loss": 0.5, "test_accuracy": 0.75, "train_loss": 1.5, "images_per_s": 100.0}
    with EventLog(tmp_path / "tb") as log:
        log.epoch(10, record, [1e-3, 2e-3])
    scalars = read_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(11, 2.0), (12, 1.0)]
    assert scalars["test/accuracy"] == [(12, 0.75)]
    assert [s for s, _ in scalars["train/learning_rate"]] == [11, 12]


def test_cli_flag_and_missing_package_message(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from cbam_multi.training.cli import build_parser, train_config_from_args

    args = build_parser().parse_args(["train", "--backend", "jax", "--tensorboard", "--out", str(tmp_path)])
    assert train_config_from_args(args).tensorboard is True
    assert train_config_from_args(build_parser().parse_args(["train"])).tensorboard is False
    root = Path(__file__).resolve().parents[1]
    code = ("import sys; sys.modules['tensorboard'] = None\n"
            "from cbam_multi.training.tensorboard import EventLog\nEventLog(sys.argv[1])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tb")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode != 0 and "pip install 'cbam-multi[tensorboard]'" in proc.stderr.strip().splitlines()[-1]
