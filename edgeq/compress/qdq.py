"""Quantized layers that carry a LayerPlan's exact codes and scales as PyTorch ops the converters lower.

Two weight forms, because the toolchains read exact numbers from different graphs (measured, see
docs/research/qdq-onnx-tflite.md and coreml-quantized.md):
  CODES  an int8 buffer of the plan's codes -> dequantize_per_channel. torch.onnx (dynamo) writes it as
         DequantizeLinear over an int8 initializer; coremltools as constexpr_affine_dequantize.
  QDQ    a float buffer equal to (codes - zero_point) * scale -> quantize_per_channel -> dequantize.
         litert-torch recovers the codes from it exactly and emits int8 weight tensors.
Static activation quantization is a quantize_per_tensor -> dequantize_per_tensor pair on the layer input
(and on its output, when the plan says so), with the plan's scale and zero-point; every converter turns it
into its own quantized tensor.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed
from torch import nn
from torch.nn import functional as F

from edgeq.plan import LayerPlan, PerChannel, PerTensor, QDtype, TensorQuant

QD = torch.ops.quantized_decomposed
_TORCH_DTYPES = {QDtype.INT8: torch.int8, QDtype.UINT8: torch.uint8, QDtype.INT16: torch.int16, QDtype.UINT16: torch.uint16}


class WeightForm(StrEnum):
    CODES = "codes"
    QDQ = "qdq"


class QuantizedWeight(nn.Module):
    """Returns the dequantized weight; the graph keeps the plan's codes and per-channel scales."""

    def __init__(self, quant: TensorQuant, codes: np.ndarray, form: WeightForm):
        super().__init__()
        if not isinstance(quant.granularity, PerChannel) or quant.dtype != QDtype.INT8:
            raise ValueError(f"weights lower as int8 per-channel here, not {quant.describe()}")
        self.axis = quant.granularity.axis
        self.form = form
        self.qmin, self.qmax = quant.dtype.qmin, quant.dtype.qmax
        codes_t = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int8))
        self.register_buffer("scale", torch.from_numpy(quant.scale.astype(np.float32)))
        self.register_buffer("zero_point", torch.from_numpy(quant.zero_point.astype(np.int64)))
        if form == WeightForm.CODES:
            self.register_buffer("codes", codes_t)
        else:
            self.register_buffer("dequantized", torch.from_numpy(quant.dequantize(codes)))
        self.evaluated: torch.Tensor | None = None  # never set on a module that is exported

    # Model code reads its layers' weights as tensors (HF ViT: `projection.weight.dtype` to cast the pixels):
    # answer as the float weight this one stands for.
    @property
    def shape(self) -> torch.Size:
        return (self.codes if self.form == WeightForm.CODES else self.dequantized).shape

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    @property
    def device(self) -> torch.device:
        return self.scale.device

    def forward(self) -> torch.Tensor:
        if self.evaluated is not None:  # PyTorch-only evaluation (keep_dequantized): the same numbers, computed once
            return self.evaluated
        args = (self.scale, self.zero_point, self.axis, self.qmin, self.qmax, torch.int8)
        if self.form == WeightForm.CODES:
            codes = self.codes
        else:
            codes = QD.quantize_per_channel(self.dequantized, *args)
        return QD.dequantize_per_channel(codes, *args)


def keep_dequantized(module: nn.Module) -> nn.Module:
    """For PyTorch-only evaluation (bias correction, the sensitivity sweep): every QuantizedWeight in `module`
    dequantizes its codes once and returns that tensor on each call, instead of dequantizing on every forward
    (MiniLM: 22M weights per forward). The numbers are the same. Never call it on a module to be exported: the
    converters read the codes from the dequantize op, which this skips."""
    with torch.no_grad():
        for child in module.modules():
            if isinstance(child, QuantizedWeight):
                child.evaluated = None
                child.evaluated = child()
    return module


class ActivationQuant(nn.Module):
    """Static per-tensor fake-quant with fixed parameters: what the artifact's integer kernels will see."""

    def __init__(self, quant: TensorQuant):
        super().__init__()
        if not isinstance(quant.granularity, PerTensor):
            raise ValueError("activations are quantized per tensor")
        self.scale = float(quant.scale)
        self.zero_point = int(quant.zero_point)
        self.qmin, self.qmax = quant.dtype.qmin, quant.dtype.qmax
        self.dtype = _TORCH_DTYPES[quant.dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (self.scale, self.zero_point, self.qmin, self.qmax, self.dtype)
        return QD.dequantize_per_tensor(QD.quantize_per_tensor(x, *args), *args)


class DynamicActivationQuant(nn.Module):
    """Simulates run-time activation quantization in PyTorch (never exported: converters emit the runtime's own op).

    uint8: ONNX Runtime's DynamicQuantizeLinear, one asymmetric range over the whole tensor, zero included.
    int8: TFLite's dynamic-range kernels, one asymmetric range per row (per token).
    """

    def __init__(self, dtype: QDtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_row = self.dtype == QDtype.INT8
        dims = -1 if per_row else tuple(range(x.dim()))
        lo = torch.clamp(x.amin(dim=dims, keepdim=per_row), max=0)
        hi = torch.clamp(x.amax(dim=dims, keepdim=per_row), min=0)
        qmin, qmax = self.dtype.qmin, self.dtype.qmax
        scale = torch.where(hi > lo, (hi - lo) / (qmax - qmin), torch.ones_like(hi))
        zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
        return (torch.clamp(torch.round(x / scale) + zero, qmin, qmax) - zero) * scale


class OutputQuant(nn.Module):
    """A leaf module followed by static fake-quant of its output (a plan's tensor point on that module)."""

    def __init__(self, module: nn.Module, quant: TensorQuant):
        super().__init__()
        self.module = module
        self.quant = ActivationQuant(quant)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.quant(self.module(*args, **kwargs))


def _bias(bias: torch.Tensor | None, layer: LayerPlan) -> nn.Parameter | None:
    """The layer's float bias, plus the plan's bias correction when it has one."""
    if layer.bias_correction is None:
        return None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
    correction = torch.from_numpy(layer.bias_correction.astype(np.float32))
    return nn.Parameter(correction if bias is None else bias.detach().float() + correction, requires_grad=False)


def _maybe_quant(quant: TensorQuant | None) -> nn.Module:
    return ActivationQuant(quant) if quant is not None else nn.Identity()


def smooth_inverse(smooth: np.ndarray) -> torch.Tensor:
    """1 / s as float32, computed in float64 first: the constant every runtime multiplies a smoothed input by."""
    return torch.from_numpy((1.0 / smooth.astype(np.float64)).astype(np.float32))


class Smooth(nn.Module):
    """SmoothQuant's input scaling x / s, as a multiply by the stored reciprocal (one float Mul in every runtime)."""

    def __init__(self, smooth: np.ndarray):
        super().__init__()  # a linear layer's input channels are its last axis, so a 1-D factor broadcasts
        self.register_buffer("inverse", smooth_inverse(smooth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.inverse


class QuantizedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, layer: LayerPlan, form: WeightForm, simulate_dynamic: bool = False):
        super().__init__()
        self.weight = QuantizedWeight(layer.weight, layer.weight_codes, form)
        self.in_features, self.out_features = linear.in_features, linear.out_features  # read by model code
        self.bias = _bias(linear.bias, layer)
        self.smooth = Smooth(layer.smooth) if layer.smooth is not None else nn.Identity()
        self.input_quant = _maybe_quant(layer.activation)
        if simulate_dynamic and layer.dynamic_activation is not None:
            self.input_quant = DynamicActivationQuant(layer.dynamic_activation)
        self.output_quant = _maybe_quant(layer.output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quant(F.linear(self.input_quant(self.smooth(x)), self.weight(), self.bias))


class QuantizedConv(nn.Module):
    def __init__(self, conv: nn.Conv1d | nn.Conv2d, layer: LayerPlan, form: WeightForm):
        super().__init__()
        self.weight = QuantizedWeight(layer.weight, layer.weight_codes, form)
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.bias = _bias(conv.bias, layer)
        if layer.smooth is not None:
            raise ValueError(f"{layer.fqn}: SmoothQuant is applied to linear layers only")
        self.input_quant = _maybe_quant(layer.activation)
        self.output_quant = _maybe_quant(layer.output)
        self.conv = F.conv2d if isinstance(conv, nn.Conv2d) else F.conv1d
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} is not lowered; only zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.input_quant(x), self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)
        return self.output_quant(y)


class QuantizedEmbedding(nn.Module):
    """Per-row int8 table (symmetric: TFLite's EMBEDDING_LOOKUP needs zero point 0)."""

    def __init__(self, embedding: nn.Embedding, layer: LayerPlan, form: WeightForm):
        super().__init__()
        self.weight = QuantizedWeight(layer.weight, layer.weight_codes, form)
        self.padding_idx = embedding.padding_idx
        # Whisper's encoder sizes its positions by `embed_positions.num_embeddings`
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight(), self.padding_idx)


def quantized_module(module: nn.Module, layer: LayerPlan, form: WeightForm, simulate_dynamic: bool = False) -> nn.Module:
    """The quantized replacement for `module` under `layer`'s plan (`simulate_dynamic`: PyTorch-only simulation
    of run-time activation quantization, for accuracy estimates; never for export)."""
    if isinstance(module, nn.Linear):
        return QuantizedLinear(module, layer, form, simulate_dynamic)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return QuantizedConv(module, layer, form)
    if isinstance(module, nn.Embedding):
        return QuantizedEmbedding(module, layer, form)
    raise ValueError(f"{layer.fqn}: no quantized form for {type(module).__name__}")
