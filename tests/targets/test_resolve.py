"""resolve_plan: which layers a weight-only scheme quantizes, overrides by FQN or regex, refusals."""

from __future__ import annotations

import pytest

from edgeq.errors import ConversionError, UsageError
from edgeq.load import load_model
from edgeq.targets import Precision, load_profile
from edgeq.targets.resolve import resolve_plan


def _plan(target="onnx", keep=()):
    model = load_model("edgeq.examples:tiny_convnet")
    return resolve_plan(model.module, load_profile(target), Precision.INT8_WEIGHT, list(keep))


def test_every_quantizable_layer_gets_int8_per_channel_weights():
    plan = _plan()
    assert sorted(plan.layers) == ["features.0", "features.4", "features.7", "head"]
    for layer in plan.layers.values():
        assert layer.weight.dtype == "int8" and layer.weight_codes.shape[0] == layer.weight.scale.shape[0]


def test_keep_float_by_fqn_and_regex():
    plan = _plan(keep=["head", "re:features\\.[04]"])
    assert plan.summary()["float_layers"] == ["features.0", "features.4", "head"]
    assert plan.layers["head"].reason == "kept float: --keep-float head"


def test_keep_float_that_names_nothing_is_a_usage_error():
    with pytest.raises(UsageError, match="names no quantizable layer"):
        _plan(keep=["classifier"])


def test_layers_the_target_does_not_quantize_stay_float_with_the_reason():
    plan = _plan("onnx-x86-avx2")  # embeddings/linears/convs: linear and conv only
    assert all(layer.weight is not None for layer in plan.layers.values())
    model = load_model("tests.converters.models:unconvertible")
    assert resolve_plan(model.module, load_profile("onnx-x86-avx2"), Precision.INT8_WEIGHT).layers["pre"].weight is not None


def test_float_schemes_have_no_plan_and_static_ones_need_calibration():
    model = load_model("edgeq.examples:tiny_mlp")
    with pytest.raises(ConversionError, match="fp16 is not a quantized scheme"):
        resolve_plan(model.module, load_profile("onnx"), Precision.FP16)
    with pytest.raises(ConversionError, match="w8a8 needs calibration samples"):
        resolve_plan(model.module, load_profile("onnx"), Precision.W8A8)
