"""Check a torch.export archive (.pt2) before torch reads it, so that loading it runs no code from the file.

`torch.export.load` (torch 2.13, torch/export/pt2_archive/_package.py and torch/_export/serde/serialize.py)
runs code from the archive in these ways:
  - `torch.load(weights_only=False)` of weights and constants whose payload config says `use_pickle`
    (tensor subclasses), `pickle.loads` of `opaque_obj_*` constants, TorchScript's unpickler for torchbind
    `custom_obj_*` constants;
  - `deserialize_torch_artifact`: `torch.load(weights_only=True)`, and on failure *weights_only=False*, for the
    example inputs (data/sample_inputs/<model>.pt), legacy weights/constants (data/{weights,constants}/<model>.pt)
    and the older zip layout (serialized_*.pt, tried whenever the current layout fails to load);
  - `sympy.sympify` - Python `eval` - of every symbolic-shape expression string (`expr_str`) in models/*.json;
  - AOTInductor members (data/aotinductor/) are shared libraries that torch loads;
  - `ExportedProgram.module()` turns the program's `guards_code` strings into Python source and runs it
    (so edgeq calls `module(check_guards=False)`: it runs the program on inputs it declares itself).

`check_archive` allows only the members a plain `torch.export.save` writes and proves each harmless: pickled
members must load with the weights-only unpickler (torch then never falls back), payload configs may route
nothing through pickle, expressions may hold only arithmetic and sympy functions. Anything else is refused,
naming the member; `--trust-pickle` skips the check. `check_program_calls` then refuses a graph that calls
anything but PyTorch operators.
"""

from __future__ import annotations

import ast
import io
import json
import operator
import pickle
import re
import zipfile
from pathlib import Path

import torch

from edgeq.errors import SourceError

# Members of the archive's top folder that torch writes as metadata and reads as plain strings (or not at all).
_METADATA = {"archive_format", "archive_version", "byteorder", "version", ".data/version", ".data/serialization_id"}
_MODEL_JSON = re.compile(r"models/[^/]+\.json")
_PAYLOAD_CONFIG = re.compile(r"data/(weights|constants)/[^/]+_(weights|constants)_config\.json")
_PICKLED_TENSORS = re.compile(r"data/(sample_inputs|weights|constants)/[^/]+\.pt")  # read by deserialize_torch_artifact
_RAW_PAYLOAD = re.compile(r"data/(weights|constants)/[^/]+")  # raw tensor bytes, mapped as storage, never unpickled
_TENSOR_CONSTANT_PREFIX = "tensor_"  # torch.export.pt2_archive.constants.TENSOR_CONSTANT_FILENAME_PREFIX


def refuse(path: Path, member: str | None, why: str) -> SourceError:
    """The refusal of an archive `member` (None: its program) that loading could run code from."""
    what = f"member {member!r} of this torch.export archive" if member else "this torch.export program"
    return SourceError(
        f"{path}: {what} {why}; edgeq does not run code from a model file unless you pass --trust-pickle (do so "
        "only if you trust where the file came from: it loads the file unchecked), or re-save the program with "
        "torch.export.save from a plain nn.Module"
    )


def check_archive(path: Path, data: bytes) -> None:
    """Refuse (SourceError) an archive holding anything that loading it would execute. `data` is the file's
    bytes: the caller hands torch the same bytes, so nothing can change between the check and the load."""
    members = _members(path, data)
    reader = torch._C.PyTorchFileReader(io.BytesIO(data))
    records = reader.get_all_records()
    if sorted(records) != sorted(members):
        odd = sorted(set(records) ^ set(members)) or sorted(members)
        raise refuse(
            path, odd[0], "is listed differently by Python's zip reader and torch's, so edgeq cannot check what torch would read"
        )
    for member in members:
        if member in _METADATA or member.startswith("extra/"):
            continue
        if _MODEL_JSON.fullmatch(member):
            _check_expressions(path, member, _json(path, member, reader.get_record(member)))
        elif _PAYLOAD_CONFIG.fullmatch(member):
            _check_payload_config(path, member, _json(path, member, reader.get_record(member)))
        elif _PICKLED_TENSORS.fullmatch(member):
            _check_weights_only(path, member, reader.get_record(member))
        elif _RAW_PAYLOAD.fullmatch(member) and not member.endswith(".json"):
            continue
        elif member.startswith("data/aotinductor/"):
            raise refuse(path, member, "is AOTInductor-compiled code (a shared library torch would load)")
        else:
            raise refuse(path, member, "is not one torch.export.save writes, so edgeq cannot tell that loading it is safe")


def _members(path: Path, data: bytes) -> list[str]:
    """Member names below the archive's one top folder; duplicates (which readers resolve differently) refused."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile as exc:
        raise SourceError(f"{path}: not a readable zip archive, so not a torch.export program ({exc})") from exc
    roots = sorted({name.split("/", 1)[0] for name in names})
    loose = [name for name in names if "/" not in name]
    if len(roots) != 1 or loose:
        odd = (loose or roots[1:])[0]
        raise refuse(
            path, odd, f"sits outside the archive's top folder {roots[0]!r}, where torch.export.save puts every member "
            "(torch reads older layouts from there, with a pickle fallback)",
        )
    folded = [name.casefold() for name in names]
    if len(set(folded)) != len(folded):
        twice = sorted({name for name in names if folded.count(name.casefold()) > 1})
        raise refuse(
            path, twice[0], "is named twice (zip readers differ on which copy they read), so edgeq cannot check what torch would read"
        )
    return [name.split("/", 1)[1] for name in names if not name.endswith("/")]


def _json(path: Path, member: str, raw: bytes):
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: member {member!r} is not valid JSON ({exc}); the file is damaged") from exc


def _check_payload_config(path: Path, member: str, config) -> None:
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise SourceError(f"{path}: member {member!r} is not a torch.export payload config; the file is damaged")
    for fqn, meta in entries.items():
        meta = meta if isinstance(meta, dict) else {}
        if meta.get("use_pickle"):
            raise refuse(path, member, f"stores {fqn!r} as a pickle, which torch would load with pickle")
        name = str(meta.get("path_name", ""))
        if "constants" in member and not name.startswith(_TENSOR_CONSTANT_PREFIX):
            raise refuse(path, member, f"stores constant {fqn!r} as a Python object ({name}), which torch would unpickle")


def _check_weights_only(path: Path, member: str, raw: bytes) -> None:
    try:
        torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise refuse(path, member, "holds pickled Python objects, not just tensors: torch would unpickle them") from exc
    except Exception as exc:
        raise SourceError(f"{path}: member {member!r} is not a readable torch file ({type(exc).__name__}); the file is damaged") from exc


def _check_expressions(path: Path, member: str, program) -> None:
    """torch reads each `expr_str` with sympy.sympify, which evaluates it as Python: only arithmetic passes."""
    stack = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "expr_str":
                    if not (isinstance(value, str) and _is_arithmetic(value)):
                        shown = str(value)[:80]
                        raise refuse(path, member, f"holds the shape expression {shown!r}, which is not arithmetic: torch would evaluate it as Python")
                else:
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


_SAFE_NODES = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Name, ast.Load,
    ast.operator, ast.unaryop, ast.boolop, ast.cmpop,
)


def _is_arithmetic(text: str) -> bool:
    """Numbers, symbol names, operators and calls of sympy's (or torch's sympy) functions, and
    `Symbol('s0', integer=True, ...)` as torch writes symbols; no other strings, no attributes, subscripts,
    lambdas or calls of anything else (eval, __import__, chr, ...)."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    functions = _sympy_functions()
    symbol_names: set[int] = set()  # ids of the string constants that name a Symbol
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in functions:
                return False
            if node.func.id == "Symbol":
                if not _is_symbol_call(node):
                    return False
                symbol_names.add(id(node.args[0]))
            elif node.keywords:
                return False
        elif isinstance(node, ast.Constant):
            if type(node.value) not in (int, float, bool) and id(node) not in symbol_names:
                return False
        elif isinstance(node, ast.Name):
            if node.id.startswith("_"):
                return False
        elif not isinstance(node, _SAFE_NODES + (ast.keyword,)):
            return False
    return True


def _is_symbol_call(node: ast.Call) -> bool:
    """`Symbol('name', assumption=True, ...)`: sympy.Symbol takes the name as is; it parses nothing."""
    return (
        len(node.args) == 1
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
        and re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", node.args[0].value) is not None
        and all(isinstance(k.value, ast.Constant) and type(k.value.value) is bool for k in node.keywords)
    )


_FUNCTIONS: set[str] = set()


def _sympy_functions() -> set[str]:
    """sympy expression classes (Max, Mod, Eq, floor, ...) and torch's own (FloorDiv, CeilToInt, ...)."""
    if not _FUNCTIONS:
        import sympy
        import torch.utils._sympy.functions as torch_functions

        for namespace in (sympy, torch_functions):
            for name in dir(namespace):
                value = getattr(namespace, name)
                if not name.startswith("_") and isinstance(value, type) and issubclass(value, sympy.Basic):
                    _FUNCTIONS.add(name)
        _FUNCTIONS.add("sqrt")
    return _FUNCTIONS


# Python callables a normal program calls besides PyTorch operators (torch._export.verifier's allowlist).
_ALLOWED_CALLS = {
    operator.getitem, operator.add, operator.mul, operator.sub, operator.truediv, operator.floordiv,
    operator.mod, operator.pow, operator.neg, operator.pos, operator.abs, operator.eq, operator.ne, operator.lt,
    operator.le, operator.gt, operator.ge, operator.and_, operator.or_, operator.not_, operator.lshift,
    operator.rshift, round,
}


def check_program_calls(path: Path, program) -> None:
    """Refuse a program whose graphs call (or pass as arguments) Python callables that are not PyTorch
    operators: a deserialized graph can name any function reachable from `torch`, `math` or `operator`."""
    import math

    allowed = _ALLOWED_CALLS | {math.ceil, math.floor, math.trunc, math.sqrt} | {
        getattr(torch, name) for name in dir(torch) if name.startswith("sym_")
    } | {torch._C._set_grad_enabled, torch.autograd.grad_mode.set_grad_enabled}
    operator_types = (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)

    def harmless(value) -> bool:
        if not callable(value) or isinstance(value, (operator_types, torch.nn.Module, torch.fx.Node)):
            return True
        try:
            return value in allowed
        except TypeError:  # unhashable: no function edgeq allows
            return False

    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op in ("call_module", "call_method"):
                raise refuse(path, None, f"calls {node.op} {node.target!r}, which a torch.export program never does")
            if node.op != "call_function":
                continue
            arguments = []
            torch.fx.node.map_aggregate((node.args, node.kwargs), arguments.append)
            for value in (node.target, *arguments):
                if not harmless(value):
                    name = getattr(value, "__qualname__", repr(value))
                    called = f"{getattr(value, '__module__', '')}.{name}"
                    raise refuse(path, None, f"calls {called} in node {node.name!r}, which is not a PyTorch operator")
