"""Jobs: one model and its targets. `edgeq.toml` declares many, so an app build runs one command.

    [defaults]                 # any job key; each [[models]] entry may override it
    out = "build/edge"
    targets = ["onnx", "tflite"]
    budget = "cosine>=0.999"

    [[models]]
    source = "mypkg.models:build"   # or a path, relative to this file
    name = "classifier"
    precisions = ["fp32", "fp16"]

The command line and the project file share one vocabulary (edgeq.job_keys) and one check (`make_job`), so
`edgeq convert SOURCE -t onnx` and a `[[models]]` entry fail the same way, before torch or a model loads.
Options given on the command line beside `-c edgeq.toml` override the file for every model:
command line > [[models]] entry > [defaults] > built-in default.
"""

from __future__ import annotations

import dataclasses
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgeq.compress.spec import CompressionSpecs
from edgeq.errors import UsageError
from edgeq.job_keys import KEYS, check_value, check_values
from edgeq.layer_overrides import parse_per_layer
from edgeq.quantize import QuantizeOptions
from edgeq.signature import TensorSpec


@dataclass
class Job:
    source: str
    targets: list[str] = field(default_factory=lambda: ["all"])
    precisions: list[str] = field(default_factory=list)
    inputs: list[TensorSpec] = field(default_factory=list)
    task: str | None = None
    factory: str | None = None
    trust_pickle: bool = False
    data: Path | None = None
    text_column: str | None = None
    preprocess: str | None = None  # image preprocessing (calibration.sources.images.parse_preprocess syntax)
    sample_rate: int | None = None  # Hz, for WAV data
    samples: int = 32
    seed: int = 0
    budget: str | None = None  # None: each profile's default; "": no budget (the user wrote `none`)
    out: Path = Path("build/edge")
    name: str | None = None
    keep_float: list[str] = field(default_factory=list)
    quantize: QuantizeOptions = field(default_factory=QuantizeOptions)
    layers: bool = False  # per-layer drift of every ONNX and TFLite artifact
    compression: CompressionSpecs = field(default_factory=CompressionSpecs)  # --prune, --lowrank, --recover


def load_project(path: Path, overrides: dict | None = None) -> list[Job]:
    """Parse edgeq.toml strictly: unknown keys, wrong types and values are errors naming the file and key.
    `overrides` (key -> value, from the command line) replace the file's values in every model."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file; expected an edgeq.toml (see README, 'Project files')")
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from exc
    unknown = set(data) - {"defaults", "models"}
    if unknown:
        raise UsageError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}; expected [defaults] and [[models]]")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise UsageError(f"{path}: defaults: expected a table ([defaults]), found {type(defaults).__name__}")
    models = data.get("models", [])
    if not isinstance(models, list) or not all(isinstance(entry, dict) for entry in models):
        raise UsageError(f"{path}: models: expected [[models]] tables, each with a source; found {_describe(models)}")
    if not models:
        raise UsageError(f"{path}: declares no [[models]]")
    check_values(defaults, lambda key: f"{path}: defaults.{key}")
    base = path.parent.resolve()
    jobs = []
    for index, entry in enumerate(models):
        where = f"models[{index}]"
        check_values(entry, lambda key, where=where: f"{path}: {where}.{key}")
        values = {**defaults, **entry, **(overrides or {})}
        if "source" not in values:
            raise UsageError(f"{path}: {where}: key 'source' is missing")
        jobs.append(make_job(values, base, lambda key, where=where, entry=entry: _origin(path, where, entry, key, overrides)))
    if str(base) not in sys.path:
        sys.path.insert(0, str(base))  # callables next to the project file import as they would from there
    return jobs


def _origin(path: Path, where: str, entry: dict, key: str, overrides: dict | None) -> str:
    """Where a model's value for `key` came from: the command line, its [[models]] entry, or [defaults]."""
    if overrides and key in overrides:
        return KEYS[key].flag
    return f"{path}: {where if key in entry else 'defaults'}.{key}"


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def command_line_job(values: dict) -> Job:
    """The job `edgeq convert SOURCE ...` describes; paths stay as the user typed them (relative to here)."""
    check_values(values, lambda key: KEYS[key].flag)
    return make_job(values, None, lambda key: KEYS[key].flag)


def make_job(values: dict, base: Path | None, label: Callable[[str], str]) -> Job:
    """Check every value a job needs without loading torch or the model, and build the Job.
    `base`: the folder relative paths start from (the project file's), None for the command line.
    `label(key)` names the option or file key in messages."""
    from edgeq.preflight import (
        check_budget, check_compression, check_data, check_device, check_keep_float, check_name, check_out, check_precisions,
        check_source, check_targets, check_task,
    )

    def relative(value: str) -> str:
        """Paths in the file are relative to it; `package.module:callable` references stay as they are."""
        if base is None or _is_reference(value):
            return value
        return str(base / value)

    for key, value in values.items():
        check_value(key, value, label(key))
    source = relative(values["source"])
    check_source(source, label("source"))
    targets = [relative(t) if t.endswith(".toml") else t for t in values.get("targets", ["all"])]
    check_targets(targets, label("targets"))
    precisions = values.get("precisions")
    check_precisions(precisions, label("precisions"))
    check_task(values.get("task"), source, label("task"))
    data = relative(values["data"]) if "data" in values else None
    if data is not None:
        check_data(data, label("data"))
    name = values.get("name")
    if name is not None:
        check_name(name, label("name"))
    out = Path(relative(values.get("out", "build/edge")))
    check_out(out, label("out"))
    keep_float = list(values.get("keep_float", []))
    check_keep_float(keep_float, label("keep_float"))
    check_device(values.get("device", "cpu"), label("device"))
    if "preprocess" in values:
        _parsed(label("preprocess"), _parse_preprocess, values["preprocess"])
    per_layer = parse_per_layer(values["per_layer"], label("per_layer")) if "per_layer" in values else ()
    inputs = [_parsed(label("inputs"), _parse_input, text) for text in values.get("inputs", [])]
    compression = check_compression(values, label)
    recover = compression.recover
    if recover is not None and recover.checkpoint_dir and base is not None and not Path(recover.checkpoint_dir).is_absolute():
        # checkpoints live where the project file says, wherever edgeq runs from (as out and data)
        compression = dataclasses.replace(compression, recover=dataclasses.replace(recover, checkpoint_dir=relative(recover.checkpoint_dir)))
    repeated = sorted({spec.name for spec in inputs if [s.name for s in inputs].count(spec.name) > 1})
    if repeated:
        raise UsageError(f"{label('inputs')}: input {', '.join(repeated)} declared more than once; declare each input once")
    return Job(
        source=source,
        targets=targets,
        precisions=list(precisions or []),
        inputs=inputs,
        task=values.get("task"),
        factory=values.get("factory"),
        trust_pickle=values.get("trust_pickle", False),
        data=Path(data) if data is not None else None,
        text_column=str(values["text_column"]) if "text_column" in values else None,
        preprocess=values.get("preprocess"),
        sample_rate=values.get("sample_rate"),
        samples=values.get("samples", 32),
        seed=values.get("seed", 0),
        budget=check_budget(values.get("budget"), label("budget")),
        out=out,
        name=name,
        keep_float=keep_float,
        quantize=_parsed(label("smoothquant"), lambda v: _quantize_options(v, per_layer), values),
        layers=values.get("layers", False),
        compression=compression,
    )


def _is_reference(value: str) -> bool:
    from edgeq.calibration.sources.function import is_function_reference

    return is_function_reference(value) and not value.split(":", 1)[0].endswith(".py")


def _parse_input(text: str) -> TensorSpec:
    from edgeq.signature import parse_input_spec

    return parse_input_spec(text)


def _parse_preprocess(text: str):
    from edgeq.calibration.sources.images import parse_preprocess

    return parse_preprocess(text)


def _quantize_options(values: dict, per_layer: tuple = ()) -> QuantizeOptions:
    from edgeq.quantize import parse_smoothquant

    return QuantizeOptions(
        calibration_samples=values.get("calibration_samples", 32), observer=values.get("observer", "mse"),
        auto_fallback=values.get("auto_fallback", False), fallback_max=float(values.get("fallback_max", 0.1)),
        algorithm=values.get("algo"), group_size=_group_size(values.get("group_size", 32)), device=values.get("device", "cpu"), layer_overrides=per_layer,
        **parse_smoothquant(values.get("smoothquant")),
    )


def _group_size(value) -> int | None:
    return None if value == "channel" else int(value)


def _parsed(label: str, parse, value):
    try:
        return parse(value)
    except UsageError as exc:
        message = str(exc)
        raise UsageError(message if message.startswith(label) else f"{label}: {message}") from exc


def run_job(job: Job, on_step: Callable[[str], None] = lambda _: None):
    """Load the job's model and convert it for every target and precision."""
    from edgeq.load import load_model
    from edgeq.pipeline import ConvertOptions, convert

    on_step(f"loading {job.source}")
    model = load_model(
        job.source, inputs=job.inputs, task=job.task, factory=job.factory, trust_pickle=job.trust_pickle, name=job.name
    )
    options = ConvertOptions(
        targets=job.targets, out=job.out, precisions=job.precisions or None, budget=job.budget,
        data=job.data, text_column=job.text_column, preprocess=job.preprocess,
        sample_rate=job.sample_rate, samples=job.samples, seed=job.seed, keep_float=job.keep_float,
        quantize=job.quantize, layers=job.layers, compression=job.compression,
    )
    return convert(model, options, on_step)


__all__ = ["Job", "command_line_job", "load_project", "make_job", "run_job"]
