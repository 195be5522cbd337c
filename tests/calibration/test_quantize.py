"""Calibrated plans: SmoothQuant keeps the function, BatchNorm folding is exact, static schemes get activation
numbers of the target's type, and the sensitivity fallback finds the one bad layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeq.calibration.sensitivity import sensitivity_fallback
from edgeq.calibration.smoothquant import smooth_factors, smoothed_weight
from edgeq.compress.apply import apply_plan
from edgeq.compress.fold import fold_batchnorm
from edgeq.compress.qdq import WeightForm
from edgeq.errors import ConversionError
from edgeq.load import load_model
from edgeq.plan import QDtype
from edgeq.targets import Precision, load_profile
from edgeq.targets.resolve import Calibration, dynamic_fallback, resolve_plan
from edgeq.validate.budget import parse_budget
from edgeq.validate.metrics import cosine, sqnr_db


class OutlierMLP(nn.Module):
    """Four linears; the input of `layers.2` has one channel 500x the others, which ruins a per-tensor int8 range."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(4))
        boost = torch.ones(32)
        boost[5] = 500.0
        self.register_buffer("boost", boost)

    def forward(self, x):
        for index, layer in enumerate(self.layers):
            x = x * self.boost if index == 2 else x
            x = torch.relu(layer(x)) if index < 3 else layer(x)
        return x


def _samples(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 32)).astype(np.float32)} for _ in range(count)]



@pytest.fixture
def outlier_model():
    from edgeq.signature import parse_input_spec

    return load_model("tests.calibration.test_quantize:OutlierMLP", inputs=[parse_input_spec("x:1x32:float32")])


def _run(module, samples):
    with torch.no_grad():
        return [module(torch.from_numpy(s["x"]))[0].numpy() for s in samples]


def test_smoothquant_keeps_the_function_and_flattens_the_outlier_channel():
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    absmax = np.ones(32, dtype=np.float32)
    absmax[3] = 400.0
    factors = smooth_factors(absmax, weight, alpha=0.7)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(2)) * torch.from_numpy(absmax)
    inverse = torch.from_numpy((1 / factors.astype(np.float64)).astype(np.float32))
    smoothed = (x * inverse) @ torch.from_numpy(smoothed_weight(weight, factors)).T
    torch.testing.assert_close(smoothed, x @ weight.T, rtol=1e-4, atol=1e-3)
    flattened = (x * inverse).abs().amax(dim=0)
    assert flattened.max() / flattened.median() < x.abs().amax(dim=0).max() / x.abs().amax(dim=0).median() / 10


def test_batchnorm_folding_is_exact_and_named():
    model = load_model("edgeq.examples:tiny_convnet")
    model.module.eval()
    folded, names = fold_batchnorm(model.module)
    assert names == ["inner.features.0", "inner.features.4"]
    with torch.no_grad():
        expected = model.module(*model.example_inputs)[0]
        got = folded(*model.example_inputs)[0]
    assert sqnr_db(expected.numpy(), got.numpy()) > 100
    assert isinstance(model.module.inner.features[1], nn.BatchNorm2d)  # the reference keeps its BatchNorm


@pytest.mark.parametrize(("target", "dtype"), [("tflite", QDtype.INT8), ("onnx-x86-avx2", QDtype.UINT8), ("onnx-qnn-htp", QDtype.UINT8)])
def test_w8a8_plan_uses_the_targets_activation_type(outlier_model, target, dtype):
    calibration = Calibration(_samples(16, 0), ["x"], observer="minmax")
    plan = resolve_plan(outlier_model.module, load_profile(target), Precision.W8A8, [], outlier_model.example_inputs, calibration)
    layers = [plan.layers[f"layers.{i}"] for i in range(4)]
    assert all(layer.activation is not None and layer.activation.dtype == dtype for layer in layers)
    assert all(layer.smooth is not None for layer in layers)  # SmoothQuant on by default for w8a8 linears
    assert any("SmoothQuant" in note for note in plan.notes)


def test_w16_activations_are_symmetric_int16_on_tflite(outlier_model):
    calibration = Calibration(_samples(8, 0), ["x"], observer="minmax")
    plan = resolve_plan(outlier_model.module, load_profile("tflite"), Precision.W8A16, [], outlier_model.example_inputs, calibration)
    activation = plan.layers["layers.0"].activation
    assert activation.dtype == QDtype.INT16 and activation.symmetric and int(activation.zero_point) == 0


def test_static_schemes_refuse_without_calibration_samples(outlier_model):
    with pytest.raises(ConversionError, match="needs calibration samples"):
        resolve_plan(outlier_model.module, load_profile("onnx"), Precision.W8A8, [], outlier_model.example_inputs, None)
    with pytest.raises(ConversionError, match="runs no w8a16 activation type"):
        resolve_plan(outlier_model.module, load_profile("onnx-x86-avx2"), Precision.W8A16, [], None, Calibration(_samples(2, 0), ["x"]))


@pytest.mark.parametrize(("target", "precision", "outputs"), [
    ("tflite-edgetpu", Precision.W8A8, True),  # integer IO: every op integer
    ("tflite", Precision.W8A8, True),  # TFLite runs an int8 FULLY_CONNECTED only with an int8 output (islands)
    ("tflite", Precision.W8A16, False),  # int16x8 kernels are reference code: slower than the float op they'd replace
    ("onnx", Precision.W8A8, False),  # ORT fuses QDQ MatMuls with float outputs
])
def test_layer_outputs_are_quantized_where_the_runtimes_integer_kernels_need_them(outlier_model, target, precision, outputs):
    calibration = Calibration(_samples(8, 0), ["x"], observer="minmax")
    plan = resolve_plan(outlier_model.module, load_profile(target), precision, [], outlier_model.example_inputs, calibration)
    assert all((plan.layers[f"layers.{i}"].output is not None) == outputs for i in range(4))
    assert dynamic_fallback(load_profile(target), precision) == (QDtype.INT8 if target == "tflite" and outputs else None)


def test_fallback_relaxes_the_bad_layer_first(outlier_model):
    module = outlier_model.module
    calibration = Calibration(_samples(16, 0), ["x"], observer="minmax", smooth=False)
    # onnx: static input ranges only, so the bad input is the only harm (tflite plans output ranges too)
    plan = resolve_plan(module, load_profile("onnx"), Precision.W8A8, [], outlier_model.example_inputs, calibration)
    validation = _samples(16, 1)
    reference = _run(module, validation)
    before = np.mean([cosine(r, c) for r, c in zip(reference, _run(apply_plan(module, plan, WeightForm.QDQ), validation))])
    result = sensitivity_fallback(
        module, plan, calibration.samples, ["x"], outlier_model.outputs, parse_budget("cosine>=0.999"), 0.5, "float32"
    )
    assert result.sweep[0].fqn == "layers.2" and result.relaxed[0] == "layers.2"
    assert result.holds and result.after > result.before
    relaxed = result.plan.layers["layers.2"]
    assert relaxed.activation is None and relaxed.weight is not None  # activations float, weights still int8
    after = np.mean([cosine(r, c) for r, c in zip(reference, _run(apply_plan(module, result.plan, WeightForm.QDQ), validation))])
    assert before < 0.99 and after >= 0.999  # the held-out samples agree with the sweep's verdict


def test_fallback_on_integer_islands_relaxes_to_run_time_quantization(outlier_model):
    """On `tflite` w8a8 a relaxed layer keeps int8 weights and integer compute: its input rows are quantized per
    call (the hybrid kernel) instead of with a static range, and its static output range goes too."""
    module = outlier_model.module
    profile = load_profile("tflite")
    calibration = Calibration(_samples(16, 0), ["x"], observer="minmax")
    plan = resolve_plan(module, profile, Precision.W8A8, [], outlier_model.example_inputs, calibration)
    result = sensitivity_fallback(
        module, plan, calibration.samples, ["x"], outlier_model.outputs, parse_budget("cosine>=0.9999"), 0.25, "float32",
        dynamic_fallback(profile, Precision.W8A8),
    )
    assert result.relaxed and result.after > result.before
    for fqn in result.relaxed:
        relaxed, original = result.plan.layers[fqn], plan.layers[fqn]
        assert relaxed.dynamic_activation == QDtype.INT8 and relaxed.activation is None and relaxed.output is None
        assert np.array_equal(relaxed.weight_codes, original.weight_codes) and np.array_equal(relaxed.smooth, original.smooth)


def test_bias_correction_removes_the_mean_shift_on_held_out_samples(tmp_path):
    from edgeq.calibration.data import synthesize
    from edgeq.plan import QuantPlan

    model = load_model("edgeq.examples:tiny_convnet")
    module, _ = fold_batchnorm(model.module)
    example = {s.name: t.numpy() for s, t in zip(model.inputs, model.example_inputs)}
    calibration_samples, held_out = synthesize(model.inputs, example, 16, 0), synthesize(model.inputs, example, 16, 1)
    name = model.input_names[0]

    def sqnr(plan):
        quantized = apply_plan(module, plan, WeightForm.CODES)
        with torch.no_grad():
            pairs = [(module(torch.from_numpy(s[name]))[0].numpy(), quantized(torch.from_numpy(s[name]))[0].numpy()) for s in held_out]
        return sqnr_db(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))

    plans = {
        flag: resolve_plan(module, load_profile("onnx"), Precision.W8A8, [], model.example_inputs,
                           Calibration(calibration_samples, model.input_names, observer="minmax", bias_correction=flag))
        for flag in (False, True)
    }
    corrected = [fqn for fqn, layer in plans[True].layers.items() if layer.bias_correction is not None]
    assert corrected and all(layer.bias_correction is None for layer in plans[False].layers.values())
    assert sqnr(plans[True]) > sqnr(plans[False]) + 1.0  # dB, on samples the correction never saw
    plans[True].save(tmp_path)
    np.testing.assert_array_equal(QuantPlan.load(tmp_path).layers[corrected[0]].bias_correction, plans[True].layers[corrected[0]].bias_correction)
