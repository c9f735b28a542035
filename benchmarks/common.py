"""Shared benchmark machinery: device choice, timing, copy bandwidth, foreign-load capture, environment
capture, JSON + markdown output. Imported by the `bench_*.py` scripts.

Timing rules (every figure in RESULTS.md goes through `Runner`):

* each case is a zero-argument callable that returns only when its work is finished (it calls
  ``torch.cuda.synchronize()`` / ``jax.block_until_ready`` itself, see `torch_sync` / `jax_block`);
* warm-up first (the first call, which includes any compilation, is timed on its own and reported
  as ``first_call_s``; ``compile_s`` = first call - steady-state median);
* then the cases of one group are timed in *interleaved rounds* (round r times every case
  ``reps_per_round`` times in turn), so a slow drift of the machine (other processes, thermal) hits
  every case alike instead of whichever ran last; the statistic is the median of all samples;
* the CPU time that *other* processes used during each case's samples is measured from /proc
  (``foreign_load``: average number of busy cores that were not ours) and stored with the figure,
  so a contaminated number can be recognised.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cbam_multi.jsondata import json_default
from cbam_multi.machine import cpu_flags, cpu_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------ device / threads
def n_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def torch_device(requested: str = "auto") -> str:
    """'cuda' if available (or requested), else 'cpu'."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    return requested


def torch_sync(device: str) -> Callable[[], None]:
    import torch

    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def jax_block(tree) -> None:
    import jax

    jax.block_until_ready(tree)


def torch_bf16_supported(device: str) -> tuple[bool, str]:
    import torch

    if device == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, "torch.cuda.is_bf16_supported()" if ok else "GPU lacks bf16"
    # CPU: bf16 kernels always exist; native bf16 arithmetic needs avx512_bf16 / amx (else emulated).
    flags = cpu_flags()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    return True, "native (avx512_bf16)" if native else "emulated (no avx512_bf16: converts through float32)"


# ------------------------------------------------------------------ foreign CPU load
class LoadMeter:
    """Busy CPU time of *other* processes while measuring, from /proc/stat minus our own usage.

    ``foreign_load`` = (all busy core-seconds - this process's core-seconds) / wall seconds, i.e. the
    average number of cores other processes kept busy. 0 on a quiet machine; 1.0 on this 2-core box
    means half the machine was taken. None where /proc is unavailable. Jiffy resolution (10 ms), so
    it is meaningful summed over many samples, not for one short call.
    """

    def __init__(self):
        self.busy = 0.0
        self.wall = 0.0
        self._t0 = None
        self._ok = Path("/proc/stat").exists()
        self._hz = os.sysconf("SC_CLK_TCK") if self._ok else 100

    def _read(self):
        with open("/proc/stat") as f:
            parts = f.readline().split()[1:]
        vals = [int(v) for v in parts]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        total = sum(vals[:8])  # user nice system idle iowait irq softirq steal
        with open("/proc/self/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()
        own = int(st[11]) + int(st[12])  # utime + stime of this process (all threads)
        return total - idle, own

    def start(self):
        if self._ok:
            self._t0 = (time.perf_counter(), *self._read())

    def stop(self):
        if self._ok and self._t0 is not None:
            t1, busy1, own1 = time.perf_counter(), *self._read()
            t0, busy0, own0 = self._t0
            self.wall += t1 - t0
            self.busy += max(0, (busy1 - busy0) - (own1 - own0)) / self._hz
            self._t0 = None

    @property
    def foreign_load(self) -> float | None:
        if not self._ok or self.wall <= 0:
            return None
        return round(self.busy / self.wall, 3)


def wait_for_quiet(max_wait_s: float, threshold: float = 0.15, window_s: float = 1.0, need: int = 3,
                   log: Callable[[str], None] = print) -> dict:
    """Block until other processes leave the CPUs alone: ``need`` consecutive ``window_s`` windows with
    foreign load < ``threshold`` cores, or ``max_wait_s`` passed. Returns what happened (recorded with
    the results). On a shared machine this keeps other jobs' bursts out of the numbers."""
    t0 = time.perf_counter()
    ok = 0
    last = None
    while True:
        m = LoadMeter()
        m.start()
        time.sleep(window_s)
        m.stop()
        last = m.foreign_load
        if last is None:
            return {"waited_s": 0.0, "quiet": None}
        ok = ok + 1 if last < threshold else 0
        waited = time.perf_counter() - t0
        if ok >= need:
            return {"waited_s": round(waited, 1), "quiet": True}
        if waited >= max_wait_s:
            log(f"    (still {last:.2f} foreign cores busy after waiting {waited:.0f} s; measuring anyway)")
            return {"waited_s": round(waited, 1), "quiet": False, "foreign_load_at_start": last}


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------ timing
@dataclass
class Case:
    """One thing to time. ``fn()`` must return only when the work is done (sync inside)."""

    name: str
    fn: Callable[[], object]
    meta: dict = field(default_factory=dict)


def _stats(samples_s: list[float]) -> dict:
    ms = sorted(s * 1e3 for s in samples_s)
    q = np.percentile(ms, [25, 75]) if len(ms) > 1 else (ms[0], ms[0])
    return {
        "median_ms": round(statistics.median(ms), 4),
        "min_ms": round(ms[0], 4),
        "p25_ms": round(float(q[0]), 4),
        "p75_ms": round(float(q[1]), 4),
        "n": len(ms),
    }


class Runner:
    """Warm up, then time a group of cases in interleaved rounds (see module docstring)."""

    def __init__(self, *, rounds: int = 5, reps_per_round: int = 6, warmup: int = 2, max_case_s: float = 6.0):
        self.rounds = rounds
        self.reps_per_round = reps_per_round
        self.warmup = warmup
        self.max_case_s = max_case_s  # time budget per case: slow cases get fewer samples

    def run(self, cases: list[Case], log: Callable[[str], None] = print) -> dict[str, dict]:
        results: dict[str, dict] = {}
        live: list[Case] = []
        per_call: dict[str, float] = {}
        for case in cases:
            try:
                t0 = time.perf_counter()
                case.fn()
                first = time.perf_counter() - t0
                t1 = time.perf_counter()
                for _ in range(self.warmup):
                    case.fn()
                per_call[case.name] = (time.perf_counter() - t1) / max(1, self.warmup) if self.warmup else first
                results[case.name] = {"first_call_s": round(first, 4), **case.meta}
                live.append(case)
            except Exception as e:  # a path that cannot run here is reported, not fatal
                msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                results[case.name] = {"error": msg, **case.meta}
                log(f"    {case.name}: FAILED {msg}")
        samples: dict[str, list[float]] = {c.name: [] for c in live}
        meters = {c.name: LoadMeter() for c in live}
        faults = {c.name: 0 for c in live}
        # slow cases: fewer reps per round so no case exceeds max_case_s in total
        reps = {
            c.name: max(1, min(self.reps_per_round, int(self.max_case_s / self.rounds / max(per_call[c.name], 1e-6))))
            for c in live
        }
        for rnd in range(self.rounds):
            # every other round in reverse: no case always runs right after the same neighbour (whose frees and
            # cache footprint it would inherit: a JAX path timed right after the torch paths page-faulted its
            # outputs in again and read 15-38 % slower than the same compiled program timed first)
            for case in live if rnd % 2 == 0 else live[::-1]:
                meter = meters[case.name]
                if per_call[case.name] < 0.05 and self.warmup:
                    case.fn()  # untimed: re-warm caches / thread pools after the previous case
                meter.start()
                f0 = _minflt()
                for _ in range(reps[case.name]):
                    t0 = time.perf_counter()
                    case.fn()
                    samples[case.name].append(time.perf_counter() - t0)
                faults[case.name] += _minflt() - f0
                meter.stop()
        for case in live:
            st = _stats(samples[case.name])
            r = results[case.name]
            r.update(st)
            r["compile_s"] = round(max(0.0, r["first_call_s"] - st["median_ms"] / 1e3), 4)
            r["foreign_load"] = meters[case.name].foreign_load
            # minor page faults per timed call: fresh memory the OS had to map (glibc returns large freed
            # blocks to the OS, so an eager op that allocates a new full-size tensor faults it in again)
            r["page_faults_per_call"] = round(faults[case.name] / max(1, len(samples[case.name])), 1)
        return results


def _minflt() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except Exception:  # not POSIX
        return 0


def selection(args, known, quick: dict, full: dict) -> tuple[list[str], list[str], Runner]:
    """What a run measures: (the ``--modes`` list, the ``--paths`` list checked against ``known`` or every
    known path, the Runner of its --smoke / --quick / full mode). ``--rounds`` / ``--reps`` override the
    ``rounds`` / ``reps_per_round`` of ``quick`` and ``full``."""
    pids = args.paths.split(",") if args.paths else list(known)
    unknown = set(pids) - set(known)
    if unknown:
        raise SystemExit(f"unknown --paths {sorted(unknown)}; choose from {list(known)}")
    if args.smoke:
        runner = Runner(rounds=1, reps_per_round=1, warmup=0, max_case_s=5)
    else:
        settings = dict(quick if args.quick else full)
        settings["rounds"] = getattr(args, "rounds", None) or settings["rounds"]
        settings["reps_per_round"] = getattr(args, "reps", None) or settings["reps_per_round"]
        runner = Runner(**settings)
    return args.modes.split(","), pids, runner


def run_group(runner: Runner, cases: list[Case], wait_quiet_s: float = 0.0, retries: int = 2,
              max_foreign: float = 0.3, log: Callable[[str], None] = print) -> tuple[dict[str, dict], dict | None]:
    """`Runner.run` on a shared machine: wait for quiet CPUs first (``wait_quiet_s`` > 0) and time the
    group again (up to ``retries`` times) when other processes took more than ``max_foreign`` cores
    during it. Compile/first-call figures come from the first attempt (later attempts are warm)."""
    quiet = wait_for_quiet(wait_quiet_s, log=log) if wait_quiet_s > 0 else None
    res = runner.run(cases, log=log)
    first = {k: {f: v[f] for f in ("first_call_s", "compile_s") if f in v} for k, v in res.items()}
    attempt = 1
    while wait_quiet_s > 0 and attempt <= retries:
        worst = max((r.get("foreign_load") or 0.0 for r in res.values()), default=0.0)
        if worst <= max_foreign:
            break
        log(f"    (foreign load reached {worst:.2f} cores: timing this group again, attempt {attempt + 1})")
        quiet = wait_for_quiet(wait_quiet_s, log=log)
        res = runner.run(cases, log=log)
        for k, v in res.items():
            if "median_ms" in v and k in first and "first_call_s" in first[k]:
                v["first_call_s"] = first[k]["first_call_s"]
                v["compile_s"] = round(max(0.0, v["first_call_s"] - v["median_ms"] / 1e3), 4)
        attempt += 1
    info = {"quiet_wait": quiet, "attempts": attempt} if wait_quiet_s > 0 else None
    return res, info


def time_window(fn: Callable[[], object], repeat: int) -> float:
    """Seconds for ``repeat`` back-to-back calls (fn must sync at its end)."""
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------------ entry point
def run_benchmark(args, run: Callable) -> dict:
    """What both benchmark scripts' ``main`` does around ``run(args, device)``: apply ``--malloc`` (recorded
    as ``args.malloc_record``), pick the device, use ``--threads`` torch threads (default: all cores), and
    give in-process callers (tests) torch's thread count and inductor's cache switch back afterwards."""
    args.malloc_record = setup_malloc(args.malloc)
    import torch
    import torch._inductor.config as inductor_config

    device = torch_device(args.device)
    prev_threads, prev_disable = torch.get_num_threads(), inductor_config.force_disable_caches
    torch.set_num_threads(args.threads or n_cores())
    try:
        return run(args, device)
    finally:
        torch.set_num_threads(prev_threads)
        inductor_config.force_disable_caches = prev_disable


def benchmark_parser(description: str, smoke_help: str, quick_help: str | None = "fewer rounds and repetitions",
                     rounds: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark script takes: --out, --quick | --smoke, --device, --threads, --wait-quiet,
    --malloc, and with ``rounds`` the --rounds / --reps overrides that `selection` reads; the script adds its own."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default benchmarks/results/)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help=quick_help)
    g.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    if rounds:
        p.add_argument("--rounds", type=int, default=None)
        p.add_argument("--reps", type=int, default=None, help="timed calls per case per round")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each group, wait up to S seconds until no other process is using the CPUs")
    add_malloc_arg(p)
    return p


def mode_name(args) -> str:
    """"smoke", "quick" or "full": the benchmark's ``--smoke`` / ``--quick`` choice (in its JSON and file names)."""
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def start_run(args, device: str, stem: str, tag: str, detail: str = "", log: Callable[[str], None] = print):
    """What every benchmark's ``run`` starts with: (its output stem, ``stem`` + ``_smoke`` / ``_quick``; the
    `environment`, with the ``--malloc`` record), the device logged as ``[tag] ...; torch threads N`` + ``detail``."""
    env = environment(device)
    env["malloc"] = args.malloc_record
    log(f"[{tag}] {device_line(env)}; torch threads {env['torch_threads']}{detail}")
    mode = mode_name(args)
    return (stem if mode == "full" else f"{stem}_{mode}"), env


def finish_run(args, stem: str, tag: str, payload: dict, markdown: Callable[[dict], str], t_start: float,
               log: Callable[[str], None] = print) -> dict:
    """What every benchmark's ``run`` ends with (a long one also after each part): the end load and the wall
    seconds since ``t_start`` into ``payload["environment"]``, the JSON + ``markdown(payload)`` files written."""
    env = payload["environment"]
    env["loadavg_end"] = loadavg()
    env["wall_s"] = round(time.perf_counter() - t_start, 1)
    jpath, mpath = write_outputs(args.out, stem, payload, markdown(payload))
    log(f"[{tag}] wrote {jpath} and {mpath}")
    return payload


# ------------------------------------------------------------------ allocator
def add_malloc_arg(parser) -> None:
    parser.add_argument(
        "--malloc", choices=("steady", "default"), default="steady",
        help="steady (default): keep freed memory in the heap (cbam_multi.training.heap.keep_heap), so every path's "
        "buffers are reused instead of page-faulted in again on each call; default: glibc as it is",
    )


def setup_malloc(choice: str) -> dict:
    """Apply ``--malloc`` before the first large allocation; the returned record goes into the JSON."""
    if choice == "default":
        return {"applied": False, "reason": "--malloc default (glibc's own mmap / trim thresholds)"}
    from cbam_multi.training.heap import keep_heap

    return keep_heap()


# ------------------------------------------------------------------ bandwidth
def copy_bandwidth(device: str = "cpu", nbytes: int = 256 * 2**20, reps: int = 10) -> dict:
    """Streaming copy bandwidth, GB/s counting bytes read + bytes written (a copy of N bytes moves 2N).

    CPU: a torch ``copy_`` (all torch threads) and a NumPy ``copyto`` (one thread) of ``nbytes``, far
    larger than the last-level cache, so this is the DRAM rate; the larger of the two is the reference.
    CUDA: a device-to-device torch copy. Best of ``reps`` (the least disturbed copy).
    """
    import torch

    out: dict = {"nbytes": nbytes, "definition": "GB/s = (bytes read + bytes written) / s, 1 GB = 1e9 B"}
    sync = torch_sync(device)
    n = nbytes // 4
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)

    def best(fn):  # best of reps: the rate the hardware can sustain (noise only ever slows a copy down)
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    t = best(lambda: (b.copy_(a), sync()))  # noqa: F821  (a and b are deleted after this call, not before)
    out["torch_copy_gbps"] = round(2 * nbytes / t / 1e9, 2)
    out["torch_threads"] = torch.get_num_threads()
    del a, b
    if device == "cpu":
        an = np.ones(n, np.float32)
        bn = np.empty_like(an)
        t = best(lambda: np.copyto(bn, an))
        out["numpy_copy_gbps"] = round(2 * nbytes / t / 1e9, 2)
        out["gbps"] = max(out["torch_copy_gbps"], out["numpy_copy_gbps"])
        out["method"] = f"max(torch copy_ {torch.get_num_threads()} threads, numpy copyto 1 thread) of {nbytes / 2**20:.0f} MiB"
    else:
        out["gbps"] = out["torch_copy_gbps"]
        out["method"] = f"torch device copy_ of {nbytes / 2**20:.0f} MiB on {device}"
    return out


def hot_copy_bandwidth(nbytes: int, device: str = "cpu", reps: int = 20) -> float:
    """Copy bandwidth (GB/s, read + write) at a given size: cache-resident when small."""
    import torch

    sync = torch_sync(device)
    a = torch.ones(max(1, nbytes // 4), device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        b.copy_(a)
        sync()
        ts.append(time.perf_counter() - t0)
    return round(2 * a.numel() * 4 / min(ts) / 1e9, 2)


# ------------------------------------------------------------------ environment
def _version(pkg: str) -> str | None:
    try:
        from importlib import metadata

        return metadata.version(pkg)
    except Exception:
        return None


def _l3_cache() -> str | None:
    p = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    try:
        return p.read_text().strip()
    except OSError:
        return None


def _git() -> dict:
    def run(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""

    commit = run("rev-parse", "HEAD")
    dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    return {"commit": commit or None, "dirty_tracked_files": dirty}


ENV_VARS = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "XLA_FLAGS",
    "JAX_PLATFORMS", "JAX_ENABLE_X64", "CUDA_VISIBLE_DEVICES", "LD_PRELOAD",
    "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "TORCHINDUCTOR_FREEZING",
)


def environment(device: str) -> dict:
    """Versions, device, threads, relevant environment variables, git state, load."""
    import torch

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": (cpu_model() or platform.machine()),
        "cores": n_cores(),
        "l3_cache": _l3_cache(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        if hasattr(os, "sysconf") else None,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "versions": {p: _version(p) for p in ("cbam-multi", "numpy", "torch", "jax", "jaxlib", "flax", "optax", "timm")},
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        "git": _git(),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv) if sys.argv and sys.argv[0] else None,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "loadavg_start": loadavg(),
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    try:
        import jax

        env["jax_devices"] = [str(d) for d in jax.devices()]
        env["jax_x64"] = bool(jax.config.jax_enable_x64)
    except Exception as e:  # jax missing: the torch part still runs
        env["jax_devices"] = f"unavailable: {type(e).__name__}: {e}"
    return env


def device_line(env: dict) -> str:
    if env["device"] == "cuda":
        return f"CUDA: {env.get('gpu')} (CUDA {env.get('cuda')}), host {env['cpu']}"
    return f"CPU: {env['cpu']}, {env['cores']} cores, L3 {env.get('l3_cache')}, {env.get('memory_gib')} GiB"


def env_markdown(env: dict) -> str:
    v = env["versions"]
    lines = [
        f"- Device: {device_line(env)}; torch threads {env['torch_threads']}; JAX devices {env.get('jax_devices')}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + f", python {env['python']}",
        f"- Platform: {env['platform']}",
        f"- Command: `{env.get('command')}`",
        f"- Git: {env['git'].get('commit')}{' (tracked files modified)' if env['git'].get('dirty_tracked_files') else ''}",
        f"- Started {env['started']}; load average at start {env.get('loadavg_start')}, at end {env.get('loadavg_end')}",
    ]
    if env.get("env"):
        lines.append("- Environment: " + ", ".join(f"{k}={val}" for k, val in env["env"].items()))
    if env.get("malloc"):
        m = env["malloc"]
        lines.append("- Allocator: " + (f"steady heap (cbam_multi.training.heap.keep_heap: {m['settings']})" if m.get("applied")
                                         else f"glibc defaults ({m.get('reason')})"))
    return "\n".join(lines)


# ------------------------------------------------------------------ output
def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v).replace("|", "\\|")

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def write_outputs(out_dir, stem: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / f"{stem}.json", out / f"{stem}.md"
    jpath.write_text(json.dumps(payload, indent=1, default=json_default) + "\n")
    mpath.write_text(markdown.rstrip() + "\n")
    return jpath, mpath


def fmt_ms(r: dict | None) -> str:
    if not r:
        return "n/a"
    if "error" in r:
        return "failed"
    if "skipped" in r:
        return "n/a"
    return f"{r['median_ms']:.3f}"
