"""Model sources that are files: TorchScript, torch.export programs, state dicts and (opt-in) pickles.

Unpickling runs code from the file, so a pickled whole model is refused unless the user passes
--trust-pickle; weights load with `torch.load(weights_only=True)` or safetensors.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from edgeq.errors import SourceError

TORCHSCRIPT_SUFFIXES = {".ts", ".torchscript", ".jit"}
STATE_DICT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".safetensors"}


def is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files holding a `code/` folder (torch.save archives do not)."""
    if path.suffix in TORCHSCRIPT_SUFFIXES:
        return True
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def load_torchscript(path: Path) -> torch.nn.Module:
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise SourceError(f"{path}: not a loadable TorchScript file: {exc}") from exc


def load_exported(path: Path) -> tuple[torch.nn.Module, list[str], tuple | None]:
    """Load a `.pt2` program; return (module, input names, example inputs or None)."""
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise SourceError(f"{path}: not a loadable torch.export program (.pt2): {exc}") from exc
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
    return program.module(), names, examples


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a weights-only torch file; a pickled model is refused here."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise SourceError(f"{path}: not a readable safetensors file: {exc}") from exc
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise SourceError(
            f"{path} holds pickled Python objects, not just tensors: loading it would run code from the "
            "file. Save a state dict (torch.save(model.state_dict())) or a torch.export program (.pt2), "
            "or pass --trust-pickle if you trust this file."
        ) from exc
    except Exception as exc:
        raise SourceError(f"{path}: not a readable torch file: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # common training-checkpoint layout
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SourceError(f"{path}: expected a state dict (name -> tensor), found {type(state).__name__}")
    return state


def load_pickled_module(path: Path) -> torch.nn.Module:
    """Unpickle a whole model. Only called with --trust-pickle."""
    try:
        model = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SourceError(f"{path}: could not unpickle: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise SourceError(
            f"{path} unpickled to a {type(model).__name__}, not an nn.Module; if it is a state dict, "
            "pass --factory package.module:callable to build the model it belongs to"
        )
    return model


def apply_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, factory: str) -> None:
    """Load weights strictly, naming every missing and unexpected key."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even when strict=False
        raise SourceError(f"{path} does not fit the model built by {factory}: {exc}") from exc
    problems = []
    if result.missing_keys:
        problems.append(f"missing keys: {', '.join(result.missing_keys[:10])}")
    if result.unexpected_keys:
        problems.append(f"unexpected keys: {', '.join(result.unexpected_keys[:10])}")
    if problems:
        raise SourceError(f"{path} does not fit the model built by {factory}: {'; '.join(problems)}")
