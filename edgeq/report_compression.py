"""Report pieces for compression (prune, low-rank, recover), read from report.json's `compression`
(edgeq/compress/run.py: compression_section). Shared by report_html and report_markdown; imports no toolchain.

A run compresses once, so every bundle of a model carries the same stages; a quantized bundle may add stages of
its own (qat, lora), which have no before/after figures. Drift is PyTorch's, against the ORIGINAL FP32 model.
"""

from __future__ import annotations

from edgeq.report_html import _table, e, fmt, fmt_size, get, model_of, number


def compression_of(report: dict) -> dict | None:
    section = report.get("compression")
    return section if isinstance(section, dict) and section.get("stages") else None


def run_stages(section: dict) -> list[dict]:
    """The stages the run applied before any artifact (those with before/after figures)."""
    return [s for s in section.get("stages") or [] if isinstance(s, dict) and isinstance(s.get("parameters"), dict)]


def own_stages(section: dict) -> list[dict]:
    """Stages of this bundle alone (qat, lora on its quantized plan)."""
    return [s for s in section.get("stages") or [] if isinstance(s, dict) and not isinstance(s.get("parameters"), dict)]


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else fmt(value, 12)


def _change(figure, render=_count) -> str:
    if not isinstance(figure, dict):
        return "-"
    return f"{render(figure.get('before'))} → {render(figure.get('after'))}"


def _share(value) -> str:
    value = number(value)
    return "-" if value is None else f"{100 * value:.1f}%"


def drift_text(stage: dict) -> str:
    rows = [d for d in stage.get("drift") or [] if isinstance(d, dict)]
    return "; ".join(f"{d.get('name')}: cosine {fmt(d.get('cosine'), 6)}, SQNR {fmt(d.get('sqnr_db'), 4)} dB" for d in rows) or "-"


def latency_text(section: dict, index: int) -> str:
    rows = get(section, "latency", "median_ms", default=None)
    if not isinstance(rows, list) or index >= len(rows) or not isinstance(rows[index], dict):
        return "-"
    return _change(rows[index], lambda v: "-" if number(v) is None else f"{fmt(v, 3)} ms")


def stage_cells(section: dict, index: int, stage: dict) -> list[str]:
    """Plain text: stage, spec, parameters, FP32 weights, zeros, drift vs FP32, PyTorch latency (before → after)."""
    return [
        str(stage.get("stage", "?")), str(stage.get("spec", "")), _change(stage.get("parameters")),
        _change(stage.get("weight_bytes"), fmt_size), _change(stage.get("zeros_share"), _share),
        drift_text(stage), latency_text(section, index),
    ]


HEAD = ["stage", "spec", "parameters", "FP32 weights", "zeros", "PyTorch drift vs FP32 (after)", "PyTorch latency"]


def by_model(reports: list[dict]) -> dict[str, dict]:
    """One run-level section per model: the first of its reports that has one."""
    sections: dict[str, dict] = {}
    for report in reports:
        section = compression_of(report)
        if section is not None and run_stages(section):
            sections.setdefault(model_of(report), section)
    return sections


ZEROS_WORTH_SAYING = 0.01  # below this the model was not made sparse: a few codes at their zero point are noise


def artifact_sparsity(report: dict) -> str | None:
    """Share of exact zeros in the artifact's weights, where the bundle measured it and compression made zeros
    (unstructured or N:M pruning): did they survive quantization and export?"""
    section = compression_of(report) or {}
    made = [number(get(s, "zeros_share", "after")) for s in run_stages(section)]
    if not any(value is not None and value >= ZEROS_WORTH_SAYING for value in made):
        return None
    share = number(get(report, "artifact", "sparsity", "share"))
    return None if share is None else f"{100 * share:.1f}% zeros in the artifact's weights"


def compression_section(reports: list[dict]) -> str:
    """The HTML section: per model, a row per stage; then stages and sparsity of single bundles."""
    parts = []
    for model, section in by_model(reports).items():
        rows = [[e(c) for c in stage_cells(section, i, s)] for i, s in enumerate(run_stages(section))]
        caption = f"{model}: each stage's effect (drift on {fmt(section.get('drift_samples'))} validation samples)"
        parts.append(_table(caption, HEAD, rows, numeric=(2, 3, 4)))
        notes = [n for s in run_stages(section) for n in s.get("notes") or []]
        skipped = [f"{s.get('stage')}: {fqn} left as it was ({why})" for s in run_stages(section) for fqn, why in (s.get("skipped") or {}).items()]
        if notes or skipped:
            parts.append("<ul class=notes>" + "".join(f"<li>{e(n)}</li>" for n in [*notes, *skipped]) + "</ul>")
        method = get(section, "latency", "method")
        if method:
            parts.append(f"<p class=note>PyTorch latency: {e(method)}, on {e(get(section, 'latency', 'host', default='this machine'))}.</p>")
    items = []
    for report in reports:
        section = compression_of(report) or {}
        lines = [f"{s.get('stage')} {s.get('spec')}: {'; '.join(map(str, s.get('notes') or [])) or 'done'}" for s in own_stages(section)]
        lines += [text] if (text := artifact_sparsity(report)) else []
        if lines:
            items.append(f"<li><strong>{e(get(report, 'target', 'id', default='?'))} {e(report.get('precision', '?'))}</strong>: {e('; '.join(lines))}</li>")
    if items:
        parts.append("<ul class=notes>" + "".join(items) + "</ul>")
    if not parts:
        return ""
    intro = ("<p>What pruning, low-rank factorization and recovery did to the model before any artifact was made (once per run). "
             "Every artifact is validated against the original FP32 model, so its drift includes what compression cost.</p>")
    return '<section id="compression"><h2>Compression</h2>' + intro + "".join(parts) + "</section>"


def compression_markdown(reports: list[dict], cell) -> list[str]:
    """Markdown lines: a table per model, then per-bundle stages; `cell` escapes table cells."""
    lines = []
    for model, section in by_model(reports).items():
        lines += [f"**compression ({cell(model)})**", "", "| " + " | ".join(HEAD) + " |", "|" + "|".join("---" for _ in HEAD) + "|"]
        lines += ["| " + " | ".join(cell(c) for c in stage_cells(section, i, s)) + " |" for i, s in enumerate(run_stages(section))]
        lines.append("")
    for report in reports:
        section = compression_of(report) or {}
        extra = [f"{s.get('stage')} {s.get('spec')}" for s in own_stages(section)]
        extra += [text] if (text := artifact_sparsity(report)) else []
        if extra:
            lines.append(f"- {cell(get(report, 'target', 'id', default='?'))} {cell(report.get('precision', '?'))}: {cell('; '.join(extra))}")
    return lines


__all__ = ["compression_markdown", "compression_section"]
