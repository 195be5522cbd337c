"""What a device run prints: plain text, one block per bundle (no colours, no tables library)."""

from __future__ import annotations

from edgeq.device.memory import megabytes
from edgeq.device.results import BundleRun


def _fmt(value, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if value == float("inf") else f"{value:.{digits}g}"
    return str(value)


def bundle_lines(run: BundleRun) -> list[str]:
    manifest, check = run.manifest, run.check
    artifact = manifest.get("artifact") or {}
    lines = [f"{run.name}: {run.verdict.upper()}"]
    if check is None:
        lines.append(f"  refused: {run.refused}")
        return lines
    report = check.report
    if run.text_generation:
        return lines + generation_lines(run)
    lines.append(f"  artifact {artifact.get('file')} sha256 {str(artifact.get('sha256'))[:16]}... verified; golden file verified")
    lines.append(f"  executed by: {report.executor}; {report.samples} golden samples")
    lines.append(f"  budget ({run.budget_source}): {check.budget or 'none'}")
    if report.outputs:
        header = ("output", "cosine", "cos min", "SQNR dB", "max abs", "top-1")
        rows = [
            (d.name, _fmt(d.cosine, 7), _fmt(d.cosine_min, 7), _fmt(d.sqnr_db, 4), _fmt(d.max_abs, 3), _fmt(d.top1, 3))
            for d in report.outputs
        ]
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
        for row in (header, *rows):
            lines.append("  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    for drift in report.outputs:
        note = drift.positions_note()
        if note:
            lines.append(f"  {drift.name}: drift {note}")
    if report.reason:
        lines.append(f"  {report.reason}")
    for line in check.violations:
        lines.append(f"  over budget: {line}")
    latency = check.latency
    if latency is not None:
        lines.append(
            f"  latency: p50 {latency.median_ms:.4g} ms, p90 {latency.p90_ms:.4g} ms, p99 {latency.p99_ms:.4g} ms "
            f"({latency.runs} timed runs after {latency.warmup} warm-up runs; {latency.method})"
        )
    else:
        lines.append(f"  latency: {check.latency_reason}")
    return lines + _memory_lines(run)


def _memory_lines(run: BundleRun) -> list[str]:
    memory = run.memory
    if memory is None:
        return []
    increase = "" if memory.rss_increase_bytes is None else f", +{megabytes(memory.rss_increase_bytes)} over the run"
    return [f"  memory: peak RSS {megabytes(memory.peak_rss_bytes)} (process){increase}"]


def generation_lines(run: BundleRun) -> list[str]:
    """A text-generation bundle: per prompt, how far the device's greedy continuation follows each golden."""
    check, generation = run.check, run.generation
    artifact = run.manifest.get("artifact") or {}
    lines = [f"  artifact {artifact.get('file')} sha256 {str(artifact.get('sha256'))[:16]}... verified; generation.json verified"]
    if generation is not None:
        lines.append(f"  executed by: {check.report.executor}; greedy generate loop over {len(generation.prompts)} prompts")
    lines.append(f"  budget ({run.budget_source}): {check.budget or 'none'}")
    for prompt in generation.prompts if generation else []:
        if prompt.equal:
            told = f"equals the golden ({len(prompt.golden)} tokens)"
        else:
            told = (f"leaves the golden at token {prompt.matched} of {len(prompt.golden)} (golden "
                    f"{prompt.golden[prompt.matched] if prompt.matched < len(prompt.golden) else 'end'}, device "
                    f"{prompt.tokens[prompt.matched] if prompt.matched < len(prompt.tokens) else 'end'})")
        lines.append(f"  prompt {prompt.index} ({prompt.prompt_tokens} tokens): {told}; FP32 PyTorch's: "
                     f"{prompt.fp32_matched} of {len(prompt.fp32)} tokens before the first difference")
        if prompt.golden_text:
            lines.append(f"    golden: {prompt.golden_text!r}")
    if check.report.reason:
        lines.append(f"  {check.report.reason}")
    if generation:
        metrics, speed = generation.metrics(), generation.speed()
        lines.append(f"  greedy_match {metrics['greedy_match']:.4g}, fp32_match {metrics['fp32_match']:.4g}")
        lines.append(f"  speed (the loop's first pass): prefill {_fmt(speed['prefill_tokens_per_s'], 4)} tokens/s, "
                     f"decode {_fmt(speed['decode_tokens_per_s'], 4)} tokens/s")
    lines += [f"  over budget: {line}" for line in check.violations]
    return lines + _memory_lines(run)


def summary_line(runs: list[BundleRun], code: int, host: str) -> str:
    counts = {}
    for run in runs:
        counts[run.verdict] = counts.get(run.verdict, 0) + 1
    told = ", ".join(f"{count} {verdict}" for verdict, count in counts.items())
    return f"edgeq.device: {len(runs)} bundle(s): {told}; exit {code}; host: {host}"
