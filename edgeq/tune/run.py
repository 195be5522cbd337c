"""`edgeq tune`: per target, measure every layer at every choice, search the per-layer plan that holds the budget
in simulation, then convert it with `pipeline.convert` and validate it in the runtime (promoting more layers
when the runtime disagrees, a bounded number of times); convert the uniform schemes the same way; keep the
candidate that holds the budget and best serves the objective, bundled like any `convert`.

Every artifact here comes from pipeline.convert: tuning orchestrates the pipeline and never reaches into the
converters (DESIGN.md). Candidates convert into OUT/<model>/tune-candidates/ and the chosen bundle is moved to
OUT/<model>/<target>/<precision>/, byte for byte what `edgeq convert -c tuned.toml` makes again.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.errors import UsageError
from edgeq.tune.options import Objective, TuneOptions, UniformScheme

CANDIDATES_DIR = "tune-candidates"
SAME_SPEED = 1.1  # medians within 10% are one speed: one process's timings on a shared machine jitter that much (latency.speed_summary)
EXTRA_FRONT_STEPS = 8  # predicted steps past the verified plan, so the front shows what more bytes would buy


@dataclass
class Candidate:
    label: str  # "tuned 1", "int4-weight:g32"
    kind: str  # "tuned" or "uniform"
    precision: str
    group_size: int | None
    per_layer: dict[str, str] | None  # tuned: layer -> choice
    outcome: object  # pipeline.Outcome
    seconds: float
    predicted_cosine: float | None = None
    predicted_size_bytes: int | None = None
    step: int | None = None
    latency_ms: float | None = None  # median ms, measured here or estimated (edgeq/tune/timing.py)
    latency_source: str | None = None  # how: "measured on this machine (...)" or "estimated"

    @property
    def passed(self) -> bool:
        return self.outcome.verdict.value == "passed"

    @property
    def cosine(self) -> float | None:
        report = self.outcome.report
        if report is None or not report.outputs:
            return None
        return float(np.mean([o.cosine for o in report.outputs]))

    def to_json(self) -> dict:
        outcome = self.outcome
        return {
            "label": self.label, "kind": self.kind, "precision": self.precision, "group_size": self.group_size,
            "verdict": outcome.verdict.value, "size_bytes": outcome.size_bytes,
            "cosine": None if self.cosine is None else round(self.cosine, 6),
            "cosine_min": None if outcome.report is None or not outcome.report.outputs else round(min(o.cosine_min for o in outcome.report.outputs), 6),
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 4), "latency_source": self.latency_source,
            "violations": list(outcome.violations), "error": outcome.error,
            "predicted_cosine": None if self.predicted_cosine is None else round(self.predicted_cosine, 6),
            "predicted_size_bytes": self.predicted_size_bytes, "search_step": self.step,
            "seconds": round(self.seconds, 1), "per_layer": self.per_layer,
        }


@dataclass
class TargetTune:
    target: str  # as given (a profile id or a .toml path)
    profile_id: str
    runtime: str
    precision: str | None  # the scheme the per-layer plan lives in; None: the profile lists no low-bit scheme
    measurements: object | None = None  # edgeq.tune.measure.Measurements
    steps: list = field(default_factory=list)  # edgeq.tune.search.Step, in search order
    trimmed: list = field(default_factory=list)  # the steps converted, after trim (edgeq.tune.search.trim)
    candidates: list[Candidate] = field(default_factory=list)
    chosen: Candidate | None = None
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    latency_method: str | None = None  # how the candidates' latency_ms were found: measured here, or a cost model's estimate
    objective_used: str | None = None  # the key the chosen point minimized: the objective, or size where latency is missing

    @property
    def evaluated(self) -> int:
        return len(self.candidates)


@dataclass
class TuneResult:
    model: str
    budget: str
    objective: str
    model_dir: Path
    targets: list[TargetTune]
    seconds: float = 0.0
    files: list[Path] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        from edgeq.validate.verdict import combined_exit_code

        return combined_exit_code(t.chosen.outcome.verdict if t.chosen else _failed(t) for t in self.targets)


def _failed(target: TargetTune):
    from edgeq.validate.verdict import Verdict

    verdicts = [c.outcome.verdict for c in target.candidates]
    return Verdict.OVER_BUDGET if not verdicts or Verdict.OVER_BUDGET in verdicts else verdicts[0]


def tune(model, job, options: TuneOptions, values: dict, on_step: Callable[[str], None] = lambda _: None) -> TuneResult:
    """Tune `model` (a LoadedModel) for every target of `job` (edgeq.project.Job). `values`: the job's keys as
    given, written into tuned.toml. Writes tune.json/.md/.html, tuned.toml and the run's report pages into
    OUT/<model>/ and returns what was evaluated."""
    from edgeq.bundle import claimed
    from edgeq.threads import limited_threads
    from edgeq.tune.choices import check_targets
    from edgeq.tune.report import write_outputs

    started = time.perf_counter()
    model_dir = Path(job.out) / model.name
    result = TuneResult(model.name, options.budget, options.objective.value, model_dir, [])
    targets = check_targets(job.targets, options)
    with claimed(model_dir), limited_threads():
        calibration = _calibration_samples(model, job)
        for target, profile in targets:
            result.targets.append(_tune_target(model, job, options, target, profile, calibration, on_step))
        result.seconds = time.perf_counter() - started
        result.files = write_outputs(result, job, values)
        if not options.keep_candidates:
            shutil.rmtree(model_dir / CANDIDATES_DIR, ignore_errors=True)
    return result


def _calibration_samples(model, job) -> list:
    """The calibration split `pipeline.convert` draws for these options (same source, count and seed), so the
    plans measured here are fitted on what the verifying conversions fit on; never the validation split."""
    from edgeq.calibration.data import load_samples, split

    wanted = job.quantize.calibration_samples
    if wanted < 2:
        raise UsageError(f"--calibration-samples {wanted}: tuning fits on calibration samples and measures drift on held-out ones; give 8 or more")
    example = {s.name: t.numpy() for s, t in zip(model.inputs, model.example_inputs)}
    loaded = load_samples(model.inputs, example, data=job.data, tokenizer=model.tokenizer, text_column=job.text_column,
                          preprocess=job.preprocess, sample_rate=job.sample_rate, count=job.samples + wanted, seed=job.seed)
    samples = loaded.samples
    count = min(wanted, max(len(samples) - job.samples, len(samples) // 2))
    calibration, _ = split(samples, calibration_count=count, seed=job.seed)
    if len(calibration) < 2:
        raise UsageError(f"--data gives {len(samples)} samples: too few to calibrate and validate; give more samples")
    return calibration


def _held_out(samples: list) -> tuple[list, list]:
    """(fitted, held out): a quarter (at most 16) judges the drift, never the samples the codes were fitted on
    (as --auto-fallback does: a plan judged on its own fit looks better than it is)."""
    count = min(16, max(1, len(samples) // 4))
    return list(samples[:-count]), list(samples[-count:])


def _tune_target(model, job, options: TuneOptions, target: str, profile, calibration: list, on_step) -> TargetTune:
    from edgeq.tune.choices import layer_choices, plan_precision, uniform_schemes
    from edgeq.tune.measure import measure
    from edgeq.tune.timing import attach_latencies
    from edgeq.validate.budget import parse_budget

    precision = plan_precision(profile, options)
    uniform, notes = uniform_schemes(profile, precision, options)
    result = TargetTune(target, profile.id, profile.runtime.value, precision, notes=notes)
    budget = parse_budget(options.budget)
    started = time.perf_counter()
    if precision is None:
        result.notes.append(f"target {profile.id} lists no low-bit scheme: no per-layer plan; uniform schemes compared")
    else:
        fitted, held_out = _held_out(calibration)
        result.measurements = measure(model, profile, precision, job.quantize, job.keep_float, fitted, held_out,
                                      layer_choices(precision, options), on_step)
        result.seconds.update(result.measurements.seconds)
        for choice, why in result.measurements.excluded.items():
            result.notes.append(f"choice {choice} not tried: {why}")
        _search(model, job, options, target, result, budget, on_step)
    uniform_started = time.perf_counter()
    for group in _uniform_calls(uniform, job):
        result.candidates += _convert_uniform(model, job, options, target, group, on_step)
    result.seconds["uniform"] = round(time.perf_counter() - uniform_started, 1)
    attach_latencies(result, profile, model, options.objective)
    _choose(result, options, model, job)
    result.seconds["total"] = round(time.perf_counter() - started, 1)
    return result


def _search(model, job, options: TuneOptions, target: str, result: TargetTune, budget, on_step) -> None:
    """Walk the greedy path; convert the first step that holds in simulation (and clears `required`); when the
    runtime misses the budget, demand a prediction that clears it by the factor the runtime drifted more (_required_cosine)."""
    from edgeq.tune.search import greedy_path, trim

    measurements, started = result.measurements, time.perf_counter()
    converting = 0.0
    required, tuned, extra = -np.inf, [], None
    path = greedy_path(measurements, budget)
    for step in path:
        result.steps.append(step)
        if extra is not None:
            extra -= 1
            if extra <= 0:
                break
            continue
        if not step.holds or step.cosine < required:
            continue
        step = trim(measurements, step, budget, required)
        result.trimmed.append(step)
        on_step(f"{result.profile_id}: converting tuned plan {len(tuned) + 1} (search step {step.index}, {len(step.demoted)} layers "
                f"trimmed back, predicted cosine {step.cosine:.5f})")
        candidate = _convert_tuned(model, job, target, result, step, len(tuned) + 1)
        converting += candidate.seconds
        tuned.append(candidate)
        result.candidates.append(candidate)
        if candidate.passed or len(tuned) >= options.max_candidates:
            extra = EXTRA_FRONT_STEPS
            continue
        required = _required_cosine(step.cosine, candidate.cosine, budget)
    if not tuned and result.steps:  # nothing holds even in simulation: the runtime may still disagree; ask it once
        step = result.steps[-1]
        on_step(f"{result.profile_id}: no plan holds the budget in simulation; converting the most precise one")
        candidate = _convert_tuned(model, job, target, result, step, 1)
        converting += candidate.seconds
        result.candidates.append(candidate)
    result.seconds["search"] = round(time.perf_counter() - started - converting, 1)
    result.seconds["verify"] = round(converting, 1)


def _required_cosine(predicted: float, measured: float | None, budget) -> float:
    """The predicted mean cosine the next plan needs after a plan predicted at `predicted` measured `measured`
    in the runtime: the runtime's drift taken as a multiple of the simulation's (k = measured / predicted drift,
    at least 1), so a cosine bound needs predicted drift <= its allowance / k; other budgets halve the drift.
    Always at least a tenth less drift than the plan that missed."""
    drift = max(1.0 - predicted, 1e-9)
    factor = max((1.0 - measured) / drift, 1.0) if measured is not None else 2.0
    bound = next((b for b in budget.bounds if b.metric == "cosine"), None)
    allowed = (1.0 - bound.limit) / factor if bound is not None else drift / 2
    return 1.0 - min(allowed, 0.9 * drift)


def _convert_tuned(model, job, target: str, result: TargetTune, step, number: int) -> Candidate:
    from edgeq.layer_overrides import parse_per_layer

    per_layer = dict(step.assignment)
    overrides = parse_per_layer(per_layer, "edgeq tune plan")
    quantize = dataclasses.replace(job.quantize, layer_overrides=overrides, auto_fallback=False)
    label = f"tuned {number}"
    started = time.perf_counter()
    outcome = _convert(model, job, target, [result.precision], quantize, _scratch(job, model, result.profile_id, f"tuned-{number}"))[0]
    return Candidate(label, "tuned", result.precision, job.quantize.group_size, per_layer, outcome, time.perf_counter() - started,
                     step.cosine, step.size_bytes, step.index)


def _uniform_calls(schemes: list[UniformScheme], job) -> list[list[UniformScheme]]:
    """Schemes that share one conversion run (one data load, one FP32 baseline): those of one group size; 8-bit
    schemes (which have none) join the first run."""
    groups: dict[int | None, list[UniformScheme]] = {}
    for scheme in schemes:
        if scheme.precision.startswith("int8"):
            continue
        groups.setdefault(scheme.group_size or job.quantize.group_size, []).append(scheme)
    eight = [s for s in schemes if s.precision.startswith("int8")]
    calls = list(groups.values())
    if eight:
        calls = [eight + calls[0]] + calls[1:] if calls else [eight]
    return calls


def _convert_uniform(model, job, options, target: str, schemes: list[UniformScheme], on_step) -> list[Candidate]:
    from edgeq.targets import load_profile

    group = next((s.group_size for s in schemes if s.group_size), job.quantize.group_size)
    quantize = dataclasses.replace(job.quantize, layer_overrides=(), auto_fallback=False, group_size=group)
    labels = ", ".join(s.label for s in schemes)
    on_step(f"{load_profile(target).id}: converting uniform {labels}")
    started = time.perf_counter()
    slug = "uniform-" + "-".join(s.label.replace(":", "") for s in schemes)
    outcomes = _convert(model, job, target, [s.precision for s in schemes], quantize, _scratch(job, model, load_profile(target).id, slug))
    seconds = (time.perf_counter() - started) / max(len(outcomes), 1)
    by_precision = {s.precision: s for s in schemes}
    candidates = []
    for outcome in outcomes:
        scheme = by_precision[outcome.precision]
        lowbit = not scheme.precision.startswith("int8")
        label = scheme.precision + (f":g{group}" if lowbit and group and not scheme.precision.startswith("lut") else "")
        candidates.append(Candidate(label, "uniform", scheme.precision, group if lowbit else None, None, outcome, seconds))
    return candidates


def _scratch(job, model, profile_id: str, slug: str) -> Path:
    return Path(job.out) / model.name / CANDIDATES_DIR / profile_id / slug


def _convert(model, job, target: str, precisions: list[str], quantize, out: Path) -> list:
    from edgeq.pipeline import ConvertOptions, convert

    options = ConvertOptions(
        targets=[target], out=out, precisions=precisions, budget=job.budget, data=job.data, text_column=job.text_column,
        preprocess=job.preprocess, sample_rate=job.sample_rate, samples=job.samples, seed=job.seed,
        keep_float=list(job.keep_float), quantize=quantize,
    )
    return convert(model, options)


def _choose(result: TargetTune, options: TuneOptions, model, job) -> None:
    """The passing candidate that best serves the objective, moved to OUT/<model>/<target>/<precision>/; with
    none passing, the closest one is kept there as <precision>.rejected/ (as `convert` keeps an over-budget one)."""
    from edgeq.bundle import REJECTED_SUFFIX, bundle_path, publish

    passing = [c for c in result.candidates if c.passed]
    objective = options.objective
    if objective != Objective.SIZE and any(c.latency_ms is None for c in passing):
        result.notes.append(f"{objective.value}: {result.runtime} artifacts have no latency here, measured or estimated; chosen by size")
        objective = Objective.SIZE
    result.objective_used = objective.value
    if passing:
        chosen = min(passing, key=_ranking(passing, objective))
    else:
        measured = [c for c in result.candidates if c.cosine is not None and c.outcome.path is not None]
        chosen = max(measured, key=lambda c: c.cosine) if measured else None
    if chosen is None or chosen.outcome.path is None:
        return
    dest = bundle_path(job.out, model.name, result.profile_id, chosen.precision)
    if not chosen.passed:
        dest = dest.with_name(dest.name + REJECTED_SUFFIX)
    dest.parent.mkdir(parents=True, exist_ok=True)
    publish(chosen.outcome.path, dest)
    chosen.outcome = dataclasses.replace(chosen.outcome, path=dest)
    result.chosen = chosen


def _ranking(passing: list[Candidate], objective: Objective):
    smallest = min(c.outcome.size_bytes for c in passing)
    if objective == Objective.SIZE:
        return lambda c: (c.outcome.size_bytes, -(c.cosine or 0))
    fastest = min(c.latency_ms for c in passing)
    if objective == Objective.LATENCY:  # within SAME_SPEED of the fastest counts as as fast: then the smaller wins
        return lambda c: (c.latency_ms > fastest * SAME_SPEED, c.outcome.size_bytes, c.latency_ms)
    return lambda c: ((c.outcome.size_bytes / smallest) * (c.latency_ms / fastest), c.outcome.size_bytes)
