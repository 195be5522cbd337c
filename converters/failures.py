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


def locate_frame(exc: BaseException, module: torch.nn.Module) -> tuple[str | None, str | None]:
    """(FQN, 'Class.method (file:line)') of the innermost traceback frame running a method of one of `module`'s
    submodules: where the model's own Python code raised while it was traced (e.g. an attribute the
    quantized stand-in of a layer lacks). (None, None) when no frame belongs to the model."""
    names = {id(m): re.sub(r"^(flat\.)?inner\.?", "", fqn) for fqn, m in module.named_modules()}
    found, seen = (None, None), set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            owner = tb.tb_frame.f_locals.get("self")
            if owner is not None and id(owner) in names:
                code, file = tb.tb_frame.f_code, tb.tb_frame.f_code.co_filename.rsplit("/", 1)[-1]
                found = (names[id(owner)] or None, f"{type(owner).__name__}.{code.co_name} ({file}:{tb.tb_lineno})")
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    return found


def _innermost(exc: BaseException) -> BaseException:
    while (exc.__cause__ or exc.__context__) is not None and not find_op(str(exc)):
        exc = exc.__cause__ or exc.__context__
    return exc


def explain_failure(
    target: str, exc: BaseException, module: torch.nn.Module, example_inputs: tuple, op: str | None = None,
    traced: torch.nn.Module | None = None,
) -> ConversionError:
    """A ConversionError with the op, the module FQN and the target, instead of a raw traceback. `op`: the op
    the toolchain was converting when it failed, where it said so apart from the message. `traced`: the module
    the converter traced when it differs from `module` (quantized layers swapped in), searched for the frame
    of the model's Python code that raised when no op is named."""
    text = _root_message(exc)
    op = find_op(text) or op
    where = ""
    if op:
        fqn = locate_op(module, example_inputs, op)
        where = f" at op {op!r}" + (f" in module {fqn!r}" if fqn else "")
    else:  # the model's own Python code raised while traced: name its module and line
        fqn, code = locate_frame(exc, traced if traced is not None else module)
        if code:
            where = (f" in module {fqn!r}" if fqn else " in the model's top module") + f", Python code {code}"
            kind = type(_innermost(exc)).__name__
            text = text if text.startswith(kind) else f"{kind}: {text}"
    first_line = next((line for line in text.splitlines() if line.strip()), text)
    return ConversionError(
        f"target {target}: conversion failed{where}: {first_line[:400]}. "
        "Replace or wrap that module with supported ops, or convert to another target."
    )


def explained(convert, request, dest):
    """`convert(request, dest)`, where any failure that is not already edgeq's (the export, rewrites, packing)
    becomes a ConversionError naming the target, the op and the module: never a raw traceback."""
    from edgeq.errors import EdgeqError

    try:
        return convert(request, dest)
    except (EdgeqError, ImportError):
        raise
    except Exception as exc:
        raise explain_failure(request.profile.id, exc, request.model.module, request.model.example_inputs) from exc
