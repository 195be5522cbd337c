"""MatMulNBits packing (converters/onnx_lowbit.py's layout): a plan layer's codes, scales and zero points in the op's
byte form and back, exactly. The layout is documented in onnx_lowbit's module docstring."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeq.errors import ConversionError
from edgeq.plan import LayerPlan, QDtype


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """[rows, count] integers in [0, 2^bits) -> uint8 [rows, ceil(count * bits / 8)], first value in the low bits."""
    per_byte = 8 // bits
    rows, count = values.shape
    padded = np.zeros((rows, -(-count // per_byte) * per_byte), dtype=np.uint8)
    padded[:, :count] = values
    grouped = padded.reshape(rows, -1, per_byte).astype(np.uint16)
    shifts = np.arange(per_byte, dtype=np.uint16) * bits
    return np.bitwise_or.reduce(grouped << shifts, axis=2).astype(np.uint8)


def unpack_rows(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_rows: uint8 [rows, bytes] -> uint8 [rows, count]."""
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    values = (packed[:, :, None] >> shifts) & np.uint8(2**bits - 1)
    return values.reshape(packed.shape[0], -1)[:, :count]


@dataclass
class PackedWeight:
    layout: "NBitsLayout"  # onnx_lowbit.NBitsLayout
    b: np.ndarray  # uint8 [N, k_blocks, blob_size]
    scales: np.ndarray  # float32 [N * k_blocks]
    zero_points: np.ndarray | None  # uint8 [N * ceil(k_blocks * bits / 8)], None: all default


def pack_layer(layer: LayerPlan) -> PackedWeight:
    """The plan's codes, scales and zero points in MatMulNBits form, exactly (codes outside the dtype refused)."""
    from edgeq.converters.onnx_lowbit import layout_of

    found = layout_of(layer)
    if isinstance(found, str):
        raise ConversionError(f"{layer.fqn}: {found}")
    lay, quant, codes = found, layer.weight, layer.weight_codes
    if codes.min() < quant.dtype.qmin or codes.max() > quant.dtype.qmax:
        raise ConversionError(f"{layer.fqn}: weight codes outside the {quant.dtype} range [{quant.dtype.qmin}, {quant.dtype.qmax}]")
    scale = quant.scale.reshape(lay.n, lay.k_blocks).astype(np.float32)
    zero = quant.zero_point.reshape(lay.n, lay.k_blocks).astype(np.int64) + lay.offset
    stored = np.full((lay.n, lay.k_blocks * lay.block_size), 0, dtype=np.uint8)
    stored[:, : lay.k] = (codes.astype(np.int64) + lay.offset).astype(np.uint8)
    # padding (per-channel blocks past K) holds each row's zero point: it dequantizes to 0
    stored[:, lay.k :] = zero[:, :1].astype(np.uint8)
    blob = lay.block_size * lay.bits // 8
    b = pack_rows(stored, lay.bits).reshape(lay.n, lay.k_blocks, blob)
    zero_points = None
    if not quant.dtype.signed or np.any(zero != lay.default_zero):
        zero_points = pack_rows(zero.astype(np.uint8), lay.bits).reshape(-1)
    return PackedWeight(lay, b, scale.reshape(-1), zero_points)


def unpack_layer(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, block_size: int, n: int,
                 k: int, dtype: QDtype | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes [N, K], scale [N, k_blocks], zero point [N, k_blocks]) in the plan's form. `dtype` None (an
    artifact not written by edgeq): signed codes without zero points, unsigned with them."""
    k_blocks = -(-k // block_size)
    signed = (zero_points is None) if dtype is None else dtype.signed
    offset = 2 ** (bits - 1) if signed else 0
    stored = unpack_rows(np.asarray(b, dtype=np.uint8).reshape(n, -1), bits, k).astype(np.int32)
    if zero_points is None:
        zero = np.full((n, k_blocks), 2 ** (bits - 1), dtype=np.int32)
    else:
        zero = unpack_rows(np.asarray(zero_points, dtype=np.uint8).reshape(n, -1), bits, k_blocks).astype(np.int32)
    storage = np.int8 if signed else np.uint8
    return (stored - offset).astype(storage), np.asarray(scales, np.float32).reshape(n, k_blocks), zero - offset
