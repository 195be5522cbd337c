"""Turn any supported model source into a LoadedModel.

Sources, told apart by their bytes (edgeq.load.kinds), not their suffix:
  folder with config.json        Hugging Face model (needs --task)
  torch.export archive (.pt2)    torch.export program, checked to run no code from the file first
  TorchScript archive            torch.jit.load (needs --input: TorchScript keeps no example inputs)
  safetensors / torch.save file + --factory   state dict loaded into the model the factory builds
  torch.save file without --factory           pickled whole model: refused unless --trust-pickle
  package.module:callable (or file.py:callable)   a function or class returning an nn.Module [, example inputs]
Anything else (an .onnx, a text file, an empty file, a folder without config.json) is refused with a message
saying what it is and what edgeq takes.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from edgeq.errors import EdgeqError, SourceError, UsageError
from edgeq.load.callable import call_model_factory, is_callable_reference
from edgeq.load.examples import as_example_list, forward_parameter_names, resolve_inputs
from edgeq.hashing import sha256_path, sha256_state
from edgeq.load.kinds import ACCEPTED_SOURCES, MODEL_KINDS, FileKind, file_kind, refuse_file, refuse_folder
from edgeq.load.model import LoadedModel, SourceInfo
from edgeq.load.wrap import FlatModel, output_names_of
from edgeq.signature import TensorSpec

__all__ = ["LoadedModel", "SourceInfo", "load_model"]


def load_model(
    source: str,
    *,
    inputs: list[TensorSpec] | None = None,
    task: str | None = None,
    factory: str | None = None,
    trust_pickle: bool = False,
    name: str | None = None,
) -> LoadedModel:
    """Load `source` (a path or `package.module:callable`) in eval mode with named inputs and outputs."""
    declared = list(inputs or [])
    path = Path(source)
    tokenizer = None
    if path.exists():
        module, names, examples, kind, tokenizer, keyword = _load_path(path, declared, task, factory, trust_pickle)
        digest = sha256_path(path)
    elif is_callable_reference(source):
        if factory:
            raise UsageError("--factory goes with a weights file; a callable source builds its own weights")
        module, raw_examples = call_model_factory(source)
        names, examples = as_example_list(raw_examples, source) if raw_examples is not None else ([], None)
        keyword = bool(names)
        names = names or forward_parameter_names(module)
        kind, digest = "callable", ""
    else:
        raise SourceError(
            f"{source!r} is neither an existing file or folder nor a 'package.module:callable' reference. "
            f"{ACCEPTED_SOURCES}"
        )

    if kind != "export":  # an exported program's module is already in eval mode and refuses .eval()
        module.eval()
    if kind == "huggingface":  # the loader already merged --input with tokenizer-made examples
        specs, example_tensors = names, tuple(examples)
    else:
        specs, example_tensors = resolve_inputs(names, list(examples) if examples is not None else None, declared, source)
    flat = FlatModel(module, [s.name for s in specs] if keyword else None).eval()
    outputs = _run_once(flat, example_tensors, specs, source, declared)
    if kind == "callable":
        digest = sha256_state(module)
    return LoadedModel(
        name=name or _default_name(source, kind),
        module=flat,
        inputs=specs,
        outputs=outputs,
        example_inputs=example_tensors,
        source=SourceInfo(kind=kind, location=source, sha256=digest),
        task=task,
        tokenizer=tokenizer,
    )


def _load_path(path: Path, declared, task, factory, trust_pickle):
    """Return (module, input names or specs, examples, kind, tokenizer, called with keywords?)."""
    from edgeq.load import files

    if path.is_dir():
        if not (path / "config.json").is_file():
            raise refuse_folder(path)
        from edgeq.load.huggingface import load_huggingface

        module, specs, examples, tokenizer = load_huggingface(path, task, declared, trust_pickle=trust_pickle)
        return module, specs, examples, "huggingface", tokenizer, True
    if task:
        raise UsageError(f"--task applies to Hugging Face model folders; {path} is a file")
    kind = file_kind(path)
    if kind not in MODEL_KINDS:
        raise refuse_file(path, kind)
    if factory and kind in (FileKind.EXPORT, FileKind.TORCHSCRIPT):
        raise UsageError(
            f"--factory builds the model a state dict belongs to; {path} is {kind}, which carries its own model: drop --factory"
        )
    if kind == FileKind.EXPORT:
        module, names, examples = files.load_exported(path, trust_pickle)
        return module, names, examples, "export", None, False
    if kind == FileKind.TORCHSCRIPT:
        module = files.load_torchscript(path)
        names = _torchscript_input_names(module)
        return module, names, None, "torchscript", None, False
    if factory:
        state = files.load_weights(path, trust_pickle)
        module, raw_examples = call_model_factory(factory)
        files.apply_state_dict(module, state, path, factory)
        names, examples = as_example_list(raw_examples, factory) if raw_examples is not None else ([], None)
        keyword = bool(names)
        return module, names or forward_parameter_names(module), examples, "state_dict", None, keyword
    # A .pt2 that is not a torch.export archive is a common mix-up: say what it is.
    what = f"{path} is {kind}, not a torch.export program: it" if path.suffix == ".pt2" else f"{path}"
    if kind == FileKind.SAFETENSORS:
        raise UsageError(f"{what} holds weights only: pass --factory package.module:callable that builds the model")
    if not trust_pickle:
        files.load_weights(path)  # refuses pickles with a message; a plain state dict gets the next one
        raise UsageError(f"{what} holds weights only: pass --factory package.module:callable that builds the model")
    module = files.load_pickled_module(path)
    return module, forward_parameter_names(module), None, "pickle", None, False


def _run_once(flat: FlatModel, examples: tuple[torch.Tensor, ...], specs: list[TensorSpec], source: str, declared) -> list[str]:
    """Name the outputs by running the model once; a forward that fails on these inputs is the user's to fix."""
    try:
        return output_names_of(flat, examples)
    except EdgeqError:
        raise
    except Exception as exc:
        from edgeq.load.user_code import describe_failure

        used = ", ".join(str(spec) for spec in specs) or "no inputs"
        origin = "declared with --input" if declared else "the example inputs the source provides"
        raise SourceError(
            f"{source}: the model's forward failed on {used} ({origin}): {describe_failure(exc)}. Check --input "
            "NAME:SHAPE:DTYPE: each input's rank, sizes (e.g. channels) and dtype must be what forward expects"
        ) from exc


def _torchscript_input_names(module: torch.jit.ScriptModule) -> list[str]:
    try:
        return [arg.name for arg in module.forward.schema.arguments[1:]]
    except (AttributeError, RuntimeError):
        return []


_GENERIC_FOLDER_NAMES = {"model", "models", "hf", "checkpoint", "weights", "snapshot"}


def _default_name(source: str, kind: str) -> str:
    """A folder-safe model name: the callable's name or the file's stem."""
    if kind == "callable":
        base = source.split(":")[-1].split(".")[-1]
    elif kind == "huggingface":
        folder = Path(source).resolve()
        # Packaged checkpoints often sit in a folder called "model": its parent names it better.
        base = folder.parent.name if folder.name.lower() in _GENERIC_FOLDER_NAMES else folder.name
    else:
        base = Path(source).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.") or "model"
