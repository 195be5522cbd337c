"""Core ML lowering of quantized plans: the saved .mlpackage holds exactly the plan's int8 codes and scales.

These tests read the artifact back (the MIL program in the package). Off macOS the pipeline validates it with
edgeq's MIL reference executor (tests/validate/test_mil_executor.py checks that executor against the plan).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from edgeq.calibration.weights import fp16_grid_up, quantize_weight_per_channel
from edgeq.compress.apply import quantizable_layers
from edgeq.converters.base import ConversionRequest
from edgeq.converters.parity import compare_weights
from edgeq.load import load_model
from edgeq.plan import LayerPlan, OpKind, PerTensor, QDtype, QuantPlan, TensorQuant
from edgeq.targets import Precision, load_profile
from edgeq.targets.resolve import op_kind
from edgeq.validate.verdict import Verdict
from tests.conftest import COREML
from tests.helpers import convert_source

pytestmark = COREML

SMALL_MODELS = [
    "edgeq.examples:tiny_mlp",
    "edgeq.examples:tiny_convnet",
    "tests.converters.test_coreml_quantized:token_classifier",
    "tests.converters.models:prelu",  # a Conv1d, and the PReLU rewrite applied to the quantized module
]


class TokenClassifier(nn.Module):
    """An embedding table, a linear layer over it and a linear head: the three kinds Core ML quantizes."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: (1, 6) int64
        return self.head(torch.relu(self.proj(self.embed(ids))))


def token_classifier():
    torch.manual_seed(0)
    model = TokenClassifier().eval()
    return model, (torch.randint(0, 50, (1, 6)),)


def _program(path):
    from edgeq.converters.parity_coreml import load_program, operations

    return list(operations(load_program(path)))


def _fqn(name):
    from edgeq.converters.parity_coreml import fqn_of

    decoded = fqn_of(name)
    return None if decoded is None else decoded[0].removeprefix("inner.")


@pytest.mark.parametrize("source", SMALL_MODELS)
@pytest.mark.parametrize("target", ["coreml", "coreml-ane"])
def test_int8_weight_end_to_end_has_exact_weight_parity(tmp_path, source, target):
    outcome = convert_source(source, target, "int8-weight", tmp_path)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations  # Linux: MIL reference executor
    assert outcome.report.status == "validated"
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    plan = QuantPlan.load(outcome.path)
    quantized = sorted(fqn for fqn, layer in plan.layers.items() if layer.weight is not None)
    assert quantized and len(quantized) == manifest["plan"]["quantized_layers"]
    parity = manifest["weight_parity"]
    assert parity == {"checked_layers": len(quantized), "mismatches": [], "missing": [], "removed_as_unused": []}
    if target == "coreml":  # the generic profile says iOS16; int8 weights need iOS17 in coremltools
        assert any("raised from iOS16 to iOS17" in note for note in manifest["notes"])
    if source.endswith("prelu"):
        assert manifest["rewrites"] == ["prelu-per-channel-to-relu: act", "prelu-per-channel-to-relu: act2"]


@pytest.mark.parametrize("source", SMALL_MODELS)
def test_weights_are_constexpr_affine_dequantize_over_int8_codes(tmp_path, source):
    outcome = convert_source(source, "coreml-ane", "int8-weight", tmp_path)
    plan = QuantPlan.load(outcome.path)
    ops = [op for op in _program(outcome.path / "model.mlpackage") if op.op_type == "constexpr_affine_dequantize"]
    assert sorted(_fqn(op.name).removesuffix(".weight") for op in ops) == sorted(plan.layers)
    for op in ops:
        layer = plan.layers[_fqn(op.name).removesuffix(".weight")]
        assert op.quantized_data.val.dtype == np.int8 and op.zero_point.val.dtype == np.int8
        np.testing.assert_array_equal(op.quantized_data.val, layer.weight_codes)  # verbatim, PyTorch layout
        np.testing.assert_array_equal(op.zero_point.val, layer.weight.zero_point)
        assert op.scale.val.dtype == np.float16  # fp16 compute; the plan's scales lie on the fp16 grid
        np.testing.assert_array_equal(op.scale.val.astype(np.float32), layer.weight.scale)
        assert int(op.axis.val) == 0


def _w8a8_plan(model, target: str, dtype: QDtype = QDtype.INT8, smooth: bool = False) -> QuantPlan:
    """Weights RTN per channel; every layer's input and output asymmetric from min/max on the example.

    `smooth` adds SmoothQuant-style input factors to the linear layers (arbitrary ones: only the lowering is tested).
    """
    ranges: dict[str, list[tuple[float, float]]] = {}

    def record(fqn):
        def hook(_module, inputs, output):
            ranges[fqn] = [(float(t.min()), float(t.max())) for t in (inputs[0], output)]

        return hook

    layers = [(fqn, layer) for fqn, layer in quantizable_layers(model.module) if not isinstance(layer, nn.Embedding)]
    handles = [layer.register_forward_hook(record(fqn)) for fqn, layer in layers]
    with torch.no_grad():
        model.module(*model.example_inputs)
    for handle in handles:
        handle.remove()
    plan = QuantPlan(Precision.W8A8.value, target)
    generator = np.random.default_rng(0)
    for fqn, layer in layers:
        factors = None
        weight = layer.weight.detach()
        if smooth and isinstance(layer, nn.Linear):
            factors = generator.uniform(0.5, 2.0, layer.in_features).astype(np.float32)
            weight = weight * torch.from_numpy(factors)
        quant, codes = quantize_weight_per_channel(weight, QDtype.INT8, axis=0, scale_dtype="float16")
        (activation, output) = (_activation_quant(lo, hi, dtype) for lo, hi in ranges[fqn])
        plan.layers[fqn] = LayerPlan(fqn, op_kind(layer), quant, codes, activation=activation, output=output, smooth=factors)
    return plan


def _activation_quant(low: float, high: float, dtype: QDtype) -> TensorQuant:
    low, high = min(low, 0.0), max(high, 0.0)
    scale = fp16_grid_up(np.array([(high - low) / 255], dtype=np.float32))[0]
    zero = int(np.clip(np.rint(dtype.qmin - low / scale), dtype.qmin, dtype.qmax))
    return TensorQuant(dtype, PerTensor(), False, np.array(scale), np.array(zero))


def _stored_as(op, dtype: QDtype) -> tuple[float, int]:
    """(scale, zero point) of a MIL quantize/dequantize, expressed in `dtype`.

    coremltools rewrites int8 with zero point -128 to uint8 without one, and drops a zero point of 0 (same
    values): uint8 u = int8 q + 128.
    """
    from coremltools.converters.mil.mil import types

    codes = op.outputs[0] if op.op_type == "quantize" else op.input
    stored = types.builtin_to_string(codes.dtype)
    zero = 0 if op.inputs.get("zero_point") is None else int(op.zero_point.val)
    shift = {("uint8", "int8"): -128, ("int8", "uint8"): 128}.get((stored, dtype.value), 0)
    return float(op.scale.val), zero + shift


@pytest.mark.parametrize(
    ("source", "dtype", "smooth"),
    [
        ("edgeq.examples:tiny_mlp", QDtype.INT8, False),
        ("edgeq.examples:tiny_convnet", QDtype.INT8, False),
        ("edgeq.examples:tiny_mlp", QDtype.UINT8, True),
    ],
)
def test_w8a8_activation_quantize_ops_carry_the_plans_numbers(tmp_path, source, dtype, smooth):
    from edgeq.converters.coreml import CoreMLConverter

    model = load_model(source)
    profile = load_profile("coreml")
    plan = _w8a8_plan(model, profile.id, dtype, smooth)
    artifact = CoreMLConverter().convert(ConversionRequest(model, profile, Precision.W8A8, plan), tmp_path / "model.mlpackage")

    parity = compare_weights(plan, _stored(artifact.path))
    assert (parity.checked, parity.mismatches, parity.missing) == (len(plan.layers), [], [])
    ops = _program(artifact.path)
    weights = {_fqn(op.name).removesuffix(".weight"): op for op in ops if op.op_type == "constexpr_affine_dequantize"}
    assert sorted(weights) == sorted(plan.layers)
    rewritten = 0
    for fqn, layer in plan.layers.items():
        (compute,) = weights[fqn].outputs[0].child_ops  # the linear/conv that uses the int8 weight
        dequantize_in = compute.x.op
        quantize_in = dequantize_in.input.op
        if smooth:  # x * (1 / smooth), then the input quantization
            assert quantize_in.input.op.op_type == "mul"
        (quantize_out,) = compute.outputs[0].child_ops
        (dequantize_out,) = quantize_out.outputs[0].child_ops
        assert [op.op_type for op in (quantize_in, dequantize_in, quantize_out, dequantize_out)] == [
            "quantize", "dequantize", "quantize", "dequantize"
        ]
        for quant, pair in ((layer.activation, (quantize_in, dequantize_in)), (layer.output, (quantize_out, dequantize_out))):
            for op in pair:
                assert op.scale.val.dtype == np.float16
                assert _stored_as(op, dtype) == (float(quant.scale), int(quant.zero_point)), (fqn, op.name)
                rewritten += op.inputs.get("zero_point") is None
    if source.endswith("tiny_convnet"):  # ReLU then conv: zero point -128, stored as uint8 without one
        assert rewritten > 0


def _stored(path):
    from edgeq.converters.parity import artifact_weights

    return artifact_weights(path, "coreml")


def test_a_planned_layer_left_float_is_missing_not_removed(tmp_path):
    """The reader tells a float layer (present, not quantized) from one the exporter dropped."""
    from edgeq.converters.coreml import CoreMLConverter

    model = load_model("edgeq.examples:tiny_mlp")
    profile = load_profile("coreml-ane")
    plan = QuantPlan(Precision.INT8_WEIGHT.value, profile.id)
    for fqn, layer in quantizable_layers(model.module):
        quant, codes = quantize_weight_per_channel(layer.weight, QDtype.INT8, scale_dtype="float16")
        plan.layers[fqn] = LayerPlan(fqn, OpKind.LINEAR, quant, codes)
    artifact = CoreMLConverter().convert(ConversionRequest(model, profile, Precision.INT8_WEIGHT, plan), tmp_path / "m.mlpackage")
    stored = _stored(artifact.path)
    assert set(stored.quantized) == {"layers.0", "layers.3"}
    del stored.quantized["layers.3"]  # as if the converter had left it float
    plan.layers["gone"] = LayerPlan("gone", OpKind.LINEAR, plan.layers["layers.0"].weight, plan.layers["layers.0"].weight_codes)
    parity = compare_weights(plan, stored)
    assert (parity.checked, parity.missing, parity.removed) == (1, ["layers.3"], ["gone"])


def test_mil_names_round_trip_any_fqn():
    from edgeq.converters.parity_coreml import fqn_of, mil_name

    for fqn in ["layers.0.weight", "encoder.layer.11.attention.self.query", "_orig_mod.out_proj", "a._b", "a_.b", "blocks.x-1", "0.weight"]:
        name = mil_name(fqn, "_cast_fp16")
        assert name.replace("_", "").isalnum()  # Core ML's name alphabet
        assert fqn_of(name) == (fqn, "_cast_fp16")
    assert fqn_of("p_layers_0_bias") is None


def test_w8a8_without_a_plan_is_refused():
    from edgeq.converters.coreml import CoreMLConverter
    from edgeq.errors import ConversionError

    model = load_model("edgeq.examples:tiny_mlp")
    with pytest.raises(ConversionError, match="needs a plan"):
        CoreMLConverter().convert(ConversionRequest(model, load_profile("coreml"), Precision.W8A8), None)
