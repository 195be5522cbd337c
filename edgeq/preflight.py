"""Checks on a job's values that need no torch and no model: run before anything heavy loads, so a wrong
target, precision, budget, name, output folder or missing file fails in well under a second.

Each check takes `label`, the option or project-file key the value came from, and names it in its message.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from edgeq.errors import SourceError, UsageError

# A bundle folder name: one path component, no hidden or parent-directory names.
_FOLDER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Hugging Face tasks edgeq exports (edgeq.load.huggingface.Task; a test keeps the two the same).
HF_TASKS = ("feature-extraction", "sentence-embedding", "text-classification", "image-classification")


def check_source(source: str, label: str) -> None:
    from edgeq.calibration.sources.function import is_function_reference  # module:callable or file.py:callable

    if Path(source).exists() or is_function_reference(source):
        return
    raise SourceError(
        f"{label} {source!r}: no such file or folder, and not a 'package.module:callable' reference "
        "(e.g. mypkg.models:build, models.py:build, model.pt2, a Hugging Face folder)"
    )


def check_targets(targets: list[str], label: str) -> None:
    from edgeq.targets import expand_targets, load_profile

    if not targets:
        raise UsageError(f"{label}: no target given; use onnx, tflite, coreml or all")
    for target in expand_targets(targets):
        try:
            load_profile(target)
        except UsageError as exc:
            raise UsageError(f"{label}: {exc}") from exc


def check_precisions(precisions: list[str] | None, label: str) -> None:
    """None: each target's default precision; an empty list was typed by the user and names none."""
    from edgeq.targets import Precision

    if precisions is None:
        return
    if not precisions:
        raise UsageError(f"{label}: no precision given; leave it out for each target's default, or name one")
    known = [p.value for p in Precision]
    unknown = [p for p in precisions if p not in known]
    if unknown:
        raise UsageError(f"{label} {', '.join(unknown)}: not one of {', '.join(known)}")


def check_task(task: str | None, source: str, label: str) -> None:
    if task is None:
        return
    if task not in HF_TASKS:
        raise UsageError(f"{label} {task!r}: not one of {', '.join(HF_TASKS)}")
    if not Path(source).is_dir():
        raise UsageError(f"{label} applies to Hugging Face model folders; {source} is not a folder")


def check_data(data: str, label: str) -> None:
    from edgeq.calibration.sources.function import is_function_reference

    if Path(data).exists() or is_function_reference(data):
        return
    raise SourceError(
        f"{label} {data}: no such file or folder, and not a 'module:function' or 'file.py:function' reference"
    )


def check_budget(text: str | None, label: str) -> str | None:
    """The budget to hold: None for the profile's default, "" for none at all (`none`), else the terms."""
    from edgeq.validate.budget import BudgetSyntaxError, parse_budget

    if text is None:
        return None
    if text.strip().lower() == "none":
        return ""
    try:
        parse_budget(text, require_terms=True)
    except BudgetSyntaxError as exc:
        raise UsageError(f"{label}: {exc}") from exc
    return text


def check_name(name: str, label: str) -> None:
    if not _FOLDER_NAME.fullmatch(name) or name in {".", ".."}:
        raise UsageError(
            f"{label} {name!r}: must be a plain folder name (letters, digits, '_', '.', '-'; no '/' or '..'), "
            "e.g. 'classifier': bundles go to OUT/<name>/<target>/<precision>/"
        )


def check_out(out: Path, label: str, wanted: str = "a folder for the bundles, e.g. build/edge") -> None:
    """`out` is a folder edgeq can create files in (or can create): found before any work, not after."""
    probe = Path(os.path.abspath(out))
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == Path(os.path.abspath(out)) else f"sits below {probe}, which is a file"
        raise UsageError(f"{label} {out}: {where}; give {wanted}")
    try:
        tempfile.TemporaryDirectory(prefix=".edgeq-write-check-", dir=probe).cleanup()
    except OSError as exc:
        raise UsageError(f"{label} {out}: cannot write in {probe} ({exc.strerror}); give a folder you can write") from exc


def check_output_file(path: Path, label: str, example: str) -> None:
    """`path` names a file edgeq can write (replacing an older file of that name), not a folder."""
    path = Path(path)
    wanted = f"the path of a file to write, e.g. {example}"
    if path.is_dir():
        raise UsageError(f"{label} {path}: is a folder; give {wanted}")
    check_out(path.parent, f"{label} {path}: its folder", wanted)


def check_keep_float(patterns: list[str], label: str) -> None:
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise UsageError(f"{label} {pattern!r}: not a valid regular expression: {exc}") from exc


def check_compression(values: dict, label):
    """The job's --prune (+ --prune-layers) / --lowrank (+ --lowrank-layers) / --recover as edgeq.compress.spec.CompressionSpecs,
    and the combinations that cannot mean anything, refused before torch loads. `label(key)` names a key."""
    from edgeq.compress.spec import CompressionSpecs, parse_lowrank, parse_prune, parse_recover, with_layers

    prune = parse_prune(values["prune"], label("prune")) if "prune" in values else None
    if "prune_layers" in values:
        if prune is None:
            raise UsageError(f"{label('prune_layers')}: sets per-layer ratios of --prune; add --prune, e.g. --prune structured:0.5")
        prune = with_layers(prune, values["prune_layers"], label("prune_layers"))
    layers = list(values.get("lowrank_layers", []))
    if layers and "lowrank" not in values:
        raise UsageError(f"{label('lowrank_layers')}: chooses the layers --lowrank factorizes; add --lowrank, e.g. --lowrank rank:0.5")
    lowrank = parse_lowrank(values["lowrank"], layers, label("lowrank"), label("lowrank_layers")) if "lowrank" in values else None
    recover = parse_recover(values["recover"], label("recover")) if "recover" in values else None
    if recover is not None and recover.mode == "distill" and prune is None and lowrank is None:
        raise UsageError(
            f"{label('recover')} {recover.text}: distillation recovers what --prune or --lowrank cost, and neither is asked; "
            "add one (e.g. --prune structured:0.5), or use --recover qat with a quantized precision"
        )
    if recover is not None and recover.device == "cuda":  # a torch without CUDA refused now, as for --device cuda
        try:
            check_device("cuda", "device")
        except UsageError as exc:
            reason = str(exc).split(": ", 1)[1].split(";")[0]
            raise UsageError(f"{label('recover')} {recover.text}: {reason}; train on the CPU (device=cpu, the default)") from exc
    specs = CompressionSpecs(prune, lowrank, recover)
    needing = specs.needing_data()
    if needing and values.get("calibration_samples", 32) == 0:
        raise UsageError(
            f"{label('calibration_samples')} 0: {', '.join(needing)} needs calibration samples; give a number, e.g. 32"
        )
    return specs


def check_device(device: str, label: str) -> None:
    """`cuda` needs a torch built with CUDA (or ROCm, which torch.cuda also drives). Read from torch/version.py
    as text, without importing torch (a second or more); whether a GPU is present is checked when calibration
    starts (edgeq.quantize.check_calibration_device)."""
    import importlib.util

    if device != "cuda":
        return
    spec = importlib.util.find_spec("torch")
    version_file = Path(spec.origin).with_name("version.py") if spec is not None and spec.origin else None
    try:
        text = version_file.read_text() if version_file is not None else ""
    except OSError:
        return  # an unusual install: leave it to the check at calibration
    builds = dict(re.findall(r"^(__version__|cuda|hip)\b[^=\n]*=\s*(.+)$", text, flags=re.MULTILINE))
    if builds and builds.get("cuda", "None").strip() == "None" and builds.get("hip", "None").strip() == "None":
        version = builds.get("__version__", "?").strip().strip("'\"")
        raise UsageError(
            f"{label} cuda: the installed torch {version} is built without CUDA, so calibration cannot run on a GPU "
            "here; use --device cpu (the default), or install a CUDA build of torch"
        )
