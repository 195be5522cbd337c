"""Zeros read back from artifacts (edgeq/sparsity_report.py): a 2:4-pruned stack (128 -> 256 -> 64 pruned, the
64 -> 10 head dense) keeps exactly half of each pruned layer's weights at 0 through export to every runtime, in
float and quantized (int8 per channel, int4 blocks) form: the pruned positions are zero codes in the artifact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeq.calibration.lowbit.grid import Grid
from edgeq.calibration.lowbit.rtn import rtn
from edgeq.calibration.lowbit.to_plan import layer_plan
from edgeq.calibration.weights import quantize_weight_per_channel
from edgeq.converters.base import ConversionRequest
from edgeq.load import load_model
from edgeq.plan import LayerPlan, OpKind, QDtype, QuantPlan
from edgeq.sparsity_report import artifact_zeros
from edgeq.targets import Precision, load_profile
from tests.conftest import COREML, ONNX, TFLITE

PRUNED = ("up", "down")


@pytest.fixture(scope="module")
def pruned():
    return load_model("tests.converters.test_coreml_sparse:pruned_stack")


def _weight(model, fqn: str) -> torch.Tensor:
    return dict(model.module.named_modules())[f"inner.{fqn}"].weight.detach()


def _plan(model, precision: Precision, target: str) -> QuantPlan:
    plan = QuantPlan(precision.value, target)
    for fqn in PRUNED:
        if precision == Precision.INT4_WEIGHT:
            plan.layers[fqn] = layer_plan(fqn, OpKind.LINEAR, rtn(_weight(model, fqn), Grid(4, 32, True), "mse"))
        else:
            quant, codes = quantize_weight_per_channel(_weight(model, fqn), QDtype.INT8)
            plan.layers[fqn] = LayerPlan(fqn, OpKind.LINEAR, quant, codes)
    return plan


def _convert(model, target: str, precision: Precision, plan, path):
    from edgeq.converters import get_converter

    profile = load_profile(target)
    request = ConversionRequest(model, profile, precision, plan)
    converter = get_converter(profile.runtime)
    assert converter.check(request) == []
    return converter.convert(request, path)


def _assert_pruned_layers_half_zero(report: dict, quantized: bool) -> None:
    for fqn in PRUNED:
        share = report["layers"][fqn]["share"]
        # float: exactly the pruned half; quantized: the pruned half plus any weight that rounds to the zero code
        assert (share >= 0.5 and share < 0.6) if quantized else share == 0.5, (fqn, report["layers"][fqn])
    head = next(entry for name, entry in report["layers"].items() if entry["weights"] == 640)
    assert head["share"] < 0.1
    assert report["weights"] == 128 * 256 + 256 * 64 + 640 and 0.49 < report["share"] < 0.6


@ONNX
@pytest.mark.parametrize("precision", [Precision.FP32, Precision.INT8_WEIGHT, Precision.INT4_WEIGHT])
def test_onnx_artifact_keeps_the_zeros(tmp_path, pruned, precision):
    plan = None if precision == Precision.FP32 else _plan(pruned, precision, "onnx")
    artifact = _convert(pruned, "onnx", precision, plan, tmp_path / "model.onnx")
    _assert_pruned_layers_half_zero(artifact_zeros(artifact.path, "onnx"), quantized=plan is not None)
    if plan is not None:  # every pruned weight is a zero code in the artifact
        from edgeq.converters.parity import onnx_weights

        stored = onnx_weights(artifact.path)
        for fqn in PRUNED:
            codes, _ = stored.quantized[fqn]
            assert np.all(codes[_weight(pruned, fqn).numpy() == 0] == 0)


@TFLITE
def test_tflite_int8_artifact_keeps_the_zeros(tmp_path, pruned):
    artifact = _convert(pruned, "tflite", Precision.INT8_WEIGHT, _plan(pruned, Precision.INT8_WEIGHT, "tflite"), tmp_path / "model.tflite")
    _assert_pruned_layers_half_zero(artifact_zeros(artifact.path, "tflite"), quantized=True)


@COREML
def test_coreml_sparse_artifact_counts_the_densified_zeros(tmp_path, pruned):
    artifact = _convert(pruned, "coreml", Precision.FP16, None, tmp_path / "model.mlpackage")
    _assert_pruned_layers_half_zero(artifact_zeros(artifact.path, "coreml"), quantized=False)
    with pytest.raises(ValueError, match="expected one of onnx, tflite, coreml"):
        artifact_zeros(artifact.path, "tensorrt")
