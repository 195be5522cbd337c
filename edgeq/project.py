"""Jobs: one model and its targets. `edgeq.toml` declares many, so an app build runs one command.

    [defaults]                 # any job key; each [[models]] entry may override it
    out = "build/edge"
    targets = ["onnx", "tflite"]
    budget = "cosine>=0.999"

    [[models]]
    source = "mypkg.models:build"   # or a path, relative to this file
    name = "classifier"
    precisions = ["fp32", "fp16"]
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgeq.errors import UsageError
from edgeq.quantize import QuantizeOptions, parse_smoothquant
from edgeq.signature import TensorSpec, parse_input_spec


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
    budget: str | None = None
    out: Path = Path("build/edge")
    name: str | None = None
    keep_float: list[str] = field(default_factory=list)
    quantize: QuantizeOptions = field(default_factory=QuantizeOptions)
    layers: bool = False  # per-layer drift of every ONNX and TFLite artifact


_KEY_TYPES = {
    "source": str, "targets": list, "precisions": list, "inputs": list, "task": str, "factory": str,
    "trust_pickle": bool, "data": str, "text_column": (str, int), "preprocess": str, "sample_rate": int,
    "samples": int, "seed": int,
    "budget": str, "out": str, "name": str, "keep_float": list,
    "calibration_samples": int, "observer": str, "smoothquant": (float, int, str), "auto_fallback": bool,
    "fallback_max": (float, int), "layers": bool,
}


def load_project(path: Path) -> list[Job]:
    """Parse edgeq.toml strictly: unknown keys and wrong types are errors naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from exc
    unknown = set(data) - {"defaults", "models"}
    if unknown:
        raise UsageError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}; expected [defaults] and [[models]]")
    defaults = _checked(data.get("defaults", {}), path, "defaults")
    models = data.get("models", [])
    if not models:
        raise UsageError(f"{path}: declares no [[models]]")
    base = path.parent.resolve()
    if str(base) not in sys.path:
        sys.path.insert(0, str(base))  # callables next to the project file import as they would from there
    jobs = []
    for index, entry in enumerate(models):
        where = f"models[{index}]"
        values = {**defaults, **_checked(entry, path, where)}
        if "source" not in values:
            raise UsageError(f"{path}: {where}: key 'source' is missing")
        jobs.append(_job(values, base, path, where))
    return jobs


def _checked(table: dict, path: Path, where: str) -> dict:
    for key, value in table.items():
        if key not in _KEY_TYPES:
            raise UsageError(f"{path}: {where}.{key}: unknown key; known keys: {', '.join(_KEY_TYPES)}")
        if not isinstance(value, _KEY_TYPES[key]):
            raise UsageError(f"{path}: {where}.{key}: wrong type {type(value).__name__}")
    return table


def _job(values: dict, base: Path, path: Path, where: str) -> Job:
    def relative(value: str) -> str:
        """Paths in the file are relative to it; `package.module:callable` references stay as they are."""
        return value if re.fullmatch(r"[\w.]+:[\w.]+", value) else str(base / value)

    try:
        inputs = [parse_input_spec(text) for text in values.get("inputs", [])]
    except UsageError as exc:
        raise UsageError(f"{path}: {where}.inputs: {exc}") from exc
    if "preprocess" in values:
        from edgeq.calibration.sources.images import parse_preprocess

        try:
            parse_preprocess(values["preprocess"])
        except UsageError as exc:
            raise UsageError(f"{path}: {where}.preprocess: {exc}") from exc
    rate = values.get("sample_rate")
    if rate is not None and (isinstance(rate, bool) or rate < 1):
        raise UsageError(f"{path}: {where}.sample_rate: {rate!r}; expected a rate in Hz, e.g. 16000")
    try:
        quantize = QuantizeOptions(
            calibration_samples=values.get("calibration_samples", 32), observer=values.get("observer", "mse"),
            auto_fallback=values.get("auto_fallback", False), fallback_max=float(values.get("fallback_max", 0.1)),
            **parse_smoothquant(values.get("smoothquant")),
        )
    except UsageError as exc:
        raise UsageError(f"{path}: {where}: {exc}") from exc
    return Job(
        source=relative(values["source"]),
        targets=[relative(t) if t.endswith(".toml") else t for t in values.get("targets", ["all"])],
        precisions=list(values.get("precisions", [])),
        inputs=inputs,
        task=values.get("task"),
        factory=values.get("factory"),
        trust_pickle=values.get("trust_pickle", False),
        data=Path(relative(values["data"])) if "data" in values else None,
        text_column=str(values["text_column"]) if "text_column" in values else None,
        preprocess=values.get("preprocess"),
        sample_rate=rate,
        samples=values.get("samples", 32),
        seed=values.get("seed", 0),
        budget=values.get("budget"),
        out=base / values.get("out", "build/edge"),
        name=values.get("name"),
        keep_float=list(values.get("keep_float", [])),
        quantize=quantize,
        layers=values.get("layers", False),
    )


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
        quantize=job.quantize, layers=job.layers,
    )
    return convert(model, options, on_step)


__all__ = ["Job", "load_project", "run_job"]
