"""Exact fixes to an exported program's graph for coremltools' torch frontend (measured with coremltools 9.0).

Each fix rewrites nodes the frontend refuses into the same computation spelled the way it takes, and names
itself in the artifact's rewrites; validation proves the artifact afterwards. Found by the model zoo:
- `alias` (torch.export keeps it where a model returns or reuses a view, e.g. GPT-2 and Llama attention
  masks): the frontend has no converter; an alias has its input's values, so its uses read the input.
- `max_pool*d` called without a stride (F.max_pool2d(x, 2)): torch's default stride is the kernel size, but
  the frontend requires the argument ("got 2 input(s), expected minimum 3 inputs").
- `affine_grid_generator` (F.affine_grid, spatial transformers): the frontend fuses it with the grid_sample
  that reads it into MIL `affine` through a TorchScript-only path that fails on an exported program ("Torch
  var 0 not found in context"); decomposed first (torch's own decomposition), grid_sample becomes `resample`.
"""

from __future__ import annotations

import torch

_POOLS = {"max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices"}


def decompositions() -> dict:
    """The decomposition table for the first conversion attempt: torch's own decompositions of the ops the
    frontend mis-converts, nothing else (the rest stays high-level for Core ML's fused ops)."""
    table = torch.export.default_decompositions()
    return {op: table[op] for op in (torch.ops.aten.affine_grid_generator.default,) if op in table}


def decomposed(program: torch.export.ExportedProgram) -> list[str]:
    """The rewrite lines for the ops of `decompositions()` that `program` (before decomposing) calls."""
    names = {_op_name(node) for node in program.graph.nodes if node.op == "call_function"}
    return [f"coreml-decomposed: {_op_name(op)}" for op in decompositions() if _op_name(op) in names]


def _op_name(node_or_op) -> str:
    """`affine_grid_generator` for an fx node calling aten.affine_grid_generator.default, or for that op itself."""
    target = getattr(node_or_op, "target", node_or_op)
    return getattr(target, "__name__", str(target)).split(".")[0]


def fix_graph(program: torch.export.ExportedProgram) -> list[str]:
    """Apply every fix to `program` in place; returns one line per fix applied, with how many nodes."""
    graph = program.graph
    applied = []
    aliases = [n for n in graph.nodes if n.op == "call_function" and _op_name(n) == "alias"]
    for node in aliases:
        source = node.args[0]
        for spec in program.graph_signature.output_specs:  # an output read through the alias keeps its name
            if getattr(spec.arg, "name", None) == node.name and source.op == "call_function":
                spec.arg.name = source.name
        node.replace_all_uses_with(source)
        graph.erase_node(node)
    if aliases:
        applied.append(f"coreml-alias-to-input: {len(aliases)} node(s)")
    pools = 0
    for node in graph.nodes:
        if node.op != "call_function" or _op_name(node) not in _POOLS:
            continue
        args = list(node.args)
        stride = args[2] if len(args) > 2 else node.kwargs.get("stride")
        if not stride:  # absent or []: torch pools with stride = kernel size
            node.args = (args[0], args[1], list(args[1]), *args[3:])
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "stride"}
            pools += 1
    if pools:
        applied.append(f"coreml-pool-default-stride: {pools} node(s)")
    if applied:
        program.graph_module.recompile()
    return applied
