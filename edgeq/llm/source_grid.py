"""Keep a source's own 4-bit grid: linears whose float weights already lie on an affine 4-bit grid per group.

A GGUF model's weights arrive dequantized: SmolLM2-135M-Instruct's Q4_1 linears hold, per block of 32 inputs,
w = d * q + m with q in 0..15 and d, m float16 (gguf-py computes `(d * qs) + m` in float32). Quantizing those
floats again onto another 4-bit grid (symmetric codes, another scale) rounds values that were already rounded:
the 4-bit artifact then agrees with its FP32 reference on about half the next tokens (measured, issue 14 note),
while the source's own grid loses nothing.

None of the runtimes' fast 4-bit kernels takes a float zero point (ONNX MatMulNBits does, but dequantizes the
whole weight per call: 20x slower than fp32 for one token, measured here; LiteRT's blockwise kernel has no
zero point at all), so the affine grid is split exactly into what they run:

    w = d * q + m = d * (q - 8) + (m + 8 d)
    y = x W^T = x W_sym^T + s(x) C^T,   W_sym = d * (q - 8)  (symmetric codes in [-8, 7], scale d)
                                        s(x) = the sum of x over each group of 32 inputs   [.., K/32]
                                        C    = m + 8 d per (output, group)                  [N, K/32]

`SourceGridLinear` computes exactly that: `.grid` an nn.Linear holding W_sym (which the low-bit plan takes with
codes and scales verbatim, see `source_codes`), `.offset` an nn.Linear over the group sums that stays float (1/32
of the layer's multiply-adds, float32 C: 4 bytes per group of 32 weights). Detection is exact or nothing: every
value of the weight must equal fl(fl(d * q) + m) for float16 d and m, so a float weight is never mistaken for a
grid (32 values on 16 evenly spaced float16-defined levels, bit for bit).
"""

from __future__ import annotations

import functools

import numpy as np

GROUP = 32
LEVELS = 16  # 4-bit codes 0..15
SOURCE_CODES = "edgeq_source_codes"  # attribute of a SourceGridLinear's .grid: (codes int8 [N, K], scale [N, G])


def find_affine_grid(weight, group: int = GROUP):
    """(codes uint8 [N, K] in 0..15, d [N, G], m [N, G]) float32 with fl(fl(d * codes) + m) == weight for every
    value, d and m float16 numbers; None when `weight` [N, K] is not exactly on such a grid."""
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % group or not np.isfinite(w).all():
        return None
    rows, columns = w.shape
    blocks = w.reshape(rows, columns // group, group)
    low, high = blocks.min(axis=2), blocks.max(axis=2)
    m = low.astype(np.float16).astype(np.float32)
    if not np.array_equal(m, low):  # the smallest value has code 0, so it is m itself, a float16 number
        return None
    estimate = (high - low) / (LEVELS - 1)
    best = None
    # d is the float16 nearest (max - min) / 15 up to the rounding of the top value: try it and its neighbours
    base = estimate.astype(np.float16)
    for step in (0, -1, 1, -2, 2):
        d16 = _ulp_step(base, step)
        d = d16.astype(np.float32)
        safe = np.where(d > 0, d, 1.0)
        codes = np.rint((blocks - m[..., None]) / safe[..., None])
        codes = np.where((d > 0)[..., None], codes, 0.0)
        inside = (codes >= 0) & (codes < LEVELS)
        rebuilt = (d[..., None] * np.clip(codes, 0, LEVELS - 1).astype(np.float32)) + m[..., None]
        exact = np.all(inside & (rebuilt == blocks), axis=2)
        if best is None:
            best = (exact.copy(), codes.copy(), d.copy())
        else:
            take = exact & ~best[0]
            best[1][take] = codes[take]
            best[2][take] = d[take]
            best[0][take] = True
        if best[0].all():
            break
    exact, codes, d = best
    if not exact.all():
        return None
    return codes.reshape(rows, columns).astype(np.uint8), d, m


def _ulp_step(values: np.ndarray, step: int) -> np.ndarray:
    out = values.copy()
    for _ in range(abs(step)):
        out = np.nextafter(out, np.float16(np.inf if step > 0 else 0)).astype(np.float16)
    return out


def source_grid_module(linear, found, group: int = GROUP):
    """A SourceGridLinear computing `linear` exactly from its grid `found` (find_affine_grid's result)."""
    import torch

    codes, d, m = found
    signed = codes.astype(np.int8) - 8
    w_sym = torch.from_numpy(np.repeat(d, group, axis=1) * signed.astype(np.float32))  # exact: d has 11 bits, codes 4
    offset = torch.from_numpy((m + np.float32(8) * d).astype(np.float32))
    module = source_grid_class()(linear.in_features, linear.out_features, group, linear.bias is not None)
    with torch.no_grad():
        module.grid.weight.copy_(w_sym)
        module.offset.weight.copy_(offset)
        if linear.bias is not None:
            module.grid.bias.copy_(linear.bias.detach().float())
    setattr(module.grid, SOURCE_CODES, (torch.from_numpy(signed), torch.from_numpy(d.astype(np.float32))))
    module.offset.edgeq_float_reason = (f"float: the per-group offsets (m + 8 d) of the source's affine 4-bit grid, exact; "
                                        f"1/{group} of the layer's multiply-adds")
    return module


@functools.cache
def source_grid_class():
    """SourceGridLinear (defined on first use: importing this module stays torch-free)."""
    return _module_class()


def _module_class():
    from torch import nn

    class SourceGridLinear(nn.Module):
        """y = grid(x) + offset(group sums of x): an affine 4-bit grid as symmetric codes plus float offsets."""

        def __init__(self, in_features: int, out_features: int, group: int, bias: bool):
            super().__init__()
            self.in_features, self.out_features, self.group = in_features, out_features, group
            self.grid = nn.Linear(in_features, out_features, bias=bias)
            self.offset = nn.Linear(in_features // group, out_features, bias=False)

        @property
        def weight(self):  # what code reading a projection's `.weight` (its dtype, its shape) sees: the real weight
            return self.grid.weight + self.offset.weight.repeat_interleave(self.group, dim=1)

        @property
        def bias(self):
            return self.grid.bias

        def forward(self, x):
            sums = x.unflatten(-1, (self.in_features // self.group, self.group)).sum(-1)
            return self.grid(x) + self.offset(sums)

    return SourceGridLinear


def split_source_grids(model, group: int = GROUP) -> list[str]:
    """Replace, in place, every nn.Linear of `model` whose weight is exactly on an affine 4-bit grid per `group`
    inputs by a SourceGridLinear; returns their names. Tied or shared weights are left alone."""
    import torch
    from torch import nn

    shared = _shared_weights(model)
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or id(child.weight) in shared:
                continue
            found = find_affine_grid(child.weight.detach().float().numpy(), group)
            if found is None:
                continue
            with torch.no_grad():
                setattr(module, child_name, source_grid_module(child, found, group))
            replaced.append(f"{name}.{child_name}" if name else child_name)
    return replaced


def _shared_weights(model) -> set[int]:
    seen, shared = set(), set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or not hasattr(weight, "data_ptr"):
            continue
        if id(weight) in seen:
            shared.add(id(weight))
        seen.add(id(weight))
    return shared


def source_codes(layer):
    """The (signed codes int8 [N, K], scale [N, G]) a SourceGridLinear's .grid carries, or None."""
    return getattr(layer, SOURCE_CODES, None)
