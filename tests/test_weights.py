"""Canonical weights and safetensors checkpoints: seeded init, validation, atomic save, failing loads."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from cbam_multi import (
    CBAMSpec,
    CheckpointError,
    WeightsError,
    init_weights,
    load_weights,
    save_weights,
)
from cbam_multi.errors import CheckpointWarning
from cbam_multi.weights import (
    DIGEST_KEY,
    SPEC_KEY,
    atomic_write_bytes,
    read_checkpoint,
    validate_weights,
)


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


# ------------------------------------------------------------------ issue 14: files, permissions, integrity
ROOT = Path(__file__).resolve().parents[1]


def _child(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter on this checkout. As root, the child imports what it needs and
    then drops to uid/gid 65534 (nobody) before ``# -- as nobody`` so that file permissions apply to it."""
    prelude = (
        "import os, sys\nfrom cbam_multi.weights import read_checkpoint, load_weights\n"
        "from cbam_multi.errors import CheckpointError\nimport safetensors, safetensors.numpy  # noqa: F401 (before the uid drop)\n"
        "if os.geteuid() == 0:\n    os.setgid(65534); os.setuid(65534)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", prelude + code, *args], env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def shared_dir(tmp_path_factory):
    """A directory others may enter (pytest's tmp dirs are 0700), under /tmp."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="cbam-robust-"))
    d.chmod(0o755)
    yield d
    for p in sorted(d.rglob("*"), reverse=True):
        p.chmod(0o700)
    import shutil

    shutil.rmtree(d)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = atomic_write_bytes(tmp_path / "f.bin", b"data")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_another_user_can_read_a_checkpoint_under_umask_022(shared_dir):
    spec = CBAMSpec(8, reduction=2)
    old = os.umask(0o022)
    try:
        path = save_weights(shared_dir / "w.safetensors", init_weights(spec), spec)
    finally:
        os.umask(old)
    r = _child("w, s = load_weights(sys.argv[1]); print('loaded', len(w))", str(path))
    assert r.returncode == 0 and f"loaded {len(spec.param_shapes())}" in r.stdout, r.stderr


@pytest.mark.parametrize("deny", ["file", "directory"])
def test_permission_problems_are_reported_as_such(shared_dir, deny):
    spec = CBAMSpec(8, reduction=2)
    sub = shared_dir / "run"
    path = save_weights(sub / "w.safetensors", init_weights(spec), spec)
    sub.chmod(0o755)
    (path if deny == "file" else sub).chmod(0o000 if deny == "file" else 0o600)
    code = "try:\n    read_checkpoint(sys.argv[1])\nexcept CheckpointError as e:\n    print('ERR', e)\n"
    r = _child(code, str(path))
    assert r.returncode == 0 and "ERR" in r.stdout and "permission denied" in r.stdout, (r.stdout, r.stderr)
    assert "No such file" not in r.stdout


def _flip_bit(path: Path, offset_in_data: int) -> None:
    b = bytearray(path.read_bytes())
    n = int.from_bytes(b[:8], "little")
    b[8 + n + offset_in_data] ^= 0x10
    path.write_bytes(bytes(b))


def test_a_flipped_bit_in_the_tensor_data_is_a_checkpoint_error(tmp_path):
    spec = CBAMSpec(16, reduction=4)
    path = save_weights(tmp_path / "w.safetensors", init_weights(spec), spec)
    assert DIGEST_KEY in read_checkpoint(path)[1]
    for offset in (0, 37, path.stat().st_size - 9 - int.from_bytes(path.read_bytes()[:8], "little")):
        fresh = tmp_path / f"flip{offset}.safetensors"
        fresh.write_bytes(path.read_bytes())
        _flip_bit(fresh, offset)
        with pytest.raises(CheckpointError, match=f"{fresh.name}: checkpoint is corrupt: its sha256 digest does not match"):
            load_weights(fresh)


def test_edited_metadata_is_a_checkpoint_error(tmp_path):
    from safetensors.numpy import save_file

    spec = CBAMSpec(16, reduction=4)
    path = save_weights(tmp_path / "w.safetensors", init_weights(spec), spec)
    tensors, meta = read_checkpoint(path)
    meta[SPEC_KEY] = CBAMSpec(16, reduction=4, norm_eps=1e-3).to_json()  # same shapes, other maths
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="digest does not match"):
        load_weights(path)


def test_a_checkpoint_without_a_digest_loads_with_one_warning(tmp_path):
    from safetensors.numpy import save_file

    spec = CBAMSpec(16, reduction=4)
    w = init_weights(spec)
    old = tmp_path / "old.safetensors"
    save_file(w, str(old), metadata={SPEC_KEY: spec.to_json()})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded, loaded_spec = load_weights(old)
        load_weights(old)
        read_checkpoint(old)
    mine = [c for c in caught if issubclass(c.category, CheckpointWarning)]
    assert len(mine) == 1 and "sha256 digest" in str(mine[0].message) and "old.safetensors" in str(mine[0].message)
    assert loaded_spec == spec and all(np.array_equal(loaded[n], w[n]) for n in w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file we wrote carries the digest: no warning
        load_weights(save_weights(tmp_path / "new.safetensors", w, spec))


def test_an_exception_during_the_write_leaves_no_temp_file(tmp_path, monkeypatch):
    path = atomic_write_bytes(tmp_path / "f.bin", b"old")

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new" * 1000)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_sigterm_during_a_write_leaves_no_temp_file_and_still_kills(tmp_path):
    # The signal arrives while the temp file is open and written (sent from inside fsync), as a
    # `kill` during a checkpoint write would.
    code = (
        "import os, signal\nfrom cbam_multi.weights import atomic_write_bytes\nreal = os.fsync\n"
        "def fsync(fd):\n    os.kill(os.getpid(), signal.SIGTERM); real(fd)\n"
        "os.fsync = fsync\natomic_write_bytes(sys.argv[1], b'x' * 5_000_000)\nprint('survived')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", "import sys\n" + code, str(tmp_path / "ckpt.safetensors")],
                       env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == -15 and "survived" not in r.stdout, (r.returncode, r.stderr)
    assert list(tmp_path.iterdir()) == []
