"""Checkpoints carry their spec; loading one for a module whose spec differs in anything that changes the
maths raises, naming the fields, even where every tensor shape agrees (issue 13, item 4); an explicit
``allow_spec_mismatch=True`` loads anyway. Spec JSON written before the new fields existed still loads,
with today's defaults. Both backends, through `load_checkpoint`, and the core `load_weights`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cbam_multi import CBAMSpec, SpecMismatchError, init_weights, load_weights, save_weights
from cbam_multi.weights import spec_differences

torch = pytest.importorskip("torch")
jnp = pytest.importorskip("jax.numpy")
import cbam_multi.jax as cj
import cbam_multi.torch as ct

# (checkpoint spec, module spec, the fields the message must name): same tensor shapes in every row
MISMATCHES = {
    "concat_order": (
        CBAMSpec.official(32, concat_order=("max", "mean")), CBAMSpec.official(32, concat_order=("mean", "max")), ["concat_order"]
    ),
    "extra_pools": (CBAMSpec.seed(16, channel_pools=("avg", "max", "lp", "lse")), CBAMSpec.seed(16), ["channel_pools"]),
    "tie_rule": (CBAMSpec.seed(16, tie_rule="split"), CBAMSpec.seed(16), ["tie_rule"]),
    "act_and_gate": (CBAMSpec.timm(16, mlp_act="silu", gate="hard_sigmoid"), CBAMSpec.timm(16), ["gate", "mlp_act"]),
    "bn_momentum": (CBAMSpec.official(32, norm_momentum=0.1), CBAMSpec.official(32), ["norm_momentum"]),
}
BACKENDS = {
    "torch": lambda spec: ct.CBAM(spec, dtype=torch.float64),
    "jax": lambda spec: cj.CBAM(spec, param_dtype=jnp.float64),
}


def _snapshot(module, backend):
    export = ct.export_weights if backend == "torch" else cj.export_weights
    return export(module)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_mismatched_spec_raises_naming_the_fields_and_changes_nothing(tmp_path, case, backend):
    stored, wanted, fields = MISMATCHES[case]
    assert stored.param_shapes() == wanted.param_shapes()  # the shapes cannot tell them apart
    w = init_weights(stored, seed=4, dtype=np.float64)
    path = save_weights(tmp_path / "block.safetensors", w, stored)
    module = BACKENDS[backend](wanted)
    load = ct.load_checkpoint if backend == "torch" else cj.load_checkpoint
    before = _snapshot(module, backend)
    with pytest.raises(SpecMismatchError) as err:
        load(module, path)
    msg = str(err.value)
    for field in fields:
        assert f"{field}: " in msg
    assert "allow_spec_mismatch=True" in msg and str(path) in msg
    after = _snapshot(module, backend)
    assert all(np.array_equal(before[n], after[n]) for n in before)  # a failed load changes nothing
    load(module, path, allow_spec_mismatch=True)  # the explicit override
    got = _snapshot(module, backend)
    assert all(np.array_equal(got[n], w[n]) for n in w)


def test_fields_that_do_not_change_the_maths_load(tmp_path):
    # module form (mlp_kind) and an initial value (norm_gamma_init) do not change what the block computes
    stored = CBAMSpec.official(32, mlp_kind="conv1x1", norm_gamma_init=1.0)
    path = save_weights(tmp_path / "b.safetensors", init_weights(stored, 1, np.float64), stored)
    ct.load_checkpoint(ct.CBAM(CBAMSpec.official(32), dtype=torch.float64), path)
    # a part module loads its own slice
    ct.load_checkpoint(ct.ChannelAttention(CBAMSpec.official(32), dtype=torch.float64), path)
    assert spec_differences(CBAMSpec.timm_light(8), CBAMSpec.timm_light(8, concat_order=("max", "mean"))) == []
    assert spec_differences(CBAMSpec.timm(24), CBAMSpec.timm(24, hidden_channels=2)) == []  # same width


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("gate, part", [("ChannelAttention", "channel"), ("SpatialAttention", "spatial")])
def test_a_gate_module_loads_its_own_part(tmp_path, backend, gate, part):
    # both backends name a module's part the same way (``_PART``), read by the one core load_module_checkpoint
    spec = CBAMSpec.official(32)
    w = init_weights(spec, 5, np.float64)
    path = save_weights(tmp_path / "g.safetensors", w, spec)
    lib, kw = (ct, {"dtype": torch.float64}) if backend == "torch" else (cj, {"param_dtype": jnp.float64})
    module = lib.load_checkpoint(getattr(lib, gate)(spec, **kw), path)
    got = lib.export_weights(module)
    assert sorted(got) == sorted(spec.param_shapes(part))
    assert all(np.array_equal(got[n], w[n]) for n in got)


def test_core_load_weights_checks_the_expected_spec(tmp_path):
    stored, wanted, _ = MISMATCHES["concat_order"]
    path = save_weights(tmp_path / "c.safetensors", init_weights(stored, 2, np.float64), stored)
    with pytest.raises(SpecMismatchError, match=r"concat_order: \('max', 'mean'\) vs \('mean', 'max'\)"):
        load_weights(path, expected_spec=wanted)
    weights, spec = load_weights(path, expected_spec=wanted, allow_spec_mismatch=True)
    assert spec == stored and set(weights) == set(wanted.param_shapes())


def test_spec_json_without_the_new_fields_loads_with_todays_defaults():
    d = CBAMSpec.official(32).to_dict()
    for name in ("tie_rule", "no_spatial", "variant", "mlp_act", "hidden_channels", "hidden_divisor"):
        d.pop(name)
    old = CBAMSpec.from_json(json.dumps(d))
    assert (old.tie_rule, old.no_spatial, old.variant, old.mlp_act, old.hidden_channels, old.hidden_divisor) == (
        "split", False, "standard", "relu", None, 1
    )
    # an old official checkpoint therefore differs from today's official preset in the tie rule alone
    assert spec_differences(old, CBAMSpec.official(32)) == ["tie_rule: 'split' vs 'first'"]
    for preset in CBAMSpec.PRESETS:
        for spec in (CBAMSpec.preset(preset, 32), CBAMSpec.preset(preset, 32, no_spatial=True, mlp_act="silu")):
            assert CBAMSpec.from_json(spec.to_json()) == spec
