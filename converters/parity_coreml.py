"""Core ML weight parity: the int8 codes and scales an .mlpackage stores, keyed by torch FQN (no macOS needed).

Core ML names ops only with [A-Za-z0-9_] (coremltools' `sanitize_name_strings` pass), and its torch frontend
names a weight's constexpr op after the torch.export node, not the module (`dequantize_per_channel_3`).
So the converter names each quantized node itself (`mil_name`) in a reversible spelling of the module's
FQN, and this reader decodes it (`fqn_of`):

    edgeq_ + FQN with "." -> "__", "_" -> "_u", any other character -> "_x" + 6 hex digits

e.g. `encoder.layer.0.attention.self.query.weight` -> `edgeq_encoder__layer__0__attention__self__query__weight`.
Decoding stops at the first "_" followed by anything else: that is the suffix coremltools appends
(`_cast_fp16`, `_quantized_data_0`) or the converter's own (`_2` for the second use of a shared weight).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.converters.parity import StoredWeights

PREFIX = "edgeq_"
_WEIGHT_OPS = ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale", "constexpr_lut_to_dense",
               "constexpr_sparse_blockwise_shift_scale")


def mil_name(fqn: str, suffix: str = "") -> str:
    """The MIL name for the node of module `fqn`; `suffix` must start with "_" and a letter or digit other than u/x."""
    out = []
    for char in fqn:
        if char == ".":
            out.append("__")
        elif char == "_":
            out.append("_u")
        elif char.isascii() and char.isalnum():
            out.append(char)
        else:
            out.append(f"_x{ord(char):06x}")
    return PREFIX + "".join(out) + suffix


def fqn_of(name: str) -> tuple[str, str] | None:
    """(FQN, rest of the name) for a name written by `mil_name` (plus any suffix); None for other names."""
    if not name.startswith(PREFIX):
        return None
    out, i = [], len(PREFIX)
    while i < len(name):
        char = name[i]
        if char != "_":
            out.append(char)
            i += 1
        elif name.startswith("__", i):
            out.append(".")
            i += 2
        elif name.startswith("_u", i):
            out.append("_")
            i += 2
        elif name.startswith("_x", i) and len(name) >= i + 8 and _is_hex(name[i + 2 : i + 8]):
            out.append(chr(int(name[i + 2 : i + 8], 16)))
            i += 8
        else:
            break
    return "".join(out), name[i:]


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def load_program(path: Path):
    """The saved package's MIL program as coremltools' Python MIL objects (ops linked to their producers and
    users, for tests that inspect the graph's structure). Weight parity and the MIL reference executor read
    the stored program with `edgeq.validate.mil.read_program` instead."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    from edgeq.converters.tracing import quiet

    with quiet():
        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
        return milproto_load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)


def operations(program):
    """Every op of every function, nested blocks included."""
    pending = [function for function in program.functions.values()]
    while pending:
        block = pending.pop()
        for op in block.operations:
            yield op
            pending.extend(op.blocks)


def coreml_weights(path: Path) -> StoredWeights:
    """{user FQN: (codes, scale)} of every weight constexpr op that edgeq named, in the plan's form, and the
    zero points of the affine ones.

    Read with `edgeq.validate.mil.read_program`, the stored program as the MIL reference executor runs it
    (the same bytes it dequantizes; sub-byte data unpacked to one value per int8/uint8):
    - constexpr_affine_dequantize (iOS16/17, int8): quantized_data, zero_point, scale, axis;
    - constexpr_blockwise_shift_scale (iOS18; int8, or int4/uint4 for low-bit codes, 2- and 3-bit codes in
      that container): data, scale (rank of data: [N, K/group], [N, 1] per channel), optional offset (zero
      points; none stored means 0);
    - constexpr_sparse_blockwise_shift_scale (iOS18, sparse int8/int4 codes, converters/coreml_sparse.py, named
      `<layer>.weight` + "_sparse"): data_mask, nonzero_data, scale, offset; the codes come back dense, each
      masked-out weight at its block's zero point (what the plan holds for a pruned weight);
    - constexpr_lut_to_dense (iOS18 palettes): (indices [N, K], lut [groups, 2^bits]) as the plan's
      (weight_codes, palette); a LUT with a vector dimension is returned as stored, so it shows as a mismatch.
    Codes come back in PyTorch layout (the converter keeps them so; a transposed store would show as a
    shape mismatch, not be hidden). `names` holds every op and value name, raw and decoded to FQN form,
    so a planned layer left float still counts as present.
    """
    from edgeq.validate.mil import read_program

    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    zero_points: dict[str, np.ndarray] = {}
    names: set[str] = set()
    for op in read_program(path).operations():
        for name in (op.name, *(name for name, _ in op.outputs)):
            names.add(name)
            decoded = fqn_of(name)
            if decoded is not None:
                names.add(decoded[0])
        decoded = fqn_of(op.name)
        if op.type not in _WEIGHT_OPS or decoded is None or not decoded[0].endswith(".weight"):
            continue
        fqn = decoded[0].removesuffix(".weight").removeprefix("inner.")
        if op.type == "constexpr_lut_to_dense":
            lut = np.asarray(op.constant("lut"), dtype=np.float32)
            if lut.ndim == 4 and lut.shape[1] == lut.shape[3] == 1:
                lut = lut.reshape(lut.shape[0], lut.shape[2])  # [groups, 1, 2^bits, 1] -> the plan's [groups, 2^bits]
            found[fqn] = (np.asarray(op.constant("indices")), lut)
            continue
        affine = op.type == "constexpr_affine_dequantize"
        scale = np.asarray(op.constant("scale"), dtype=np.float32)
        zero = op.constant("zero_point" if affine else "offset")
        if op.type == "constexpr_sparse_blockwise_shift_scale":
            codes = _dense_codes(np.asarray(op.constant("data_mask")), np.asarray(op.constant("nonzero_data")), zero)
        else:
            codes = np.asarray(op.constant("quantized_data" if affine else "data"))
        found[fqn] = (codes, scale)
        zero = np.zeros(scale.shape, np.int32) if zero is None else np.asarray(zero).astype(np.int32)
        zero_points[fqn] = np.broadcast_to(zero, scale.shape) if zero.size == 1 else zero  # one zero point for all
    return StoredWeights(found, names, zero_points)


def _dense_codes(mask: np.ndarray, nonzero: np.ndarray, offset) -> np.ndarray:
    """The dense codes of a sparse quantized weight: the stored non-zero codes where the mask is set, the zero
    point of each weight's block (offset repeated over blocks; none stored: 0) elsewhere."""
    codes = np.zeros(mask.shape, dtype=nonzero.dtype)
    if offset is not None:
        offset = np.asarray(offset).astype(nonzero.dtype)
        for axis, (size, blocks) in enumerate(zip(mask.shape, offset.shape)):
            offset = np.repeat(offset, size // blocks, axis=axis)
        codes[...] = offset
    codes[mask != 0] = nonzero
    return codes
