"""QuantPlan: affine quantization arithmetic and the plan.json + scales.npz round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeq.plan import LayerPlan, OpKind, PerChannel, PerGroup, PerTensor, QDtype, QuantPlan, TensorQuant


def _per_channel(weight: np.ndarray) -> TensorQuant:
    scale = np.abs(weight).max(axis=1) / 127
    return TensorQuant(QDtype.INT8, PerChannel(0), True, scale, np.zeros_like(scale, dtype=np.int32))


def test_round_trip_error_is_at_most_half_a_step():
    weight = np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32)
    quant = _per_channel(weight)
    codes = quant.quantize(weight)
    assert codes.dtype == np.int8 and codes.min() >= -127 and codes.max() == 127
    error_in_steps = np.abs(quant.dequantize(codes) - weight) / quant.scale[:, None]
    assert error_in_steps.max() <= 0.5 + 1e-5


def test_per_group_scales_each_block():
    weight = np.concatenate([np.ones((2, 4)), 100 * np.ones((2, 4))], axis=1).astype(np.float32)
    scale = np.array([[1 / 7, 100 / 7]] * 2, dtype=np.float32)
    quant = TensorQuant(QDtype.INT4, PerGroup(axis=1, size=4), True, scale, np.zeros((2, 2), dtype=np.int32))
    np.testing.assert_allclose(quant.dequantize(quant.quantize(weight)), weight, rtol=1e-6)


def test_asymmetric_uint8_activation():
    quant = TensorQuant(QDtype.UINT8, PerTensor(), False, np.float32(0.1), np.int32(20))
    codes = quant.quantize(np.array([-2.0, 0.0, 23.5, 100.0]))
    assert codes.tolist() == [0, 20, 255, 255]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scale=[0.0], zero_point=[0]), "finite and positive"),
        (dict(scale=[0.1], zero_point=[200]), "outside the int8 range"),
        (dict(scale=[0.1], zero_point=[1]), "symmetric int8 tensor has zero point 0"),
        (dict(scale=[0.1, 0.2], zero_point=[0]), "differ in shape"),
    ],
)
def test_invalid_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TensorQuant(QDtype.INT8, PerChannel(0), True, **kwargs)


def test_plan_saves_and_loads_exactly(tmp_path):
    weight = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    quant = _per_channel(weight)
    activation = TensorQuant(QDtype.UINT8, PerTensor(), False, np.float32(0.05), np.int32(128))
    plan = QuantPlan("w8a8", "onnx")
    plan.layers["encoder.fc"] = LayerPlan("encoder.fc", OpKind.LINEAR, quant, quant.quantize(weight), activation)
    plan.layers["head"] = LayerPlan("head", OpKind.LINEAR, reason="kept float: --keep-float head")
    plan_path, _ = plan.save(tmp_path)

    summary = json.loads(plan_path.read_text())["summary"]
    assert summary == {"scheme": "w8a8", "target": "onnx", "layers": 2, "quantized_layers": 1, "float_layers": ["head"]}
    loaded = QuantPlan.load(tmp_path)
    fc = loaded.layers["encoder.fc"]
    assert fc.weight.granularity == PerChannel(0) and fc.activation.dtype == QDtype.UINT8
    np.testing.assert_array_equal(fc.weight.scale, quant.scale)
    np.testing.assert_array_equal(fc.weight_codes, plan.layers["encoder.fc"].weight_codes)
    assert loaded.layers["head"].is_float and loaded.layers["head"].reason.startswith("kept float")


def test_tensor_points_save_and_load_exactly(tmp_path):
    """Full-integer plans carry tensor points (model inputs, module outputs) beside their layers."""
    image = TensorQuant(QDtype.INT8, PerTensor(), False, np.float32(0.0305528), np.int32(-6))
    pool = TensorQuant(QDtype.INT8, PerTensor(), False, np.float32(0.0075653), np.int32(-79))
    plan = QuantPlan("w8a8", "tflite-edgetpu", tensors={"input:image": image, "features.pool": pool}, inputs=["image", "mask"])
    plan_path, _ = plan.save(tmp_path)
    document = json.loads(plan_path.read_text())
    assert document["summary"]["quantized_tensors"] == 2 and document["inputs"] == ["image", "mask"]
    loaded = QuantPlan.load(tmp_path)
    assert list(loaded.tensors) == ["input:image", "features.pool"] and loaded.inputs == ["image", "mask"]
    for key, quant in plan.tensors.items():
        got = loaded.tensors[key]
        assert got.describe() == quant.describe() and got.scale.tobytes() == quant.scale.tobytes()
        assert got.zero_point == quant.zero_point
    # Plans without points keep their old form.
    QuantPlan("w8a8", "onnx").save(tmp_path)
    assert "tensors" not in json.loads(plan_path.read_text()) and QuantPlan.load(tmp_path).tensors == {}
