"""Cross-framework parity: one table of cases, runners for every backend, one comparison routine.

Used by ``parity_tests/`` (which assert) and by ``cbam-multi parity`` (which prints the table).
torch and jax are imported lazily, inside the runners, so the core stays framework-free.

For every case and dtype we compare, on the same input and the same fixed random cotangent:
  * each backend (torch, Flax NNX, Flax linen) with the float64 NumPy oracle: outputs, BN running stats;
  * torch -> canonical -> NNX and NNX -> canonical -> torch: outputs and gradients w.r.t. the input and
    every trainable parameter;
  * NNX with linen, and jit (or torch.compile) with eager;
  * torch eager inference (the fused CPU kernel), NCHW and channels_last, with the eval-mode oracle.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cbam_multi._optional import require
from cbam_multi.errors import InputError
from cbam_multi.reference import cbam_forward
from cbam_multi.spec import STATISTIC, CBAMSpec
from cbam_multi.weights import init_weights

DTYPES = ("float64", "float32")

# The torch side's device ("cpu", "cuda", "cuda:1", ...): `cbam-multi parity --device` sets it, and so can the
# parity tests' environment. JAX runs on its default backend (a GPU when jax has its CUDA plugin); `devices()`
# names both, so a report says where its figures come from.
TORCH_DEVICE_ENV = "CBAM_MULTI_TORCH_DEVICE"


def torch_device() -> str:
    return os.environ.get(TORCH_DEVICE_ENV, "cpu")


def devices(backends=("torch", "jax")) -> str:
    """'torch on cpu, JAX on cpu' (or the GPU's name): the line a parity report starts with."""
    parts = []
    if "torch" in backends:
        torch = require("torch", "the torch parity runner")
        try:
            dev = torch.device(torch_device())
        except RuntimeError:
            raise InputError(f"{TORCH_DEVICE_ENV}={torch_device()!r} is no torch device: use cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"torch device {dev} requested but torch.cuda.is_available() is False: install a CUDA "
                             "build of torch (README, Install) or use --device cpu")
        parts.append(f"torch {torch.__version__} on {dev} ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda"
                     else f"torch {torch.__version__} on {dev}")
    if "jax" in backends:
        jax = require("jax", "the JAX parity runner")
        parts.append(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    return ", ".join(parts)

# Tolerances, in one place. Outputs: max abs error. Gradients and BN statistics: max abs error divided
# by max |reference| (gradients scale with the cotangent and the batch, so absolute bounds mislead).
# float32 output bound is the one Hugging Face uses for PyTorch <-> Flax checks.
TOLERANCES = {
    "float64": {"y": 1e-10, "grad": 1e-10, "stats": 1e-10},
    "float32": {"y": 1e-5, "grad": 1e-4, "stats": 1e-5},
}


@dataclass(frozen=True)
class ParityCase:
    preset: str
    channels: int
    batch: int
    height: int
    width: int
    train: bool = False
    overrides: tuple = ()  # ((field, value), ...) applied to the preset
    compile: bool = False  # also compare torch.compile with eager (slow to compile: few cases)
    inputs: str = "normal"  # "ties": deliberate tied maxima (see `tie_input`), where the tie rule matters

    @property
    def spec(self) -> CBAMSpec:
        return CBAMSpec.preset(self.preset, self.channels, **dict(self.overrides))

    @property
    def id(self) -> str:
        extra = "".join(f"-{k}={_short(v)}" for k, v in self.overrides)
        mode = "-train" if self.train else ""
        ties = "-ties" if self.inputs == "ties" else ""
        return f"{self.preset}-C{self.channels}-B{self.batch}-{self.height}x{self.width}{mode}{ties}{extra}"


def _short(v) -> str:
    return "+".join(v) if isinstance(v, tuple) else str(v)


CASES: tuple[ParityCase, ...] = (
    ParityCase("seed", 16, 1, 1, 1),
    ParityCase("seed", 4, 3, 7, 5),  # hidden width 1
    ParityCase("seed", 64, 32, 28, 28, compile=True),
    ParityCase("seed", 8, 3, 9, 9, overrides=(("channel_pools", ("avg", "max", "lp", "lse")), ("gate", "hard_sigmoid"))),
    ParityCase("paper", 32, 2, 7, 5),
    ParityCase("paper", 256, 2, 14, 14),
    ParityCase("official", 64, 2, 56, 56),
    ParityCase("official", 64, 2, 56, 56, train=True),
    ParityCase("official", 16, 32, 7, 5, train=True, compile=True),
    ParityCase("timm", 1, 1, 7, 5, train=True),
    ParityCase("timm", 24, 1, 28, 28),
    ParityCase("timm", 128, 4, 28, 28, train=True),
    # tied maxima (the tie rule decides the gradients) and the options of the anchors (issue 13)
    ParityCase("seed", 8, 2, 6, 5, inputs="ties"),
    ParityCase("official", 32, 2, 7, 6, train=True, inputs="ties"),
    ParityCase("official", 32, 2, 7, 6, overrides=(("no_spatial", True),), inputs="ties"),
    ParityCase("timm_light", 24, 2, 7, 5, train=True, inputs="ties"),
    ParityCase("timm", 32, 2, 6, 6, overrides=(("mlp_act", "silu"), ("hidden_divisor", 8))),
    ParityCase("paper", 16, 2, 5, 5, overrides=(("mlp_act", "leaky_relu"), ("hidden_channels", 3)), inputs="ties"),
    ParityCase("seed", 8, 2, 5, 5, overrides=(("mlp_act", "relu6"), ("variant", "light"))),
)


def tie_input(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """An NCHW input full of tied maxima, as real inputs have them: ReLU'd values (so pixels where every
    channel is 0 tie in the spatial max over channels), every channel's maximum duplicated at a second
    position (a tie inside the pool over H, W) and one all-zero row of pixels."""
    b, c, h, w = shape
    x = np.maximum(rng.normal(size=shape), 0.0)
    x[:, :, 0, :] = 0.0
    flat = x.reshape(b, c, h * w)
    first = flat.argmax(axis=2)
    if h * w > 1:
        second = (first + 1 + rng.integers(0, h * w - 1, size=first.shape)) % (h * w)
        bi, ci = np.meshgrid(np.arange(b), np.arange(c), indexing="ij")
        flat[bi, ci, second] = flat[bi, ci, first]
    return flat.reshape(shape)


def case_inputs(case: ParityCase, seed: int = 0):
    """Seeded float64 (weights, x NCHW, cotangent NCHW) shared by every backend."""
    spec = case.spec
    rng = np.random.default_rng(seed)
    weights = init_weights(spec, seed=seed + 1, dtype=np.float64)
    if spec.has_norm:
        # Non-trivial BN state, so that transfer and eval mode are actually exercised.
        weights["spatial.bn.scale"] = rng.uniform(0.5, 1.5, size=(1,))
        weights["spatial.bn.bias"] = rng.normal(size=(1,))
        weights["spatial.bn.mean"] = rng.normal(scale=0.1, size=(1,))
        weights["spatial.bn.var"] = rng.uniform(0.5, 2.0, size=(1,))
    shape = (case.batch, case.channels, case.height, case.width)
    x = tie_input(shape, rng) if case.inputs == "ties" else rng.normal(size=shape)
    g = rng.normal(size=shape)
    return weights, x, g


@dataclass
class RunResult:
    y: np.ndarray  # NCHW
    grads: dict[str, np.ndarray]  # "input" (NCHW) and canonical trainable names
    stats: dict[str, np.ndarray]  # BN running stats after the call (train mode)
    exported: dict[str, np.ndarray] = field(default_factory=dict)  # canonical weights before the call


# ------------------------------------------------------------------ runners
def run_torch(spec, weights, x, g, dtype: str, train: bool, compiled: bool = False, composed: bool = False) -> RunResult:
    """One forward+backward. Eager autograd takes the fused training Function where it applies
    (`cbam_multi.torch.fused`); ``composed`` turns it off to run the plain ops it is checked against."""
    import contextlib

    torch = require("torch", "the torch parity runner")
    import cbam_multi.torch as ct
    from cbam_multi.torch import fused

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tdtype, dev = getattr(torch, dtype), torch_device()
    model = ct.CBAM(spec, dtype=tdtype)
    ct.import_weights(model, weights)
    exported = ct.export_weights(model)
    model.to(dev).train(train)
    fn = torch.compile(model) if compiled else model
    xt = torch.tensor(x, dtype=tdtype, device=dev, requires_grad=True)
    with fused.disabled() if composed else contextlib.nullcontext():
        y = fn(xt)
        (y * torch.tensor(g, dtype=tdtype, device=dev)).sum().backward()
    grads = {"input": xt.grad.cpu().numpy(), **ct.export_grads(model)}
    return RunResult(y.detach().cpu().numpy(), grads, _stats(spec, ct.export_weights(model), train), exported)


def run_torch_inference(spec, weights, x, dtype: str, channels_last: bool = False) -> RunResult:
    """Eval-mode forward under ``torch.inference_mode()``: on CPU the fused kernel where it applies
    (`cbam_multi.torch.cpu_kernel`), NCHW or channels_last input. Outputs only."""
    torch = require("torch", "the torch parity runner")
    import cbam_multi.torch as ct

    tdtype, dev = getattr(torch, dtype), torch_device()
    model = ct.CBAM(spec, dtype=tdtype).eval()
    ct.import_weights(model, weights)
    model.to(dev)
    xt = torch.tensor(x, dtype=tdtype, device=dev)
    if channels_last:
        xt = xt.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        y = model(xt)
    return RunResult(y.cpu().numpy(), {}, {})


def run_jax_inference(spec, weights, x, dtype: str) -> RunResult:
    """Eval-mode forward of the NNX block under ``nnx.jit``, no derivative taken: on CPU the fused kernel where it
    applies (`cbam_multi.jax.cpu_kernel`, an XLA custom call). Outputs only."""
    jnp = require("jax.numpy", "the JAX inference parity runner")
    from flax import nnx

    import cbam_multi.jax as cj

    jdtype = getattr(jnp, dtype)
    model = cj.CBAM(spec, param_dtype=jdtype)
    cj.import_weights(model, weights)
    model.eval()
    y = nnx.jit(lambda m, xin: m(xin))(model, _nhwc(x, jdtype))
    return RunResult(_nchw(y), {}, {})


def run_nnx(spec, weights, x, g, dtype: str, train: bool, jit: bool = False) -> RunResult:
    jnp = require("jax.numpy", "the NNX parity runner")
    from flax import nnx

    import cbam_multi.jax as cj

    jdtype = getattr(jnp, dtype)
    model = cj.CBAM(spec, param_dtype=jdtype)
    cj.import_weights(model, weights)
    exported = cj.export_weights(model)
    model.train() if train else model.eval()
    xj, gj = _nhwc(x, jdtype), _nhwc(g, jdtype)

    def loss(m, xin):
        y = m(xin)
        return (y * gj).sum(), y

    step = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    if jit:
        step = nnx.jit(step)
    (_, y), (gm, gx) = step(model, xj)
    grads = {"input": _nchw(gx), **cj.export_grads(gm)}
    return RunResult(_nchw(y), grads, _stats(spec, cj.export_weights(model), train), exported)


def run_linen(spec, weights, x, g, dtype: str, train: bool) -> RunResult:
    jax = require("jax", "the linen parity runner")
    import jax.numpy as jnp

    from cbam_multi.jax import linen

    jdtype = getattr(jnp, dtype)
    variables = linen.import_variables({n: np.asarray(a, dtype) for n, a in weights.items()}, spec)
    model = linen.CBAM(spec, param_dtype=jdtype)
    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    xj, gj = _nhwc(x, jdtype), _nhwc(g, jdtype)

    @jax.jit
    def step(params, xin):
        def loss(p, xi):
            out = model.apply({"params": p, **rest}, xi, train=train, mutable=["batch_stats"] if train else False)
            y, updates = out if train else (out, {})
            return (y * gj).sum(), (y, updates)

        (_, (y, updates)), (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, xin)
        return y, updates, gp, gx

    y, updates, gp, gx = step(params, xj)
    grads = {"input": _nchw(gx), **linen.export_variables({"params": gp})}
    after = linen.export_variables({"params": params, **rest, **updates})
    return RunResult(_nchw(y), grads, _stats(spec, after, train), linen.export_variables(variables))


def _nhwc(a, dtype):
    import jax.numpy as jnp

    return jnp.asarray(np.transpose(a, (0, 2, 3, 1)), dtype=dtype)


def _nchw(a) -> np.ndarray:
    return np.transpose(np.asarray(a), (0, 3, 1, 2))


def _stats(spec, weights, train: bool) -> dict[str, np.ndarray]:
    if not (train and spec.has_norm):
        return {}
    kinds = spec.param_kinds()
    return {n: np.asarray(a) for n, a in weights.items() if kinds.get(n) == STATISTIC}


# --------------------------------------------------------------- comparing
@dataclass(frozen=True)
class Row:
    case: str
    dtype: str
    check: str  # e.g. "torch~oracle", "torch->nnx"
    quantity: str  # "y", "stats", "grad"
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.tol)  # NaN fails


def max_abs(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def rel_err(a, b) -> float:
    scale = float(np.max(np.abs(np.asarray(b, np.float64)))) if np.size(b) else 0.0
    return max_abs(a, b) / max(scale, 1e-30)


def _compare(case_id, dtype, check, got: RunResult, ref: RunResult | None, oracle=None) -> list[Row]:
    tol = TOLERANCES[dtype]
    rows = []
    if oracle is not None:
        y_ref, stats_ref = oracle
        rows.append(Row(case_id, dtype, check, "y", max_abs(got.y, y_ref), tol["y"]))
        if stats_ref:
            err = max(rel_err(got.stats.get(n), s) for n, s in stats_ref.items())
            rows.append(Row(case_id, dtype, check, "stats", err, tol["stats"]))
        return rows
    rows.append(Row(case_id, dtype, check, "y", max_abs(got.y, ref.y), tol["y"]))
    if set(got.grads) != set(ref.grads):
        rows.append(Row(case_id, dtype, check, "grad-names", float("inf"), 0.0))
    else:
        err = max(rel_err(got.grads[n], ref.grads[n]) for n in ref.grads)
        rows.append(Row(case_id, dtype, check, "grad", err, tol["grad"]))
    if ref.stats:
        err = max(rel_err(got.stats.get(n), s) for n, s in ref.stats.items())
        rows.append(Row(case_id, dtype, check, "stats", err, tol["stats"]))
    return rows


def check_case(case: ParityCase, dtype: str, backends=("torch", "jax"), with_compile: bool | None = None) -> list[Row]:
    """Run every comparison for one case and dtype; returns one Row per (check, quantity)."""
    spec = case.spec
    weights, x, g = case_inputs(case)
    y_ref, stats_ref = cbam_forward(x, weights, spec, train=case.train)
    oracle = (y_ref, stats_ref)
    cid, train = case.id, case.train
    rows: list[Row] = []
    run: dict[str, Callable[..., RunResult]] = {}
    if "torch" in backends:
        run["torch"] = lambda w, **kw: run_torch(spec, w, x, g, dtype, train, **kw)
    if "jax" in backends:
        run["nnx"] = lambda w, **kw: run_nnx(spec, w, x, g, dtype, train, **kw)
        run["linen"] = lambda w: run_linen(spec, w, x, g, dtype, train)
    results = {name: fn(weights) for name, fn in run.items()}
    for name, res in results.items():
        rows += _compare(cid, dtype, f"{name}~oracle", res, None, oracle)
    if "torch" in results:  # the fused training Function (where it applies) against the composed ops
        rows += _compare(cid, dtype, "torch-fused~composed", results["torch"], run["torch"](weights, composed=True))
    y_eval = cbam_forward(x, weights, spec, train=False)[0] if train else y_ref  # the inference rows' reference
    if "torch" in backends:  # eager inference (the fused CPU kernel) against the eval-mode oracle
        for layout, cl in (("", False), ("-cl", True)):
            res = run_torch_inference(spec, weights, x, dtype, channels_last=cl)
            rows += _compare(cid, dtype, f"torch-infer{layout}~oracle", res, None, (y_eval, {}))
    if "jax" in backends:  # eval-mode forward (on CPU the fused kernel as an XLA custom call) against the oracle
        rows += _compare(cid, dtype, "jax-infer~oracle", run_jax_inference(spec, weights, x, dtype), None, (y_eval, {}))
    if "torch" in results and "nnx" in results:
        # Each side runs with the weights the *other* side exported, and must reproduce its outputs/grads.
        rows += _compare(cid, dtype, "torch->nnx", run["nnx"](results["torch"].exported), results["torch"])
        rows += _compare(cid, dtype, "nnx->torch", run["torch"](results["nnx"].exported), results["nnx"])
    if "nnx" in results:
        rows += _compare(cid, dtype, "linen~nnx", results["linen"], results["nnx"])
        rows += _compare(cid, dtype, "nnx.jit~eager", run["nnx"](weights, jit=True), results["nnx"])
    if "torch" in results and (case.compile if with_compile is None else with_compile):
        rows += _compare(cid, dtype, "compile~eager", run["torch"](weights, compiled=True), results["torch"])
    return rows


QUANTITIES = ("y", "grad", "stats")  # the summary's columns; "grad-names" (a name mismatch) shows as a failure


def format_table(rows: list[Row]) -> str:
    """One line per row, columns as wide as their longest entry (case ids vary in length), then the
    largest error per dtype and quantity: the figures README quotes."""
    cells = [
        (r.case, r.dtype, r.check, r.quantity, f"{r.error:.2e}", f"{r.tol:.0e}", "ok" if r.ok else "FAIL") for r in rows
    ]
    head = ("case", "dtype", "check", "qty", "max err", "tol", "ok")
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    right = {4, 5}  # numbers right-aligned

    def line(c) -> str:
        return "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths))).rstrip()

    lines = [line(head), "-" * (sum(widths) + 2 * (len(widths) - 1)), *(line(c) for c in cells)]
    return "\n".join(lines + ["", format_summary(rows)])


def summarize(rows: list[Row]) -> dict[str, dict[str, float]]:
    """{dtype: {quantity: largest error}} over every row (outputs max abs; grad/stats relative)."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.quantity in QUANTITIES:
            d = out.setdefault(r.dtype, {})
            d[r.quantity] = float(np.maximum(d.get(r.quantity, -np.inf), r.error))  # NaN propagates
    return out


def round_up(x: float) -> float:
    """``x`` rounded *up* to two significant digits, so a printed summary figure is a true upper bound
    (1.04e-5 prints as 1.1e-05, never 1.0e-05); NaN and inf pass through."""
    if not np.isfinite(x) or x <= 0:
        return x
    unit = 10.0 ** (np.floor(np.log10(x)) - 1)
    up = float(np.ceil(round(x / unit, 9)) * unit)  # round(): 1.1e-05 / 1e-06 is 11.000000000000002
    return float(f"{up:.1e}")


def format_summary(rows: list[Row]) -> str:
    """The largest error per dtype and quantity, rounded up (README quotes these)."""
    worst = summarize(rows)
    head = f"{'largest error':<14}" + "".join(f"{q:>10}" for q in QUANTITIES)
    lines = [head]
    for dtype in (d for d in DTYPES if d in worst):
        cells = "".join(f"{round_up(worst[dtype][q]):>10.1e}" if q in worst[dtype] else f"{'-':>10}" for q in QUANTITIES)
        lines.append(f"{dtype:<14}{cells}")
    return "\n".join(lines)


# Whole-network parity (`cbam_multi.parity_resnet`): every quantity relative to the largest reference value
# (logits; each gradient tensor separately; each BN statistic tensor). float32 logits: the 1e-5 bound above;
# float32 gradients: BN in train mode at batch 2 is ill-conditioned (its backward divides by small batch standard
# deviations): even float64 torch and JAX gradients differ by ~5e-13 there, ~4000x the float64 rounding unit, and the
# same amplification of float32's 6e-8 gives ~2.5e-4 (observed up to 2.2e-4), hence 1e-3 relative per tensor.
# Trajectory: float64 per-step losses.
RESNET_TOLERANCES = {
    "float64": {"logits": 1e-10, "grad": 1e-10, "stats": 1e-10},
    "float32": {"logits": 1e-5, "grad": 1e-3, "stats": 1e-5},
}
RESNET_TRAJECTORY_TOLERANCE = 1e-9
