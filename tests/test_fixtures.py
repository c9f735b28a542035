"""Files written by earlier code still load and resume: the checkpoint and train state in
tests/fixtures/v1/ (made by tests/fixtures/make_fixtures.py before the package layout changed)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures.make_fixtures import FIXTURE_DIR, dataset

from cbam_multi import MNISTNetSpec, load_weights

torch = pytest.importorskip("torch")


def test_v1_checkpoint_loads():
    weights, spec = load_weights(FIXTURE_DIR / "checkpoint.safetensors")
    assert spec == MNISTNetSpec(conv_channels=(4, 8), dense=16)
    assert set(weights) == set(spec.param_shapes()) and all(w.dtype == np.float64 for w in weights.values())


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_v1_train_state_resumes_to_the_recorded_numbers(tmp_path, backend):
    if backend == "jax":
        jax = pytest.importorskip("jax")
        if not jax.config.jax_enable_x64:
            pytest.skip("float64 JAX needs x64 mode")
    from cbam_multi import training

    state = training.ResumeState.load(FIXTURE_DIR / "train_state.safetensors")
    assert (state.epoch, state.step) == (1, 2)
    shutil.copy(FIXTURE_DIR / "train_state.safetensors", tmp_path / "train_state.safetensors")
    cfg = state.config.replace(backend=backend, out=str(tmp_path), resume=True)
    result = training.train_and_evaluate(cfg, data=dataset())
    expected = json.loads((FIXTURE_DIR / "expected.json").read_text())
    np.testing.assert_allclose(result["epochs"][1]["train_losses"], expected["epoch2_train_losses"], rtol=1e-9)
    assert result["final"]["test_accuracy"] == expected["test_accuracy"]
    assert Path(tmp_path / "checkpoint.safetensors").is_file()
