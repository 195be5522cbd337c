"""TFLite / LiteRT: `litert_torch.convert`, keeping the PyTorch (e.g. NCHW) input layout and names.

FP16 is TFLite's float16 quantization: float16 weights for FULLY_CONNECTED, CONV_2D, DEPTHWISE_CONV_2D,
CONV_2D_TRANSPOSE and EMBEDDING_LOOKUP, dequantized to float32 at load (ai-edge-quantizer's float casting).
Integer inputs are stored as int32, the TFLite index type; runners cast int64 feeds losslessly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgeq.converters.base import Artifact, ConversionRequest, Converter
from edgeq.converters.failures import explain_failure
from edgeq.converters.tracing import quiet, shape_notes
from edgeq.targets import Precision, Runtime

_FP16_WEIGHT_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D_TRANSPOSE", "EMBEDDING_LOOKUP")


class KeywordIO(torch.nn.Module):
    """Keyword inputs and dict outputs: litert-torch turns both into the signature's tensor names."""

    def __init__(self, flat: torch.nn.Module, input_names: list[str], output_names: list[str]):
        super().__init__()
        self.flat = flat
        self.input_names = input_names
        self.output_names = output_names

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.flat(*(inputs[name] for name in self.input_names))
        return dict(zip(self.output_names, outputs))


class TFLiteConverter(Converter):
    runtime = Runtime.TFLITE
    filename = "model.tflite"

    def convert(self, request: ConversionRequest, dest: Path) -> Artifact:
        import litert_torch

        model = request.model
        notes = shape_notes(model, request.profile)
        examples = model.example_inputs
        wrapper = KeywordIO(model.module, model.input_names, model.outputs).eval()
        try:
            with quiet():
                edge_model = litert_torch.convert(wrapper, sample_kwargs=dict(zip(model.input_names, examples)))
                flatbuffer = edge_model.model_content()
        except Exception as exc:
            raise explain_failure(request.profile.id, exc, model.module, examples) from exc
        if request.precision == Precision.FP16:
            flatbuffer = float16_weights(flatbuffer)
        Path(dest).write_bytes(flatbuffer)
        return Artifact(dest, self.runtime, request.precision, request.profile.id, self.versions(), notes=notes)

    @staticmethod
    def versions() -> dict[str, str]:
        import litert_torch

        versions = {"torch": torch.__version__, "litert-torch": litert_torch.__version__}
        try:
            from importlib.metadata import version

            versions["ai-edge-quantizer"] = version("ai-edge-quantizer")
        except Exception:
            pass
        return versions


def float16_weights(flatbuffer: bytes) -> bytes:
    """Store the weights of weight-carrying ops as float16 (computed in float32 after dequantize)."""
    from ai_edge_quantizer import qtyping, quantizer

    engine = quantizer.Quantizer(bytearray(flatbuffer))
    config = qtyping.OpQuantizationConfig(
        weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
        compute_precision=qtyping.ComputePrecision.FLOAT,
        explicit_dequantize=True,
    )
    for op in _FP16_WEIGHT_OPS:
        engine.update_quantization_recipe(
            regex=".*",
            operation_name=getattr(qtyping.TFLOperationName, op),
            algorithm_key=quantizer.AlgorithmName.FLOAT_CASTING,
            op_config=config,
        )
    with quiet():  # it prints a size summary and progress bars
        return bytes(engine.quantize().quantized_model)
