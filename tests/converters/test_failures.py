"""A converter's raw exception becomes a ConversionError naming the target and where in the model it arose: the
op and module when the toolchain names an op, else the module and line of the model's own Python code."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeq.errors import ConversionError
from tests.conftest import ONNX, TFLITE


class ReadsWhileExported(nn.Module):
    """Model code that breaks only under export, as HF code reading `layer.weight.dtype` did on quantized layers."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        if torch.compiler.is_exporting():
            raise AttributeError("'QuantizedWeight' object has no attribute 'dtype'")
        return self.proj(x)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = ReadsWhileExported()

    def forward(self, x):
        return self.block(x)


def broken_under_export():
    return Outer().eval(), (torch.randn(1, 4),)


@pytest.mark.parametrize("target", [pytest.param("onnx", marks=ONNX), pytest.param("tflite", marks=TFLITE)])
def test_python_errors_in_model_code_name_the_module_and_line(tmp_path, target):
    from edgeq.converters import ConversionRequest, get_converter
    from edgeq.load import load_model
    from edgeq.targets import Precision, load_profile

    model = load_model("tests.converters.test_failures:broken_under_export")
    profile = load_profile(target)
    converter = get_converter(profile.runtime)
    with pytest.raises(ConversionError) as raised:
        converter.convert(ConversionRequest(model, profile, Precision.FP32), tmp_path / converter.filename)
    message = str(raised.value)
    assert message.startswith(f"target {target}: conversion failed in module 'block'"), message
    assert "ReadsWhileExported.forward (test_failures.py:" in message and "AttributeError: 'QuantizedWeight'" in message


def tiny():
    return nn.Sequential(nn.Linear(4, 4)).eval(), (torch.randn(1, 4),)


@pytest.mark.parametrize(("target", "step"), [
    pytest.param("onnx", "portable_metadata", marks=ONNX), pytest.param("tflite", "float16_weights", marks=TFLITE),
])
def test_an_exception_after_the_export_is_a_conversion_error_naming_the_target(tmp_path, monkeypatch, target, step):
    """A step after the toolchain (graph rewrites, packing) that raises gives a ConversionError, not a traceback."""
    from edgeq.converters import ConversionRequest, get_converter
    from edgeq.load import load_model
    from edgeq.targets import Precision, load_profile

    def broken(*args, **kwargs):
        raise ValueError("a rewrite met a graph it did not expect")

    monkeypatch.setattr(f"edgeq.converters.{target}.{step}", broken)
    profile = load_profile(target)
    converter = get_converter(profile.runtime)
    with pytest.raises(ConversionError, match=f"^target {target}: conversion failed.*a rewrite met a graph"):
        converter.convert(ConversionRequest(load_model("tests.converters.test_failures:tiny"), profile, Precision.FP16), tmp_path / "m")
