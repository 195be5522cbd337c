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


def _blob_file(folder: Path, payload: bytes, blob_dtype: int, padding_bits: int) -> int:
    """A weight.bin with one blob laid out as coremltools' blob writer lays it out; returns the blob's offset."""
    header = np.zeros(64, np.uint8)
    header[:8] = np.frombuffer(np.array([1, 2], "<u4").tobytes(), np.uint8)  # count, version 2
    meta = np.zeros(64, np.uint8)
    meta[:8] = np.frombuffer(np.array([0xDEADBEEF, blob_dtype], "<u4").tobytes(), np.uint8)
    meta[8:32] = np.frombuffer(np.array([len(payload), 128, padding_bits], "<u8").tobytes(), np.uint8)
    (folder / "weight.bin").write_bytes(header.tobytes() + meta.tobytes() + payload)
    return 64


def test_sub_byte_blob_is_read_and_its_header_checked(tmp_path):
    from edgeq.validate.mil.program import _Blobs

    values = [3, 0, 15, 7, 9]  # uint4: 20 bits in 3 bytes, 4 padding bits
    offset = _blob_file(tmp_path, pack(values, 4), blob_dtype=11, padding_bits=4)
    np.testing.assert_array_equal(_Blobs(tmp_path).read("@model_path/weights/weight.bin", offset, ValueType("uint4", (5,))), values)
    with pytest.raises(MILError, match=r"stored as blob dtype 11; the program declares int4 \(blob dtype 8\)"):
        _Blobs(tmp_path).read("weight.bin", offset, ValueType("int4", (5,)))
    offset = _blob_file(tmp_path, pack(values, 4), blob_dtype=11, padding_bits=0)
    with pytest.raises(MILError, match=r"holds 3 bytes with 0 padding bits; uint4\[5\] packs into 20 bits"):
        _Blobs(tmp_path).read("weight.bin", offset, ValueType("uint4", (5,)))


@COREML
def test_an_unreadable_dtype_names_its_op():
    """A value typed in a dtype the reader does not know (fp8 here) fails with the op's type and name."""
    from coremltools.proto import MIL_pb2

    from edgeq.validate.mil.program import _op

    spec = MIL_pb2.Operation(type="constexpr_blockwise_shift_scale")
    spec.attributes["name"].type.tensorType.dataType = MIL_pb2.STRING
    spec.attributes["name"].immediateValue.tensor.strings.values.append("the_weight")
    data = spec.inputs["data"].arguments.add().value
    data.type.tensorType.dataType = MIL_pb2.FLOAT8E4M3FN
    data.type.tensorType.rank = 1
    data.type.tensorType.dimensions.add().constant.size = 2
    data.immediateValue.tensor.bytes.values = bytes(2)
    with pytest.raises(MILError, match=r"MIL op 'constexpr_blockwise_shift_scale' \(named 'the_weight'\): MIL dtype FLOAT8E4M3FN is not supported"):
        _op(spec, None)


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


# ---- real artifacts: coremltools.optimize.coreml, decompressed by coremltools and by edgeq -----------------


class TwoLinear(torch.nn.Module):
    """K = 64 and 96: multiples of the block size 32; distinct weight shapes tell the layers apart."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(64, 96)
        self.second = torch.nn.Linear(96, 32)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def _module() -> TwoLinear:
    torch.manual_seed(0)
    return TwoLinear().eval()


@pytest.fixture(scope="module")
def base_models():
    """The MLP converted once per precision (iOS18: sub-byte types, per-block scales and grouped palettes)."""
    import coremltools as ct

    from edgeq.converters.tracing import quiet

    module = _module()
    program = torch.export.export(module, (torch.randn(16, 64),), strict=False).run_decompositions({})
    models = {}
    for precision, compute, target in (("fp32", ct.precision.FLOAT32, ct.target.iOS18), ("fp16", ct.precision.FLOAT16, ct.target.iOS18),
                                       ("fp16_ios16", ct.precision.FLOAT16, ct.target.iOS16)):
        with quiet():
            models[precision] = ct.convert(program, convert_to="mlprogram", compute_precision=compute, minimum_deployment_target=target)
    return models


def _quantize(dtype: str, mode: str, joint: bool = False, granularity: str = "per_block"):
    def compress(model):
        import coremltools.optimize.coreml as cto

        block = {"block_size": 32} if granularity == "per_block" else {}
        config = cto.OpLinearQuantizerConfig(mode=mode, dtype=dtype, granularity=granularity, **block)
        return cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=config), joint_compression=joint)

    return compress


def _palettize(nbits: int, granularity: str = "per_tensor", joint: bool = False, **options):
    def compress(model):
        import coremltools.optimize.coreml as cto

        config = cto.OpPalettizerConfig(mode="kmeans", nbits=nbits, granularity=granularity, **options)
        return cto.palettize_weights(model, cto.OptimizationConfig(global_config=config), joint_compression=joint)

    return compress


def _prune(model):
    import coremltools.optimize.coreml as cto

    config = cto.OpMagnitudePrunerConfig(target_sparsity=0.5)
    return cto.prune_weights(model, cto.OptimizationConfig(global_config=config))


def _then(*steps):
    def compress(model):
        for step in steps:
            model = step(model)
        return model

    return compress


# id -> (precision, compression, what the artifact must hold: op types, "op_type(parameter)", value dtypes)
ARTIFACTS = {
    "int4_block32_symmetric": ("fp32", _quantize("int4", "linear_symmetric"), {"constexpr_blockwise_shift_scale", "int4"}),
    "uint4_block32_asymmetric": ("fp32", _quantize("uint4", "linear"), {"constexpr_blockwise_shift_scale(offset)", "uint4"}),
    "int4_block32_symmetric_fp16": ("fp16", _quantize("int4", "linear_symmetric"), {"constexpr_blockwise_shift_scale", "int4"}),
    "uint4_block32_asymmetric_fp16": ("fp16", _quantize("uint4", "linear"), {"constexpr_blockwise_shift_scale(offset)", "uint4"}),
    **{f"lut{bits}_per_tensor": ("fp32", _palettize(bits), {"constexpr_lut_to_dense", f"uint{bits}"}) for bits in (2, 3, 4, 6, 8)},
    "lut4_grouped16": ("fp32", _palettize(4, "per_grouped_channel", group_size=16), {"constexpr_lut_to_dense", "uint4"}),
    "lut3_grouped16_fp16": ("fp16", _palettize(3, "per_grouped_channel", group_size=16), {"constexpr_lut_to_dense", "uint3"}),
    "lut2_grouped8_fp16": ("fp16", _palettize(2, "per_grouped_channel", group_size=8), {"constexpr_lut_to_dense", "uint2"}),
    "lut6_per_tensor_fp16": ("fp16", _palettize(6), {"constexpr_lut_to_dense", "uint6"}),
    "lut2_vector2": ("fp32", _palettize(2, cluster_dim=2), {"constexpr_lut_to_dense(vector_axis)", "uint2"}),
    "lut4_per_channel_scale_fp16": ("fp16", _palettize(4, enable_per_channel_scale=True),
                                    {"constexpr_lut_to_dense", "constexpr_blockwise_shift_scale", "uint4"}),
    "lut4_int8_table_fp16": ("fp16", _then(_palettize(4, "per_grouped_channel", group_size=16), _quantize("int8", "linear_symmetric", joint=True, granularity="per_tensor")),
                             {"constexpr_lut_to_dense", "constexpr_blockwise_shift_scale", "uint4", "int8"}),
    # iOS16 spellings: one table per tensor, indices packed in a flat uint8 vector; a packed uint8 bit mask
    "lut4_ios16_fp16": ("fp16_ios16", _palettize(4), {"constexpr_lut_to_dense(shape)"}),
    "sparse_ios16_fp16": ("fp16_ios16", _prune, {"constexpr_sparse_to_dense(shape)"}),
    "sparse_fp16": ("fp16", _prune, {"constexpr_sparse_to_dense", "uint1"}),
    "sparse_lut4_fp16": ("fp16", _then(_prune, _palettize(4, joint=True)), {"constexpr_lut_to_sparse", "constexpr_sparse_to_dense", "uint4"}),
    "sparse_int4_fp16": ("fp16", _then(_prune, _quantize("int4", "linear_symmetric", joint=True)),
                         {"constexpr_sparse_blockwise_shift_scale", "constexpr_sparse_to_dense", "int4"}),
}
FLOOR_DB = {"fp32": 120.0, "fp16": 55.0}
CEILING_DB = {"fp32": float("inf"), "fp16": 85.0}


def _coremltools_decompression(path) -> dict[str, np.ndarray]:
    """{constexpr output name: value} as coremltools decompresses the saved package: its own milproto reader and
    blob reader, then its WeightDecompressor pass (what `decompress_weights` applies), op by op in order."""
    from coremltools.optimize.coreml._quantization_passes import WeightDecompressor

    from edgeq.converters.parity_coreml import load_program, operations

    program = load_program(path)
    names = [var.name for op in operations(program) if op.op_type.startswith("constexpr_") for var in op.outputs]
    WeightDecompressor(op_selector=lambda op: True).apply(program)
    consts = {op.outputs[0].name: op.outputs[0].val for op in operations(program) if op.op_type == "const"}
    return {name: np.asarray(consts[name]) for name in names}


def _sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    reference, candidate = reference.astype(np.float64), candidate.astype(np.float64)
    noise = np.sum((reference - candidate) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(reference**2) / noise))


@COREML
@pytest.mark.parametrize("case", list(ARTIFACTS))
def test_low_bit_artifact(case, base_models, tmp_path):
    """The executor's decompressed weights are coremltools' bit for bit, and the model's output is PyTorch's
    with those weights."""
    from edgeq.converters.tracing import quiet

    precision, compress, expected = ARTIFACTS[case]
    path = tmp_path / "model.mlpackage"
    with quiet():
        compress(base_models[precision]).save(str(path))
    executor = MILExecutor(path)
    operations = list(executor.program.operations())
    held = {op.type for op in operations} | {vtype.dtype for vtype in executor.types.values()}
    held |= {f"{op.type}({key})" for op in operations for key in [*op.inputs, *op.attributes]}
    held |= {b.vtype.dtype for op in operations for bound in op.inputs.values() for b in bound if isinstance(b, Const) and b.vtype}
    assert expected <= held, f"{case}: the artifact lacks {sorted(expected - held)}"

    reference = _coremltools_decompression(path)
    for name, value in reference.items():
        got = executor.constant(name)
        assert got.dtype.str == value.dtype.str and got.shape == value.shape, (name, got.dtype, value.dtype, got.shape, value.shape)
        np.testing.assert_array_equal(got, value, err_msg=f"{case}: {name}")

    module = _module()
    weights = {}
    for op in executor.function.ops:
        if op.type == "linear":
            (weight,) = op.inputs["weight"]
            weights[reference[weight].shape] = reference[weight]  # a KeyError here: a weight left uncompressed
    with torch.no_grad():
        for layer in (module.first, module.second):
            layer.weight.copy_(torch.from_numpy(weights[tuple(layer.weight.shape)].astype(np.float32)))
    x = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    (input_name, _), = executor.function.inputs
    got = executor.run({input_name: x})[executor.function.outputs[0]]
    with torch.no_grad():
        expected_out = module(torch.from_numpy(x)).numpy()
    sqnr = _sqnr_db(expected_out, got)
    print(f"{case}: {sqnr:.1f} dB against PyTorch with coremltools' decompressed weights")
    floor, ceiling = FLOOR_DB[precision[:4]], CEILING_DB[precision[:4]]
    assert floor <= sqnr <= ceiling, sqnr
