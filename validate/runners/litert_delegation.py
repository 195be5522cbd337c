"""Which ops of a `.tflite` model LiteRT hands to a delegate (XNNPACK, its default CPU delegate).

Why it matters: a low-bit FULLY_CONNECTED (blockwise INT4 weights) that XNNPACK does not take runs in LiteRT's
builtin kernel, a scalar reference loop measured ~1,000x slower than XNNPACK's qb4w kernel here
(docs: shared/research/lowbit-prune-peers.md §3.2), so such an artifact is unusable and must fail.

LiteRT's Python API has no execution plan. After the delegate is applied, `_get_ops_details()` still lists
every original node, followed by one DELEGATE node per partition the delegate took, whose inputs are the
tensors the partition reads from outside (graph inputs, constants, outputs of ops left to the builtin
kernels) and whose outputs are the tensors read after it. A partition's nodes are therefore exactly those met
walking back from its outputs through their producers until a tensor the partition reads from outside.
Imports numpy and the LiteRT interpreter only (runs on a device image).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DELEGATE = "DELEGATE"


@dataclass(frozen=True)
class OpPlacement:
    index: int  # node index: the operator's position in subgraph 0 of the flatbuffer
    op_name: str
    delegated: bool


def op_placements(interpreter) -> list[OpPlacement]:
    """Every original node of subgraph 0 and whether a delegate partition took it (allocated interpreter)."""
    ops = interpreter._get_ops_details()
    original = [op for op in ops if op["op_name"] != DELEGATE]
    producers = {int(t): int(op["index"]) for op in original for t in op["outputs"] if t >= 0}
    by_index = {int(op["index"]): op for op in original}
    delegated: set[int] = set()
    for partition in (op for op in ops if op["op_name"] == DELEGATE):
        outside = {int(t) for t in partition["inputs"] if t >= 0}
        pending = [int(t) for t in partition["outputs"] if t >= 0]
        while pending:
            tensor = pending.pop()
            node = producers.get(tensor)
            if tensor in outside or node is None or node in delegated:
                continue
            delegated.add(node)
            pending.extend(int(t) for t in by_index[node]["inputs"] if t >= 0)
    return [OpPlacement(int(op["index"]), op["op_name"], int(op["index"]) in delegated) for op in original]


def undelegated_ops(model: Path | bytes, op_indices: list[int], threads: int = 1) -> list[OpPlacement]:
    """The ops among `op_indices` (subgraph-0 operator positions) that LiteRT's default delegate does not take
    when it loads `model` (a path or the flatbuffer bytes). Raises RuntimeError if LiteRT cannot load it."""
    from edgeq.validate.runners.litert import load_interpreter_class

    interpreter_class, _ = load_interpreter_class()
    source = {"model_path": str(model)} if isinstance(model, (str, Path)) else {"model_content": bytes(model)}
    try:
        interpreter = interpreter_class(num_threads=threads, **source)
        interpreter.allocate_tensors()
    except Exception as exc:  # e.g. XNNPACK refusing a tensor type fails the whole interpreter
        raise RuntimeError(f"LiteRT could not load the model with its default delegate: {exc}") from exc
    if not hasattr(interpreter, "_get_ops_details"):
        raise RuntimeError("this TFLite runtime does not list its ops (_get_ops_details): delegation cannot be checked")
    placements = {p.index: p for p in op_placements(interpreter)}
    return [placements[i] for i in op_indices if i in placements and not placements[i].delegated]
