"""The body of `edgeq tune` after its options are checked: load the model, tune, print what was found."""

from __future__ import annotations

from collections.abc import Callable

from edgeq.tune.options import TuneOptions


def run_tune(job, options: TuneOptions, values: dict, echo: Callable[[str], None], on_step: Callable[[str], None]) -> int:
    """Tune `job`'s model for its targets; print one summary per target; return the exit code (0: every target
    has a plan holding the budget; 6: some target has none; 4/5 when every candidate failed to convert/run)."""
    from edgeq.tune.choices import check_targets

    check_targets(job.targets, options)  # schemes the targets cannot hold: refused before torch and the model load
    from edgeq.load import load_model
    from edgeq.tune.run import tune

    on_step(f"loading {job.source}")
    model = load_model(job.source, inputs=job.inputs, task=job.task, factory=job.factory, trust_pickle=job.trust_pickle, name=job.name)
    result = tune(model, job, options, values, on_step)
    for target in result.targets:
        echo(f"{target.target}: {target.evaluated} candidates evaluated ({_seconds(target.seconds)})")
        for candidate in target.candidates:
            size = "-" if candidate.outcome.size_bytes is None else f"{candidate.outcome.size_bytes / 1e6:.3f} MB"
            cosine = "-" if candidate.cosine is None else f"{candidate.cosine:.5f}"
            mark = "*" if candidate is target.chosen else " "
            ms = "" if candidate.latency_ms is None else f"  {candidate.latency_ms:.3g} ms {candidate.latency_source.split(' ', 1)[0]}"
            echo(f" {mark} {candidate.label:<22} {candidate.kind:<8} {size:>11}  cosine {cosine}{ms}  {candidate.outcome.verdict.value}")
        chosen = target.chosen
        if chosen is not None and chosen.passed:
            echo(f"  chosen by {target.objective_used}: {chosen.label} -> {chosen.outcome.path}")
        else:
            closest = "" if chosen is None else f"; the closest ({chosen.label}, cosine {chosen.cosine:.5f}) is kept at {chosen.outcome.path}"
            echo(f"  no candidate holds the budget {options.budget!r} on {target.target}{closest}")
        for note in target.notes:
            echo(f"  note: {note}")
    echo(f"search time {result.seconds:.0f} s; {sum(t.evaluated for t in result.targets)} candidate plans evaluated")
    for path in result.files:
        echo(f"  wrote {path}")
    return result.exit_code


def _seconds(seconds: dict) -> str:
    return ", ".join(f"{key} {value} s" for key, value in seconds.items())
