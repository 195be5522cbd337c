"""Issue 13's acceptance on a real dataset: a convnet trained on scikit-learn's digits (tests/compress/digits.py),
converted by `edgeq convert` with `--prune structured:0.5`, gives an ONNX artifact at least 40% smaller than the
unpruned one, and with `--recover distill` (the FP32 model as teacher, on unlabeled calibration images) the
artifact's test accuracy in ONNX Runtime is within 1 point of the FP32 model's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import main
from tests.compress.digits import accuracy, train_digits

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

DISTILL = "distill:steps=200,lr=1e-3,batch_size=32"  # ~4 s on one core: 88% after pruning -> ~98% (FP32 98.7%)


def train_images() -> list[np.ndarray]:
    """`--data tests.compress.test_digits_prune:train_images`: the training split's images, no labels."""
    return [image[None] for image in train_digits().x_train.numpy()]


def _convert(out, name: str, *options: str) -> dict:
    result = CliRunner().invoke(main, [
        "convert", "tests.compress.digits:convnet", "-t", "onnx", "-p", "fp32", "--name", name,
        "--data", "tests.compress.test_digits_prune:train_images", "--samples", "16", "--calibration-samples", "256",
        "--budget", "none", "-o", str(out), *options,
    ])
    assert result.exit_code == 0, result.output
    bundle = out / name / "onnx" / "fp32"
    return {"bundle": bundle, "manifest": json.loads((bundle / "manifest.json").read_text())}


def _onnx_accuracy(bundle, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    predictions = [int(np.argmax(session.run(None, {name: image[None]})[0])) for image in x]
    return float(np.mean(np.asarray(predictions) == y))


def test_structured_pruning_shrinks_the_onnx_artifact_and_distillation_recovers_accuracy(tmp_path):
    trained = train_digits()
    fp32_accuracy = accuracy(trained.model, trained.x_test, trained.y_test)
    plain = _convert(tmp_path, "plain")
    pruned = _convert(tmp_path, "pruned", "--prune", "structured:0.5", "--recover", DISTILL)

    plain_size = plain["manifest"]["artifact"]["size_bytes"]
    pruned_size = pruned["manifest"]["artifact"]["size_bytes"]
    assert pruned_size <= 0.6 * plain_size, (pruned_size, plain_size)

    x_test, y_test = trained.x_test.numpy(), trained.y_test.numpy()
    assert abs(_onnx_accuracy(plain["bundle"], x_test, y_test) - fp32_accuracy) < 1e-6  # the same predictions
    recovered = _onnx_accuracy(pruned["bundle"], x_test, y_test)
    assert recovered >= fp32_accuracy - 0.01, (recovered, fp32_accuracy)

    prune, distill = pruned["manifest"]["compression"]["stages"]
    assert (prune["stage"], prune["spec"], distill["spec"]) == ("prune", "structured:0.5", DISTILL)
    assert prune["parameters"]["after"] < 0.5 * prune["parameters"]["before"]
    # distillation moved the pruned model back towards the FP32 one (PyTorch, validation images)
    assert distill["drift"][0]["cosine"] > prune["drift"][0]["cosine"]
    print(f"\ndigits: FP32 {fp32_accuracy:.4f}, pruned+distilled ONNX {recovered:.4f}; ONNX {plain_size} -> {pruned_size} bytes; "
          f"PyTorch latency {pruned['manifest']['compression']['latency']['median_ms']}; ONNX Runtime median ms "
          f"{plain['manifest']['validation']['latency']['median_ms']} -> {pruned['manifest']['validation']['latency']['median_ms']}")
