"""Turn a converter's exception into a ConversionError naming the op, the torch module (FQN) and the target."""

from __future__ import annotations

import re

import torch

from edgeq.errors import ConversionError

# How each toolchain names the op it choked on (first match wins).
_OP_PATTERNS = (
    r"Unsupported fx node (\w+)",  # coremltools
    r"convert function for op '([\w.]+)' not implemented",  # coremltools
    r"[Uu]nsupported FX nodes?:?.*?'(?:aten::|aten\.)?([\w.]+)'",  # torch.onnx
    r"\b(?:aten|torch\.ops\.aten)[.:]+([a-zA-Z_]\w*)",  # generic torch op name in a message
    r"op ['`\"]?([\w.]+)['`\"]? (?:is )?not supported",
    r"^(\w+) op: ",  # coremltools op-converter refusals ("prelu op: rank 3 ...")
)


def find_op(message: str) -> str | None:
    for pattern in _OP_PATTERNS:
        match = re.search(pattern, message)
        if match:
            return match.group(1).split(".")[0]
    return None


def locate_op(module: torch.nn.Module, example_inputs: tuple, op: str) -> str | None:
    """The FQN of the first module whose exported graph calls `op` (None when it cannot be told)."""
    try:
        program = torch.export.export(module, example_inputs, strict=False)
    except Exception:
        return None
    for node in program.graph.nodes:
        # The failing graph may be decomposed further (`_linalg_det` for `linalg_det`): match the bare name.
        if node.op != "call_function" or op.strip("_") not in str(node.target):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path, _kind = list(stack.values())[-1]
            fqn = re.sub(r"^L\['self'\]\.?", "", str(path))
            return re.sub(r"^inner(\.|$)", "", fqn) or None  # edgeq's FlatModel wrapper is not the user's
    return None


def _root_message(exc: BaseException) -> str:
    """The innermost cause says what broke; outer layers (e.g. torch.onnx's 'step 1/3') only say where."""
    while (exc.__cause__ or exc.__context__) is not None and not find_op(str(exc)):
        exc = exc.__cause__ or exc.__context__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # drop terminal colour codes
    return text or type(exc).__name__


def explain_failure(
    target: str, exc: BaseException, module: torch.nn.Module, example_inputs: tuple, op: str | None = None
) -> ConversionError:
    """A ConversionError with the op, the module FQN and the target, instead of a raw traceback. `op`: the op
    the toolchain was converting when it failed, where it said so apart from the message."""
    text = _root_message(exc)
    op = find_op(text) or op
    where = ""
    if op:
        fqn = locate_op(module, example_inputs, op)
        where = f" at op {op!r}" + (f" in module {fqn!r}" if fqn else "")
    first_line = next((line for line in text.splitlines() if line.strip()), text)
    return ConversionError(
        f"target {target}: conversion failed{where}: {first_line[:400]}. "
        "Replace or wrap that module with supported ops, or convert to another target."
    )
