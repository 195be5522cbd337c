"""Which ops of each signature of a multi-signature `.tflite` (a decoder's "prefill" and "decode") XNNPACK takes.

validate/runners/litert_delegation.py reads placements through `_get_ops_details()`, which lists subgraph 0 only.
Each signature here is its own subgraph, so each is checked in a copy of the model that holds that subgraph
alone (same buffers, same ops, op positions unchanged), loaded with LiteRT's default delegate.
Imports numpy and LiteRT only (runs on a device image).
"""

from __future__ import annotations

from pathlib import Path


def single_signature(flatbuffer: bytes, signature: str) -> bytes:
    """A copy of the model whose only subgraph (and signature) is `signature`'s."""
    import copy

    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = schema.ModelT.InitFromPackedBuf(bytearray(flatbuffer), 0)
    definitions = [d for d in model.signatureDefs if d.signatureKey.decode() == signature]
    if not definitions:
        raise KeyError(f"no signature {signature!r}")
    definition = copy.copy(definitions[0])
    model.subgraphs = [model.subgraphs[definition.subgraphIndex]]
    definition.subgraphIndex = 0
    model.signatureDefs = [definition]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def placements_by_signature(model: Path | bytes, threads: int = 1) -> dict[str, list]:
    """signature -> litert_delegation.OpPlacement of every op of its subgraph under the default delegate."""
    from edgeq.validate.runners.litert import load_interpreter_class
    from edgeq.validate.runners.litert_delegation import op_placements

    flatbuffer = Path(model).read_bytes() if isinstance(model, (str, Path)) else bytes(model)
    interpreter_class, _ = load_interpreter_class()
    signatures = list(interpreter_class(model_content=flatbuffer).get_signature_list())
    result = {}
    for signature in signatures:
        try:
            interpreter = interpreter_class(model_content=single_signature(flatbuffer, signature), num_threads=threads)
            interpreter.allocate_tensors()
        except Exception as exc:
            raise RuntimeError(f"LiteRT could not load signature {signature!r} with its default delegate: {exc}") from exc
        result[signature] = op_placements(interpreter)
    return result


def undelegated_by_signature(model: Path | bytes, ops: dict[str, set[int]], threads: int = 1) -> dict[str, list]:
    """signature -> the ops among `ops[signature]` (op positions in that signature's subgraph) the delegate left."""
    placed = placements_by_signature(model, threads)
    return {sig: [p for p in placed.get(sig, []) if p.index in wanted and not p.delegated] for sig, wanted in ops.items()}
