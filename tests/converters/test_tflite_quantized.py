"""Quantized TFLite: the plan's exact numbers in the .tflite, the kernels each scheme runs, parity read back.

int8-weight and int8-dynamic run through the whole pipeline; w8a8/w8a16 use hand-built plans (weights
round-to-nearest, activations per-tensor int8 from min/max on seeded inputs) given to the converter directly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from edgeq.validate.verdict import Verdict
from tests.conftest import TFLITE
from tests.helpers import convert_source

pytestmark = TFLITE

SOURCES = [
    "edgeq.examples:tiny_mlp",
    "edgeq.examples:tiny_convnet",
    "tests.converters.models:prelu",  # Conv1d: CONV_2D over [O, 1, k, I]
    "tests.converters.models:recurrent",  # LSTMCell stays float; only the head is planned
    "tests.converters.models:sequence_lstm",
    "tests.converters.models:colliding_names",
]
COSINE = {"int8-weight": 0.999, "int8-dynamic": 0.99}
# Integer kernels vs PyTorch fake-quant: the converter's rounded int32 bias and TFLite's fixed-point requantization
# may move an output code by a step or two (plus float rounding of the dequantized value).
MAX_QSTEPS = 2.001


class IntegerMLP(nn.Module):
    """Only ops a full-integer target runs: linear layers and ReLUs (fused into FULLY_CONNECTED)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.layers(x)


class IntegerConvNet(nn.Module):
    """conv, depthwise conv, grouped strided conv, flatten, linear: all of it runs in int8."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
        )
        self.head = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


def integer_mlp():
    torch.manual_seed(0)
    return IntegerMLP().eval(), (torch.randn(1, 16),)


def integer_convnet():
    torch.manual_seed(0)
    return IntegerConvNet().eval(), (torch.randn(1, 3, 16, 16),)


def op_types(path) -> list[tuple[str, list[str], list[str]]]:
    """(op, input dtypes, output dtypes) of every op, as LiteRT's interpreter reports them."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    interpreter.allocate_tensors()
    dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    return [
        (op["op_name"], [dtypes[i] for i in op["inputs"] if i >= 0], [dtypes[i] for i in op["outputs"]])
        for op in interpreter._get_ops_details()
    ]


def static_plan(loaded, dtype="int8", samples=16):
    """A w8a8 (w8a16) plan: RTN int8 weights; each layer's input and output quantized per tensor from the
    min/max seen on seeded random inputs (int8 asymmetric, int16 symmetric with zero point 0)."""
    from edgeq.calibration.weights import quantize_weight_per_channel
    from edgeq.compress.apply import quantizable_layers
    from edgeq.plan import LayerPlan, PerTensor, QDtype, QuantPlan, TensorQuant
    from edgeq.targets.resolve import op_kind

    def quant(lo, hi):
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if dtype == "int16":
            return TensorQuant(QDtype.INT16, PerTensor(), True, np.float32(max(-lo, hi) / 32767), np.int32(0))
        scale = np.float32((hi - lo) / 255)
        return TensorQuant(QDtype.INT8, PerTensor(), False, scale, np.int32(np.clip(np.round(-128 - lo / scale), -128, 127)))

    layers = list(quantizable_layers(loaded.module))
    ranges = {fqn: [np.inf, -np.inf, np.inf, -np.inf] for fqn, _ in layers}

    def observe(fqn):
        def hook(_module, inputs, output):
            r = ranges[fqn]
            r[:] = [min(r[0], float(inputs[0].min())), max(r[1], float(inputs[0].max())),
                    min(r[2], float(output.min())), max(r[3], float(output.max()))]
        return hook

    handles = [layer.register_forward_hook(observe(fqn)) for fqn, layer in layers]
    generator = torch.Generator().manual_seed(5)
    batches = [tuple(torch.randn(t.shape, generator=generator) for t in loaded.example_inputs) for _ in range(samples)]
    with torch.no_grad():
        for batch in batches:
            loaded.module(*batch)
    for handle in handles:
        handle.remove()
    plan = QuantPlan(f"w8a{dtype[3:]}", "tflite")
    for fqn, layer in layers:
        weight, codes = quantize_weight_per_channel(layer.weight, QDtype.INT8, axis=0)
        r = ranges[fqn]
        plan.layers[fqn] = LayerPlan(fqn, op_kind(layer), weight, codes, activation=quant(r[0], r[1]), output=quant(r[2], r[3]))
    return plan, batches


def convert_with_plan(source, target, precision, plan, dest, loaded=None):
    from edgeq.converters import ConversionRequest
    from edgeq.converters.tflite import TFLiteConverter
    from edgeq.load import load_model
    from edgeq.targets import Precision, load_profile

    loaded = loaded or load_model(source)
    request = ConversionRequest(loaded, load_profile(target), Precision(precision), plan)
    return TFLiteConverter().convert(request, dest / "model.tflite")


def fake_quant_drift_qsteps(loaded, plan, path, batches) -> float:
    """Largest |artifact - PyTorch fake-quant| over the batches, in steps of the last layer's output scale."""
    from edgeq.compress.apply import apply_plan
    from edgeq.compress.qdq import WeightForm
    from edgeq.validate.runners import open_runner

    simulated = apply_plan(loaded.module, plan, WeightForm.QDQ)
    runner = open_runner(path, "tflite")
    step = float(list(plan.layers.values())[-1].output.scale)
    worst = 0.0
    for batch in batches:
        got = runner.run({name: t.numpy() for name, t in zip(loaded.input_names, batch)})
        with torch.no_grad():
            expected = simulated(*batch)
        for name, value in zip(loaded.outputs, expected):
            worst = max(worst, float(np.abs(got[name] - value.numpy()).max()) / step)
    return worst


@pytest.mark.parametrize("precision", ["int8-weight", "int8-dynamic"])
@pytest.mark.parametrize("source", SOURCES)
def test_weight_only_and_dynamic_convert_with_exact_parity(tmp_path, source, precision):
    outcome = convert_source(source, "tflite", precision, tmp_path)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    parity = manifest["weight_parity"]
    assert parity["checked_layers"] == manifest["plan"]["quantized_layers"] > 0
    assert parity["mismatches"] == [] and parity["missing"] == [] and parity["removed_as_unused"] == []
    assert min(d.cosine for d in outcome.report.outputs) >= COSINE[precision]
    ops = op_types(outcome.path / "model.tflite")
    hybrid = [op for op, inputs, _ in ops if len(inputs) > 1 and inputs[0] == "float32" and inputs[1] == "int8"]
    dequantized = [outputs for op, inputs, outputs in ops if op == "DEQUANTIZE" and inputs == ["int8"]]
    if precision == "int8-weight":  # int8 constants -> DEQUANTIZE -> float kernels; no hybrid kernel
        assert hybrid == [] and len(dequantized) == parity["checked_layers"]
    else:  # every linear layer runs the hybrid FULLY_CONNECTED; convolutions stay weight-only
        layers = json.loads((outcome.path / "plan.json").read_text())["layers"].values()
        linear = sum(1 for layer in layers if layer["op"] == "linear" and "weight" in layer)
        # one hybrid FULLY_CONNECTED per call: a recurrent cell's rebuilt ih/hh layers run once per step
        assert set(hybrid) == {"FULLY_CONNECTED"} and len(hybrid) >= linear
        # the recurrent cell's first hh call multiplies the initial zero state, a constant the converter moves
        # into the FULLY_CONNECTED's weight operand: that call keeps DEQUANTIZE -> float FULLY_CONNECTED
        folded = 1 if source.endswith(":recurrent") else 0
        assert len(dequantized) == parity["checked_layers"] - linear + folded


def test_int8_dynamic_hybrid_layers_follow_the_plan(tmp_path):
    """Each planned linear layer is hybrid, and a --keep-float layer keeps float32 weights (litert-torch's own
    DYNAMIC mode would quantize it with scales of its own)."""
    from edgeq.load import load_model
    from edgeq.pipeline import ConvertOptions, convert

    model = load_model("edgeq.examples:tiny_mlp")
    options = ConvertOptions(targets=["tflite"], out=tmp_path, precisions=["int8-dynamic"], samples=8, keep_float=["layers.3"])
    (outcome,) = convert(model, options)
    assert outcome.verdict == Verdict.PASSED, outcome.error
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    assert manifest["weight_parity"]["checked_layers"] == 1
    fully_connected = [inputs for op, inputs, _ in op_types(outcome.path / "model.tflite") if op == "FULLY_CONNECTED"]
    assert [inputs[:2] for inputs in fully_connected] == [["float32", "int8"], ["float32", "float32"]]
    plan = json.loads((outcome.path / "plan.json").read_text())["layers"]
    assert plan["layers.0"]["dynamic_activation"] == "int8"  # TFLite quantizes rows to int8, not ORT's uint8


def test_cli_converts_int8_dynamic(tmp_path):
    from click.testing import CliRunner

    from edgeq.cli import main

    result = CliRunner().invoke(
        main, ["convert", "edgeq.examples:tiny_convnet", "-t", "tflite", "-p", "int8-dynamic", "--out", str(tmp_path), "--samples", "4"]
    )
    assert result.exit_code == 0, result.output
    (manifest,) = tmp_path.rglob("manifest.json")
    parity = json.loads(manifest.read_text())["weight_parity"]
    assert parity["checked_layers"] == 4 and parity["mismatches"] == []


@pytest.mark.parametrize("source", ["edgeq.examples:tiny_mlp", "edgeq.examples:tiny_convnet"])
def test_w8a8_runs_int8_kernels_with_the_plans_numbers(tmp_path, source):
    from edgeq.converters.parity import compare_weights
    from edgeq.converters.parity_tflite import tflite_weights
    from edgeq.load import load_model

    loaded = load_model(source)
    plan, batches = static_plan(loaded)
    artifact = convert_with_plan(source, "tflite", "w8a8", plan, tmp_path, loaded)
    kernels = [(op, i, o) for op, i, o in op_types(artifact.path) if op in ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D")]
    assert len(kernels) == len(plan.layers)
    assert all(i == ["int8", "int8", "int32"] and o == ["int8"] for _, i, o in kernels), kernels
    parity = compare_weights(plan, tflite_weights(artifact.path))
    assert parity.checked == len(plan.layers) and parity.mismatches == [] and parity.missing == []
    # Activation parameters are the plan's, bitwise: every planned input/output scale is in the file.
    from ai_edge_litert.interpreter import Interpreter

    stored = {
        (float(np.float32(q["scales"][0])), int(q["zero_points"][0]))
        for t in Interpreter(model_path=str(artifact.path)).get_tensor_details()
        if (q := t["quantization_parameters"])["scales"].size == 1
    }
    for layer in plan.layers.values():
        for quant in (layer.activation, layer.output):
            assert (float(quant.scale), int(quant.zero_point)) in stored
    # The converter rounds the int32 bias to s_in * s_w; outputs stay within 2 steps of PyTorch's fake-quant.
    assert fake_quant_drift_qsteps(loaded, plan, artifact.path, batches[:8]) <= MAX_QSTEPS


def test_w8a16_runs_int16x8_kernels_and_refuses_int16_depthwise(tmp_path):
    from edgeq.errors import ConversionError
    from edgeq.load import load_model

    loaded = load_model("edgeq.examples:tiny_mlp")
    plan, batches = static_plan(loaded, dtype="int16")
    artifact = convert_with_plan(None, "tflite", "w8a16", plan, tmp_path, loaded)
    kernels = [(i, o) for op, i, o in op_types(artifact.path) if op == "FULLY_CONNECTED"]
    assert kernels == [(["int16", "int8", "int32"], ["int16"])] * 2
    assert fake_quant_drift_qsteps(loaded, plan, artifact.path, batches[:8]) <= MAX_QSTEPS

    convnet = load_model("edgeq.examples:tiny_convnet")
    plan, _ = static_plan(convnet, dtype="int16")
    with pytest.raises(ConversionError, match=r"depthwise convolution\(s\) features\.7 do not load in LiteRT"):
        convert_with_plan(None, "tflite", "w8a16", plan, tmp_path, convnet)


@pytest.mark.parametrize("factory", ["integer_mlp", "integer_convnet"])
def test_edgetpu_w8a8_is_integer_only_with_integer_io(tmp_path, factory):
    from edgeq.load import load_model
    from edgeq.validate.runners import open_runner

    loaded = load_model(f"tests.converters.test_tflite_quantized:{factory}")
    plan, batches = static_plan(loaded)
    artifact = convert_with_plan(None, "tflite-edgetpu", "w8a8", plan, tmp_path, loaded)
    ops = op_types(artifact.path)
    floats = [op for op, inputs, outputs in ops if {"float32", "float16"} & {*inputs, *outputs}]
    assert floats == [] and {"QUANTIZE", "DEQUANTIZE"}.isdisjoint(op for op, _, _ in ops)
    runner = open_runner(artifact.path, "tflite")
    assert [spec.dtype for spec in runner.inputs] == ["int8"]
    assert "integer IO converted on the host with the artifact's own scale/zero point" in runner.executor
    # The runner quantizes float feeds and dequantizes the int8 output; drift is what the integer graph adds.
    assert fake_quant_drift_qsteps(loaded, plan, artifact.path, batches[:8]) <= MAX_QSTEPS


def test_edgetpu_refuses_ops_that_stay_float(tmp_path):
    from edgeq.errors import ConversionError
    from edgeq.load import load_model

    loaded = load_model("edgeq.examples:tiny_convnet")
    plan, _ = static_plan(loaded)
    with pytest.raises(ConversionError, match="runs integer ops only") as error:
        convert_with_plan(None, "tflite-edgetpu", "w8a8", plan, tmp_path, loaded)
    assert "HARD_SWISH" in str(error.value) and "MEAN" in str(error.value)


def test_static_schemes_without_activation_scales_are_refused(tmp_path):
    from edgeq.errors import ConversionError

    with pytest.raises(ConversionError, match="w8a8 needs activation scales from calibration, and the request's plan has none"):
        convert_with_plan("edgeq.examples:tiny_mlp", "tflite", "w8a8", None, tmp_path)


def test_w8a8_pipeline_runs_int8_islands_and_says_what_computes_in_float(tmp_path):
    """On `tflite` (float IO) the pipeline's w8a8 plans each linear's output too, so each is an int8
    FULLY_CONNECTED between QUANTIZE and DEQUANTIZE that XNNPACK runs (docs/research/tflite-w8a8-speed.md); the
    plan note says so, and says that the ops between layers compute in float."""
    outcome = convert_source("edgeq.examples:tiny_mlp", "tflite", "w8a8", tmp_path)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    kernels = [(i, o) for op, i, o in op_types(outcome.path / "model.tflite") if op == "FULLY_CONNECTED"]
    assert kernels == [(["int8", "int8", "int32"], ["int8"])] * 2
    (note,) = [note for note in outcome.plan_notes if "layers run int8 kernels" in note]
    assert note.startswith("2 of 2 linear/conv layers run int8 kernels") and "compute in float" not in note.split(".")[0]
    assert note.endswith("XNNPACK (the default delegate) takes all 2 of them")


def test_w8a8_layers_without_planned_outputs_say_they_compute_in_float(tmp_path):
    """A plan with input ranges only (as before output ranges were planned on `tflite`) lowers to QUANTIZE /
    DEQUANTIZE around a float FULLY_CONNECTED: the note says those layers compute in float."""
    from edgeq.load import load_model

    loaded = load_model("edgeq.examples:tiny_mlp")
    plan, _ = static_plan(loaded)
    for layer in plan.layers.values():
        layer.output = None
    convert_with_plan(None, "tflite", "w8a8", plan, tmp_path, loaded)
    kernels = [i for op, i, _ in op_types(tmp_path / "model.tflite") if op == "FULLY_CONNECTED"]
    assert [inputs[0] for inputs in kernels] == ["float32", "float32"]
    (note,) = [note for note in plan.notes if "layers run int8 kernels" in note]
    assert note.startswith("0 of 2 linear/conv layers run int8 kernels") and "2 with int8 activations in the plan compute in float" in note


def test_w8a8_mixed_plan_runs_static_islands_and_hybrid_layers(tmp_path):
    """--auto-fallback on `tflite` moves a static layer to per-call int8 rows (calibration.sensitivity.relax with
    the target's dynamic type): that layer runs the hybrid FULLY_CONNECTED, the others stay int8 islands, every
    kernel is XNNPACK's, weight parity holds and the artifact agrees with the PyTorch simulation of the plan."""
    from edgeq.calibration.sensitivity import relax
    from edgeq.compress.apply import apply_plan, quantizable_layers
    from edgeq.compress.qdq import WeightForm
    from edgeq.converters.parity import compare_weights
    from edgeq.converters.parity_tflite import tflite_weights
    from edgeq.load import load_model
    from edgeq.plan import QDtype
    from edgeq.validate.metrics import sqnr_db
    from edgeq.validate.runners import open_runner

    loaded = load_model("edgeq.examples:tiny_mlp")
    plan, batches = static_plan(loaded)
    modules = dict(quantizable_layers(loaded.module))
    first, second = plan.layers
    plan.layers[second] = relax(plan.layers[second], modules[second], "float32", QDtype.INT8)
    assert plan.layers[second].dynamic_activation == QDtype.INT8 and plan.layers[second].output is None
    artifact = convert_with_plan(None, "tflite", "w8a8", plan, tmp_path, loaded)
    kernels = [(i, o) for op, i, o in op_types(artifact.path) if op == "FULLY_CONNECTED"]
    assert kernels == [(["int8", "int8", "int32"], ["int8"]), (["float32", "int8", "float32"], ["float32"])]
    parity = compare_weights(plan, tflite_weights(artifact.path))
    assert parity.checked == 2 and parity.mismatches == [] and parity.missing == []
    (note,) = [note for note in plan.notes if "layers run int8 kernels" in note]
    assert note.startswith("1 of 2 linear/conv layers run int8 kernels") and "1 the hybrid kernel" in note and "takes all 2" in note
    simulated = apply_plan(loaded.module, plan, WeightForm.QDQ, simulate_dynamic=True)
    runner = open_runner(artifact.path, "tflite")
    for batch in batches[:4]:
        got = runner.run({name: t.numpy() for name, t in zip(loaded.input_names, batch)})
        with torch.no_grad():
            expected = simulated(*batch)
        for name, value in zip(loaded.outputs, expected):
            assert sqnr_db(value.numpy(), got[name]) >= 30  # the hybrid kernel's per-row rounding differs from torch's by a step

