"""Canonical weights and safetensors checkpoints: seeded init, validation, atomic save, failing loads."""

import numpy as np
import pytest

from cbam_multi import CBAMSpec, CheckpointError, WeightsError, init_weights, load_weights, save_weights
from cbam_multi.weights import SPEC_KEY, validate_weights


def test_init_is_seeded_and_follows_the_spec():
    spec = CBAMSpec.official(32)
    a, b, c = init_weights(spec, 0), init_weights(spec, 0), init_weights(spec, 1)
    assert list(a) == list(spec.param_shapes())
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert not np.array_equal(a["channel.fc1.kernel"], c["channel.fc1.kernel"])
    assert a["spatial.bn.scale"][0] == 0.0 and a["spatial.bn.var"][0] == 1.0  # official zero-init gamma
    bound = 32 ** -0.5
    assert np.abs(a["channel.fc1.kernel"]).max() <= bound and a["channel.fc1.kernel"].dtype == np.float32


def test_validate_lists_every_problem():
    spec = CBAMSpec(16, reduction=4)
    w = init_weights(spec)
    del w["channel.fc1.bias"]
    w["channel.fc2.kernel"] = np.zeros((3, 16), np.float32)
    w["spatial.conv.kernel"] = w["spatial.conv.kernel"].astype(np.int32)
    w["surprise"] = np.zeros(1)
    with pytest.raises(WeightsError) as err:
        validate_weights(w, spec)
    msg = str(err.value)
    for words in ("missing ['channel.fc1.bias']", "unexpected ['surprise']", "shape (3, 16)", "int32"):
        assert words in msg


def test_save_load_round_trip(tmp_path):
    spec = CBAMSpec.timm(24)
    w = init_weights(spec, seed=3, dtype=np.float64)
    path = save_weights(tmp_path / "cbam.safetensors", w, spec)
    loaded, loaded_spec = load_weights(path)
    assert loaded_spec == spec
    assert all(np.array_equal(loaded[n], w[n]) and loaded[n].dtype == np.float64 for n in w)
    with pytest.raises(WeightsError, match="channels: 24 vs 32"):
        load_weights(path, expected_spec=CBAMSpec.timm(32))


def test_failed_save_keeps_the_old_file(tmp_path):
    spec = CBAMSpec(16, reduction=4)
    path = save_weights(tmp_path / "w.safetensors", init_weights(spec), spec)
    before = path.read_bytes()
    bad = init_weights(spec)
    bad.pop("channel.fc1.bias")
    with pytest.raises(WeightsError):
        save_weights(path, bad, spec)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp files left


def test_corrupt_and_foreign_checkpoints_are_clear_errors(tmp_path):
    from safetensors.numpy import save_file

    spec = CBAMSpec(16, reduction=4)
    path = save_weights(tmp_path / "w.safetensors", init_weights(spec), spec)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_weights(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_weights(garbage)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_weights(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"a": np.zeros(2, np.float32)}, str(foreign))
    with pytest.raises(CheckpointError, match="no spec in the metadata"):
        load_weights(foreign)
    wrong_shape = tmp_path / "wrong.safetensors"
    w = init_weights(spec)
    w["channel.fc1.kernel"] = np.zeros((16, 5), np.float32)
    save_file(w, str(wrong_shape), metadata={SPEC_KEY: spec.to_json()})
    with pytest.raises(CheckpointError, match="shape \\(16, 5\\)"):
        load_weights(wrong_shape)
    bad_spec = tmp_path / "badspec.safetensors"
    save_file(init_weights(spec), str(bad_spec), metadata={SPEC_KEY: '{"channels": 16, "spatial_kernel": 4}'})
    with pytest.raises(CheckpointError, match="invalid spec"):
        load_weights(bad_spec)
