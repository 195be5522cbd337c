"""Read an .mlpackage's ML program (MIL) as it is stored: the protobuf program and its weight blob file.

Nothing is inferred: each value has the dtype and shape the program declares, constants come from the
protobuf or from `weights/weight.bin`, and no op is folded or rewritten. The protobuf classes come from
coremltools (`coremltools.proto`), imported only when a package is read; the blob file is parsed here with
numpy (MIL blob storage, version 2):

    file header (64 bytes): uint32 count, uint32 version (= 2), padding
    per blob, at the offset the program names (64 bytes): uint32 sentinel 0xDEADBEEF, uint32 dtype,
        uint64 size in bytes, uint64 offset of the data, uint64 padding bits (sub-byte types), reserved
    the data: `size` bytes at `offset`, in the dtype the program declares for the value

Sub-byte types (int4, uint1..uint6) are refused with the value named: edgeq's converters do not emit them.
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
_SENTINEL = 0xDEADBEEF


@dataclass(frozen=True)
class ValueType:
    """A tensor type as declared: dtype name ('float16', 'int32', 'bool', 'string', ...) and shape (None: unknown)."""

    dtype: str
    shape: tuple[int | None, ...] | None  # () for scalars; None for an unknown rank

    @property
    def numpy(self):
        return str if self.dtype == "string" else np.dtype(self.dtype)


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
    attributes = {}
    name = None
    for key, value in spec.attributes.items():
        decoded = _value(value, blobs)
        if key == "name":
            name = decoded
        else:
            attributes[key] = decoded
    inputs = {}
    for key, argument in spec.inputs.items():
        bound = []
        for binding in argument.arguments:
            if binding.WhichOneof("binding") == "name":
                bound.append(binding.name)
            else:
                bound.append(Const(_value(binding.value, blobs)))
        inputs[key] = bound
    outputs = [(o.name, _value_type(o.type)) for o in spec.outputs]
    blocks = [
        Block([(i.name, _value_type(i.type)) for i in b.inputs], [_op(o, blobs) for o in b.operations], list(b.outputs))
        for b in spec.blocks
    ]
    return Op(spec.type, name or (outputs[0][0] if outputs else spec.type), inputs, attributes, outputs, blocks)


class Const:
    """An input bound to an immediate value rather than to a named value."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _value_type(spec) -> ValueType:
    kind = spec.WhichOneof("type")
    if kind != "tensorType":
        raise MILError(f"MIL value type {kind!r} is not supported (only tensors and scalars)")
    tensor = spec.tensorType
    from coremltools.proto import MIL_pb2

    dtype_name = MIL_pb2.DataType.Name(tensor.dataType)
    if dtype_name not in DTYPES:
        raise MILError(f"MIL dtype {dtype_name} is not supported by edgeq's MIL reader")
    dtype = "string" if dtype_name == "STRING" else np.dtype(DTYPES[dtype_name]).name
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
        dtype = np.dtype(vtype.numpy).newbyteorder("<")
        count = int(np.prod(vtype.shape, dtype=np.int64))
        if size != count * dtype.itemsize:
            raise MILError(
                f"{path}: blob at offset {offset} holds {size} bytes; {vtype.dtype}{list(vtype.shape)} needs "
                f"{count * dtype.itemsize} (sub-byte types are not supported)"
            )
        return np.frombuffer(data[start : start + size].tobytes(), dtype=dtype).astype(vtype.numpy).reshape(vtype.shape)
