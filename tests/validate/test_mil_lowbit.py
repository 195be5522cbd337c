"""edgeq's MIL reference executor on low-bit Core ML weights: sub-byte storage and the decompression ops.

Two halves:
- the bit layout, from bytes built here (no coremltools): coremltools packs sub-byte values element after
  element, each least significant bit first, bytes filled from their least significant bit (an element may
  straddle two bytes); `pack` below is that rule written with Python integers, obviously and independently;
- real artifacts: a tiny two-layer MLP converted by coremltools (iOS18, fp32 and fp16), compressed with
  `coremltools.optimize.coreml` (int4/uint4 per block of 32, k-means palettes at 2/3/4/6/8 bits per tensor and
  per grouped channel, vector palettes, per-channel-scaled palettes, an int8 LUT, sparse and joint forms)
  and saved. Every constexpr output the executor materializes must equal coremltools' own decompression of the
  same package (its milproto reader + its WeightDecompressor pass, the code behind `decompress_weights`) bit
  for bit, and the model's output must match PyTorch run with those decompressed weights: > 120 dB on fp32
  programs, 55-85 dB on fp16 programs (the band of tests/validate/test_mil_executor.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeq.validate.mil import MILError, MILExecutor, UnsupportedOp
from edgeq.validate.mil.program import Const, Function, Op, Program, ValueType, unpack_bits
from tests.conftest import COREML

# ---- bit layout, from bytes built here ------------------------------------------------------------------


def pack(values, bits: int) -> bytes:
    """coremltools' packing written out: value k's bits at stream positions [k*bits, (k+1)*bits), LSB first;
    stream bit j is bit j % 8 of byte j // 8; two's complement for negative values; zero padding bits."""
    stream = 0
    for k, value in enumerate(values):
        stream |= (int(value) & ((1 << bits) - 1)) << (k * bits)
    return stream.to_bytes(-(-len(values) * bits // 8), "little")


def test_documented_layouts():
    # coremltools' iOS16 constexpr_lut_to_dense docstring: n_bits 2, shape (5,): | 01 10 11 00 | xx xx xx 11 |
    got = unpack_bits(bytes([0b01_10_11_00, 0b000000_11]), ValueType("uint2", (5,)))
    np.testing.assert_array_equal(got, [0, 3, 2, 1, 3])
    assert got.dtype == np.uint8
    # int4 [-8, 7] is one byte, coremltools' test_sub_byte_immediate_value: low nibble first
    got = unpack_bits(bytes([0x78]), ValueType("int4", (2,)))
    np.testing.assert_array_equal(got, [-8, 7])
    assert got.dtype == np.int8
    # uint3 5, 2, 7 straddle the byte boundary: stream 101 010 11|1 -> 0b11010101, 0b00000001
    np.testing.assert_array_equal(unpack_bits(bytes([0b11010101, 0b1]), ValueType("uint3", (3,))), [5, 2, 7])
    # uint6 63, 1: 111111 10|0000 -> 0b01111111, 0b00000000
    np.testing.assert_array_equal(unpack_bits(bytes([0b01111111, 0]), ValueType("uint6", (2,))), [63, 1])


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_unpack_inverts_pack(data):
    dtype = data.draw(st.sampled_from(["int4", "uint1", "uint2", "uint3", "uint4", "uint6"]))
    low, high = ValueType(dtype, ()).value_range()
    values = data.draw(st.lists(st.integers(low, high), min_size=1, max_size=40))
    got = unpack_bits(pack(values, ValueType(dtype, ()).bits), ValueType(dtype, (len(values),)))
    np.testing.assert_array_equal(got, values)


def test_wrong_byte_count_is_refused():
    with pytest.raises(MILError, match="holds 3 bytes; 5 uint3 values pack into 2"):
        unpack_bits(bytes(3), ValueType("uint3", (5,)))  # 15 bits: 2 bytes, not 3
    with pytest.raises(MILError, match="holds 1 bytes; 3 uint4 values pack into 2"):
        unpack_bits(bytes(1), ValueType("uint4", (3,)))


# ---- the ops on programs built in memory -------------------------------------------------------------------


def _program(ops: list[Op], outputs: list[str]) -> Program:
    return Program(Path("in-memory.mlpackage"), {"main": Function("main", "CoreML8", [], ops, outputs)})


def _const(value, dtype: str | None = None) -> list:
    value = np.asarray(value)
    return [Const(value, ValueType(dtype, value.shape) if dtype else None)]


def test_lut_indices_must_match_the_table_size():
    """A uint4 index tensor with a 4-entry table is not a valid program (coremltools requires uint2)."""
    op = Op("constexpr_lut_to_dense", "the_lut", {"indices": _const(np.zeros((4, 2), np.uint8), "uint4"),
                                                  "lut": _const(np.zeros((1, 1, 4, 1), np.float32))},
            {}, [("w", ValueType("float32", (4, 2)))])
    with pytest.raises(MILError, match=r"'constexpr_lut_to_dense' \(named 'the_lut'\): indices is uint4; .* needs uint2"):
        MILExecutor(_program([op], ["w"]))


def test_sub_byte_results_must_fit_their_width():
    """An op whose result is typed uint1 (a sparsity mask) cannot hold a 2."""
    mask = np.array([[1, 0], [2, 1]], np.uint8)
    op = Op("constexpr_lut_to_sparse", "joint", {"indices_mask": _const(mask), "indices_nonzero_data": _const(np.zeros(3, np.uint8)),
                                                 "lut": _const(np.zeros((1, 1, 2, 1), np.float32))},
            {}, [("m", ValueType("uint1", (2, 2))), ("v", ValueType("float32", (3,)))])
    with pytest.raises(MILError, match=r"'constexpr_lut_to_sparse' \(named 'joint'\) outside uint1's range \[0, 1\]"):
        MILExecutor(_program([op], ["v"]))


def test_unimplemented_constexpr_is_named():
    op = Op("constexpr_cast", "the_cast", {"source_val": _const(np.ones(3, np.float16))}, {}, [("w", ValueType("float32", (3,)))])
    with pytest.raises(UnsupportedOp, match=r"MIL op 'constexpr_cast' \(named 'the_cast'\) is not supported"):
        MILExecutor(_program([op], ["w"]))


@COREML
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_lookup_matches_coremltools_lut_to_dense(data):
    """Per-block and vector look-ups against coremltools' numpy reference (optimize._utils.lut_to_dense)."""
    from coremltools.optimize._utils import lut_to_dense

    rank = data.draw(st.integers(1, 3))
    blocks = data.draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    per_block = data.draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    bits = data.draw(st.sampled_from([1, 2, 3, 4]))
    vector = data.draw(st.sampled_from([1, 1, 2, 3]))
    axis = data.draw(st.integers(-rank, rank - 1))
    shape = tuple(b * p for b, p in zip(blocks, per_block))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    indices = rng.integers(0, 2**bits, shape).astype(np.uint8)
    lut = rng.standard_normal((*blocks, 2**bits, vector)).astype(np.float16)
    params = {"indices": _const(indices, f"uint{bits}"), "lut": _const(lut, "float16")}
    if vector > 1:
        params["vector_axis"] = _const(np.int32(axis), "int32")
    out_shape = list(shape)
    out_shape[axis] *= vector
    op = Op("constexpr_lut_to_dense", "lut", params, {}, [("w", ValueType("float16", tuple(out_shape)))])
    got = MILExecutor(_program([op], ["w"])).constant("w")
    expected = lut_to_dense(indices, lut, axis if vector > 1 else None)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
