"""PyTorch rewrites before conversion: exact in PyTorch, needed by Core ML, proven through a runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeq.load import load_model
from edgeq.rewrites import ChannelPReLU, apply_rewrites
from edgeq.validate.verdict import Verdict
from tests.conftest import COREML, ONNX
from tests.converters.models import prelu
from tests.helpers import convert_source


@pytest.mark.parametrize("shape", [(2, 12), (2, 12, 5), (2, 12, 4, 4)])
def test_channel_prelu_equals_prelu(shape):
    original = torch.nn.PReLU(12)
    with torch.no_grad():
        original.weight.copy_(torch.linspace(-0.5, 0.9, 12))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ChannelPReLU(original)(x), original(x), rtol=0, atol=0)


def test_rewrites_leave_the_reference_untouched():
    model = load_model("tests.converters.models:prelu")
    rewritten, applied = apply_rewrites(model.module, "coreml")
    assert applied == ["prelu-per-channel-to-relu: act", "prelu-per-channel-to-relu: act2"]
    assert isinstance(model.module.inner.act, torch.nn.PReLU) and rewritten is not model.module
    assert apply_rewrites(model.module, "onnx") == (model.module, [])


@ONNX
def test_rewritten_module_validates_in_onnxruntime(tmp_path):
    """Core ML cannot run on Linux: prove the rewritten graph in a runtime that can."""
    import onnxruntime as ort

    module, (x,) = prelu()
    rewritten, _ = apply_rewrites(module, "coreml")
    path = tmp_path / "rewritten.onnx"
    torch.onnx.export(rewritten, (x,), str(path), dynamo=True, input_names=["x"])
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, module(x).numpy(), rtol=1e-5, atol=1e-6)


@COREML
def test_coreml_needs_and_records_the_prelu_rewrite(tmp_path, monkeypatch):
    outcome = convert_source("tests.converters.models:prelu", "coreml", "fp32", tmp_path)
    assert outcome.verdict in (Verdict.PASSED, Verdict.NOT_VALIDATED), outcome.error
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    assert "prelu-per-channel-to-relu: act" in manifest["rewrites"]

    monkeypatch.setattr("edgeq.rewrites.REWRITES", ())  # without it, coremltools refuses the model
    refused = convert_source("tests.converters.models:prelu", "coreml", "fp32", tmp_path / "plain")
    assert refused.verdict == Verdict.CONVERSION_FAILED and "prelu" in refused.error


@COREML
def test_coreml_falls_back_to_the_default_decomposition_table(tmp_path):
    outcome = convert_source("tests.converters.models:new_ones", "coreml", "fp32", tmp_path)
    assert outcome.verdict in (Verdict.PASSED, Verdict.NOT_VALIDATED), outcome.error
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    assert any(r.startswith("default-decomposition-table") for r in manifest["rewrites"])
