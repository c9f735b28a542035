"""Where eager PyTorch CBAM time goes: torch.profiler op tables for the blog's CBAM, timm's CbamModule (copy)
and ours, forward (inference mode) and forward+backward, one shape (default 64x64x28x28 float32).

    python benchmarks/profile_eager.py [--shape 64x64x28x28] [--threads N] [--out benchmarks/results/]

Writes ``<out>/profile_eager.json`` and ``.md``: per model, wall ms per call (median, no profiler), minor page
faults per call, and the top aten ops by self CPU time per call with their input shapes.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import anchors, common


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="64x64x28x28")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--out", default=str(common.DEFAULT_OUT))
    p.add_argument("--wait-quiet", type=float, default=60.0, metavar="S",
                   help="before each measurement wait up to S s for other processes to leave the CPUs (0: off)")
    args = p.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from cbam_multi import CBAMSpec, init_weights
    from cbam_multi.torch import CBAM, export_weights, to_timm_state_dict

    prev = torch.get_num_threads()
    torch.set_num_threads(args.threads or common.n_cores())
    try:
        shape = tuple(int(v) for v in args.shape.split("x"))
        c = shape[1]
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        dy = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        blog = anchors.load_seed_weights(anchors.BlogCBAM(c), init_weights(CBAMSpec.seed(c), 0))
        ours_timm = CBAM(CBAMSpec.timm(c))
        timm = anchors.TimmCbamModule(c)
        timm.load_state_dict(to_timm_state_dict(export_weights(ours_timm), CBAMSpec.timm(c)))
        models = {"blog CBAM": blog, "ours (seed preset)": CBAM(CBAMSpec.seed(c)),
                  "timm CbamModule copy": timm, "ours (timm preset)": ours_timm}
        env = common.environment("cpu")
        out = {"shape": list(shape), "environment": env, "models": {}}
        for name, model in models.items():
            for mode in ("fwd", "fwdbwd"):
                model.train(mode == "fwdbwd")
                xin = x.clone().requires_grad_(mode == "fwdbwd")

                def call():
                    if mode == "fwd":
                        with torch.inference_mode():
                            model(xin)
                    else:
                        xin.grad = None
                        for q in model.parameters():
                            q.grad = None
                        model(xin).backward(dy)

                quiet = common.wait_for_quiet(args.wait_quiet, log=print) if args.wait_quiet > 0 else None
                for _ in range(5):
                    call()
                meter = common.LoadMeter()
                meter.start()
                ts = []
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    call()
                    ts.append(time.perf_counter() - t0)
                faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / args.calls
                meter.stop()
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    for _ in range(args.calls):
                        call()
                rows = []
                for ev in prof.key_averages(group_by_input_shape=True):
                    if not ev.key.startswith("aten::"):
                        continue
                    rows.append({"op": ev.key, "shapes": str(ev.input_shapes)[:90], "self_ms_per_call":
                                 round(ev.self_cpu_time_total / 1e3 / args.calls, 3), "calls_per_call": ev.count / args.calls})
                rows.sort(key=lambda r: -r["self_ms_per_call"])
                out["models"][f"{name} | {mode}"] = {"median_ms": round(statistics.median(ts) * 1e3, 3),
                                                     "page_faults_per_call": round(faults, 1), "foreign_load": meter.foreign_load,
                                                     "quiet_wait": quiet, "top_ops": rows[: args.top]}
                print(f"{name:22s} {mode:6s} {statistics.median(ts) * 1e3:8.3f} ms, {faults:7.1f} page faults/call, "
                      f"foreign load {meter.foreign_load}")
        env["loadavg_end"] = common.loadavg()
        md = [f"# Eager op profile, {args.shape} float32", "", common.env_markdown(env), ""]
        for key, m in out["models"].items():
            md += [f"## {key}: {m['median_ms']} ms/call (median of {args.calls}, no profiler), "
                   f"{m['page_faults_per_call']} minor page faults/call, foreign load {m['foreign_load']}", ""]
            md.append(common.md_table(["aten op", "input shapes", "self ms / call", "calls / call"],
                                      [[r["op"], r["shapes"], r["self_ms_per_call"], r["calls_per_call"]] for r in m["top_ops"]]))
            md.append("")
        common.write_outputs(args.out, "profile_eager", out, "\n".join(md))
        return out
    finally:
        torch.set_num_threads(prev)


if __name__ == "__main__":
    main()
