"""Training memory of ResNet-50-CBAM vs ResNet-50, torch eager on CPU (issue 12's memory goal).

    python benchmarks/train_memory.py            # ResNet-50, batch 8, 224x224, float32
    python benchmarks/train_memory.py --smoke    # ResNet-18, batch 2, 32x32 (CI check)

Two measures per network, each in a fresh subprocess so that no other case's buffers are counted:

* **saved activations**: the distinct storages autograd saves in one train-mode forward
  (`torch.autograd.graph.saved_tensors_hooks`), parameters excluded - exact and independent of the allocator;
* **peak RSS of training**: the process's peak resident set (``ru_maxrss``) over two SGD-with-momentum steps
  minus its resident set before the model was built: weights, gradients, momentum, activations and every
  temporary, as the operating system saw them (glibc's default heap, which returns large blocks at free).

Paths: the network without CBAM, with CBAM as it trains by default (the BN+CBAM Function, `fused_bn`), and
with CBAM through the composed ops (``CBAM_MULTI_FUSED_TRAIN=0``). Writes ``<out>/train_memory[_smoke].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

# path id -> (label, CBAM in the network?, environment for the subprocess)
PATHS = {
    "plain": ("ResNet (no CBAM)", False, {}),
    "cbam": ("ResNet-CBAM, default (BN+CBAM Function)", True, {}),
    "cbam_composed": ("ResNet-CBAM, composed ops", True, {"CBAM_MULTI_FUSED_TRAIN": "0"}),
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def saved_activation_bytes(model, x) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward of ``model(x)``."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sum(storages.values())


def measure(depth: int, cbam: bool, batch: int, size: int) -> dict:
    """One case, in this process: saved activation bytes and the peak RSS of two train steps."""
    import torch

    from cbam_multi import ResNetSpec
    from cbam_multi.torch.models import ResNet

    rss0 = _rss_bytes()
    spec = ResNetSpec(depth, "imagenet", num_classes=1000, attention="cbam" if cbam else "none")
    model = ResNet(spec).train()
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=rng)
    y = torch.randint(0, 1000, (batch,), generator=rng)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    saved = saved_activation_bytes(model, x)
    n_params = sum(p.numel() for p in model.parameters())
    return {"saved_activation_mb": saved / 1e6, "train_peak_rss_mb": (peak - rss0) / 1e6, "params_m": n_params / 1e6}


def _child(args) -> None:
    print(json.dumps(measure(args.depth, args.cbam, args.batch, args.size)))


def run(depth: int, batch: int, size: int, paths=tuple(PATHS), threads: int | None = None) -> dict:
    """Every path in its own subprocess -> {path: result}."""
    out = {}
    for pid in paths:
        label, cbam, extra = PATHS[pid]
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--depth", str(depth), "--batch", str(batch),
               "--size", str(size)] + (["--cbam"] if cbam else [])
        env = {**os.environ, **extra, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"train_memory: the {pid} case failed:\n{proc.stderr[-2000:]}")
        out[pid] = {"label": label, **json.loads(proc.stdout.strip().splitlines()[-1])}
    base = out.get("plain")  # the ratios need the plain network among the paths
    if base:
        for r in out.values():
            r["saved_ratio"] = r["saved_activation_mb"] / base["saved_activation_mb"]
            r["peak_ratio"] = r["train_peak_rss_mb"] / base["train_peak_rss_mb"]
    return out


def markdown(payload: dict) -> str:
    def ratio(r, key):  # "-" without the plain network among the paths
        return f"{r[key]:.3f}" if key in r else "-"

    rows = [[r["label"], f"{r['params_m']:.2f}", f"{r['saved_activation_mb']:.1f}", ratio(r, "saved_ratio"),
             f"{r['train_peak_rss_mb']:.1f}", ratio(r, "peak_ratio")] for r in payload["results"].values()]
    head = (f"# Training memory, ResNet-{payload['depth']}, batch {payload['batch']}, {payload['size']}x{payload['size']}, "
            "float32, torch eager, CPU\n\n")
    table = common.md_table(["network", "params (M)", "saved activations (MB)", "x plain", "peak RSS of training (MB)",
                             "x plain"], rows)
    return head + table + "\n\n" + common.env_markdown(payload["environment"])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="ResNet-18, batch 2, 32x32")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--threads", type=int, default=None, help="torch threads in the subprocesses (OMP_NUM_THREADS)")
    p.add_argument("--paths", default=",".join(PATHS), help="comma list of: " + ",".join(PATHS))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cbam", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--depth", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return {}
    paths = [q.strip() for q in args.paths.split(",") if q.strip()]
    unknown = [q for q in paths if q not in PATHS]
    if unknown or not paths:
        raise SystemExit(f"train_memory: unknown --paths {unknown or args.paths!r}; use a comma list of {','.join(PATHS)}")
    depth, batch, size = (18, 2, 32) if args.smoke else (50, 8, 224)
    depth, batch, size = depth, args.batch or batch, args.size or size
    t0 = time.perf_counter()
    env = common.environment("cpu")
    env["malloc"] = {"applied": False, "reason": "each case runs in a subprocess with glibc's defaults (RSS is measured)"}
    payload = {"depth": depth, "batch": batch, "size": size, "results": run(depth, batch, size, paths, threads=args.threads),
               "environment": env}
    return common.finish_run(args, "train_memory" + ("_smoke" if args.smoke else ""), "train_memory", payload,
                             markdown, t0, log=lambda m: None) | {"markdown": markdown(payload)}

if __name__ == "__main__":
    print(main().get("markdown", ""))
