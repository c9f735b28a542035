"""Whole-network parity for ResNet(-CBAM): torch vs JAX vs the float64 NumPy oracle.

Used by ``parity_tests/test_resnet_parity.py`` (asserts) and ``cbam-multi parity --model resnet18`` (prints).
For each case and dtype, on the same seeded weights (random BN statistics and scales, so eval mode and
weight transfer are exercised), input and fixed random cotangent on the logits:

* torch and JAX against the oracle: logits (train or eval BN), updated running statistics (train);
* torch vs JAX: logits and the gradient of every trainable tensor (``sum(logits * g)``), each gradient's
  error relative to that tensor's largest reference gradient;
* the jitted JAX function vs the NNX module.

`trajectory` runs N SGD-with-momentum steps in both frameworks from the same init on the same batches.
Tolerances: `cbam_multi.parity.RESNET_TOLERANCES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cbam_multi.models.resnet import ResNetSpec
from cbam_multi.models.resnet import forward as oracle_forward
from cbam_multi.parity import RESNET_TOLERANCES, Row, rel_err, torch_device
from cbam_multi.weights import init_weights


@dataclass(frozen=True)
class ResNetCase:
    depth: int
    stem: str
    batch: int
    size: int
    train: bool
    attention: str = "cbam"
    preset: str = "official"
    num_classes: int = 10
    width: int = 64  # stem / layer1 width; the code paths (stem, every block, CBAM in each, BN) do not depend on it

    @property
    def spec(self) -> ResNetSpec:
        return ResNetSpec(self.depth, self.stem, num_classes=self.num_classes, attention=self.attention,
                          cbam_preset=self.preset, width=self.width)

    @property
    def id(self) -> str:
        att = self.preset if self.attention == "cbam" else "plain"
        extra = ("-train" if self.train else "") + ("" if self.width == 64 else f"-w{self.width}")
        return f"resnet{self.depth}-{self.stem}-{att}-B{self.batch}-{self.size}x{self.size}{extra}"


# Each case costs one JAX compile of the whole network's gradient per dtype (~10-20 s on 2 cores), so the set
# is the fewest cases that still cover every code path: both stems, basic and bottleneck blocks, train and eval
# BN, plain and CBAM, the official and timm presets (each in float64 and float32). The first two are the
# published width (the README quotes their figures); the others run at width 16, which goes through
# the same stem, every block (down-sampling and projection shortcuts included) and CBAM in each; the train-BN
# ResNet-50 keeps 64x64 so that layer4 is still 2x2 (at 1x1 with batch 2, train BN would normalise to +-1).
RESNET_CASES: tuple[ResNetCase, ...] = (
    ResNetCase(18, "cifar", 2, 32, train=True),
    ResNetCase(18, "cifar", 2, 32, train=False),
    ResNetCase(50, "imagenet", 2, 64, train=True, preset="timm", width=16),
    ResNetCase(18, "imagenet", 2, 32, train=False, attention="none", width=16),
)


def case_inputs(case: ResNetCase, seed: int = 0):
    """Seeded float64 (weights, x NCHW, cotangent on the logits)."""
    spec = case.spec
    rng = np.random.default_rng(seed)
    w = init_weights(spec, seed + 1, np.float64)
    for name in w:
        if name.endswith(".scale"):
            w[name] = rng.uniform(0.5, 1.5, size=w[name].shape)
        elif name.endswith(".mean"):
            w[name] = rng.normal(scale=0.1, size=w[name].shape)
        elif name.endswith(".var"):
            w[name] = rng.uniform(0.5, 2.0, size=w[name].shape)
        elif name.endswith("bn.bias") or (".bn" in name and name.endswith(".bias")):
            w[name] = rng.normal(scale=0.1, size=w[name].shape)
    x = rng.normal(size=(case.batch, spec.in_channels, case.size, case.size))
    g = rng.normal(size=(case.batch, spec.num_classes))
    return w, x, g


def run_torch(spec, weights, x, g, dtype: str, train: bool):
    import torch

    import cbam_multi.torch.models as tr

    td, dev = getattr(torch, dtype), torch_device()
    model = tr.ResNet(spec, dtype=td)
    tr.import_model_weights(model, weights)
    model.to(dev).train(train)
    logits = model(torch.tensor(x, dtype=td, device=dev))
    (logits * torch.tensor(g, dtype=td, device=dev)).sum().backward()
    kinds = spec.param_kinds()
    after = tr.export_model_weights(model)
    stats = {n: a for n, a in after.items() if kinds[n] == "stat"} if train else {}
    return logits.detach().cpu().numpy(), tr.export_model_grads(model), stats


def run_jax(spec, weights, x, g, dtype: str, train: bool, module: bool = False):
    import jax
    import jax.numpy as jnp

    import cbam_multi.jax.models as jm
    from cbam_multi.jax.models import resnet as jr

    jd = getattr(jnp, dtype)
    kinds = spec.param_kinds()
    xj = jnp.asarray(np.transpose(x, (0, 2, 3, 1)), jd)
    if module:  # the NNX module, eagerly: forward only
        model = jm.import_model_weights(jm.ResNet(spec, dtype=jd), weights)
        model.train() if train else model.eval()
        logits = model(xj)
        after = jm.export_model_weights(model)
        return np.asarray(logits), {}, ({n: a for n, a in after.items() if kinds[n] == "stat"} if train else {})
    params = {n: jnp.asarray(a, jd if kinds[n] == "param" else jnp.promote_types(jd, jnp.float32)) for n, a in weights.items()}
    p, s = jr.split_params(params, spec)
    gj = jnp.asarray(g, jd)

    @jax.jit
    def step(p, s, xin):
        def f(p):
            logits, new = jr.forward({**p, **s}, xin, spec, train=train)
            return (logits * gj).sum(), (logits, new)

        (_, (logits, new)), grads = jax.value_and_grad(f, has_aux=True)(p)
        return logits, grads, new

    logits, grads, new = step(p, s, xj)
    return np.asarray(logits), {n: np.asarray(v) for n, v in grads.items()}, {n: np.asarray(v) for n, v in new.items()}


def check_case(case: ResNetCase, dtype: str, backends=("torch", "jax")) -> list[Row]:
    spec, tol = case.spec, RESNET_TOLERANCES[dtype]
    weights, x, g = case_inputs(case)
    y_ref, stats_ref = oracle_forward(x, weights, spec, train=case.train)
    rows: list[Row] = []
    results = {}
    if "torch" in backends:
        results["torch"] = run_torch(spec, weights, x, g, dtype, case.train)
    if "jax" in backends:
        results["jax"] = run_jax(spec, weights, x, g, dtype, case.train)
    for name, (y, _, stats) in results.items():
        rows.append(Row(case.id, dtype, f"{name}~oracle", "logits", rel_err(y, y_ref), tol["logits"]))
        if stats_ref:
            err = max(rel_err(stats.get(n), s) for n, s in stats_ref.items())
            rows.append(Row(case.id, dtype, f"{name}~oracle", "stats", err, tol["stats"]))
    if len(results) == 2:
        (yt, gt, _), (yj, gjx, _) = results["torch"], results["jax"]
        rows.append(Row(case.id, dtype, "torch~jax", "logits", rel_err(yj, yt), tol["logits"]))
        if set(gt) != set(gjx):
            rows.append(Row(case.id, dtype, "torch~jax", "grad-names", float("inf"), 0.0))
        else:
            rows.append(Row(case.id, dtype, "torch~jax", "grad", max(rel_err(gjx[n], gt[n]) for n in gt), tol["grad"]))
    return rows


def trajectory(spec: ResNetSpec, steps: int = 20, batch: int = 8, size: int = 32, dtype: str = "float64",
               lr: float = 0.05, momentum: float = 0.9, seed: int = 0) -> dict:
    """Per-step losses of torch (torch.optim.SGD) and JAX (optax.sgd via the jitted, donating train step)
    from the same init on the same random batches; returns both curves and the max relative difference."""
    import jax.numpy as jnp
    import optax
    import torch

    import cbam_multi.torch.models as tr
    from cbam_multi.jax.models import resnet as jr
    from cbam_multi.jax.models.resnet_steps import make_train_step

    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(steps, batch, spec.in_channels, size, size))
    ys = rng.integers(0, spec.num_classes, size=(steps, batch))
    weights = init_weights(spec, seed + 1, np.float64)

    td, dev = getattr(torch, dtype), torch_device()
    model = tr.import_model_weights(tr.ResNet(spec, dtype=td), weights).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    torch_losses = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.tensor(x, dtype=td, device=dev)), torch.tensor(y, device=dev))
        loss.backward()
        opt.step()
        torch_losses.append(float(loss.detach()))

    jd = getattr(jnp, dtype)
    step = make_train_step(spec, optax.sgd(lr, momentum=momentum))
    params, stats = jr.split_params(jr.init_params(spec, seed + 1, jd), spec)
    params, stats = jr.split_params({n: jnp.asarray(a, jd if n in params else stats[n].dtype) for n, a in weights.items()}, spec)
    params, stats, opt_state = step.place(params, stats, step.tx.init(params))
    jax_losses = []
    for x, y in zip(xs, ys):
        params, stats, opt_state, loss = step(params, stats, opt_state, np.transpose(x, (0, 2, 3, 1)).astype(dtype), y.astype(np.int32))
        jax_losses.append(float(loss))
    t, j = np.array(torch_losses), np.array(jax_losses)
    return {"torch": t, "jax": j, "max_rel": float(np.max(np.abs(t - j) / np.abs(t)))}
