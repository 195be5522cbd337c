"""sweep.toml: models x targets x schemes x recipes, checked whole, expanded to one task per cell.

    [sweep]
    targets = ["onnx", "tflite", "coreml"]   # the axes; "all" and profile .toml paths as in edgeq.toml
    schemes = ["fp32", "fp16", "int8-weight"]
    out = "build/sweep"                      # relative to this file; --out overrides

    [defaults]                               # edgeq.toml job keys for every task
    samples = 8

    [[models]]                               # a source with its own keys (task, inputs, data, ...)
    source = "edgeq.examples:tiny_convnet"
    name = "convnet"

    [recipes.smooth]                         # a recipe: job keys laid over the model's (none: one "default" recipe)
    smoothquant = 0.5
    auto_fallback = true

A task's keys: recipe > [[models]] entry > [defaults]. Every table goes through the same key checks as
edgeq.toml (edgeq.job_keys, edgeq.project.make_job), so a typo fails here, naming file and key, before any
task starts. `targets`, `precisions` and `out` are the sweep's own (its axes and its folder) and are refused
in the job tables.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from edgeq.errors import UsageError
from edgeq.job_keys import check_values
from edgeq.project import Job, make_job

DEFAULT_RECIPE = "default"
DEFAULT_OUT = "build/sweep"
_TABLES = ("sweep", "defaults", "models", "recipes")
_SWEEP_KEYS = {"targets": "a list of targets, e.g. [\"onnx\", \"tflite\"]",
               "schemes": "a list of precisions, e.g. [\"fp32\", \"int8-weight\"]",
               "out": "a folder path, e.g. 'build/sweep'"}
_AXES = {"targets": "sweep.targets", "precisions": "sweep.schemes", "out": "sweep.out or --out"}


@dataclass(frozen=True)
class SweepTask:
    """One cell: `job` converts `model` for one target and one scheme into `folder` (its own bundle tree)."""

    model: str
    recipe: str
    target: str  # the profile id (folder name); job.targets holds what pipeline.convert is given
    scheme: str
    job: Job
    folder: Path
    values: dict = field(repr=False)  # the job keys as written (for the content key, edgeq.sweep.key)

    @property
    def id(self) -> str:
        return f"{self.model}/{self.recipe}/{self.target}/{self.scheme}"


@dataclass
class Sweep:
    path: Path
    out: Path
    tasks: list[SweepTask]
    import_paths: list[str]  # where tasks import `module:callable` sources from (the file's folder, the cwd)


def load_sweep(path: Path, out: Path | None = None) -> Sweep:
    """Parse and check sweep.toml whole (exit 2 naming file and key); `out` (from --out) overrides [sweep] out."""
    path = Path(path)
    data = _read(path)
    unknown = sorted(set(data) - set(_TABLES))
    if unknown:
        raise UsageError(f"{path}: unknown table(s) {', '.join(unknown)}; expected [sweep], [defaults], [[models]], [recipes.NAME]")
    base = path.parent.resolve()
    sweep = _table(data, "sweep", path)
    for key, value in sweep.items():
        if key not in _SWEEP_KEYS:
            raise UsageError(f"{path}: sweep.{key}: unknown key; [sweep] takes {', '.join(_SWEEP_KEYS)}")
        kind = str if key == "out" else list
        if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) and v.strip() for v in value)):
            raise UsageError(f"{path}: sweep.{key}: {value!r} is not valid; expected {_SWEEP_KEYS[key]}")
    for key in ("targets", "schemes"):
        if not sweep.get(key):
            raise UsageError(f"{path}: sweep.{key}: missing or empty; expected {_SWEEP_KEYS[key]}")
    defaults = _table(data, "defaults", path)
    _check_job_table(defaults, path, "defaults", allow=())
    models = data.get("models", [])
    if not isinstance(models, list) or not all(isinstance(entry, dict) for entry in models) or not models:
        raise UsageError(f"{path}: models: expected one or more [[models]] tables, each with a source")
    for index, entry in enumerate(models):
        _check_job_table(entry, path, f"models[{index}]", allow=("source", "name"))
        if "source" not in entry:
            raise UsageError(f"{path}: models[{index}]: key 'source' is missing")
    recipes = _table(data, "recipes", path) or {DEFAULT_RECIPE: {}}
    for name, recipe in recipes.items():
        where = f"recipes.{name}"
        if not isinstance(recipe, dict):
            raise UsageError(f"{path}: {where}: expected a table of job keys ([recipes.{name}]), found {type(recipe).__name__}")
        _check_folder_name(name, f"{path}: {where}", "recipe")
        _check_job_table(recipe, path, where, allow=())

    from edgeq.preflight import check_out

    out_label = "--out" if out is not None else f"{path}: sweep.out"
    out = Path(out) if out is not None else base / sweep.get("out", DEFAULT_OUT)
    check_out(out, out_label)
    targets = _targets(sweep["targets"], base, path)
    names = _model_names(models, path)
    tasks = []
    for index, (entry, model) in enumerate(zip(models, names)):
        for recipe_name, recipe in recipes.items():
            values = {**defaults, **entry, **recipe, "name": model}

            def label(key, entry=entry, recipe=recipe, recipe_name=recipe_name, index=index):
                if key in ("targets", "precisions"):
                    return f"{path}: {_AXES[key]}"
                where = f"recipes.{recipe_name}" if key in recipe else f"models[{index}]" if key in entry else "defaults"
                return f"{path}: {where}.{key}"

            job = make_job({**values, "targets": [t for t, _ in targets], "precisions": list(sweep["schemes"])}, base, label)
            for target, profile_id in targets:
                for scheme in sweep["schemes"]:
                    folder = out / model / recipe_name / profile_id / scheme
                    cell = dataclasses.replace(job, targets=[target], precisions=[scheme], out=folder, name=model)
                    tasks.append(SweepTask(model, recipe_name, profile_id, scheme, cell, folder, values))
    return Sweep(path=path, out=out, tasks=tasks, import_paths=[str(base), os.getcwd()])


def _read(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file; expected a sweep.toml (see README, 'Sweeps')")
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from exc


def _table(data: dict, name: str, path: Path) -> dict:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise UsageError(f"{path}: {name}: expected a table ([{name}]), found {type(table).__name__}")
    return table


def _check_job_table(table: dict, path: Path, where: str, allow: tuple[str, ...]) -> None:
    """edgeq.toml's key checks, less the keys that are the sweep's axes or belong to [[models]] alone."""
    for key in table:
        if key in _AXES:
            raise UsageError(f"{path}: {where}.{key}: set by the sweep ({_AXES[key]}), not per job")
        if key in ("source", "name") and key not in allow:
            raise UsageError(f"{path}: {where}.{key}: belongs in a [[models]] entry")
    check_values(table, lambda key: f"{path}: {where}.{key}")


def _targets(targets: list[str], base: Path, path: Path) -> list[tuple[str, str]]:
    """(what pipeline.convert is given, the profile id naming the folder) per target, `all` expanded."""
    from edgeq.targets import expand_targets, load_profile

    resolved = []
    for target in expand_targets(targets):
        given = str(base / target) if target.endswith(".toml") else target
        try:
            profile = load_profile(given)
        except UsageError as exc:
            raise UsageError(f"{path}: sweep.targets: {exc}") from exc
        if profile.id in [p for _, p in resolved]:
            raise UsageError(f"{path}: sweep.targets: profile {profile.id!r} is named twice")
        resolved.append((given, profile.id))
    return resolved


def _model_names(models: list[dict], path: Path) -> list[str]:
    """Each model's folder name: its `name`, else the callable's name or the file's stem (as edgeq convert names
    it); two models may not share one, since their bundles would land in one folder."""
    names = []
    for index, entry in enumerate(models):
        name = entry.get("name") or _default_name(entry["source"])
        _check_folder_name(name, f"{path}: models[{index}].name", "model")
        if name in names:
            raise UsageError(
                f"{path}: models[{index}]: name {name!r} is also models[{names.index(name)}]'s; give one of them a name = \"...\""
            )
        names.append(name)
    return names


def _default_name(source: str) -> str:
    base = Path(source).stem if Path(source).exists() else source.split(":")[-1].split(".")[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.") or "model"


_FOLDER_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _check_folder_name(name: str, label: str, what: str) -> None:
    if not _FOLDER_NAME.fullmatch(name) or name in (".", ".."):
        raise UsageError(f"{label}: {what} name {name!r} must be a plain folder name (letters, digits, '_', '.', '-')")


__all__ = ["DEFAULT_RECIPE", "Sweep", "SweepTask", "load_sweep"]
