"""Each candidate's latency for --objective latency / balanced: measured in the runtime on this machine where it
runs (ONNX Runtime, LiteRT), estimated from the profile's cost model where it does not (Core ML off macOS:
edgeq/tune/cost.py). Every figure carries its source, and tune.json and the report pages print it.

The pipeline times each artifact when it validates it, but candidates are validated minutes apart on a machine
other work shares: their medians are not comparable. When the objective needs latency, the candidates that hold
the budget are timed again here, interleaved round by round (validate/latency.py), so load lands on all alike.
"""

from __future__ import annotations

from edgeq.tune.options import Objective

MEASURED, ESTIMATED = "measured", "estimated"


def attach_latencies(result, profile, model, objective: Objective) -> None:
    """Set `latency_ms` and `latency_source` on `result`'s candidates (a run.TargetTune): estimates for every
    converted candidate where the runtime is not timed here and the profile has a cost model; with a latency
    objective, the passing candidates timed again interleaved where it is timed. Notes what could not be."""
    untimed = [c for c in result.candidates if c.outcome.path is not None and c.outcome.latency is None]
    timed = [c for c in result.candidates if c.outcome.latency is not None]
    for candidate in timed:
        candidate.latency_ms = candidate.outcome.latency.median_ms
        candidate.latency_source = f"{MEASURED} on this machine when validated ({candidate.outcome.latency.method})"
    if untimed and not timed:
        _estimate(result, profile, model, untimed)
    elif objective != Objective.SIZE:
        _time_again(result, profile, [c for c in timed if c.passed])


def _estimate(result, profile, model, candidates: list) -> None:
    from edgeq.tune.cost import cost_model, estimate_ms, layer_work

    cost = cost_model(profile)
    if cost is None:
        result.notes.append(f"latency: {profile.id} artifacts are not timed on this machine and edgeq has no cost model for it")
        return
    work = layer_work(model)
    for candidate in candidates:
        if candidate.outcome.storage is None:
            continue
        candidate.latency_ms = estimate_ms(candidate.outcome.storage, work, cost)
        candidate.latency_source = ESTIMATED
    result.latency_method = cost.describe()


def _time_again(result, profile, candidates: list) -> None:
    """The passing candidates timed together, interleaved, on the first validation sample (their golden.npz)."""
    from edgeq.bundle import read_golden
    from edgeq.validate.check import runner_settings
    from edgeq.validate.latency import time_artifacts

    if len(candidates) < 2:
        return
    files = [_artifact(c.outcome.path) for c in candidates]
    inputs, _ = read_golden(candidates[0].outcome.path / "golden.npz")
    labels = [f"{len(candidates) - 1} other passing candidates" for _ in candidates]
    latencies, why = time_artifacts(files, profile.runtime.value, runner_settings(profile.runtime.value, profile.runtime_options),
                                    inputs[0], labels)
    if latencies is None:
        result.notes.append(f"latency: the passing candidates could not be timed together ({why}); each one's figure from its validation")
        return
    for candidate, latency in zip(candidates, latencies):
        candidate.latency_ms = latency.median_ms
        candidate.latency_source = f"{MEASURED} on this machine ({latency.method}; p90 {latency.p90_ms:.3f} ms)"
    result.latency_method = f"{MEASURED} in {profile.runtime.value} on this machine: {latencies[0].method}; {latencies[0].host}"


def _artifact(bundle):
    return next(p for p in sorted(bundle.iterdir()) if p.name.startswith("model."))
