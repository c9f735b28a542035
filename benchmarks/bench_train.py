"""Training throughput: MNIST train steps per backend with and without CBAM, and a CBAM-block train step.

    python benchmarks/bench_train.py                # full run
    python benchmarks/bench_train.py --quick        # fewer windows
    python benchmarks/bench_train.py --smoke        # tiny net, 1 window of 1 step, no torch.compile (CI check)

Writes ``<out>/train[_quick|_smoke].json`` and ``.md`` (default out: benchmarks/results/).

1. MNIST (`cbam_multi.models.MNISTNetSpec`, default net, with ``cbam=True`` and ``cbam=False``): the
   backends' own trainers (`cbam_multi.torch.train.TorchTrainer`, `cbam_multi.jax.train.JaxTrainer`,
   the objects `train_and_evaluate` drives), fed a fixed synthetic batch of MNIST shape (N, 28, 28, 1)
   so no data files are needed. One timed sample = ``k`` train steps (forward, backward, optimizer
   update with the config's AdamW) followed by fetching their losses (the device sync). Images/s =
   batch * k / median sample. Compile time (JAX: ``trainer.warmup``, the AOT compile of the step;
   torch.compile: first step minus steady state) is reported separately.
2. CBAM block train step (forward, backward of ``mean(y * dy)``, SGD update) on MNIST-like block
   shapes: torch eager, torch.compile (module compiled), Flax NNX (nnx.jit, nnx.Optimizer) and linen
   (jax.jit, optax, buffers donated).
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

BLOCK_SHAPES = [(128, 32, 28, 28), (128, 64, 14, 14), (64, 64, 28, 28)]
SMOKE_BLOCK_SHAPES = [(2, 8, 6, 6)]


def parse_args(argv=None):
    p = common.benchmark_parser(
        __doc__, smoke_help="tiny net and block, 1 sample, no torch.compile", quick_help=None, rounds=False
    )
    p.add_argument("--batch-size", type=int, default=None, help="MNIST batch (default 128, the TrainConfig default)")
    p.add_argument("--steps", type=int, default=None, help="train steps per timed sample")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--parts", default="mnist,block")
    return p.parse_args(argv)


# ------------------------------------------------------------------ MNIST
def mnist_cases(args, batch, steps, log) -> tuple[list[Case], dict]:
    """One Case per (backend, cbam on/off): ``steps`` train steps + loss fetch."""
    info: dict = {}
    try:
        from cbam_multi.models import MNISTNetSpec
        from cbam_multi.training.config import TrainConfig
    except Exception as e:
        return [], {"unavailable": f"cbam_multi.training.config / MNISTNetSpec: {type(e).__name__}: {e}"}
    trainers = {}
    try:
        from cbam_multi.torch.train import TorchTrainer

        trainers["torch"] = TorchTrainer
    except Exception as e:
        info["torch"] = f"cbam_multi.torch.train unavailable: {type(e).__name__}: {e}"
    try:
        from cbam_multi.jax.train import JaxTrainer

        trainers["jax"] = JaxTrainer
    except Exception as e:
        info["jax"] = f"cbam_multi.jax.train unavailable: {type(e).__name__}: {e}"

    rng = np.random.default_rng(0)
    x = rng.random((batch, 28, 28, 1), dtype=np.float32)  # NHWC, as cbam_multi.training.data yields batches
    y = rng.integers(0, 10, size=batch).astype(np.int64)
    cases = []
    variants = [("torch", False), ("jax", False)]
    if not (args.no_compile or args.smoke):
        variants.append(("torch", True))
    for backend, compiled in variants:
        if backend not in trainers:
            continue
        for cbam in (True, False):
            name = f"mnist_{backend}{'_compile' if compiled else ''}_{'cbam' if cbam else 'nocbam'}"
            label = {"torch": "torch eager (TorchTrainer)", "jax": "JAX (JaxTrainer: nnx + one jax.jit step)"}[backend]
            if compiled:
                label = "torch.compile(model) in TorchTrainer"
            model = MNISTNetSpec(conv_channels=(4,), dense=8) if args.smoke else MNISTNetSpec()
            model = MNISTNetSpec(**{**_spec_fields(model), "cbam": cbam})
            cfg = TrainConfig(backend=backend, model=model, batch_size=batch, progress=False, dtype="float32")
            meta = {"label": label, "backend": backend, "cbam": cbam, "batch": batch, "steps_per_sample": steps,
                    "optimizer": cfg.optimizer, "torch_compile": compiled}
            try:
                tr = trainers[backend](cfg)
                meta["trainer_compile_s"] = round(float(tr.warmup(x, y)), 3)  # JAX: AOT compile; torch: 0
                if compiled:
                    import torch

                    tr.model = torch.compile(tr.model, dynamic=False)
                meta["device"] = tr.device()
            except Exception as e:
                cases.append(Case(name, None, {**meta, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}))
                continue

            def fn(tr=tr):
                tr.losses([tr.train_step(x, y, 1e-3) for _ in range(steps)])

            cases.append(Case(name, fn, meta))
    return cases, info


def _spec_fields(spec) -> dict:
    import dataclasses

    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}


# ------------------------------------------------------------------ CBAM block train step
def block_cases(shape, device, args, log) -> list[Case]:
    import torch

    from cbam_multi import CBAMSpec
    from cbam_multi.torch import CBAM

    b, c, h, w = shape
    spec = CBAMSpec.seed(c)
    sync = common.torch_sync(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device)
    dy = torch.randn(shape, generator=gen).to(device)
    cases = []

    def torch_step(model, label, name):
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)

        def fn():
            opt.zero_grad(set_to_none=True)
            (model(x) * dy).mean().backward()
            opt.step()
            sync()

        cases.append(Case(name, fn, {"label": label}))

    torch_step(CBAM(spec, seed=0).to(device).train(), "torch eager + torch.optim.SGD", "block_torch_eager")
    if not (args.no_compile or args.smoke):
        import torch._dynamo

        torch._dynamo.reset()
        torch_step(torch.compile(CBAM(spec, seed=0).to(device).train(), dynamic=False),
                   "torch.compile(module) + torch.optim.SGD", "block_torch_compile")
    try:
        import jax
        import jax.numpy as jnp
        import optax
        from flax import nnx

        from cbam_multi.jax import CBAM as NNXCBAM
        from cbam_multi.jax import linen
        from cbam_multi.jax.weights import init_variables
    except Exception as e:
        cases.append(Case("block_nnx", None, {"label": "Flax NNX", "skipped": f"jax unavailable: {e}"}))
        return cases
    rng = np.random.default_rng(0)
    xj = jnp.asarray(rng.standard_normal((b, h, w, c), dtype=np.float32))
    dyj = jnp.asarray(rng.standard_normal((b, h, w, c), dtype=np.float32))

    model = NNXCBAM(spec, seed=0)
    model.train()
    opt = nnx.Optimizer(model, optax.sgd(1e-2), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, opt, x, dy):
        grads = nnx.grad(lambda m: jnp.mean(m(x) * dy))(model)
        opt.update(model, grads)

    cases.append(Case("block_nnx", lambda: jax.block_until_ready(nnx_step(model, opt, xj, dyj)) or
                      jax.block_until_ready(nnx.state(model, nnx.Param)),
                      {"label": "Flax NNX: nnx.jit(step), nnx.Optimizer(optax.sgd)"}))

    mod = linen.CBAM(spec, seed=0)
    tx = optax.sgd(1e-2)
    state = {"params": init_variables(spec, 0)["params"]}
    state["opt"] = tx.init(state["params"])

    def linen_step(params, opt_state, x, dy):
        grads = jax.grad(lambda p: jnp.mean(mod.apply({"params": p}, x) * dy))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    linen_step = jax.jit(linen_step, donate_argnums=(0, 1))

    def linen_fn():
        state["params"], state["opt"] = linen_step(state["params"], state["opt"], xj, dyj)
        jax.block_until_ready(state["params"])

    cases.append(Case("block_linen", linen_fn, {"label": "Flax linen: jax.jit(step, donate), optax.sgd"}))
    return cases


# ------------------------------------------------------------------ main
def main(argv=None) -> dict:
    return common.run_benchmark(parse_args(argv), _run)


def _run(args, device) -> dict:
    import torch._inductor.config as inductor_config

    inductor_config.force_disable_caches = True  # cold torch.compile times (no on-disk caches of earlier runs)
    log = print
    parts = args.parts.split(",")
    batch = args.batch_size or (4 if args.smoke else 128)
    steps = args.steps or (1 if args.smoke else 5)
    if args.smoke:
        runner = common.Runner(rounds=1, reps_per_round=1, warmup=0, max_case_s=5)
    elif args.quick:
        runner = common.Runner(rounds=3, reps_per_round=2, warmup=1, max_case_s=4)
    else:
        runner = common.Runner(rounds=5, reps_per_round=3, warmup=2, max_case_s=12)
    stem, env = common.start_run(args, device, "train", "bench_train", log=log)
    t0 = time.perf_counter()
    payload: dict = {"benchmark": "train", "mode": common.mode_name(args),
                     "environment": env, "mnist": None, "block": []}
    if "mnist" in parts:
        cases, info = mnist_cases(args, batch, steps, log)
        res, quiet = common.run_group(runner, [c for c in cases if c.fn is not None], args.wait_quiet, log=log)
        if quiet:
            info["quiet_wait"] = quiet
        rows = []
        for c in cases:
            r = {"name": c.name, **res.get(c.name, c.meta)}
            if "median_ms" in r:
                r["images_per_s"] = round(batch * steps / (r["median_ms"] / 1e3), 1)
                r["us_per_image"] = round(r["median_ms"] * 1e3 / (batch * steps), 2)
                log(f"    {c.name:28s} {r['images_per_s']:10.1f} img/s  ({r['us_per_image']} us/img, compile {r.get('trainer_compile_s')} s"
                    f" / first call {r['first_call_s']} s, foreign load {r.get('foreign_load')})")
            else:
                log(f"    {c.name:28s} {r.get('error') or r.get('skipped')}")
            rows.append(r)
        payload["mnist"] = {"batch": batch, "steps_per_sample": steps, "input": "synthetic, fixed batch of MNIST shape",
                            "rows": rows, "info": info}
    if "block" in parts:
        for shape in SMOKE_BLOCK_SHAPES if args.smoke else BLOCK_SHAPES:
            log(f"[bench_train] CBAM block train step {'x'.join(map(str, shape))} float32")
            cases = block_cases(shape, device, args, log)
            res, quiet = common.run_group(runner, [c for c in cases if c.fn is not None], args.wait_quiet, log=log)
            for c in cases:
                r = {"name": c.name, "shape": list(shape), "quiet_wait": quiet, **res.get(c.name, c.meta)}
                if "median_ms" in r:
                    r["us_per_image"] = round(r["median_ms"] * 1e3 / shape[0], 2)
                    log(f"    {c.name:22s} {r['median_ms']:9.3f} ms/step ({r['us_per_image']} us/img, first {r['first_call_s']} s, "
                        f"foreign load {r.get('foreign_load')})")
                payload["block"].append(r)
    payload["goals"] = goals(payload)
    return common.finish_run(args, stem, "bench_train", payload, markdown, t0, log=log)


def _row(rows, name):
    return next((r for r in rows if r.get("name") == name and "median_ms" in r), None)


def goals(payload) -> dict:
    out = {}
    m = payload.get("mnist") or {}
    rows = m.get("rows", [])
    t, j = _row(rows, "mnist_torch_cbam"), _row(rows, "mnist_jax_cbam")
    if t and j:
        ratio = round(t["us_per_image"] / j["us_per_image"], 3)
        out["jax_vs_torch_eager_mnist_cbam"] = {"torch_us_per_image": t["us_per_image"], "jax_us_per_image": j["us_per_image"],
                                                "torch_over_jax": ratio, "target": ">= 1.0 (JAX at least as fast)", "met": ratio >= 1.0}
    blk = payload.get("block", [])
    per = []
    for shape in sorted({tuple(r["shape"]) for r in blk}):
        rs = [r for r in blk if tuple(r["shape"]) == shape]
        t = next((r for r in rs if r["name"] == "block_torch_eager" and "median_ms" in r), None)
        for jn in ("block_nnx", "block_linen"):
            jr = next((r for r in rs if r["name"] == jn and "median_ms" in r), None)
            if t and jr:
                per.append({"shape": list(shape), "jax": jn, "torch_over_jax": round(t["median_ms"] / jr["median_ms"], 3)})
    if per:
        out["jax_vs_torch_eager_block_step"] = per
    return out


def markdown(payload) -> str:
    env = payload["environment"]
    out = [f"# Training throughput ({payload['mode']})", "", common.env_markdown(env), ""]
    m = payload.get("mnist")
    if m:
        out += [f"## MNIST train step (batch {m['batch']}, {m['steps_per_sample']} steps per timed sample, {m['input']})", ""]
        table = []
        for r in m["rows"]:
            if "median_ms" in r:
                table.append([r["label"], "yes" if r["cbam"] else "no", f"{r['images_per_s']:.0f}", f"{r['us_per_image']:.1f}",
                              r.get("trainer_compile_s") if r["backend"] == "jax"
                              else (r.get("compile_s") if r.get("torch_compile") else "-"),
                              r.get("foreign_load")])
            else:
                table.append([r.get("label", r["name"]), "yes" if r.get("cbam") else "no", r.get("error") or r.get("skipped"), "", "", ""])
        out.append(common.md_table(["backend", "CBAM", "images/s", "us/image", "compile s", "foreign load"], table))
        for k, v in (m.get("info") or {}).items():
            out.append(f"- {k}: {v}")
        out.append("")
    blk = payload.get("block") or []
    if blk:
        out += ["## CBAM block train step (forward, backward of mean(y*dy), SGD update), float32", ""]
        shapes = []
        for r in blk:
            if tuple(r["shape"]) not in shapes:
                shapes.append(tuple(r["shape"]))
        names = []
        for r in blk:
            if r["name"] not in names:
                names.append(r["name"])
        table = []
        for n in names:
            label = next(r.get("label", n) for r in blk if r["name"] == n)
            cells = []
            for s in shapes:
                r = next((r for r in blk if r["name"] == n and tuple(r["shape"]) == s), None)
                cells.append("" if r is None else f"{r['median_ms']:.2f} ms ({r['us_per_image']:.1f} us/img)" if "median_ms" in r
                             else (r.get("error") or r.get("skipped") or "n/a"))
            table.append([label] + cells)
        out.append(common.md_table(["path"] + ["x".join(map(str, s)) for s in shapes], table))
        out.append("")
    g = payload.get("goals") or {}
    if g:
        out += ["## Goals", ""]
        if "jax_vs_torch_eager_mnist_cbam" in g:
            e = g["jax_vs_torch_eager_mnist_cbam"]
            out.append(f"- MNIST with CBAM: torch eager {e['torch_us_per_image']} us/image, JAX {e['jax_us_per_image']} us/image; "
                       f"torch/JAX = **{e['torch_over_jax']}** (target {e['target']}): **{'met' if e['met'] else 'not met'}**.")
        for e in g.get("jax_vs_torch_eager_block_step", []):
            out.append(f"- CBAM block step {'x'.join(map(str, e['shape']))}: torch eager / {e['jax']} = {e['torch_over_jax']}")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
