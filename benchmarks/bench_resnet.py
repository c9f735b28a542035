"""ResNet-50 vs ResNet-50-CBAM: inference and train step, torch eager / torch.compile / JAX jit, in one process.

    python benchmarks/bench_resnet.py                 # full run: 224x224, batch 8, float32
    python benchmarks/bench_resnet.py --quick         # fewer rounds / reps
    python benchmarks/bench_resnet.py --smoke         # ResNet-18 at 32x32, batch 2, no torch.compile (CI check)

Writes ``<out>/resnet[_quick|_smoke].json`` and ``.md`` (default out: benchmarks/results/).

For each mode (``infer``: eval-mode forward, torch under ``inference_mode``; ``train``: one SGD-with-momentum
step, cross-entropy, train-mode BN) the cases of every path are timed in interleaved rounds
(`benchmarks.common.Runner`), plain network and CBAM network side by side, so the CBAM/plain time ratio of a
path compares figures from the same rounds. Paths: our torch modules eager and under ``torch.compile``, our
JAX networks as one ``jax.jit`` (the train step donates its buffers), and - as the anchor - the official code's
ResNet-50 with and without CBAM (`benchmarks.anchors_resnet.official_resnet`, torch eager).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks import common
from benchmarks.common import Case

# path id -> label
PATHS = {
    "torch_eager": "ours, torch eager",
    "torch_compile": "ours, torch.compile",
    "jax_jit": "ours, JAX jit",
    "official_eager": "official code (anchor), torch eager",
}
MODES = ("infer", "train")
# timing settings of --quick and of a full run
QUICK = dict(rounds=3, reps_per_round=2, warmup=1, max_case_s=6.0)
FULL = dict(rounds=5, reps_per_round=3, warmup=2, max_case_s=20.0)


def parse_args(argv=None):
    p = common.benchmark_parser(__doc__, smoke_help="ResNet-18, 32x32, batch 2, 1 rep, no torch.compile")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 8; smoke 2)")
    p.add_argument("--size", type=int, default=None, help="image size (default 224; smoke 32)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--paths", default=None, help="comma list of path ids: " + ",".join(PATHS))
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    return p.parse_args(argv)


def _spec(depth: int, cbam: bool):
    from cbam_multi import ResNetSpec

    return ResNetSpec(depth, "imagenet", num_classes=1000, attention="cbam" if cbam else "none")


def _torch_case(name, model, x, y, mode, device, meta) -> Case:
    import torch

    sync = common.torch_sync(device)
    if mode == "infer":
        model.eval()

        def fn():
            with torch.inference_mode():
                model(x)
            sync()

        return Case(name, fn, meta)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sync()

    return Case(name, step, meta)


def _jax_case(name, spec, x, y, mode, meta) -> Case:
    import jax
    import jax.numpy as jnp
    import optax

    from cbam_multi.jax.models.resnet import init_params, split_params
    from cbam_multi.jax.models.resnet_steps import make_eval_step, make_train_step

    xh = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    params, stats = split_params(init_params(spec, 0, jnp.float32), spec)
    if mode == "infer":
        step = make_eval_step(spec)
        xs = jax.device_put(xh, jax.sharding.NamedSharding(step.mesh, jax.sharding.PartitionSpec("data")))

        def fn():
            jax.block_until_ready(step.fn(params, stats, xs))

        return Case(name, fn, meta)
    train = make_train_step(spec, optax.sgd(1e-3, momentum=0.9))
    state = list(train.place(params, stats, train.tx.init(params)))
    xs, ys = train.place(xh, y.astype(np.int32))  # replicated: one device on CPU; the step reshards

    def fn():
        p, s, o, loss = train.fn(*state, xs, ys)
        state[:] = [p, s, o]
        jax.block_until_ready(loss)

    return Case(name, fn, meta)


def build_cases(pids, mode, depth, batch, size, device, compile_ok, log) -> list[Case]:
    import torch

    from benchmarks.anchors_resnet import official_resnet
    from cbam_multi.torch.models.resnet import ResNet

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
    y = rng.integers(0, 1000, size=batch)
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    cases = []
    for cbam in (False, True):
        variant = "cbam" if cbam else "plain"
        meta = {"variant": variant, "mode": mode}
        spec = _spec(depth, cbam)
        if "torch_eager" in pids:
            eager_meta = {**meta, "path": "torch_eager"}
            cases.append(_torch_case(f"torch_eager/{variant}", ResNet(spec).to(device), xt, yt, mode, device, eager_meta))
        if "torch_compile" in pids:
            if compile_ok:
                model = torch.compile(ResNet(spec).to(device))
                cases.append(_torch_case(f"torch_compile/{variant}", model, xt, yt, mode, device, {**meta, "path": "torch_compile"}))
            else:
                skipped = {**meta, "path": "torch_compile", "skipped": "no torch.compile in this mode"}
                cases.append(Case(f"torch_compile/{variant}", None, skipped))
        if "jax_jit" in pids:
            cases.append(_jax_case(f"jax_jit/{variant}", spec, x, y, mode, {**meta, "path": "jax_jit"}))
        if "official_eager" in pids:
            anchor = official_resnet("ImageNet", depth, 1000, "CBAM" if cbam else None).to(device)
            if size != 224:  # the official ImageNet network ends in AvgPool2d(7): global only at 224x224 inputs
                anchor.avgpool = torch.nn.AdaptiveAvgPool2d(1)
            cases.append(_torch_case(f"official_eager/{variant}", anchor, xt, yt, mode, device, {**meta, "path": "official_eager"}))
    return cases


def main(argv=None) -> dict:
    return common.run_benchmark(parse_args(argv), _run)


def _run(args, device) -> dict:
    log = print
    depth = 18 if args.smoke else 50
    batch = args.batch or (2 if args.smoke else 8)
    size = args.size or (32 if args.smoke else 224)
    modes, pids, runner = common.selection(args, PATHS, QUICK, FULL)
    stem, env = common.start_run(args, device, "resnet", "bench_resnet", f"; ResNet-{depth}, {batch}x3x{size}x{size}", log=log)
    rows, t_start = [], time.perf_counter()
    for mode in modes:
        log(f"[bench_resnet] {mode}")
        cases = build_cases(pids, mode, depth, batch, size, device, not (args.smoke or args.no_compile), log)
        res, quiet = common.run_group(runner, [c for c in cases if c.fn is not None], args.wait_quiet, log=log)
        for c in cases:
            r = res.get(c.name, dict(c.meta))
            row = {
                "case": c.name, "label": PATHS[c.meta["path"]], "depth": depth, "batch": batch, "size": size, "quiet_wait": quiet,
                **c.meta, **r,
            }
            if "median_ms" in r:
                row["images_per_s"] = round(batch / (r["median_ms"] / 1e3), 2)
                log(
                    f"    {c.name:24s} {r['median_ms']:10.1f} ms  first call {r['first_call_s']:.1f} s,"
                    f" foreign load {r.get('foreign_load')}"
                )
            else:
                log(f"    {c.name:24s} {r.get('skipped') or r.get('error')}")
            rows.append(row)
        _write(args, stem, env, runner, depth, batch, size, modes, pids, rows, t_start, log)  # after every mode
    return _write(args, stem, env, runner, depth, batch, size, modes, pids, rows, t_start, log)


def _write(args, stem, env, runner, depth, batch, size, modes, pids, rows, t_start, log) -> dict:
    """JSON + markdown of the rows so far (a long run keeps its finished modes if it is stopped)."""
    payload = {
        "benchmark": "resnet",
        "mode": common.mode_name(args),
        "environment": env,
        "config": {
            "depth": depth, "batch": batch, "size": size, "dtype": "float32", "modes": modes, "paths": pids,
            "cbam": "official preset (r=16, 7x7, BN) after the last BN of every block",
            "rounds": runner.rounds, "reps_per_round": runner.reps_per_round, "warmup": runner.warmup,
            "statistic": "median of all timed calls (interleaved rounds)", "wait_quiet_s": args.wait_quiet,
            "train_step": "SGD momentum 0.9, cross-entropy, BN in train mode",
        },
        "results": rows,
        "ratios": ratios(rows),
    }
    return common.finish_run(args, stem, "bench_resnet", payload, markdown, t_start, log=log)


def ratios(rows) -> dict:
    """CBAM / plain median time per (path, mode)."""
    by = {(r["path"], r["mode"], r["variant"]): r for r in rows}
    out = {}
    for path in PATHS:
        for mode in MODES:
            a, b = by.get((path, mode, "cbam")), by.get((path, mode, "plain"))
            if a and b and "median_ms" in a and "median_ms" in b:
                out[f"{path}/{mode}"] = round(a["median_ms"] / b["median_ms"], 3)
    return out


def markdown(payload) -> str:
    cfg, rows = payload["config"], payload["results"]
    by = {(r["path"], r["mode"], r["variant"]): r for r in rows}
    lines = [
        f"# ResNet-{cfg['depth']} vs ResNet-{cfg['depth']}-CBAM ({payload['mode']} run)",
        "",
        common.env_markdown(payload["environment"]),
        "",
        f"Batch {cfg['batch']}, {cfg['size']}x{cfg['size']}, float32; median ms per call over interleaved rounds; "
        f"train = {cfg['train_step']}.",
        "",
    ]
    table = []
    for mode in cfg["modes"]:
        for path in cfg["paths"]:
            plain, cbam = by.get((path, mode, "plain")), by.get((path, mode, "cbam"))
            ratio = payload["ratios"].get(f"{path}/{mode}")
            table.append([mode, PATHS[path], common.fmt_ms(plain), common.fmt_ms(cbam), f"{ratio:.3f}" if ratio else "n/a"])
    lines.append(common.md_table(["mode", "path", "plain ms", "CBAM ms", "CBAM / plain"], table))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
