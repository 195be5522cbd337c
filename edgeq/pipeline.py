"""The flow of `edgeq convert`: load -> validation data -> FP32 reference -> per target and precision:
check -> convert -> validate in the runtime -> budget -> bundle."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.bundle import REJECTED_SUFFIX, bundle_path, claimed, publish, staging, write_atomic, write_golden, write_json
from edgeq.calibration.collect import run_module
from edgeq.calibration.data import SampleSet, load_samples, split
from edgeq.calibration.memory import check_request
from edgeq.compress.spec import CompressionSpecs
from edgeq.converters import ConversionRequest, get_converter
from edgeq.converters.parity import artifact_weights, compare_weights
from edgeq.errors import ConversionError, SourceError, UsageError
from edgeq.load import LoadedModel
from edgeq.manifest import build_manifest
from edgeq.reference_artifact import Fp32Baselines, QuantizationDrift, TimingInput, compare_with_fp32, fp32_first
from edgeq.targets import Precision, TargetProfile, expand_targets, load_profile
from edgeq.quantize import QuantizeOptions, quantization_plan
from edgeq.targets.resolve import QUANTIZED
from edgeq.threads import limited_threads
from edgeq.validate.budget import BudgetSyntaxError, parse_budget
from edgeq.footprint import WeightStorage, float_bits_of, weight_storage
from edgeq.validate.check import AccuracyLevels, per_compute_unit, run_accuracy_levels, run_artifact, runner_settings
from edgeq.validate.drift import DriftReport, Status
from edgeq.validate.latency import Latency
from edgeq.validate.layer_drift import LayerReport
from edgeq.validate.verdict import Verdict, combined_exit_code, verdict_of


@dataclass
class ConvertOptions:
    targets: list[str]
    out: Path
    precisions: list[str] | None = None  # None: each profile's default
    budget: str | None = None  # None: each profile's default budget for the precision
    data: Path | None = None
    text_column: str | None = None
    preprocess: str | None = None  # image preprocessing, e.g. "resize=256,crop=224,mean=...,std=...,layout=nchw"
    sample_rate: int | None = None  # Hz every WAV file must be at (no resampling)
    samples: int = 32
    seed: int = 0
    keep_float: list[str] = field(default_factory=list)  # torch FQNs or re:REGEX kept float in quantized schemes
    quantize: QuantizeOptions = field(default_factory=QuantizeOptions)
    layers: bool = False  # per-layer drift of every ONNX and TFLite artifact (edgeq.layers)
    compression: CompressionSpecs = field(default_factory=CompressionSpecs)  # prune, lowrank, recover (edgeq/compress/run.py)


@dataclass
class Outcome:
    target: str
    precision: str
    verdict: Verdict
    path: Path | None = None
    report: DriftReport | None = None
    violations: list[str] = field(default_factory=list)
    error: str | None = None
    size_bytes: int | None = None
    latency: Latency | None = None
    quantization: QuantizationDrift | None = None  # against the target's FP32 artifact; None for fp32
    outputs: list[dict[str, np.ndarray]] | None = field(default=None, repr=False)  # fp32 only: the baseline
    plan_notes: list[str] = field(default_factory=list)  # quantized schemes: how the plan was decided
    layers: LayerReport | None = None  # per-layer drift, when asked for
    storage: WeightStorage | None = None  # the weights as the artifact stores them (bits per weight)
    accuracy_levels: AccuracyLevels | None = None  # ONNX MatMulNBits: deployed beside accuracy_level 1


def convert(model: LoadedModel, options: ConvertOptions, on_step: Callable[[str], None] = lambda _: None) -> list[Outcome]:
    """Convert `model` for every requested target and precision; one Outcome each, failures included."""
    profiles = [load_profile(t) for t in expand_targets(options.targets)]
    plans = [(p, x) for p in profiles for x in fp32_first([Precision(x) for x in _precisions(p, options.precisions)])]
    _check_budget(options.budget)
    _check_compression(options.compression, plans)
    if options.compression.asked:  # --prune-layers patterns name real layers: exit 2 before any data is loaded
        from edgeq.compress.run import check_patterns

        check_patterns(model, options.compression)
    # Held for the whole run: a second run into OUT/<model> is refused now, not after loading data.
    # edgeq's own computing on one thread unless EDGEQ_THREADS says otherwise (edgeq/threads.py: same bytes on
    # any machine, and no spinning workers on shared cores).
    with claimed(Path(options.out) / model.name), limited_threads():
        return _convert_plans(model, plans, options, on_step)


def _convert_plans(model: LoadedModel, plans: list, options: ConvertOptions, on_step: Callable[[str], None]) -> list[Outcome]:
    on_step("preparing validation data")
    example = {s.name: t.numpy() for s, t in zip(model.inputs, model.example_inputs)}
    wanted = _calibration_count(plans, options)
    check_request(model, validation=options.samples, calibration=wanted)  # before loading: a clear error, not an OOM kill
    loaded = load_samples(
        model.inputs, example, data=options.data, tokenizer=model.tokenizer, text_column=options.text_column,
        preprocess=options.preprocess, sample_rate=options.sample_rate, count=options.samples + wanted, seed=options.seed,
    )
    samples = loaded.samples
    # A short source never starves validation (at most half goes to calibration); a long one gives both their count.
    calibration_count = min(wanted, max(len(samples) - options.samples, len(samples) // 2))
    calibration, validation = split(samples, calibration_count=calibration_count, seed=options.seed)
    references = reference_outputs(model, validation)  # of the ORIGINAL model, also when compression follows
    data_source = describe_data(loaded, options, validation=len(validation), calibration=len(calibration))
    compression, teacher = None, model.module  # QAT and LoRA distill from the original model too
    if options.compression.asked:  # once per run, before any artifact: every target converts the compressed model
        from edgeq.compress.run import compress_model

        compression = compress_model(model, options.compression, calibration, validation, references, on_step)
        model, compression = compression.model, compression if compression.stages else None

    outcomes = []
    with Fp32Baselines(model, validation, references, on_step) as baselines:  # temporary FP32 artifacts live until the end
        for profile, precision in plans:
            on_step(f"{profile.id} {precision}: converting")
            outcome = _convert_one(
                model, profile, precision, validation, references, options, data_source, fp32_artifact=baselines.getter(profile),
                calibration=calibration, on_step=on_step, compression=compression, teacher=teacher,
            )
            baselines.record(profile, outcome)
            outcomes.append(outcome)
    return outcomes


def _calibration_count(plans: list, options: ConvertOptions) -> int:
    """Calibration samples are drawn for quantized schemes and, also in FP32-only runs, for compression."""
    wanted = any(precision in QUANTIZED for _, precision in plans) or options.compression.needs_calibration
    return options.quantize.calibration_samples if wanted else 0


def _check_compression(specs: CompressionSpecs, plans: list) -> None:
    """Requests that cannot mean anything for these plans, refused before any data or model work (exit 2)."""
    recover = specs.recover
    if recover is None:
        return
    quantized = sorted({precision.value for _, precision in plans if precision in QUANTIZED})
    if recover.mode in ("qat", "lora") and not quantized:
        asked = ", ".join(sorted({precision.value for _, precision in plans}))
        raise UsageError(
            f"--recover {recover.text or recover.mode}: recovers quantized plans, and this run makes none ({asked}); "
            "add a quantized precision (e.g. -p int8-dynamic, -p int4-weight) or use --recover distill after --prune/--lowrank"
        )


def _precisions(profile: TargetProfile, requested: list[str] | None) -> list[str]:
    if not requested:
        return [profile.default_precision.value]
    unknown = [p for p in requested if p not in {x.value for x in Precision}]
    if unknown:
        raise UsageError(f"--precision {', '.join(unknown)}: not one of {', '.join(p.value for p in Precision)}")
    return requested


def _check_budget(text: str | None) -> None:
    try:
        parse_budget(text)
    except BudgetSyntaxError as exc:
        raise UsageError(f"--budget: {exc}") from exc


def reference_outputs(model: LoadedModel, samples: list[dict]) -> list[dict[str, np.ndarray]]:
    """FP32 PyTorch outputs for each sample: the reference every artifact is held to. A reference that is not
    finite can hold no artifact to anything (every comparison with NaN fails): that is the model's or the
    data's problem, said as such, not drift."""
    outputs = run_module(model.module, samples, model.input_names, model.outputs, "FP32 reference outputs")
    for index, sample in enumerate(outputs):
        for name, value in sample.items():
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                kind = "NaN" if np.isnan(value).any() else "Inf"
                raise SourceError(
                    f"the FP32 PyTorch model returns {kind} in output {name!r} for validation sample {index}: "
                    "no artifact can be compared with that. Check the model and the data it is given "
                    "(--data, --input, --preprocess)"
                )
    return outputs


def describe_data(loaded: SampleSet, options: ConvertOptions, *, validation: int, calibration: int = 0) -> dict:
    """The manifest's `validation.data`: source kind, path, samples found and used (per split, with the seed),
    the declared or defaulted preprocessing, and notes."""
    return loaded.describe(seed=options.seed, validation=validation, calibration=calibration)


LAYER_RUNTIMES = ("onnx", "tflite")  # runtimes whose intermediate tensors edgeq reads


def _convert_one(model, profile, precision, validation, references, options, data_source, fp32_artifact=None, calibration=(), on_step=lambda _: None,
                 compression=None, teacher=None) -> Outcome:
    converter = get_converter(profile.runtime)
    request = ConversionRequest(model, profile, precision)
    refusals = converter.check(request)
    if refusals:
        message = f"target {profile.id} refuses {precision}:\n" + "\n".join(f"  - {r}" for r in refusals)
        return Outcome(profile.id, precision.value, Verdict.CONVERSION_FAILED, error=message)
    budget = parse_budget(options.budget if options.budget is not None else profile.budget_for(precision))
    fallback = None
    if precision in QUANTIZED:
        try:
            request.model, request.plan, fallback = quantization_plan(
                model, profile, precision, options.quantize, options.keep_float, list(calibration), budget,
                recover=options.compression.recover, teacher=teacher if teacher is not None else model.module,
            )
            if compression is not None:  # the run's stages first, then what recovered this plan (qat, lora)
                from edgeq.compress.run import plan_records

                request.plan.compression[:0] = plan_records(compression.stages)
        except ConversionError as exc:
            return Outcome(profile.id, precision.value, Verdict.CONVERSION_FAILED, error=str(exc))
    settings = runner_settings(profile.runtime.value, profile.runtime_options)
    dest = bundle_path(options.out, model.name, profile.id, precision.value)
    try:
        with staging(dest) as stage:
            artifact = converter.convert(request, stage / converter.filename)
            parity = None
            if request.plan is not None:
                request.plan.save(stage)
                if fallback is not None:
                    write_json(stage / "sensitivity.json", fallback.to_json())
                parity = compare_weights(request.plan, artifact_weights(artifact.path, profile.runtime.value))
                if parity.mismatches or parity.missing:
                    problems = parity.mismatches + [f"{fqn}: not quantized in the artifact" for fqn in parity.missing]
                    raise ConversionError(f"target {profile.id}: weight parity failed: " + "; ".join(problems[:10]))
            # A quantized artifact is timed below, interleaved with its FP32 artifact (validate/latency.py)
            paired = precision != Precision.FP32 and fp32_artifact is not None
            run = run_artifact(artifact.path, profile.runtime.value, settings, validation, references, model.outputs, timed=not paired)
            report, signature = run.report, run.signature
            levels = run_accuracy_levels(artifact.path, profile.runtime.value, settings, validation, references, model.outputs, run)
            storage = weight_storage(request.model.module, request.plan, profile.runtime.value, float_bits_of(profile.runtime.value, precision.value))
            quantization = None
            if paired:
                timing = TimingInput(artifact.path, profile.runtime.value, settings, validation[0]) if validation else None
                quantization = compare_with_fp32(fp32_artifact, run, model.outputs, timing)
            violations = budget.violations(report) if report.status == Status.VALIDATED else []
            verdict = verdict_of(report, violations)
            layers = None
            if options.layers and report.status == Status.VALIDATED and profile.runtime.value in LAYER_RUNTIMES:
                from edgeq.layers import localize

                on_step(f"{profile.id} {precision}: per-layer drift")
                layers = localize(model, artifact.path, profile.runtime.value, settings, validation, quantized=request.plan is not None)
            golden = stage / "golden.npz"
            write_golden(golden, validation, references)
            manifest = build_manifest(
                model=model, profile=profile, artifact=artifact, report=report, budget=budget,
                violations=violations, verdict=verdict.value, signature=signature, settings=settings, golden=golden,
                data_source=data_source, plan=request.plan, parity=parity,
                latency=run.latency, latency_reason=run.latency_reason, quantization=quantization,
                storage=storage, accuracy_levels=levels, compression=_compression_section(compression, request.plan),
            )
            if manifest["compression"] is not None:  # did the zeros make it through quantization and export?
                manifest["artifact"]["sparsity"] = _artifact_sparsity(artifact.path, profile.runtime.value)
            if profile.runtime.value == "coreml":
                manifest["validation"]["per_compute_unit"] = per_compute_unit(artifact.path, settings, validation, references, model.outputs)
            write_json(stage / "report.json", _report_json(manifest, request.plan, layers))
            write_json(stage / "manifest.json", manifest)
            size = manifest["artifact"]["size_bytes"]
            final = dest if verdict in (Verdict.PASSED, Verdict.NOT_VALIDATED) else dest.with_name(dest.name + REJECTED_SUFFIX)
            publish(stage, final)
    except ConversionError as exc:
        return Outcome(profile.id, precision.value, Verdict.CONVERSION_FAILED, error=str(exc))
    error = report.reason if report.status == Status.ERROR else None
    outputs = run.outputs if precision == Precision.FP32 else None
    notes = _plan_notes(request.plan)
    return Outcome(profile.id, precision.value, verdict, final, report, violations, error, size, run.latency, quantization, outputs, notes, layers,
                   storage, levels)


def _compression_section(compression, plan) -> dict | None:
    """The run's compression figures, plus the records of stages that ran for this plan alone (qat, lora)."""
    section = dict(compression.figures) if compression is not None else None
    own = plan.compression[len(compression.stages) if compression is not None else 0:] if plan is not None else []
    if own:
        section = section or {"stages": [], "drift_samples": None, "latency": None, "seconds": []}
        section["stages"] = [*section["stages"], *own]
    return section


def _artifact_sparsity(path: Path, runtime: str) -> dict | None:
    """Exact zeros among the artifact's weights (edgeq.sparsity_report), overall and per layer."""
    from edgeq.sparsity_report import artifact_zeros

    try:
        return artifact_zeros(path, runtime)
    except (ValueError, OSError):  # a runtime whose weights edgeq cannot read: the report says nothing of zeros
        return None


def _plan_notes(plan) -> list[str]:
    if plan is None:
        return []
    return [*plan.coverage_notes(), *plan.notes]  # 'N of M weights quantized (share)', float ones with reasons


def _report_json(manifest: dict, plan=None, layers: LayerReport | None = None) -> dict:
    """report.json: the drift part of the manifest, for tools that read only reports (docs/report-schema.md),
    plus what a report page shows beside it: versions, the plan summary with its notes, weight parity."""
    keys = ("model", "target", "precision", "artifact", "validation", "budget")
    report = {key: manifest[key] for key in keys}
    report["versions"] = manifest["versions"]
    report["plan"] = None if manifest["plan"] is None else {**manifest["plan"], "notes": list(plan.notes) if plan is not None else []}
    report["weight_parity"] = manifest["weight_parity"]
    report["layers"] = None if layers is None else layers.to_json()  # edgeq convert/validate --layers
    report["compression"] = manifest.get("compression")  # prune / low-rank / recover: before and after each stage
    return report


def write_run_reports(outcomes: list[Outcome]) -> list[Path]:
    """OUT/<model>/report.html and report.md for one run: the report.json of every bundle the run
    published, and a line for each target/precision that published none (conversion refused or failed).
    Written atomically (temp + rename). Returns the paths written; none when the run published nothing."""
    from edgeq.report_html import load_reports, render_html
    from edgeq.report_markdown import render_markdown

    published = [o for o in outcomes if o.path is not None and (o.path / "report.json").is_file()]
    if not published:
        return []
    model_dir = published[0].path.parent.parent
    model = model_dir.name
    reports = load_reports((o.path for o in published), relative_to=model_dir)
    for outcome in outcomes:
        if outcome.path is None:
            reports.append({
                "model": {"name": model}, "target": {"id": outcome.target}, "precision": outcome.precision,
                "budget": {"terms": None, "verdict": outcome.verdict.value, "violations": list(outcome.violations)},
                "error": outcome.error,
            })
    written = []
    for name, text in (("report.html", render_html(reports)), ("report.md", render_markdown(reports))):
        written.append(write_atomic(model_dir / name, text))
    return written


def exit_code(outcomes: list[Outcome]) -> int:
    return combined_exit_code(o.verdict for o in outcomes)


__all__ = ["ConvertOptions", "Outcome", "Verdict", "convert", "exit_code", "write_run_reports"]
