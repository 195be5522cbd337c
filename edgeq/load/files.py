"""Model sources that are files: TorchScript, torch.export programs, state dicts and (opt-in) pickles.

Nothing here runs code from a file unless the user passed --trust-pickle:
  - state dicts load with `torch.load(weights_only=True)` (torch's restricted unpickler: tensors, containers and
    primitive types only) or safetensors;
  - a pickled whole model is unpickled only with --trust-pickle;
  - a torch.export program is checked member by member first (edgeq.load.export_archive);
  - TorchScript archives go through TorchScript's own C++ deserializer: its unpickler (data.pkl, constants.pkl)
    builds only tensors, containers and TorchScript classes, and the code/ folder is TorchScript compiled by
    TorchScript's compiler, not Python: no Python global can be named, imported or called from the file. (A
    TorchScript program can still only do what TorchScript operators do when it runs.)
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
from pathlib import Path

import torch

from edgeq.errors import SourceError

_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")  # where training scripts nest weights


def load_torchscript(path: Path) -> torch.nn.Module:
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise SourceError(
            f"{path}: not a loadable TorchScript archive ({_last_line(exc)}); save it with torch.jit.save, or give "
            "a torch.export program (.pt2) instead"
        ) from exc


def load_exported(path: Path, trust_pickle: bool = False) -> tuple[torch.nn.Module, list[str], tuple | None]:
    """Load a `.pt2` program; return (module, input names, example inputs or None)."""
    from edgeq.load.export_archive import check_archive, check_program_calls

    data = path.read_bytes()  # torch reads these very bytes, so the file cannot change after the check
    if not trust_pickle:
        check_archive(path, data)
    try:
        with _quiet("torch.export", "torch._export.serde.serialize"):
            program = torch.export.load(io.BytesIO(data))
    except Exception as exc:
        raise SourceError(
            f"{path}: torch.export.load could not read it ({_last_line(exc)}); a .pt2 from another torch version "
            f"(this is {torch.__version__}) or a damaged file: export it again with torch.export.save"
        ) from exc
    if not trust_pickle:
        check_program_calls(path, program)
    names = [
        spec.arg.name
        for spec in program.graph_signature.input_specs
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT
    ]
    examples = None
    if program.example_inputs is not None:
        args, kwargs = program.example_inputs
        if not kwargs:
            examples = tuple(args)
    # check_guards=True would turn the program's `guards_code` strings into Python and run them on every call.
    return program.module(check_guards=False), names, examples


def load_weights(path: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (weights-only unless trusted); a pickled model is refused."""
    if path.suffix == ".safetensors" or _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise SourceError(f"{path}: not a readable safetensors file ({_last_line(exc)}); it may be truncated or damaged") from exc
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        raise SourceError(
            f"{path} holds pickled Python objects, not just tensors: loading it would run code from the "
            "file. Save a state dict (torch.save(model.state_dict())) or a torch.export program (.pt2), "
            "or pass --trust-pickle if you trust this file."
        ) from exc
    except Exception as exc:
        raise SourceError(f"{path}: torch.load could not read it ({_last_line(exc)}); the file may be truncated or damaged") from exc
    return _state_dict_in(path, state)


def _state_dict_in(path: Path, state) -> dict[str, torch.Tensor]:
    """The name -> tensor mapping in what torch.load returned: the dict itself or a training checkpoint's entry."""
    if isinstance(state, dict):
        for key in _CHECKPOINT_KEYS:
            if isinstance(state.get(key), dict) and state[key] and _all_tensors(state[key]):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise SourceError(f"{path}: expected a state dict (name -> tensor), found a {type(state).__name__}")
    if not state:
        raise SourceError(f"{path}: the state dict is empty")
    if not _all_tensors(state):
        others = [f"{key} ({type(value).__name__})" for key, value in state.items() if not isinstance(value, torch.Tensor)]
        raise SourceError(
            f"{path}: expected a state dict (name -> tensor), found a dict with other values: {', '.join(others[:6])}; "
            f"edgeq looks for the weights at the top level or under {', '.join(repr(k) for k in _CHECKPOINT_KEYS)}"
        )
    return state


def _all_tensors(mapping: dict) -> bool:
    return all(isinstance(value, torch.Tensor) for value in mapping.values())


def _is_safetensors(path: Path) -> bool:
    from edgeq.load.kinds import FileKind, file_kind

    return file_kind(path) == FileKind.SAFETENSORS


def load_pickled_module(path: Path) -> torch.nn.Module:
    """Unpickle a whole model. Only called with --trust-pickle."""
    try:
        model = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SourceError(
            f"{path}: could not unpickle it ({type(exc).__name__}: {_last_line(exc)}); a pickled model needs the "
            "classes it was saved with importable (run edgeq where their package is), or save a torch.export program"
        ) from exc
    if not isinstance(model, torch.nn.Module):
        raise SourceError(
            f"{path} unpickled to a {type(model).__name__}, not an nn.Module; if it is a state dict, "
            "pass --factory package.module:callable to build the model it belongs to"
        )
    return model


def apply_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, factory: str) -> None:
    """Load weights strictly, naming every missing, unexpected and misshapen key."""
    expected = module.state_dict()
    misshapen = [
        f"{key} is {_shape(state[key])} in the file, {_shape(expected[key])} in the model"
        for key in expected
        if key in state and tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    problems = []
    if misshapen:
        problems.append(f"shapes differ: {'; '.join(misshapen[:5])}")
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:10])}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:10])}")
    if problems:
        raise SourceError(f"{path} does not fit the model built by {factory}: {'; '.join(problems)}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SourceError(f"{path} does not fit the model built by {factory}: {_last_line(exc)}") from exc


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "a scalar"


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


@contextlib.contextmanager
def _quiet(*logger_names: str):
    """torch.export.load logs a traceback when a layout fails before trying another; edgeq reports the failure itself."""
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
