"""CBAMSpec: presets, validation, derived facts, JSON round trip, input checks."""

import dataclasses
import json

import pytest

from cbam_multi import CBAMSpec, InputError, SpecError
from cbam_multi.models import MNISTNetSpec
from cbam_multi.training.config import ConfigError, TrainConfig


@pytest.mark.parametrize("preset", CBAMSpec.PRESETS)
def test_presets_round_trip_json(preset):
    spec = CBAMSpec.preset(preset, 64)
    assert CBAMSpec.from_json(spec.to_json()) == spec
    assert hash(spec) == hash(CBAMSpec.from_json(spec.to_json()))


def test_preset_values_match_the_implementations_they_name():
    seed, paper, official, timm, timm_light = (CBAMSpec.preset(p, 64) for p in CBAMSpec.PRESETS)
    assert (seed.reduction, seed.spatial_kernel, seed.mlp_bias, seed.spatial_norm) == (4, 3, True, "none")
    assert (paper.reduction, paper.spatial_kernel, paper.concat_order) == (16, 7, ("mean", "max"))
    assert official.concat_order == ("max", "mean") and not official.spatial_bias
    assert (official.spatial_norm, official.norm_momentum, official.norm_gamma_init) == ("batchnorm", 0.01, 0.0)
    assert (timm.hidden_rule, timm.mlp_bias, timm.mlp_kind, timm.norm_momentum) == ("round", False, "conv1x1", 0.1)
    assert official.flax_momentum == pytest.approx(0.99)
    # max pools: the official code and the blog route a tied maximum's gradient to the first; timm's amax splits
    assert (seed.tie_rule, official.tie_rule, paper.tie_rule, timm.tie_rule) == ("first", "first", "split", "split")
    assert timm_light == CBAMSpec.timm(64, variant="light")


@pytest.mark.parametrize(
    "channels, reduction, rule, hidden",
    [(64, 16, "floor", 4), (64, 4, "floor", 16), (24, 16, "floor", 1), (24, 16, "round", 2),
     (8, 16, "round", 1), (1, 16, "round", 1), (40, 16, "round", 3), (7, 2, "floor", 3)],
)
def test_hidden_width_rules(channels, reduction, rule, hidden):
    assert CBAMSpec(channels, reduction=reduction, hidden_rule=rule).hidden == hidden


def test_zero_hidden_width_is_a_clear_error():
    with pytest.raises(SpecError, match="hidden width is 0.*hidden_rule='round'"):
        CBAMSpec(8, reduction=16)


@pytest.mark.parametrize(
    "field, value, words",
    [("spatial_kernel", 4, "odd"), ("spatial_kernel", 0, "odd"), ("concat_order", ("mean", "mean"), "concat_order"),
     ("channel_pools", ("avg", "median"), "unknown channel pool"), ("channel_pools", (), "at least one"),
     ("gate", "tanh", "gate"), ("spatial_norm", "layernorm", "spatial_norm"), ("channels", 0, "channels"),
     ("reduction", 1.5, "reduction"), ("norm_momentum", 1.5, "norm_momentum"), ("mlp_bias", 1, "bool"),
     ("tie_rule", "last", "tie_rule"), ("variant", "heavy", "variant"), ("mlp_act", "gelu", "mlp_act"),
     ("no_spatial", 1, "bool"), ("hidden_channels", 0, "hidden_channels"), ("hidden_divisor", 0, "hidden_divisor"),
     ("hidden_divisor", 8, "hidden_rule='round'")],
)
def test_invalid_fields_name_the_problem(field, value, words):
    with pytest.raises(SpecError, match=words):
        CBAMSpec(**{"channels": 16, field: value})


def test_param_shapes_follow_the_flags():
    spec = CBAMSpec(32, reduction=4, spatial_kernel=5)
    assert spec.param_shapes() == {
        "channel.fc1.kernel": (32, 8), "channel.fc1.bias": (8,), "channel.fc2.kernel": (8, 32),
        "channel.fc2.bias": (32,), "spatial.conv.kernel": (5, 5, 2, 1), "spatial.conv.bias": (1,),
    }
    official = CBAMSpec.official(32)
    assert "spatial.conv.bias" not in official.param_shapes()
    assert official.param_kinds()["spatial.bn.var"] == "stat"
    assert set(official.param_shapes("spatial")) == {
        "spatial.conv.kernel", "spatial.bn.scale", "spatial.bn.bias", "spatial.bn.mean", "spatial.bn.var"}
    assert official.num_params() == 2 * 32 * 2 + 2 + 32 + 7 * 7 * 2 + 2


def test_json_rejects_foreign_or_unknown_content():
    with pytest.raises(SpecError, match="not valid JSON"):
        CBAMSpec.from_json("{not json")
    with pytest.raises(SpecError, match="unknown CBAMSpec field"):
        CBAMSpec.from_dict({**CBAMSpec(8).to_dict(), "reduciton": 2})
    with pytest.raises(SpecError, match="version"):
        CBAMSpec.from_dict({**CBAMSpec(8).to_dict(), "version": 99})


def test_spec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CBAMSpec(8).channels = 4


@pytest.mark.parametrize(
    "shape, dtype, layout, words",
    [((8, 5, 5), "float32", "NCHW", "rank-4.*x\\[None\\]"), ((1, 5, 5, 8), "float32", "NCHW", "looks like NHWC"),
     ((1, 8, 5, 5), "float32", "NHWC", "looks like NCHW"), ((1, 9, 5, 5), "float32", "NCHW", "8 channels on axis 1"),
     ((1, 8, 5, 5), "int64", "NCHW", "floating-point"), ((1, 8, 0, 5), "float32", "NCHW", "empty axis")],
)
def test_input_checks_name_the_problem(shape, dtype, layout, words):
    with pytest.raises(InputError, match=words):
        CBAMSpec(8, reduction=2).check_input(shape, dtype, layout)


@pytest.mark.parametrize(
    "make,err",
    [(lambda: CBAMSpec.preset("official", 16), SpecError), (lambda: _model_spec(), SpecError), (lambda: _config(), ConfigError)],
    ids=["CBAMSpec", "MNISTNetSpec", "TrainConfig"],
)
def test_plain_data_json_round_trips_and_fails_alike(make, err):
    """The three plain-data classes share one JSON reader: the same round trip and the same errors."""
    obj = make()
    cls = type(obj)
    assert cls.from_json(obj.to_json()) == obj
    d = obj.to_dict()
    bad = {
        "not valid JSON": "{oops",
        "must be an object": "[1, 2]",
        "not a " + cls.__name__: json.dumps({**d, "format": "something.else"}),
        "format version": json.dumps({**d, "version": 99}),
        "unknown " + cls.__name__ + r" field\(s\) \['typo'\]": json.dumps({**d, "typo": 1}),
    }
    for message, text in bad.items():
        with pytest.raises(err, match=message):
            cls.from_json(text)
    d.pop("format"), d.pop("version")  # hand-written JSON may leave them out
    assert cls.from_dict(d) == obj


def _model_spec():
    return MNISTNetSpec(conv_channels=(8, 16), cbam_preset="timm")


def _config():
    return TrainConfig(backend="jax", model=_model_spec(), lr=1e-3)


# ------------------------------------------------------------------ issue 14 item 10: types checked first
@pytest.mark.parametrize(
    "field, value, words",
    [("norm_momentum", "0.1", "norm_momentum must be a finite number"), ("channel_pools", "max", "channel_pools must be a list"),
     ("channel_pools", None, "channel_pools must be a list"), ("channel_pools", ["avg", ["max"]], "channel_pools"),
     ("concat_order", "mean", "concat_order must be a list"), ("concat_order", None, "concat_order"),
     ("norm_eps", float("inf"), "norm_eps must be a finite number"), ("norm_gamma_init", float("nan"), "norm_gamma_init"),
     ("norm_momentum", float("nan"), "norm_momentum"), ("channels", "8", "channels must be an int"),
     ("channels", True, "channels must be an int"), ("gate", ["sigmoid"], "gate must be one of"),
     ("spatial_norm", None, "spatial_norm must be one of"), ("spatial_bias", "yes", "spatial_bias must be a bool")],
)
def test_wrong_types_raise_spec_error_naming_the_field(field, value, words):
    with pytest.raises(SpecError, match=words):
        CBAMSpec(**{"channels": 16, field: value})


def test_numbers_from_json_accepted_where_floats_belong():
    assert CBAMSpec(8, norm_eps=1, norm_gamma_init=0).norm_eps == 1
    assert CBAMSpec(8, channel_pools=["max"], concat_order=["max", "mean"]).channel_pools == ("max",)


@pytest.mark.parametrize("text", ['{"channels": 8, "channel_pools": 5}', '{"channels": 8, "concat_order": null}',
                                  '{"channels": 8, "norm_eps": "1e-5"}', '{"channels": 8, "mlp_bias": null}'])
def test_spec_json_with_wrong_types_raises_spec_error(text):
    with pytest.raises(SpecError):
        CBAMSpec.from_json(text)


def test_jax_modules_reject_a_non_spec_with_a_type_error():
    pytest.importorskip("jax")
    import jax
    import jax.numpy as jnp

    from cbam_multi.jax import (
        CBAM,
        ChannelAttention,
        SpatialAttention,
        functional,
        linen,
    )

    for cls in (CBAM, ChannelAttention, SpatialAttention):
        with pytest.raises(TypeError, match="spec must be a CBAMSpec, got dict"):
            cls({})
    with pytest.raises(TypeError, match="spec must be a CBAMSpec"):
        linen.CBAM({}).init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)))
    with pytest.raises(TypeError, match="spec must be a CBAMSpec"):
        functional.cbam({}, jnp.zeros((1, 4, 4, 8)), {})
