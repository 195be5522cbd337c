"""Quantized layers carry the plan's exact numbers in PyTorch and through the ONNX exporter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeq.calibration.weights import quantize_weight_per_channel
from edgeq.compress.apply import apply_plan, quantizable_layers
from edgeq.compress.qdq import WeightForm
from edgeq.load import load_model
from edgeq.plan import LayerPlan, OpKind, PerTensor, QDtype, QuantPlan, TensorQuant
from tests.conftest import ONNX


def _weight_plan(model) -> QuantPlan:
    plan = QuantPlan("int8-weight", "test")
    for fqn, module in quantizable_layers(model.module):
        quant, codes = quantize_weight_per_channel(module.weight)
        plan.layers[fqn] = LayerPlan(fqn, OpKind.LINEAR, quant, codes)
    return plan


def test_weight_quantization_error_is_within_half_a_step():
    weight = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    quant, codes = quantize_weight_per_channel(weight)
    assert codes.dtype == np.int8 and np.abs(codes).max() == 127
    steps = np.abs(quant.dequantize(codes) - weight.numpy()) / quant.scale[:, None, None, None]
    assert steps.max() <= 0.5 + 1e-4


@pytest.mark.parametrize("form", list(WeightForm))
def test_both_weight_forms_compute_the_same_dequantized_model(form):
    model = load_model("edgeq.examples:tiny_convnet")
    plan = _weight_plan(model)
    quantized = apply_plan(model.module, plan, form)
    codes_form = apply_plan(model.module, plan, WeightForm.CODES)
    with torch.no_grad():
        reference = model.module(*model.example_inputs)[0]
        got = quantized(*model.example_inputs)[0]
        torch.testing.assert_close(got, codes_form(*model.example_inputs)[0], rtol=0, atol=0)
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.999  # int8 per-channel weights barely move a small convnet
    assert isinstance(model.module.inner.head, torch.nn.Linear)  # the reference is untouched


def test_static_activation_quant_rounds_to_the_plan_grid():
    model = load_model("edgeq.examples:tiny_mlp")
    plan = _weight_plan(model)
    activation = TensorQuant(QDtype.INT8, PerTensor(), False, np.float32(0.05), np.int32(3))
    plan.layers["layers.0"].activation = activation
    quantized = apply_plan(model.module, plan, WeightForm.CODES)
    seen = []
    quantized.inner.layers[0].input_quant.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        quantized(*model.example_inputs)
    codes = seen[0] / 0.05 + 3
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)


def test_unknown_layer_in_plan_is_an_error():
    model = load_model("edgeq.examples:tiny_mlp")
    plan = _weight_plan(model)
    plan.layers["nope"] = LayerPlan("nope", OpKind.LINEAR, *quantize_weight_per_channel(torch.ones(2, 2)))
    with pytest.raises(KeyError, match="nope"):
        apply_plan(model.module, plan, WeightForm.CODES)


@ONNX
def test_onnx_artifact_carries_the_plan_codes_and_scales_exactly(tmp_path):
    import onnxruntime as ort

    from edgeq.converters.parity import compare_weights, onnx_weights

    model = load_model("edgeq.examples:tiny_convnet")
    plan = _weight_plan(model)
    quantized = apply_plan(model.module, plan, WeightForm.CODES)
    path = tmp_path / "q.onnx"
    torch.onnx.export(quantized, model.example_inputs, str(path), dynamo=True, input_names=["pixels"])
    parity = compare_weights(plan, onnx_weights(path))
    assert parity.checked == len(plan.layers) and parity.mismatches == [] and parity.missing == []
    assert parity.removed == []

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"pixels": model.example_inputs[0].numpy()})[0]
    with torch.no_grad():
        simulated = quantized(*model.example_inputs)[0].numpy()
    np.testing.assert_allclose(got, simulated, rtol=1e-5, atol=1e-6)

    plan.layers["head"].weight_codes = plan.layers["head"].weight_codes.copy()
    plan.layers["head"].weight_codes[0, 0] += 1  # a plan that differs from the artifact is caught
    assert compare_weights(plan, onnx_weights(path)).mismatches == ["head: 1 weight codes differ"]
