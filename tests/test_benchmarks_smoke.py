"""The benchmark scripts run end to end (``--smoke``: one tiny shape, one rep, no torch.compile) and write
well-formed JSON + markdown. Structure only: no timing is asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")
pytest.importorskip("flax")

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _load(out: Path, stem: str) -> dict:
    data = json.loads((out / f"{stem}.json").read_text())
    md = (out / f"{stem}.md").read_text()
    assert md.startswith("# ") and "Command:" in md and "Versions:" in md
    env = data["environment"]
    for key in ("device", "cpu", "cores", "torch_threads", "versions", "command", "git", "malloc", "wall_s", "loadavg_end"):
        assert key in env, key
    assert env["versions"]["torch"] and env["versions"]["jax"]
    return data


def _timed(row: dict) -> bool:
    return isinstance(row.get("median_ms"), float) and row["median_ms"] > 0 and row["n"] >= 1


def test_bench_cbam_smoke(tmp_path):
    import torch

    from benchmarks import bench_cbam

    threads = torch.get_num_threads()
    bench_cbam.main(["--smoke", "--malloc", "default", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # the benchmark restores global state
    data = _load(tmp_path, "cbam_block_smoke")
    assert data["mode"] == "smoke" and data["bandwidth"]["gbps"] > 0
    rows = data["results"]
    assert {r["mode"] for r in rows} == {"fwd", "fwdbwd"}
    by = {(r["path"], r["mode"]): r for r in rows}
    must_run = ["torch_eager", "torch_eager_cl", "nnx_jit", "nnx_jit_tree", "nnx_split_jit", "linen_jit",
                 "blog", "torch_eager_timm", "timm_copy"]
    for mode in ("fwd", "fwdbwd"):
        for path in must_run:
            row = by[(path, mode)]
            assert "error" not in row, (path, mode, row.get("error"))
            assert _timed(row), (path, mode)
            assert row["x_limit"] > 0 and row["limit_ms"] > 0 and "foreign_load" in row
        assert "skipped" in by[("torch_compile", mode)]  # no compile in smoke mode
        real = by[("timm_real", mode)]
        assert _timed(real) or real["skipped"].startswith("not importable")
    assert _timed(by[("numpy_ref", "fwd")])
    # the anchors compute the same function as ours
    assert by[("blog", "fwd")]["max_abs_diff_vs_ours"] < 1e-4
    assert by[("timm_copy", "fwd")]["max_abs_diff_vs_ours"] < 1e-4
    assert "best_compiled_vs_limit" in data["goals"] and "eager_vs_anchors" in data["goals"]


def test_bench_train_smoke(tmp_path):
    from benchmarks import bench_train

    data = bench_train.main(["--smoke", "--malloc", "default", "--out", str(tmp_path)])
    loaded = _load(tmp_path, "train_smoke")
    assert loaded["mode"] == data["mode"] == "smoke"
    rows = loaded["mnist"]["rows"]
    names = {r["name"] for r in rows}
    assert {"mnist_torch_cbam", "mnist_torch_nocbam", "mnist_jax_cbam", "mnist_jax_nocbam"} <= names
    for r in rows:
        assert "error" not in r, (r["name"], r.get("error"))
        assert _timed(r) and r["images_per_s"] > 0
    blocks = {r["name"]: r for r in loaded["block"]}
    for name in ("block_torch_eager", "block_nnx", "block_linen"):
        assert _timed(blocks[name]) and blocks[name]["us_per_image"] > 0
    assert "jax_vs_torch_eager_mnist_cbam" in loaded["goals"]


def test_bench_resnet_smoke(tmp_path):
    from benchmarks import bench_resnet

    data = bench_resnet.main(["--smoke", "--malloc", "default", "--modes", "infer", "--paths", "torch_eager,jax_jit,official_eager",
                              "--out", str(tmp_path)])
    loaded = _load(tmp_path, "resnet_smoke")
    assert loaded["mode"] == data["mode"] == "smoke"
    rows = {r["case"]: r for r in loaded["results"]}
    for name in ("torch_eager/plain", "torch_eager/cbam", "jax_jit/plain", "jax_jit/cbam", "official_eager/plain", "official_eager/cbam"):
        assert "error" not in rows[name], rows[name].get("error")
        assert _timed(rows[name]) and rows[name]["images_per_s"] > 0
    assert set(loaded["ratios"]) == {"torch_eager/infer", "jax_jit/infer", "official_eager/infer"}
    assert all(v > 0 for v in loaded["ratios"].values())


def test_eager_jax_smoke():
    from benchmarks import eager_jax

    rows = eager_jax.main(["--shapes", "1x16x3x3", "--rounds", "1"])
    assert [r["variant"] for r in rows] == ["one jitted program", "op by op"]
    assert all(r["first_s"] > 0 and r["later_ms"] > 0 for r in rows)


def test_train_memory_smoke(tmp_path):
    from benchmarks import train_memory

    # one network (a subprocess); what the default path saves against the plain network and the composed ops
    # is tests/test_torch_fused_bn.py::test_resnet_cbam_saves_about_what_resnet_saves
    train_memory.main(["--smoke", "--paths", "cbam", "--out", str(tmp_path)])
    loaded = _load(tmp_path, "train_memory_smoke")
    rows = loaded["results"]
    assert set(rows) == {"cbam"}
    assert rows["cbam"]["saved_activation_mb"] > 0 and rows["cbam"]["train_peak_rss_mb"] > 0
    assert rows["cbam"]["params_m"] > 11.69  # ResNet-18 (11.69 M) plus its CBAM blocks
    with pytest.raises(SystemExit, match="unknown --paths"):
        train_memory.main(["--smoke", "--paths", "plain,nope", "--out", str(tmp_path)])
