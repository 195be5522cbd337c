"""report.md: a compact GitHub-flavoured Markdown summary of a run, for CI comments.

One table (a row per artifact), then what went wrong per artifact (budget violations, errors, reasons)
and its top offending layers when the report has per-layer drift. Cells are escaped for GFM tables:
`|` cannot end a cell early and `<`, `>`, `&` render as text, never as HTML.
"""

from __future__ import annotations

import math

from edgeq.report_html import fmt, fmt_size, get, layers_of, model_of, number, outputs_of, size_ratio, sort_reports, speed_text, target_of, verdict_of, worst
from edgeq.report_storage import accuracy_level_text, bits_per_weight, layer_bits
from edgeq.validate.drift import positions_note

_ICON = {"passed": "✅", "not_validated": "⚠️", "over_budget": "❌", "validation_failed": "❌", "conversion_failed": "❌"}
TOP_LAYERS = 3


def cell(value) -> str:
    """Text safe inside a GFM table cell (and anywhere in a comment): one line, no live HTML or pipes."""
    text = "-" if value is None else str(value)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")
    return " ".join(text.split())


def _vs_fp32(report: dict, reports: list[dict]) -> str:
    """Speed and size against the FP32 artifact of the same target: "1.6x faster than FP32, 0.27x size"."""
    parts = []
    ratio = number(get(report, "validation", "latency_vs_fp32"))
    if ratio is not None and math.isfinite(ratio) and ratio > 0:
        parts.append(speed_text(ratio))  # the terminal's and the HTML page's words: "1.6x faster than FP32"
    size = size_ratio(report, reports)
    if size is not None:
        parts.append(f"{size:.2f}x size")
    return ", ".join(parts) or "-"


def _size(report: dict) -> str:
    """The artifact's size, with its stored bits per weight where the report has them: "18.2 kB, 4.61 bits/w"."""
    size, bits = fmt_size(get(report, "artifact", "size_bytes")), bits_per_weight(report)
    return size if bits is None else f"{size}, {fmt(bits, 3)} bits/w"


def _problems(report: dict) -> list[str]:
    lines = [f"over budget: {v}" for v in get(report, "budget", "violations", default=[]) or []]
    if report.get("error"):
        lines.append(str(report["error"]))
    reason = get(report, "validation", "reason")
    if reason and verdict_of(report) != "passed":
        lines.append(str(reason))
    executor = get(report, "validation", "executor")
    if executor and "reference executor" in str(executor).lower():
        lines.append(f"run by {executor} (not Apple's Core ML runtime)")
    return lines


def _top_layers(report: dict) -> list[str]:
    layers = layers_of(report)
    if layers is None:
        return []
    bits = layer_bits(report)
    rows = {str(r.get("name")): r for r in layers.get("rows") or [] if isinstance(r, dict)}
    lines = []
    for name in [str(t) for t in layers.get("top") or []][:TOP_LAYERS]:
        row = rows.get(name, {})
        kind = f" ({cell(row['kind'])})" if row.get("kind") else ""
        parts = [f"adds noise at {fmt(row.get('local_sqnr_db'), 3)} dB SQNR"] if row.get("local_sqnr_db") is not None else []
        parts.append(f"layer SQNR {fmt(row.get('sqnr_db'), 3)} dB")
        if row.get("sqnr_lost_db") is not None:
            parts.append(f"{fmt(row.get('sqnr_lost_db'), 3)} dB lost")
        if bits.get(name) is not None:
            parts.append(f"{fmt(bits[name], 3)} bits/weight")
        lines.append(f"`{name.replace('`', '')}`{kind}: {', '.join(parts)}")
    return lines


def render_markdown(reports: list[dict]) -> str:
    """The Markdown summary of a run's reports (report.json dicts, as for report_html.render_html)."""
    reports = sort_reports(r for r in reports if isinstance(r, dict))
    models = list(dict.fromkeys(str(get(r, "model", "name")) for r in reports if get(r, "model", "name"))) or ["no bundles"]
    lines = [f"### edgeq: {cell(', '.join(models))}", ""]
    multi = len(models) > 1
    head = (["model"] if multi else []) + ["target", "precision", "verdict", "worst cosine", "worst SQNR dB", "size", "p50 ms", "vs FP32"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---:" if h in ("worst cosine", "worst SQNR dB", "size", "p50 ms") else "---" for h in head) + "|")
    for r in reports:
        verdict = verdict_of(r)
        row = ([cell(model_of(r))] if multi else []) + [
            cell(target_of(r)),
            cell(r.get("precision", "?")),
            f"{_ICON.get(verdict, '')} {cell(verdict)}".strip(),
            cell(fmt(worst(r, "cosine"), 7)),
            cell(fmt(worst(r, "sqnr_db"), 4)),
            cell(_size(r)),
            cell(fmt(get(r, "validation", "latency", "median_ms"), 3)),
            cell(_vs_fp32(r, reports)),
        ]
        lines.append("| " + " | ".join(row) + " |")
    details = []
    for r in reports:
        problems, top, level = _problems(r), _top_layers(r), accuracy_level_text(r)
        tokens = [f"`{cell(o.get('name'))}`: drift {cell(note)}" for o in outputs_of(r) if (note := positions_note(o))]
        if not problems and not top and not level and not tokens:
            continue
        details.append(f"**{cell(target_of(r))} {cell(r.get('precision', '?'))}**")
        details.extend(f"- {cell(p)}" for p in problems)
        details.extend(f"- {line}" for line in tokens)
        if level:
            details.append(f"- {cell(level)}")
        if top:
            details.append(f"- top {len(top)} offending layers:")
            details.extend(f"  {i}. {line}" for i, line in enumerate(top, 1))
        details.append("")
    from edgeq.report_compression import compression_markdown

    compression = compression_markdown(reports, cell)
    while compression and not compression[-1]:
        compression.pop()
    if compression:
        details = [*compression, "", *details]
    if details:
        lines += ["", *details]
    else:
        lines.append("")
    lines.append(
        "<sub>Drift against FP32 PyTorch; speed and size against the FP32 artifact of the same target; latency on the machine "
        "that ran edgeq, 1 thread unless the profile states its threads, warm, a quantized artifact interleaved with its FP32 "
        "artifact; bits/w: every weight as the artifact stores it (codes, scales, zero points, LUTs, floats).</sub>"
    )
    return "\n".join(lines).rstrip() + "\n"


__all__ = ["render_markdown"]
