"""Read an .mlpackage's ML program (MIL) as it is stored: the protobuf program and its weight blob file.

Nothing is inferred: each value has the dtype and shape the program declares, constants come from the
protobuf or from `weights/weight.bin`, and no op is folded or rewritten. The protobuf classes come from
coremltools (`coremltools.proto`), imported only when a package is read; the blob file is parsed here with
numpy (MIL blob storage, version 2):

    file header (64 bytes): uint32 count, uint32 version (= 2), padding
    per blob, at the offset the program names (64 bytes): uint32 sentinel 0xDEADBEEF, uint32 dtype,
        uint64 size in bytes, uint64 offset of the data, uint64 padding bits (sub-byte types), reserved
    the data: `size` bytes at `offset`, in the dtype the program declares for the value

Sub-byte types (int4; uint1, uint2, uint3, uint4, uint6: low-bit weights, palette indices, sparsity masks) are
packed as coremltools packs them, in the blob file and in immediate values alike (`unpack_bits`): element after
element in row-major order, each element's bits least significant first, filling each byte from its least
significant bit up; an element may straddle two bytes; the last byte is padded with zero bits. A blob's header
then names the sub-byte dtype (blob dtype codes measured with coremltools 9's blob writer: int4 8, uint1 9,
uint2 10, uint4 11, uint3 12, uint6 13) and the padding bits, and both are checked. In memory, sub-byte values
are held unpacked, one per int8 (int4) or uint8 (uint1..uint6) element.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class MILError(Exception):
    """The MIL program cannot be read or executed; the message names the op, value or file."""


# MIL_pb2.DataType names -> numpy dtypes (STRING stays a Python str).
DTYPES = {
    "FLOAT16": np.float16, "FLOAT32": np.float32, "FLOAT64": np.float64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "BOOL": np.bool_, "STRING": str,
}
# MIL_pb2.DataType names of sub-byte types -> (dtype name, bits, signed); held unpacked in int8 / uint8
SUB_BYTE = {
    "INT4": ("int4", 4, True), "UINT1": ("uint1", 1, False), "UINT2": ("uint2", 2, False),
    "UINT3": ("uint3", 3, False), "UINT4": ("uint4", 4, False), "UINT6": ("uint6", 6, False),
}
_SUB_BYTE_BY_NAME = {name: (bits, signed) for name, bits, signed in SUB_BYTE.values()}
_BLOB_DTYPE_CODES = {"int4": 8, "uint1": 9, "uint2": 10, "uint4": 11, "uint3": 12, "uint6": 13}
_SENTINEL = 0xDEADBEEF


@dataclass(frozen=True)
class ValueType:
    """A tensor type as declared: dtype name ('float16', 'int32', 'bool', 'string', ...) and shape (None: unknown)."""

    dtype: str
    shape: tuple[int | None, ...] | None  # () for scalars; None for an unknown rank
    state: bool = False  # a function input of MIL type state<tensor> (iOS18 stateful models): the executor holds it

    @property
    def bits(self) -> int | None:
        """The width of a sub-byte dtype (int4: 4, uint3: 3, ...); None for whole-byte dtypes."""
        return _SUB_BYTE_BY_NAME[self.dtype][0] if self.dtype in _SUB_BYTE_BY_NAME else None

    @property
    def numpy(self):
        """The numpy dtype values are held in: a sub-byte dtype's container (int8 for int4, uint8 for uint1..6)."""
        if self.dtype == "string":
            return str
        if self.dtype in _SUB_BYTE_BY_NAME:
            return np.dtype(np.int8 if _SUB_BYTE_BY_NAME[self.dtype][1] else np.uint8)
        return np.dtype(self.dtype)

    def value_range(self) -> tuple[int, int] | None:
        """(lowest, highest) value of a sub-byte dtype: int4 -8..7, uintN 0..2^N-1; None for other dtypes."""
        if self.bits is None:
            return None
        signed = _SUB_BYTE_BY_NAME[self.dtype][1]
        return (-(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1) if signed else (0, (1 << self.bits) - 1)


@dataclass
class Op:
    """One MIL operation: inputs bind names of values or constants; outputs carry their declared types."""

    type: str
    name: str
    inputs: dict[str, list]  # parameter -> [str (the name of a value) | Const (an immediate value)], in order
    attributes: dict[str, object]  # constant attributes (`val` of const, constexpr parameters), `name` excluded
    outputs: list[tuple[str, ValueType]]
    blocks: list = field(default_factory=list)

    def constant(self, key: str, default=None):
        """A parameter that must be a constant: an attribute or an input bound to a value (not a name)."""
        if key in self.attributes:
            return self.attributes[key]
        bound = self.inputs.get(key)
        if bound and len(bound) == 1 and isinstance(bound[0], Const):
            return bound[0].value
        return default


@dataclass
class Function:
    name: str
    opset: str  # e.g. CoreML7 (iOS17)
    inputs: list[tuple[str, ValueType]]
    ops: list[Op]
    outputs: list[str]


@dataclass
class Program:
    path: Path
    functions: dict[str, Function]

    @property
    def main(self) -> Function:
        if "main" not in self.functions:
            raise MILError(f"{self.path}: the ML program has no 'main' function (it has {sorted(self.functions)})")
        return self.functions["main"]

    def operations(self):
        """Every op of every function, nested blocks included."""
        pending = [function.ops for function in self.functions.values()]
        while pending:
            for op in pending.pop():
                yield op
                pending.extend(block.ops for block in op.blocks)


@dataclass
class Block:
    inputs: list[tuple[str, ValueType]]
    ops: list[Op]
    outputs: list[str]


def read_program(path: Path) -> Program:
    """The package's ML program, every constant decoded (MLModel.predict is not needed, nor macOS)."""
    import coremltools as ct

    path = Path(path)
    try:
        spec = ct.utils.load_spec(str(path))
    except Exception as exc:
        raise MILError(f"coremltools could not read {path}: {exc}") from exc
    if spec.WhichOneof("Type") != "mlProgram":
        raise MILError(f"{path} is a {spec.WhichOneof('Type')} model, not an ML program (MIL)")
    blobs = _Blobs(path / "Data" / "com.apple.CoreML" / "weights")
    functions = {}
    for name, function in spec.mlProgram.functions.items():
        block = function.block_specializations[function.opset]
        functions[name] = Function(
            name,
            function.opset,
            [(i.name, _value_type(i.type)) for i in function.inputs],
            [_op(op, blobs) for op in block.operations],
            list(block.outputs),
        )
    return Program(path, functions)


def _op(spec, blobs: "_Blobs") -> Op:
    name = None
    if "name" in spec.attributes:
        value = spec.attributes["name"]
        if value.WhichOneof("value") == "immediateValue" and value.immediateValue.tensor.strings.values:
            name = value.immediateValue.tensor.strings.values[0]
    try:
        return _parse_op(spec, blobs, name)
    except MILError as exc:  # a value this reader cannot decode: say which op holds it
        raise MILError(f"MIL op {spec.type!r} (named {name!r}): {exc}") from exc


def _parse_op(spec, blobs: "_Blobs", name: str | None) -> Op:
    attributes = {}
    for key, value in spec.attributes.items():
        if key != "name":
            attributes[key] = _value(value, blobs)
    inputs = {}
    for key, argument in spec.inputs.items():
        bound = []
        for binding in argument.arguments:
            if binding.WhichOneof("binding") == "name":
                bound.append(binding.name)
            else:
                bound.append(Const(_value(binding.value, blobs), _value_type(binding.value.type)))
        inputs[key] = bound
    outputs = [(o.name, _value_type(o.type)) for o in spec.outputs]
    blocks = [
        Block([(i.name, _value_type(i.type)) for i in b.inputs], [_op(o, blobs) for o in b.operations], list(b.outputs))
        for b in spec.blocks
    ]
    return Op(spec.type, name or (outputs[0][0] if outputs else spec.type), inputs, attributes, outputs, blocks)


class Const:
    """An input bound to an immediate value rather than to a named value."""

    __slots__ = ("value", "vtype")

    def __init__(self, value, vtype: ValueType | None = None):
        self.value = value
        self.vtype = vtype  # as declared in the program; None for values built in memory without a type


def _value_type(spec) -> ValueType:
    kind = spec.WhichOneof("type")
    if kind == "stateType":  # state<tensor>: the wrapped tensor's type, marked (ops_state.py reads and writes it)
        wrapped = _value_type(spec.stateType.wrappedType)
        return ValueType(wrapped.dtype, wrapped.shape, state=True)
    if kind != "tensorType":
        raise MILError(f"MIL value type {kind!r} is not supported (only tensors and scalars)")
    tensor = spec.tensorType
    from coremltools.proto import MIL_pb2

    dtype_name = MIL_pb2.DataType.Name(tensor.dataType)
    if dtype_name in SUB_BYTE:
        dtype = SUB_BYTE[dtype_name][0]
    elif dtype_name in DTYPES:
        dtype = "string" if dtype_name == "STRING" else np.dtype(DTYPES[dtype_name]).name
    else:
        raise MILError(
            f"MIL dtype {dtype_name} is not supported by edgeq's MIL reader "
            f"(it reads {', '.join(sorted([*DTYPES, *SUB_BYTE]))})"
        )
    if tensor.rank < 0:
        return ValueType(dtype, None)
    shape = tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in tensor.dimensions)
    return ValueType(dtype, shape)


def _value(spec, blobs: "_Blobs"):
    """A constant as numpy (scalars as 0-d arrays), or a Python str for string scalars."""
    vtype = _value_type(spec.type)
    kind = spec.WhichOneof("value")
    if kind == "blobFileValue":
        return blobs.read(spec.blobFileValue.fileName, spec.blobFileValue.offset, vtype)
    if kind != "immediateValue" or spec.immediateValue.WhichOneof("value") != "tensor":
        raise MILError(f"MIL constant of kind {kind!r} is not supported")
    tensor = spec.immediateValue.tensor
    field_name = tensor.WhichOneof("value")
    shape = vtype.shape or ()
    if vtype.dtype == "string":
        values = list(tensor.strings.values)
        return values[0] if shape == () else np.array(values, dtype=object).reshape(shape)
    if field_name == "bytes" and vtype.bits is not None:  # sub-byte: packed as in the blob file
        return unpack_bits(tensor.bytes.values, vtype, "an immediate value").reshape(shape)
    if field_name == "bytes":  # fp16, int8, uint8, int16, uint16 are stored as raw little-endian bytes
        array = np.frombuffer(tensor.bytes.values, dtype=np.dtype(vtype.dtype).newbyteorder("<"))
    elif field_name is None:
        array = np.zeros(0, dtype=vtype.numpy)
    else:
        array = np.asarray(list(getattr(tensor, field_name).values)).astype(vtype.numpy)
    return array.astype(vtype.numpy).reshape(shape)


class _Blobs:
    """The package's weight files (normally one, weight.bin), mapped read-only."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, np.ndarray] = {}

    def read(self, file_name: str, offset: int, vtype: ValueType) -> np.ndarray:
        path = self.folder / file_name.split("/")[-1]  # "@model_path/weights/weight.bin"
        if path.name not in self.files:
            try:
                self.files[path.name] = np.memmap(path, dtype=np.uint8, mode="r")
            except OSError as exc:
                raise MILError(f"cannot read the weight file {path}: {exc}") from exc
        data = self.files[path.name]
        header = data[offset : offset + 32]
        if len(header) < 32:
            raise MILError(f"{path}: no blob at offset {offset}")
        sentinel, _dtype = np.frombuffer(header[:8].tobytes(), dtype="<u4")
        size, start = (int(x) for x in np.frombuffer(header[8:24].tobytes(), dtype="<u8"))
        if sentinel != _SENTINEL:
            raise MILError(f"{path}: blob at offset {offset} has no MIL blob sentinel")
        if vtype.shape is None or any(d is None for d in vtype.shape):
            raise MILError(f"{path}: blob at offset {offset} has no static shape")
        count = int(np.prod(vtype.shape, dtype=np.int64))
        if vtype.bits is not None:
            return self._read_sub_byte(path, offset, vtype, count, header, data[start : start + size])
        dtype = np.dtype(vtype.numpy).newbyteorder("<")
        if size != count * dtype.itemsize:
            raise MILError(
                f"{path}: blob at offset {offset} holds {size} bytes; {vtype.dtype}{list(vtype.shape)} needs "
                f"{count * dtype.itemsize}"
            )
        return np.frombuffer(data[start : start + size].tobytes(), dtype=dtype).astype(vtype.numpy).reshape(vtype.shape)

    @staticmethod
    def _read_sub_byte(path: Path, offset: int, vtype: ValueType, count: int, header, payload) -> np.ndarray:
        blob_dtype = int(np.frombuffer(header[4:8].tobytes(), dtype="<u4")[0])
        padding_bits = int(np.frombuffer(header[24:32].tobytes(), dtype="<u8")[0])
        if blob_dtype != _BLOB_DTYPE_CODES[vtype.dtype]:
            raise MILError(
                f"{path}: blob at offset {offset} is stored as blob dtype {blob_dtype}; the program declares "
                f"{vtype.dtype} (blob dtype {_BLOB_DTYPE_CODES[vtype.dtype]})"
            )
        if len(payload) * 8 - count * vtype.bits != padding_bits:
            raise MILError(
                f"{path}: blob at offset {offset} holds {len(payload)} bytes with {padding_bits} padding bits; "
                f"{vtype.dtype}{list(vtype.shape)} packs into {count * vtype.bits} bits"
            )
        return unpack_bits(payload.tobytes(), vtype, f"the blob at offset {offset} of {path}").reshape(vtype.shape)


def unpack_bits(packed: bytes, vtype: ValueType, where: str = "packed data") -> np.ndarray:
    """The flat values of a sub-byte `vtype` packed in `packed`, as coremltools packs them (its blob writer and
    `optimize._utils.pack_elements_into_bits`): element k occupies bits [k*bits, (k+1)*bits) of the byte stream,
    where bit j of the stream is bit (j % 8) of byte j // 8, least significant first; an element's own bits
    are in the same order (its least significant bit first). int4 is two's complement. The stream is
    exactly ceil(count * bits / 8) bytes.

    e.g. uint2 [0, 3, 2, 1, 3] -> bytes 0b01_10_11_00, 0b000000_11; int4 [-8, 7] -> 0x78.
    """
    bits = vtype.bits
    if bits is None or vtype.shape is None or any(d is None for d in vtype.shape):
        raise MILError(f"{where}: packed {vtype.dtype} values need a sub-byte dtype and a static shape, not {vtype.shape}")
    count = int(np.prod(vtype.shape, dtype=np.int64))
    raw = np.frombuffer(packed, dtype=np.uint8)
    if len(raw) != -(-count * bits // 8):
        raise MILError(
            f"{where} holds {len(raw)} bytes; {count} {vtype.dtype} values pack into {-(-count * bits // 8)}"
        )
    stream = np.unpackbits(raw, bitorder="little")[: count * bits].reshape(count, bits)
    values = stream.astype(np.int32) @ (np.int32(1) << np.arange(bits, dtype=np.int32))
    low, high = vtype.value_range()
    if low < 0:  # two's complement: the top bit weighs -2^(bits-1)
        values = np.where(values > high, values - (1 << bits), values)
    return values.astype(vtype.numpy)
