"""What `edgeq tune` leaves in OUT/<model>/: tune.json (every candidate evaluated, the search path, each layer's
figures), tune.md and tune.html (the front per target, the chosen point, each layer's choice and why),
tuned.toml (the chosen plans as an edgeq.toml: `edgeq convert -c tuned.toml` makes them again without searching),
and the run's report.html/report.md of the chosen bundles (pipeline.write_run_reports)."""

from __future__ import annotations

import json
from pathlib import Path

from edgeq.tune.search import front, sensitivity_rank

TOML_NAME = "tuned.toml"
REPRODUCED_OUT = "reproduced"  # where `edgeq convert -c tuned.toml` puts its bundles, beside the file
_PATH_KEYS = ("source", "data")
_NOT_COPIED = {"targets", "precisions", "per_layer", "out", "name", "group_size", "budget", "auto_fallback", "fallback_max"}


def layer_rows(target, budget: str = "the budget") -> list[dict]:
    """Per tuned layer of the chosen plan: its choice, size, drift alone, and why it got it: its sensitivity, the
    search steps that promoted it (with the mix's predicted cosine before each, against `budget`), and whether
    the trim step demoted it back."""
    chosen, measurements = target.chosen, target.measurements
    if chosen is None or chosen.per_layer is None or measurements is None:
        return []
    from edgeq.tune.search import cheapest

    start, ranks = cheapest(measurements), sensitivity_rank(measurements)
    total = len(measurements.layers)
    steps = [s for s in target.steps if chosen.step is None or s.index <= chosen.step]
    cosine_at = {s.index: s.cosine for s in steps}
    first_held = next((s.index for s in steps if s.holds), None)
    converted = next((s for s in target.trimmed if s.assignment == chosen.per_layer), None)
    held_at = "" if converted is None else f"; the plan held {budget} in simulation at step {converted.index} (predicted cosine {converted.cosine:.5f})"
    rows = []
    for fqn, value in chosen.per_layer.items():
        figures = measurements.layers[fqn]
        pick, base = figures[value], figures[start[fqn]]
        weights = measurements.weights.get(fqn)
        sensitivity = f"alone at {start[fqn]} it drifts {base.drift_alone:.2g} (sensitivity rank {ranks[fqn]} of {total})"
        promotions = [_promotion_text(s, cosine_at, first_held) for s in steps if s.promoted is not None and s.promoted[0] == fqn]
        demoted = [d for d in (converted.demoted if converted is not None else []) if d[0] == fqn]
        if value == start[fqn]:
            why = f"cheapest choice kept: {sensitivity}" + "".join(f"; {text}" for text in promotions)
        else:
            why = (f"promoted from {start[fqn]} to {value}: {sensitivity}, at {value} {pick.drift_alone:.2g}, for "
                   f"{(pick.bits - base.bits) / 8000:.1f} kB more; " + "; ".join(promotions))
        why += "".join(f"; trimmed back from {old} to {new}: the mix still held {budget} without it" for _, old, new in demoted)
        why += held_at + (" without promoting it" if not promotions and held_at else "")
        rows.append({
            "layer": fqn, "choice": value, "form": pick.form, "bytes": -(-pick.bits // 8),
            "bits_per_weight": None if not weights else round(pick.bits / weights, 3),
            "drift_alone": float(f"{pick.drift_alone:.3g}"), "drift_alone_cheapest": float(f"{base.drift_alone:.3g}"),
            "sensitivity_rank": ranks[fqn], "why": why,
            "promoted_at_steps": [s.index for s in steps if s.promoted is not None and s.promoted[0] == fqn],
            "trimmed": [{"from": old, "to": new} for _, old, new in demoted],
            "choices": {c.value: {"bytes": -(-c.bits // 8), "drift_alone": float(f"{c.drift_alone:.3g}")} for c in figures.values()},
        })
    return rows


def _promotion_text(step, cosine_at: dict, first_held: int | None) -> str:
    """"step 3 (int4:g128 -> int8, the most drift saved per byte; the mix before it predicted 0.98120)"."""
    _, old, new = step.promoted
    before = cosine_at.get(step.index - 1)
    after_miss = first_held is not None and step.index > first_held
    reason = ("after a converted plan missed the budget in the runtime" if after_miss else "the most drift saved per byte")
    return f"step {step.index} ({old} -> {new}, {reason}" + ("" if before is None else f"; the mix before it predicted {before:.5f}") + ")"


def target_json(target, budget: str = "the budget") -> dict:
    candidates = target.candidates
    points = [(c.outcome.size_bytes, 1 - c.cosine) for c in candidates if c.cosine is not None and c.outcome.size_bytes]
    measured = [c for c in candidates if c.cosine is not None and c.outcome.size_bytes]
    m = target.measurements
    return {
        "target": target.target, "profile": target.profile_id, "runtime": target.runtime, "plan_precision": target.precision,
        "choices": None if m is None else m.choices, "choices_excluded": None if m is None else m.excluded,
        "held_out_samples": None if m is None else m.samples,
        "evaluated_candidates": target.evaluated, "seconds": target.seconds, "notes": target.notes,
        "validated_by": validated_by(target), "latency_method": target.latency_method, "chosen_by": target.objective_used,
        "chosen": None if target.chosen is None else {**target.chosen.to_json(), "bundle": str(target.chosen.outcome.path)},
        "candidates": [c.to_json() for c in candidates],
        "front": [measured[i].label for i in front(points)],
        "front_with_latency": front_with_latency(measured),
        "search": [s.to_json() for s in target.steps],
        "converted_plans": [s.to_json() for s in target.trimmed],
        "layers": layer_rows(target, budget),
    }


def front_with_latency(candidates: list) -> list[str] | None:
    """Labels of the candidates no other beats on size, latency and drift together (each at least as good,
    one better); None when some candidate has no latency."""
    if not candidates or any(c.latency_ms is None for c in candidates):
        return None
    keys = [(c.outcome.size_bytes, c.latency_ms, 1 - c.cosine) for c in candidates]

    def beaten(i):
        return any(all(o <= m for o, m in zip(other, keys[i])) and other != keys[i] for other in keys)

    return [c.label for i, c in enumerate(candidates) if not beaten(i)]


def validated_by(target) -> str | None:
    """What ran the candidates: the runtime's executor as its drift reports name it (on Linux, Core ML's is
    edgeq's MIL reference executor, never presented as Apple's runtime)."""
    return next((c.outcome.report.executor for c in target.candidates if c.outcome.report is not None), None)


def latency_header(target) -> str:
    """The candidates' ms column: whether its figures were measured or estimated."""
    sources = {c.latency_source.split(" ", 1)[0] for c in target.candidates if c.latency_source}
    return "ms (" + "/".join(sorted(sources)) + ")" if sources else "ms"


def tune_json(result) -> dict:
    return {
        "model": result.model, "budget": result.budget, "objective": result.objective, "seconds": round(result.seconds, 1),
        "evaluated_candidates": sum(t.evaluated for t in result.targets),
        "targets": [target_json(t, result.budget) for t in result.targets],
    }


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string takes JSON's escapes


def tuned_toml(result, job, values: dict) -> str:
    """The chosen plans as an edgeq.toml: [defaults] from the run's options (paths made absolute), one [[models]]
    per target with its scheme and, for a tuned plan, its per_layer table, every tuned layer by name."""
    lines = [
        f"# edgeq tune: the chosen plan per target for budget {result.budget!r} (objective {result.objective}).",
        "# Reproduce without searching: edgeq convert -c tuned.toml   (bundles go to ./reproduced/ beside this file)",
        "[defaults]",
    ]
    defaults = {k: v for k, v in values.items() if k not in _NOT_COPIED}
    for key in _PATH_KEYS:
        if key in defaults and Path(str(defaults[key])).exists():
            defaults[key] = str(Path(str(defaults[key])).resolve())
    defaults |= {"budget": result.budget, "out": REPRODUCED_OUT, "name": result.model}
    lines += [f"{key} = {_toml_value(value)}" for key, value in defaults.items()]
    for target in result.targets:
        chosen = target.chosen
        if chosen is None or not chosen.passed:
            lines += ["", f"# {target.target}: no candidate held the budget (see tune.md)"]
            continue
        lines += ["", f"# {target.target}: {chosen.label}, {chosen.outcome.size_bytes:,} bytes, mean cosine {chosen.cosine:.5f}",
                  "[[models]]", f"source = {_toml_value(defaults['source'])}", f"targets = {_toml_value([target.target])}",
                  f"precisions = {_toml_value([chosen.precision])}"]
        if chosen.group_size is not None:
            lines.append(f"group_size = {chosen.group_size}")
        if chosen.per_layer:
            lines.append("[models.per_layer]")
            lines += [f"{_toml_value(fqn)} = {_toml_value(value)}" for fqn, value in chosen.per_layer.items()]
    return "\n".join(lines) + "\n"


def _mb(size) -> str:
    return "-" if size is None else f"{size / 1e6:.3f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def _num(value, digits=5) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def tune_markdown(result) -> str:
    lines = [f"# edgeq tune: {result.model}", "",
             f"Budget `{result.budget}`, objective {result.objective}; {sum(t.evaluated for t in result.targets)} candidate "
             f"artifacts converted and validated in {result.seconds:.0f} s.", ""]
    for target in result.targets:
        chosen = target.chosen
        lines += [f"## {target.target}", ""]
        head = f"Per-layer plan inside {target.precision}" if target.precision else "No per-layer plan"
        lines.append(f"{head}; {target.evaluated} candidates evaluated; seconds: "
                     + ", ".join(f"{k} {v}" for k, v in target.seconds.items()) + ".")
        if chosen is None:
            lines.append("\n**Nothing was converted that could be chosen.**")
        elif chosen.passed:
            lines.append(f"\n**Chosen: {chosen.label}**, {_mb(chosen.outcome.size_bytes)}, mean cosine {_num(chosen.cosine)}: `{chosen.outcome.path}`")
        else:
            lines.append(f"\n**No candidate holds the budget.** The closest, {chosen.label} (mean cosine {_num(chosen.cosine)}), "
                         f"is kept at `{chosen.outcome.path}`.")
        if target.objective_used:
            lines.append(f"Chosen by {target.objective_used}.")
        if validated_by(target):
            lines.append(f"Validated by: {validated_by(target)}.")
        if target.latency_method:
            lines.append(f"Latency: {target.latency_method}.")
        lines += ["", f"| candidate | kind | size | mean cosine | predicted cosine | {latency_header(target)} | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for c in target.candidates:
            lines.append(f"| {c.label} | {c.kind} | {_mb(c.outcome.size_bytes)} | {_num(c.cosine)} | {_num(c.predicted_cosine)} | "
                         f"{_ms(c.latency_ms)} | {c.outcome.verdict.value} |")
        lines += [f"- {note}" for note in target.notes]
        rows = layer_rows(target, f"`{result.budget}`")
        if chosen is not None and chosen.per_layer is None:
            lines.append(f"\nThe chosen point is the uniform scheme {chosen.label}: every quantized layer at it (no per-layer plan).")
        if rows:
            lines += ["", "| layer | choice | bits/weight | drift alone | why |", "|---|---|---|---|---|"]
            lines += [f"| {r['layer']} | {r['choice']} | {r['bits_per_weight']} | {r['drift_alone']:.2g} | {r['why']} |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def write_outputs(result, job, values: dict) -> list[Path]:
    """tune.json, tune.md, tune.html and tuned.toml in OUT/<model>/, then the chosen bundles' report pages."""
    from edgeq.bundle import write_atomic
    from edgeq.pipeline import write_run_reports
    from edgeq.tune.page import tune_html

    folder = result.model_dir
    folder.mkdir(parents=True, exist_ok=True)
    written = [
        write_atomic(folder / "tune.json", json.dumps(tune_json(result), indent=2) + "\n"),
        write_atomic(folder / "tune.md", tune_markdown(result)),
        write_atomic(folder / "tune.html", tune_html(result)),
        write_atomic(folder / TOML_NAME, tuned_toml(result, job, values)),
    ]
    chosen = [t.chosen.outcome for t in result.targets if t.chosen is not None]
    return written + write_run_reports(chosen)
