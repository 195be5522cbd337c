"""Fake quantization for training, on a plan's exact grid: the forward pass sees the quantized numbers, the
backward pass gets straight-through gradients (Bengio et al. 2013) and, for weights, gradients for the scales.

Weights (`WeightFakeQuant`, a torch parametrization of a layer's `weight`): real = s * (clamp(round(v / s) + z,
qmin, qmax) - z), with `v` the latent float weight and `s` LEARNABLE, initialized from the plan. Rounding passes
gradients straight through, clamping passes none outside the range, so d real / d s is round(v/s) - v/s inside the
range and the clamp level - z outside it: LSQ's gradient (Esser et al. 2020, "Learned Step Size Quantization",
eq. 3). The scale is held as log s: AdamW then moves it by a relative amount per step, the same for an int8 scale of
1e-4 and an int2 scale of 0.05 (LSQ's gradient scale g = 1/sqrt(N * qmax) serves the same end under SGD).
Zero points, dtype and granularity stay the plan's.

Activations (`StaticFakeQuant`, `DynamicFakeQuant`): the plan's calibrated static scales, fixed, or the run-time
range per call, with straight-through rounding.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeq.plan import PerChannel, PerGroup, PerTensor, QDtype, TensorQuant


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward (half to even, as the plan rounds), identity backward."""
    return x + (torch.round(x) - x).detach()


def expand(params: torch.Tensor, granularity, ndim: int) -> torch.Tensor:
    """A plan's per-tensor / per-channel / per-group parameters broadcast to a weight of `ndim` dimensions."""
    if isinstance(granularity, PerTensor):
        return params.reshape(())
    if isinstance(granularity, PerChannel):
        shape = [1] * ndim
        shape[granularity.axis] = -1
        return params.reshape(shape)
    if isinstance(granularity, PerGroup):
        return params.repeat_interleave(granularity.size, dim=granularity.axis)
    raise ValueError(f"granularity {granularity!r}")


class WeightFakeQuant(nn.Module):
    """Parametrization: latent weight `v` (in the plan's quantized domain: W * smooth for SmoothQuant layers) ->
    the real weight the layer multiplies by (dequantized, divided by smooth again)."""

    def __init__(self, quant: TensorQuant, smooth: np.ndarray | None = None):
        super().__init__()
        self.granularity = quant.granularity
        self.qmin, self.qmax = quant.dtype.qmin, quant.dtype.qmax
        self.log_scale = nn.Parameter(torch.from_numpy(np.log(quant.scale.astype(np.float64)).astype(np.float32)))
        self.register_buffer("zero", torch.from_numpy(quant.zero_point.astype(np.float32)))
        self.register_buffer("smooth", None if smooth is None else torch.from_numpy(smooth.astype(np.float32)))

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        scale = expand(self.scale(), self.granularity, latent.dim())
        zero = expand(self.zero, self.granularity, latent.dim())
        codes = torch.clamp(round_ste(latent / scale) + zero, self.qmin, self.qmax)
        real = (codes - zero) * scale
        return real if self.smooth is None else real / self.smooth


def latent_init(quant: TensorQuant, codes: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The latent weight QAT starts from: the plan's dequantized value plus the float weight's own rounding
    residual, clamped to under half a step. Its rounding gives back exactly the plan's codes (so QAT starts where
    the plan is, GPTQ's or AWQ's choices included), while the residual keeps how close each weight was to
    flipping (RTN plans: the float weight itself, wherever it was inside the clipping range)."""
    dequantized = quant.dequantize(codes)
    scale, _ = quant._broadcast(dequantized, dequantized.ndim)
    residual = np.clip(weight.astype(np.float32) - dequantized, -0.49 * scale, 0.49 * scale)
    return (dequantized + residual).astype(np.float32)


class StaticFakeQuant(nn.Module):
    """Per-tensor static quantization with the plan's fixed scale and zero point, straight-through."""

    def __init__(self, quant: TensorQuant):
        super().__init__()
        self.scale, self.zero = float(quant.scale), float(quant.zero_point)
        self.qmin, self.qmax = quant.dtype.qmin, quant.dtype.qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = torch.clamp(round_ste(x / self.scale) + self.zero, self.qmin, self.qmax)
        return (codes - self.zero) * self.scale


class DynamicFakeQuant(nn.Module):
    """Run-time activation quantization (edgeq.compress.qdq.DynamicActivationQuant's ranges), straight-through."""

    def __init__(self, dtype: QDtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_row = self.dtype == QDtype.INT8
        dims = -1 if per_row else tuple(range(x.dim()))
        lo = torch.clamp(x.amin(dim=dims, keepdim=per_row), max=0).detach()
        hi = torch.clamp(x.amax(dim=dims, keepdim=per_row), min=0).detach()
        qmin, qmax = self.dtype.qmin, self.dtype.qmax
        scale = torch.where(hi > lo, (hi - lo) / (qmax - qmin), torch.ones_like(hi))
        zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
        return (torch.clamp(round_ste(x / scale) + zero, qmin, qmax) - zero) * scale
