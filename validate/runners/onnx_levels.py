"""ONNX Runtime's `accuracy_level` of com.microsoft.MatMulNBits nodes: read it from an artifact, or run the same
bytes at another level.

A MatMulNBits node states the arithmetic ORT uses with its low-bit weights: 0 (unset) and 1 compute in fp32 (the
error is the weights' alone), 2 fp16, 3 bf16, 4 quantizes the activations to int8 per block at run time (the fast
CPU path, ~1e-2 relative error per layer measured here). The session option `session.qdq_matmulnbits_accuracy_level`
does not reach these nodes: it sets the level of MatMulNBits that ORT fuses from DequantizeLinear + MatMul
(measured with ORT 1.32: a level-4 node gave the same outputs with the option at 1 and at 4). So the level-1 run of
a deployed artifact is its own bytes with the nodes' attribute changed, parsed and serialized in memory: no second
file. Needs the `onnx` package (numpy + protobuf), which edgeq's ONNX converter needs anyway.
"""

from __future__ import annotations

from pathlib import Path

OP, DOMAIN, ATTRIBUTE = "MatMulNBits", "com.microsoft", "accuracy_level"
FLOAT_LEVELS = (0, 1)  # fp32 math: the plan's dequantized weights, to fp32 rounding
SESSION_BYTES_LIMIT = 2**31 - 1  # an InferenceSession made from bytes takes a protobuf under 2 GiB


def _nodes(proto):
    graphs = [proto.graph]
    while graphs:  # subgraphs (If / Loop bodies) hold nodes too
        graph = graphs.pop()
        for node in graph.node:
            if node.op_type == OP and node.domain == DOMAIN:
                yield node
            for attribute in node.attribute:
                graphs.extend([attribute.g] if attribute.HasField("g") else [])
                graphs.extend(attribute.graphs)


def _load(path: Path):
    import onnx

    return onnx.load(str(path))


def matmul_nbits_levels(path: Path) -> list[int]:
    """The distinct accuracy_level values of the artifact's MatMulNBits nodes (0 where unset); [] without any."""
    levels = set()
    for node in _nodes(_load(path)):
        levels.add(next((int(a.i) for a in node.attribute if a.name == ATTRIBUTE), 0))
    return sorted(levels)


def at_accuracy_level(path: Path, level: int) -> bytes:
    """The artifact's bytes with every MatMulNBits node at `level` (everything else as stored)."""
    from onnx import helper

    proto = _load(path)
    for node in _nodes(proto):
        kept = [a for a in node.attribute if a.name != ATTRIBUTE]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute(ATTRIBUTE, int(level))])
    if proto.ByteSize() > SESSION_BYTES_LIMIT:
        raise ValueError(f"{path.name} is over 2 GiB: it cannot be run at another accuracy_level from memory")
    return proto.SerializeToString()
