"""Which linears SmoothQuant pays for under dynamic int8: smoothing kept only where it buys accuracy.

A dynamic-int8 layer that reads a smoothed input pays a float Mul (x / s) on every call wherever the factor
cannot fold into the op before it: after a LayerNorm whose output is also the residual, after GELU (ONNX Runtime
and LiteRT alike; converters/onnx_graph_shape.py folds only the attention output projection's). On
all-MiniLM-L6-v2 those Muls are 3% of an ORT int8-dynamic run, yet only some of them buy accuracy: the input's
outliers differ from layer to layer, and the runtime's activation quantizer decides how much they hurt
(ORT's DynamicQuantizeLinear takes one range per tensor; LiteRT's dynamic-range kernels one per row, which
outliers hurt far less).

So per group of linears reading one tensor (q/k/v share one), the output error of the layer as the runtime
computes it (input quantized per call, int8 weight codes) is measured on the calibration samples with and
without smoothing, and smoothing is kept only where it removes a clear share of that error (KEEP_RATIO,
KEEP_GAIN).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Smoothing stays where it at least halves the layer's output error, or removes at least KEEP_GAIN of it (relative
# squared error: a layer whose error is large either way, MiniLM's first FFN down projection on ORT, 3.3e-3 plain
# against 2.1e-3 smoothed, cost 0.0008 cosine without it). Measured on all-MiniLM-L6-v2, docs/research/ort-kernels-cpus.md.
KEEP_RATIO = 2.0
KEEP_GAIN = 5e-4


@dataclass
class GroupError:
    """Relative squared output error of one group's linears on the calibration samples, smoothed and not."""

    layers: list[str]
    smoothed: float
    plain: float

    @property
    def keep(self) -> bool:
        return self.plain >= KEEP_RATIO * self.smoothed or self.plain - self.smoothed >= KEEP_GAIN

    def describe(self) -> str:
        verdict = "smoothed" if self.keep else "not smoothed"
        return f"{self.layers[0]}{f' (+{len(self.layers) - 1})' if len(self.layers) > 1 else ''}: {verdict} (output error {self.plain:.2e} plain, {self.smoothed:.2e} smoothed)"


def dynamic_quantize(x: torch.Tensor, per_row: bool) -> torch.Tensor:
    """x as the runtime sees it after its per-call 8-bit asymmetric quantization (range always holding 0):
    one range per tensor (ORT DynamicQuantizeLinear) or per row of the last axis (LiteRT/XNNPACK dynamic range)."""
    dims = (-1,) if per_row else tuple(range(x.dim()))
    low = torch.clamp(x.amin(dim=dims, keepdim=True), max=0)
    high = torch.clamp(x.amax(dim=dims, keepdim=True), min=0)
    scale = (high - low) / 255
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-low / scale), 0, 255)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def _dequantized(codes: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(codes.astype(np.float32) * np.asarray(scale, np.float32).reshape(-1, 1))


def smoothing_errors(
    module: torch.nn.Module,
    groups: list[list[str]],
    plain: dict[str, tuple[np.ndarray, np.ndarray]],
    smoothed: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    samples: list[dict],
    input_names: list[str],
    per_row: bool,
) -> list[GroupError]:
    """Per group, the output error with plain weight codes on x against smoothed codes on x / s.

    `plain`: fqn -> (codes, scale) of W; `smoothed`: fqn -> (codes, scale, s) of W * s. The error is
    sum |y_q - y|^2 / sum |y|^2 over the group's layers and the samples, y the float layer's output."""
    from edgeq.calibration.collect import watch

    weights = {fqn: (_dequantized(*plain[fqn]), _dequantized(*smoothed[fqn][:2]), torch.from_numpy(smoothed[fqn][2])) for fqn in plain}
    sums = {fqn: np.zeros(3) for fqn in weights}  # plain error, smoothed error, reference energy
    biases = {}
    for fqn, child in module.named_modules():
        from edgeq.compress.apply import user_fqn

        if user_fqn(fqn) in weights:
            biases[user_fqn(fqn)] = None if child.bias is None else child.bias.detach().float()

    def record(fqn: str, x: torch.Tensor, y: torch.Tensor) -> None:
        w_plain, w_smooth, factors = weights[fqn]
        x, y = x.float(), y.float()
        for slot, (inp, w) in enumerate(((x, w_plain), (x / factors, w_smooth))):
            y_q = torch.nn.functional.linear(dynamic_quantize(inp, per_row), w, biases[fqn])
            sums[fqn][slot] += float(((y_q - y) ** 2).sum())
        sums[fqn][2] += float((y ** 2).sum())

    with torch.no_grad():
        watch(module, set(weights), samples, input_names, record, "calibration: where SmoothQuant pays")
    errors = []
    for group in groups:
        total = sum((sums[fqn] for fqn in group), np.zeros(3))
        energy = max(total[2], 1e-30)
        errors.append(GroupError(list(group), smoothed=total[1] / energy, plain=total[0] / energy))
    return errors


def paying_groups(module, plan, groups: list[list[str]], candidates: dict, samples: list[dict], input_names: list[str]) -> list[list[str]]:
    """The groups whose smoothing pays (GroupError.keep) under the plan's dynamic activation quantization, with
    each decision and its measured reason in plan.notes. `candidates`: fqn -> (weight quant, codes, factors) of
    the smoothed layer; plan.layers still hold the plain codes. Static schemes: every group (their per-tensor
    ranges are fixed at calibration, where smoothing is what makes the ranges usable)."""
    from edgeq.plan import QDtype

    dynamic = {plan.layers[fqn].dynamic_activation for group in groups for fqn in group}
    if None in dynamic or len(dynamic) != 1:
        return groups
    per_row = dynamic == {QDtype.INT8}  # LiteRT's dynamic-range kernels: int8 per row; ORT: uint8 per tensor
    plain = {fqn: (plan.layers[fqn].weight_codes, plan.layers[fqn].weight.scale) for group in groups for fqn in group}
    smoothed = {fqn: (codes, quant.scale, factors) for fqn, (quant, codes, factors) in candidates.items()}
    errors = smoothing_errors(module, groups, plain, smoothed, samples, input_names, per_row)
    kept = [error for error in errors if error.keep]
    plan.notes.append(
        f"SmoothQuant kept on {sum(len(e.layers) for e in kept)} of {len(plain)} dynamic linear layers, where it at least "
        f"{KEEP_RATIO}x lowers the relative output error or lowers it by {KEEP_GAIN:g} ({'int8 per row' if per_row else 'uint8 per tensor'} activations, "
        f"{len(samples)} calibration samples): " + "; ".join(error.describe() for error in errors)
    )
    return [error.layers for error in kept]
