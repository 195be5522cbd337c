"""report.html: one self-contained page per run, rendered from the bundles' report.json files.

No external resources: the CSS is inline, the plots are SVG drawn here, and there is no JavaScript, so the
page renders offline, from a CI artifact or an e-mail attachment, the same as on the machine that made it.
Every piece of text from a report passes through `html.escape`. Imports no toolchain (numpy at most).

The report dicts are report.json files (docs/report-schema.md), optionally with a `bundle` key (the bundle
folder, added by `load_reports`) and, for a target/precision that produced no bundle, an `error` key.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable
from pathlib import Path

from edgeq.errors import SourceError
from edgeq.validate.drift import positions_note

VERDICTS = ("passed", "not_validated", "over_budget", "validation_failed", "conversion_failed")
_VERDICT_TEXT = {
    "passed": "passed",
    "not_validated": "not validated",
    "over_budget": "over budget",
    "validation_failed": "validation failed",
    "conversion_failed": "conversion failed",
}
_COLOURS = {  # background, text: WCAG AA contrast on both
    "passed": ("#dcf3e3", "#14532d"),
    "not_validated": ("#fdf0c8", "#713f12"),
    "over_budget": ("#fde0e0", "#7f1d1d"),
    "validation_failed": ("#fde0e0", "#7f1d1d"),
    "conversion_failed": ("#ece4f7", "#4c1d95"),
}
_BAR = {"passed": "#2f855a", "not_validated": "#b7791f", "over_budget": "#c53030", "validation_failed": "#c53030", "conversion_failed": "#6b46c1"}
_PRECISION_ORDER = ("fp32", "fp16", "int8-weight", "int8-dynamic", "w8a16", "w8a8")
MIL_REFERENCE = "reference executor"  # Core ML off macOS: edgeq's own executor of the MIL program, not Apple's runtime


# ---------------------------------------------------------------- numbers and access (shared with report_markdown)


def number(value) -> float | None:
    """A report value as a float: JSON numbers, Infinity/NaN (Python's json), "inf"/"-inf"/"nan" strings
    (DriftReport.to_json); None for anything else."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower().lstrip("+")
        if text in ("inf", "infinity"):
            return math.inf
        if text in ("-inf", "-infinity"):
            return -math.inf
        if text == "nan":
            return math.nan
        try:
            return float(text)
        except ValueError:
            return None
    return None


def fmt(value, digits: int = 4, missing: str = "-") -> str:
    """`digits` significant digits; inf, -inf and NaN spelled out; `missing` for None."""
    x = number(value)
    if x is None:
        return missing if value is None or not isinstance(value, str) else value
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def fmt_size(size_bytes) -> str:
    x = number(size_bytes)
    if x is None or not math.isfinite(x):
        return "-"
    if x >= 1e9:
        return f"{x / 1e9:.2f} GB"
    return f"{x / 1e6:.2f} MB" if x >= 1e5 else f"{x / 1e3:.1f} kB"


def get(data, *keys, default=None):
    """data[k1][k2]... or `default` where any level is missing or not a dict/list."""
    for key in keys:
        if isinstance(data, dict):
            data = data.get(key)
        elif isinstance(data, list) and isinstance(key, int) and -len(data) <= key < len(data):
            data = data[key]
        else:
            return default
        if data is None:
            return default
    return data


def target_of(report: dict) -> str:
    return str(get(report, "target", "id", default=get(report, "target", default="?")))


def verdict_of(report: dict) -> str:
    return str(get(report, "budget", "verdict", default="conversion_failed" if report.get("error") else "not_validated"))


def outputs_of(report: dict, *path: str) -> list[dict]:
    """The per-output drift list at validation.<path...>.outputs (validation.outputs without `path`)."""
    outputs = get(report, "validation", *path, "outputs", default=[])
    return [o for o in outputs if isinstance(o, dict)] if isinstance(outputs, list) else []


def worst(report: dict, metric: str) -> float | None:
    """The lowest `metric` over the outputs (NaN is the worst of all); None when no output has it."""
    values = [number(o.get(metric)) for o in outputs_of(report)]
    values = [v for v in values if v is not None]
    if not values:
        return None
    if any(math.isnan(v) for v in values):
        return math.nan
    return min(values)


def layers_of(report: dict) -> dict | None:
    """The per-layer section: top-level `layers` (or `validation.layers`) when present and not null."""
    layers = report.get("layers")
    if layers is None:
        layers = get(report, "validation", "layers")
    return layers if isinstance(layers, dict) else None


def fp32_sibling(report: dict, reports: list[dict]) -> dict | None:
    """The FP32 report of the same model and target in `reports`, if the run made one."""
    if report.get("precision") == "fp32":
        return None
    for other in reports:
        if other.get("precision") == "fp32" and target_of(other) == target_of(report) and model_of(other) == model_of(report):
            return other
    return None


def model_of(report: dict) -> str:
    return str(get(report, "model", "name", default="model"))


def size_ratio(report: dict, reports: list[dict]) -> float | None:
    """Artifact size over the size of the FP32 artifact of the same target in this run."""
    sibling = fp32_sibling(report, reports)
    size, base = number(get(report, "artifact", "size_bytes")), number(get(sibling, "artifact", "size_bytes"))
    if size is None or not base:
        return None
    return size / base


def speed_text(ratio) -> str:
    """`latency_vs_fp32` (quantized median / FP32 median) in words, as the terminal prints it."""
    from edgeq.validate.latency import speed_summary

    x = number(ratio)
    return speed_summary(x if x is not None and math.isfinite(x) else None)


def sort_reports(reports: Iterable[dict]) -> list[dict]:
    """By model, target, then fp32 first and the schemes in a fixed order."""

    def key(report):
        precision = str(report.get("precision", ""))
        rank = _PRECISION_ORDER.index(precision) if precision in _PRECISION_ORDER else len(_PRECISION_ORDER)
        return (model_of(report), target_of(report), rank, precision)

    return sorted(reports, key=key)


def load_reports(paths: Iterable[Path], relative_to: Path | None = None) -> list[dict]:
    """report.json of each path: a bundle folder, a report.json file, or a folder searched for bundles
    (OUT/<model>/ or OUT/). Each dict gets `bundle`: the folder it came from, relative to `relative_to`
    (the folder the report page goes to) when given. Hidden (staging) folders are skipped."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif (path / "report.json").is_file():
            found.append(path / "report.json")
        elif path.is_dir():
            hits = [p for p in sorted(path.rglob("report.json")) if not any(part.startswith(".") for part in p.relative_to(path).parts)]
            if not hits:
                raise SourceError(f"{path}: no bundle (no report.json) in this folder")
            found.extend(hits)
        else:
            raise SourceError(f"{path}: no such bundle, folder or report.json")
    reports = []
    for file in dict.fromkeys(found):
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise SourceError(f"{file}: not a readable report.json ({exc})") from exc
        if not isinstance(data, dict):
            raise SourceError(f"{file}: not a report.json (expected an object)")
        data.setdefault("bundle", _relative(file.parent, relative_to))
        reports.append(data)
    return sort_reports(reports)


def _relative(folder: Path, base: Path | None) -> str:
    if base is None:
        return str(folder)
    import os

    try:
        return Path(os.path.relpath(folder.resolve(), Path(base).resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return str(folder)


# ---------------------------------------------------------------- html helpers


def e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _badge(verdict: str) -> str:
    return f'<span class="badge v-{e(verdict)}">{e(_VERDICT_TEXT.get(verdict, verdict))}</span>'


def _table(caption: str, head: list[str], rows: list[list[str]], numeric: Iterable[int] = (), cls: str = "") -> str:
    """`rows` hold HTML already escaped; header cells are escaped here."""
    numeric = set(numeric)
    out = [f'<div class="scroll"><table class="{e(cls)}"><caption>{e(caption)}</caption><thead><tr>']
    out += [f'<th scope="col"{" class=num" if i in numeric else ""}>{e(h)}</th>' for i, h in enumerate(head)]
    out.append("</tr></thead><tbody>")
    for row in rows:
        cells = "".join(f'<td{" class=num" if i in numeric else ""}>{cell}</td>' for i, cell in enumerate(row))
        out.append(f"<tr>{cells}</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _name(report: dict) -> str:
    return f"{target_of(report)} {report.get('precision', '?')}"


def _anchor(report: dict, suffix: str = "") -> str:
    text = f"{model_of(report)}-{target_of(report)}-{report.get('precision', '')}{suffix}"
    return "".join(c if c.isalnum() else "-" for c in text.lower())


def _num_cell(value, digits: int = 4) -> str:
    return e(fmt(value, digits))


# ---------------------------------------------------------------- svg plots


def _svg_open(width: int, height: int, title: str, desc: str, ident: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-labelledby="{ident}-t {ident}-d">'
        f'<title id="{ident}-t">{e(title)}</title><desc id="{ident}-d">{e(desc)}</desc>'
    )


def _nice_max(value: float) -> float:
    if value <= 0:
        return 10.0
    step = 10 ** math.floor(math.log10(value))
    for factor in (1, 2, 2.5, 5, 10):
        if value <= factor * step:
            return factor * step
    return 10 * step


def _axis(values: list[float | None], headroom: float = 1.05, count: int = 5) -> tuple[float, float, list[float]]:
    """(low, high, ticks) for the finite `values`: 0 always in range, ends on round ticks."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    low, high = min([0.0, *finite]), max([0.0, *finite]) * headroom
    if high <= low:
        high = low + 10.0
    step = _nice_max((high - low) / count)
    low, high = math.floor(low / step + 1e-9) * step, math.ceil(high / step - 1e-9) * step
    ticks = [round(low + i * step, 10) for i in range(int(round((high - low) / step)) + 1)]
    return low, high, ticks


def bar_chart(bars: list[tuple[str, object, str, str]], *, title: str, desc: str, unit: str, ident: str) -> str:
    """Horizontal bars: (label, value, colour, tooltip). inf draws a full bar marked "inf"; None/NaN no bar."""
    label_w, plot_w, row_h, top, bottom = 230, 520, 26, 14, 34
    width, height = label_w + plot_w + 90, top + row_h * max(len(bars), 1) + bottom
    values = [number(v) for _, v, _, _ in bars]
    low, high, ticks = _axis(values)
    scale = plot_w / (high - low)
    zero = label_w + (0 - low) * scale
    out = [_svg_open(width, height, title, desc, ident)]
    for tick in ticks:  # grid and axis ticks
        x = label_w + (tick - low) * scale
        out.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - bottom + 4}" class="grid"/>')
        out.append(f'<text x="{x:.1f}" y="{height - bottom + 18}" class="tick" text-anchor="middle">{e(f"{tick:g}")}</text>')
    out.append(f'<text x="{label_w + plot_w / 2:.1f}" y="{height - 2}" class="axis" text-anchor="middle">{e(unit)}</text>')
    for row, ((label, _, colour, tip), value) in enumerate(zip(bars, values)):
        y = top + row * row_h
        out.append(f"<g><title>{e(tip)}</title>")
        out.append(f'<text x="{label_w - 8}" y="{y + row_h / 2 + 4:.1f}" class="label" text-anchor="end">{e(label)}</text>')
        if value is None or math.isnan(value):
            out.append(f'<text x="{zero + 4:.1f}" y="{y + row_h / 2 + 4:.1f}" class="value">{"NaN" if value is not None else "n/a"}</text>')
        else:
            end = label_w + plot_w if value == math.inf else label_w if value == -math.inf else label_w + (value - low) * scale
            x0, x1 = sorted((zero, end))
            pattern = ' stroke-dasharray="4 3" stroke="#1a202c"' if math.isinf(value) else ""
            out.append(f'<rect x="{x0:.1f}" y="{y + 4}" width="{max(x1 - x0, 1):.1f}" height="{row_h - 8}" rx="2" fill="{e(colour)}"{pattern}/>')
            out.append(f'<text x="{max(x1, zero) + 5:.1f}" y="{y + row_h / 2 + 4:.1f}" class="value">{e(fmt(value, 4))}</text>')
        out.append("</g>")
    out.append(f'<line x1="{zero:.1f}" y1="{top - 4}" x2="{zero:.1f}" y2="{height - bottom + 4}" class="axisline"/>')
    out.append("</svg>")
    return "".join(out)


def layer_chart(rows: list[dict], top: list[str], *, title: str, ident: str) -> str:
    """SQNR dB per layer in execution order: one bar each, the top offenders red and numbered by rank.
    inf (an exact layer) is a capped, hatched bar; None/NaN a grey tick at the axis."""
    count = max(len(rows), 1)
    names_below = count <= 32
    longest = max((len(_short(str(r.get("name", "")))) for r in rows), default=0) if names_below else 0
    reach = int(4.8 * longest)  # a label rotated by 45 degrees, 12px font: about 4.8px per character each way
    left, right, top_pad = max(64, reach - 8), 16, 26
    bottom = max(40, reach + 24)
    plot_w = max(640, min(1100, count * 22))
    plot_h = 220
    width, height = left + plot_w + right, top_pad + plot_h + bottom
    values = [number(r.get("sqnr_db")) for r in rows]
    low, high, ticks = _axis(values, headroom=1.1)
    scale = plot_h / (high - low)

    def y_of(v: float) -> float:
        return top_pad + (high - v) * scale

    rank = {name: i + 1 for i, name in enumerate(top)}
    desc = (
        f"{len(rows)} layers in execution order; bar height is SQNR in dB against the reference; "
        f"the {len(top)} layers adding the most noise are red and numbered by rank: " + ", ".join(f"{i + 1}. {n}" for i, n in enumerate(top))
    )
    out = [_svg_open(width, height, title, desc, ident)]
    for tick in ticks:
        y = y_of(tick)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{e(f"{tick:g}")}</text>')
    out.append(
        f'<text transform="translate({left - 40} {top_pad + plot_h / 2:.1f}) rotate(-90)" class="axis" text-anchor="middle">SQNR dB</text>'
    )
    slot = plot_w / count
    bar_w = max(min(slot * 0.72, 28), 1.0)
    zero = y_of(0.0)
    for index, (row, value) in enumerate(zip(rows, values)):
        name = str(row.get("name", f"#{index}"))
        x = left + index * slot + (slot - bar_w) / 2
        offender = name in rank
        colour = "#c53030" if offender else "#3b6fb6"
        tip = (
            f"{index + 1}. {name} ({row.get('kind') or '?'}): SQNR {fmt(row.get('sqnr_db'))} dB, cosine {fmt(row.get('cosine'), 6)}, "
            f"local SQNR {fmt(row.get('local_sqnr_db'))} dB, dB lost {fmt(row.get('sqnr_lost_db'))}"
            + (f"; adds the most noise #{rank[name]}" if offender else "")
        )
        out.append(f"<g><title>{e(tip)}</title>")
        if value is None or math.isnan(value):
            out.append(f'<rect x="{x:.1f}" y="{zero - 2:.1f}" width="{bar_w:.1f}" height="4" fill="#a0aec0"/>')
        else:
            y = top_pad if value == math.inf else y_of(max(value, low))
            y0, y1 = sorted((y, zero))
            extra = ' fill-opacity="0.45" stroke="#1a202c" stroke-dasharray="3 2"' if math.isinf(value) else ""
            out.append(f'<rect x="{x:.1f}" y="{y0:.1f}" width="{bar_w:.1f}" height="{max(y1 - y0, 1):.1f}" fill="{colour}"{extra}/>')
            if value == math.inf and not offender:
                out.append(f'<text x="{x + bar_w / 2:.1f}" y="{top_pad - 6}" class="tick" text-anchor="middle">inf</text>')
        if offender:
            label_y = top_pad - 8 if value is None or not math.isfinite(value) else min(y_of(max(value, 0.0)), zero) - 5
            out.append(f'<text x="{x + bar_w / 2:.1f}" y="{max(label_y, 12):.1f}" class="rank" text-anchor="middle">{rank[name]}</text>')
        if names_below:
            lx, ly = x + bar_w / 2, top_pad + plot_h + 10
            cls = "label offender" if offender else "label"
            out.append(f'<text transform="translate({lx:.1f} {ly}) rotate(-45)" class="{cls}" text-anchor="end">{e(_short(name))}</text>')
        out.append("</g>")
    out.append(f'<line x1="{left}" y1="{zero:.1f}" x2="{left + plot_w}" y2="{zero:.1f}" class="axisline"/>')
    if not names_below:
        out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 10}" class="axis" text-anchor="middle">layers in execution order (1 to {len(rows)})</text>')
    out.append("</svg>")
    return "".join(out)


def _short(name: str, limit: int = 25) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


# ---------------------------------------------------------------- sections


def _summary(reports: list[dict]) -> str:
    from edgeq.report_storage import bits_per_weight

    rows = []
    for r in reports:
        verdict = verdict_of(r)
        latency = get(r, "validation", "latency", default={})
        ratio = size_ratio(r, reports)
        size = fmt_size(get(r, "artifact", "size_bytes"))
        if ratio is not None:
            size += f' <span class="dim">({ratio:.2f}x FP32)</span>'
        speed = get(r, "validation", "latency_vs_fp32")
        vs = "-" if speed is None else f"{e(speed_text(speed))}<br><span class=dim>{e(fmt(speed, 3))}x FP32's median</span>"
        if not latency and get(r, "validation", "latency_reason"):
            vs = f'<span class="dim">{e(get(r, "validation", "latency_reason"))}</span>'
        violations = get(r, "budget", "violations", default=[]) or []
        problems = "".join(f"<li>{e(v)}</li>" for v in violations)
        if r.get("error"):
            problems += f"<li>{e(r['error'])}</li>"
        reason = get(r, "validation", "reason")
        if reason and verdict != "passed":
            problems += f"<li>{e(reason)}</li>"
        rows.append([
            f'<a href="#{_anchor(r)}">{e(target_of(r))}</a>',
            e(r.get("precision", "?")),
            _badge(verdict),
            size,
            _num_cell(bits_per_weight(r), 3),
            _num_cell(get(latency, "median_ms"), 3),
            _num_cell(get(latency, "p90_ms"), 3),
            _num_cell(get(latency, "p99_ms"), 3),
            vs,
            f'<code class="nowrap">{e(get(r, "budget", "terms", default="-"))}</code>',
            f'<ul class="issues">{problems}</ul>' if problems else '<span class="dim">none</span>',
        ])
    hosts = sorted({str(get(r, "validation", "latency", "host")) for r in reports if get(r, "validation", "latency", "host")})
    note = (
        "<p class=note>Latency: wall time of one run of the artifact in its runtime on "
        + (e("; ".join(hosts)) if hosts else "this machine")
        + " (median p50, p90, p99 in ms), not the device's: 1 thread unless the profile states its threads, warm, and a "
        "quantized artifact timed in interleaved rounds with the FP32 artifact of its target, so machine load hits both "
        "alike. “vs FP32”: how much faster (or slower) than that FP32 artifact, and its median over the FP32 median "
        "(below 1 is faster). Bits/weight: every weight of the model as the artifact stores it "
        "(codes in their containers, scales, zero points, look-up tables, float weights), over the weight count.</p>"
    )
    head = ["target", "precision", "verdict", "size", "bits/weight", "p50 ms", "p90 ms", "p99 ms", "vs FP32", "budget", "violations and errors"]
    return (
        '<section id="summary"><h2>Summary</h2>'
        + _table("Verdict, size and latency per target and precision", head, rows, numeric=(3, 4, 5, 6, 7), cls="summary")
        + note + "</section>"
    )


def _drift(reports: list[dict]) -> str:
    bars, rows = [], []
    for r in reports:
        verdict = verdict_of(r)
        for o in outputs_of(r):
            name = f"{_name(r)} · {o.get('name', '?')}"
            bars.append((name, o.get("sqnr_db"), _BAR.get(verdict, "#4a5568"), f"{name}: SQNR {fmt(o.get('sqnr_db'))} dB, cosine {fmt(o.get('cosine'), 7)}"))
            note = positions_note(o)  # a token output: figures over its real positions, all positions beside
            rows.append([
                e(target_of(r)), e(r.get("precision", "?")),
                e(o.get("name", "?")) + (f'<br><span class="dim">{e(note)}</span>' if note else ""),
                _num_cell(o.get("cosine"), 7), _num_cell(o.get("cosine_min"), 7), _num_cell(o.get("sqnr_db"), 4),
                _num_cell(o.get("max_abs"), 3), _num_cell(o.get("rel_l2"), 3), _num_cell(o.get("top1"), 3), _num_cell(o.get("top5"), 3),
            ])
    if not rows:
        return '<section id="drift"><h2>Drift per output</h2><p>No artifact ran in its runtime in this run: there is no drift to show.</p></section>'
    plot = bar_chart(
        bars, title="SQNR in dB of each artifact's outputs against FP32 PyTorch (higher is closer)",
        desc="One bar per artifact and output, coloured by verdict; a dashed bar is infinite SQNR (identical outputs).",
        unit="SQNR dB against FP32 PyTorch", ident="sqnr-plot",
    )
    head = ["target", "precision", "output", "cosine", "cosine min", "SQNR dB", "max abs", "rel L2", "top-1", "top-5"]
    return (
        '<section id="drift"><h2>Drift per output</h2>'
        "<p>Each artifact's outputs against FP32 PyTorch on the validation samples: cosine is the mean over samples, "
        "cosine min the worst sample; top-1/top-5 agreement only for outputs named logits. Token outputs ([batch, seq, ...]) "
        "are compared on the positions attention_mask marks real; their figures over every position, padding included, "
        "are given beside.</p>"
        f'<figure>{plot}<figcaption>SQNR per artifact and output; hover a bar for its figures.</figcaption></figure>'
        + _table("Drift of every output against FP32 PyTorch", head, rows, numeric=range(3, 10))
        + "</section>"
    )


def _pair(o: dict | None) -> list[str]:
    if o is None:
        return ["-", "-"]
    return [_num_cell(o.get("cosine"), 7), _num_cell(o.get("sqnr_db"), 4)]


def _conversion_vs_quantization(reports: list[dict]) -> str:
    rows = []
    for r in reports:
        if r.get("precision") == "fp32" or r.get("error"):
            continue
        quant = {o.get("name"): o for o in outputs_of(r, "vs_fp32_artifact")}
        conversion = {o.get("name"): o for o in outputs_of(r, "fp32_artifact", "conversion_drift")}
        source = get(r, "validation", "fp32_artifact", "source", default="-")
        reason = get(r, "validation", "vs_fp32_artifact", "reason") or get(r, "validation", "fp32_artifact", "reason")
        names = [o.get("name") for o in outputs_of(r)] or list(quant) or [None]
        for name in names:
            total = next((o for o in outputs_of(r) if o.get("name") == name), None)
            cells = [e(target_of(r)), e(r.get("precision", "?")), e(name or "-")]
            cells += _pair(total) + _pair(conversion.get(name)) + _pair(quant.get(name))
            cells.append(e(source) + (f'<br><span class="dim">{e(reason)}</span>' if reason else ""))
            rows.append(cells)
    if not rows:
        return ""
    head = ["target", "precision", "output", "total cos", "total SQNR", "conversion cos", "conversion SQNR", "quantization cos", "quantization SQNR", "FP32 artifact"]
    return (
        '<section id="conversion-vs-quantization"><h2>Conversion drift and quantization drift</h2>'
        "<p><strong>Total</strong>: the artifact against FP32 PyTorch (what the budget holds). "
        "<strong>Conversion</strong>: the FP32 artifact of the same target against FP32 PyTorch (what the exporter and "
        "runtime change). <strong>Quantization</strong>: the artifact against that FP32 artifact, same runtime and samples "
        "(what the scheme changes). SQNR in dB.</p>"
        + _table("Where the drift comes from, per quantized artifact and output", head, rows, numeric=range(3, 9))
        + "</section>"
    )


def _data(reports: list[dict]) -> str:
    groups: dict[str, tuple[dict, list[str]]] = {}
    for r in reports:
        data = get(r, "validation", "data")
        if not isinstance(data, dict):
            continue
        key = json.dumps(data, sort_keys=True, default=str)
        groups.setdefault(key, (data, []))[1].append(_name(r))
    if not groups:
        return ""
    parts = ['<section id="data"><h2>Validation data</h2>']
    for data, names in groups.values():
        if len(groups) > 1:
            parts.append(f"<h3>{e(', '.join(names))}</h3>")
        split = data.get("split") if isinstance(data.get("split"), dict) else {}
        items = [
            ("source", data.get("source")),
            ("path", data.get("path")),
            ("samples found / used", f"{fmt(data.get('samples_found'))} / {fmt(data.get('samples_used'))}"),
            ("validation samples", split.get("validation")),
            ("calibration samples (disjoint)", split.get("calibration")),
            ("split seed", split.get("seed")),
            ("preprocessing", _compact(data.get("preprocess"))),
        ]
        known = {"source", "path", "samples_found", "samples_used", "split", "preprocess", "notes"}
        items += [(k, _compact(v)) for k, v in data.items() if k not in known]
        parts.append('<dl class="facts">' + "".join(f"<dt>{e(k)}</dt><dd>{e('-' if v is None else v)}</dd>" for k, v in items) + "</dl>")
        notes = data.get("notes") or []
        if notes:
            parts.append("<ul class=notes>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    parts.append("</section>")
    return "".join(parts)


def _compact(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return ", ".join(f"{k}={_compact(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(str(_compact(v)) for v in value)
    return str(value)


def _executors(reports: list[dict]) -> str:
    rows = []
    reference = False
    for r in reports:
        executor = get(r, "validation", "executor")
        status = get(r, "validation", "status", default="-" if not r.get("error") else "not converted")
        cell = e(executor or "-")
        if executor and MIL_REFERENCE in str(executor).lower():
            reference = True
            cell += ' <span class="tag">not Apple\'s Core ML runtime</span>'
        versions = get(r, "versions")
        converter = ", ".join(f"{k} {v}" for k, v in versions.items() if k not in ("runtime", "python", "numpy")) if isinstance(versions, dict) else ""
        rows.append([e(target_of(r)), e(r.get("precision", "?")), e(status), cell, e(fmt(get(r, "validation", "samples"))), e(converter or "-")])
    note = ""
    if reference:
        note = (
            "<p class=note>Core ML artifacts on this machine were run by <strong>edgeq's MIL reference executor</strong>: "
            "edgeq's own execution of the artifact's MIL program, not Apple's Core ML runtime (which runs only on "
            "Apple platforms). Its figures show what the program computes, not what a device's CPU, GPU or Neural "
            "Engine returns.</p>"
        )
    head = ["target", "precision", "status", "executed by", "samples", "versions"]
    return '<section id="executors"><h2>Who ran each artifact</h2>' + note + _table("The runtime or executor that produced each artifact's outputs", head, rows, numeric=(4,)) + "</section>"


def _plans(reports: list[dict]) -> str:
    from edgeq.report_storage import storage_items, storage_table

    parts = []
    for r in reports:
        plan = r.get("plan")
        if not isinstance(plan, dict):
            continue
        floats = plan.get("float_layers") or []
        if plan.get("weights") is not None:  # every weight tensor of the model counted (edgeq.coverage)
            share = plan.get("quantized_weight_share")
            counted = f"{fmt(plan.get('quantized_weights'))} of {fmt(plan.get('weights'))}"
            if isinstance(share, (int, float)):
                counted += f" ({100 * share:.1f}% of the parameter bytes)"
            items = [("scheme", plan.get("scheme")), ("weights quantized", counted)]
            others = plan.get("other_weights") or {}
            floats = [*floats, *(f"{name} ({reason})" for name, reason in others.items())]
        else:
            items = [("scheme", plan.get("scheme")), ("layers quantized", f"{fmt(plan.get('quantized_layers'))} of {fmt(plan.get('layers'))}")]
        if floats:
            items.append(("stays float", ", ".join(map(str, floats))))
        if plan.get("quantized_tensors") is not None:
            items.append(("quantized tensors", plan.get("quantized_tensors")))
        parity = r.get("weight_parity")
        if isinstance(parity, dict):
            mismatches, missing = parity.get("mismatches") or [], parity.get("missing") or []
            text = f"{fmt(parity.get('checked_layers'))} layers read back from the artifact, {len(mismatches)} mismatches, {len(missing)} missing"
            if parity.get("removed_as_unused"):
                text += f"; removed as unused: {', '.join(map(str, parity['removed_as_unused']))}"
            items.append(("weight parity", text))
        items += storage_items(r)
        body = '<dl class="facts">' + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in items) + "</dl>"
        notes = plan.get("notes") or []
        if notes:
            body += "<ul class=notes>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>"
        body += storage_table(r, _name(r))
        parts.append(f'<div class="card"><h3 id="{_anchor(r, "-plan")}">{e(_name(r))}</h3>{body}</div>')
    if not parts:
        return ""
    intro = "<p>How each quantized artifact's numbers were decided in PyTorch (plan.json and scales.npz in its bundle).</p>"
    return '<section id="plans"><h2>Quantization plans</h2>' + intro + '<div class="cards">' + "".join(parts) + "</div></section>"


def _layer_cells(row: dict, bits: dict) -> list[str]:
    """kind, tensor, SQNR, local SQNR, input SQNR, dB lost, cosine, stored bits per weight of one layer row."""
    return [
        e(row.get("kind") or "-"), f'<code class="nowrap">{e(row.get("tensor") or "-")}</code>',
        _num_cell(row.get("sqnr_db"), 4), _num_cell(row.get("local_sqnr_db"), 4), _num_cell(row.get("input_sqnr_db"), 4),
        _num_cell(row.get("sqnr_lost_db"), 3), _num_cell(row.get("cosine"), 7), _num_cell(bits.get(str(row.get("name"))), 3),
    ]


_LAYER_HEAD = ["kind", "tensor", "SQNR dB", "local SQNR dB", "input SQNR dB", "dB lost", "cosine", "bits/weight"]


def _layers(reports: list[dict]) -> str:
    from edgeq.report_storage import layer_bits

    parts = []
    for index, r in enumerate(reports):
        layers = layers_of(r)
        if layers is None:
            continue
        bits = layer_bits(r)
        rows = [row for row in layers.get("rows") or [] if isinstance(row, dict)]
        top = [str(t) for t in layers.get("top") or []]
        meta = (
            f"Each layer's output against {e(layers.get('reference') or 'the reference')}, "
            f"as produced by {e(layers.get('executor') or 'the artifact')}, on {e(fmt(layers.get('samples')))} samples."
        )
        parts.append(f'<h3 id="{_anchor(r, "-layers")}">{e(_name(r))}</h3><p>{meta}</p>')
        if layers.get("reason"):
            parts.append(f"<p class=note>{e(layers['reason'])}</p>")
        if not rows:
            parts.append("<p>No layer could be compared.</p>")
        else:
            chart = layer_chart(rows, top, title=f"SQNR per layer of {_name(r)} in execution order", ident=f"layers-{index}")
            parts.append(
                f"<figure>{chart}<figcaption>Bars: each layer's SQNR against the reference, noise from every layer before it "
                "included. Red, numbered: the layers adding the most noise, worst first. Hover a bar for its figures.</figcaption></figure>"
            )
            by_name = {str(row.get("name")): (i, row) for i, row in enumerate(rows)}
            table_rows = []
            for rank, name in enumerate(top, 1):
                position, row = by_name.get(name, (None, {}))
                table_rows.append([
                    str(rank), f'<code class="nowrap">{e(name)}</code>', "-" if position is None else str(position + 1), *_layer_cells(row, bits),
                    e(row.get("local_method") or "-"),
                ])
            if table_rows:
                head = ["rank", "layer", "#", *_LAYER_HEAD, "method"]
                parts.append(_table(f"Layers of {_name(r)} adding the most noise (worst first)", head, table_rows, numeric=(0, 2, 5, 6, 7, 8, 9, 10)))
            all_rows = [
                [str(i + 1), f'<code class="nowrap">{e(row.get("name"))}</code>', *_layer_cells(row, bits), e(", ".join(map(str, row.get("fused") or [])) or "-")]
                for i, row in enumerate(rows)
            ]
            parts.append(
                f"<details><summary>All {len(rows)} layers</summary>"
                + _table(f"Every compared layer of {_name(r)} in execution order", ["#", "layer", *_LAYER_HEAD, "fused into it"], all_rows, numeric=(0, 4, 5, 6, 7, 8, 9))
                + "</details>"
            )
        notes = [str(n) for n in layers.get("notes") or []]
        if notes:
            parts.append("<ul class=notes>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
        unmatched = layers.get("unmatched") or []
        if unmatched:
            parts.append(
                f"<details><summary>{len(unmatched)} module{'s' if len(unmatched) != 1 else ''} not compared (the artifact does not expose {'their tensors' if len(unmatched) != 1 else 'its tensor'})</summary>"
                "<ul class=notes>" + "".join(f"<li><code>{e(u)}</code></li>" for u in unmatched) + "</ul></details>"
            )
    if not parts:
        return ""
    intro = (
        "<p>Where the drift enters. A layer's <em>SQNR</em> holds the noise of every layer before it; its "
        "<em>local SQNR</em> is the SQNR of the noise the layer itself adds (inf: none), which names the layer that "
        "injects the drift whatever its depth. <em>dB lost</em> is its input's SQNR minus its output's.</p>"
    )
    return '<section id="layers"><h2>Per-layer drift</h2>' + intro + "".join(parts) + "</section>"


def _bundles(reports: list[dict]) -> str:
    rows = []
    for r in reports:
        rows.append([
            f'<span id="{_anchor(r)}">{e(_name(r))}</span>', _badge(verdict_of(r)),
            f"<code>{e(r.get('bundle') or '-')}</code>", f'<code class="nowrap">{e(get(r, "artifact", "file", default="-"))}</code>',
            _hash(get(r, "artifact", "sha256")),
        ])
    return '<section id="bundles"><h2>Bundles</h2>' + _table("Where each artifact is, and its checksum", ["artifact", "verdict", "bundle", "file", "sha256"], rows) + "</section>"


def _hash(sha256) -> str:
    if not sha256:
        return "-"
    text = str(sha256)
    return f'<code class="hash" title="{e(text)}">{e(text[:16])}…</code>'


_CSS = """
:root{--fg:#1a202c;--dim:#5a6473;--line:#d8dee6;--head:#f1f4f8;--accent:#2b6cb0}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg);background:#f7f9fb}
main{max-width:1240px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh}
header{border-bottom:3px solid var(--accent);padding-bottom:12px;margin-bottom:8px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:34px 0 10px;border-bottom:1px solid var(--line);padding-bottom:4px}
h3{font-size:16px;margin:22px 0 6px}
p{margin:6px 0 10px;max-width:80em}
.dim,.note{color:var(--dim)}.note{font-size:13.5px}
code{font:12.5px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f1f4f8;padding:1px 4px;border-radius:3px;overflow-wrap:anywhere}
code.nowrap,.nowrap{white-space:nowrap}.hash{font-size:12px;white-space:nowrap}
nav ul{display:flex;flex-wrap:wrap;gap:6px 16px;list-style:none;padding:0;margin:8px 0 0}
nav a{color:var(--accent);text-decoration:none}nav a:hover{text-decoration:underline}
.chips{display:flex;flex-wrap:wrap;gap:8px;margin:10px 0 0;padding:0;list-style:none}
.scroll{overflow-x:auto;margin:8px 0 14px}
table{border-collapse:collapse;font-size:13.5px;min-width:50%}
caption{caption-side:top;text-align:left;font-weight:600;padding:4px 0 6px;color:var(--fg)}
th,td{border-bottom:1px solid var(--line);padding:5px 8px;text-align:left;vertical-align:top}
th{background:var(--head);font-weight:600;white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody tr:nth-child(even){background:#fafbfd}
.badge{display:inline-block;padding:1px 9px;border-radius:10px;font-size:12.5px;font-weight:600;white-space:nowrap}
""" + "".join(f".v-{v}{{background:{bg};color:{fg}}}" for v, (bg, fg) in _COLOURS.items()) + """
.tag{display:inline-block;margin-left:4px;padding:0 6px;border-radius:3px;background:#fdf0c8;color:#713f12;font-size:12px}
ul.issues{margin:0;padding-left:16px;color:#7f1d1d}ul.notes{margin:4px 0 8px;padding-left:20px}
dl.facts{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:2px 16px;margin:6px 0}
dl.facts dt{color:var(--dim)}dl.facts dd{margin:0;overflow-wrap:anywhere}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:14px;align-items:start}
.card{border:1px solid var(--line);border-radius:6px;padding:4px 14px 8px}
figure{margin:10px 0 14px}figcaption{font-size:13px;color:var(--dim)}
svg.plot{max-width:100%;height:auto;display:block;font-family:inherit}
svg .grid{stroke:#e3e8ef;stroke-width:1}svg .axisline{stroke:#4a5568;stroke-width:1}
svg .tick{font-size:11px;fill:#5a6473}svg .axis{font-size:12px;fill:#4a5568}
svg .label{font-size:12px;fill:#1a202c}svg .label.offender{fill:#9b2c2c;font-weight:600}
svg .value{font-size:11.5px;fill:#1a202c}svg .rank{font-size:11px;font-weight:700;fill:#9b2c2c}
details{margin:6px 0 10px}summary{cursor:pointer;color:var(--accent)}
footer{margin-top:40px;font-size:12.5px;color:var(--dim);border-top:1px solid var(--line);padding-top:8px}
"""


def render_html(reports: list[dict]) -> str:
    """One self-contained HTML page for the reports of a run (report.json dicts, see the module doc)."""
    from edgeq.report_compression import compression_section
    from edgeq.report_storage import accuracy_levels_section

    reports = sort_reports(r for r in reports if isinstance(r, dict))
    models = list(dict.fromkeys(str(get(r, "model", "name")) for r in reports if get(r, "model", "name"))) or ["no bundles"]
    title = f"edgeq report: {', '.join(models)}"
    counts = {v: sum(verdict_of(r) == v for r in reports) for v in VERDICTS}
    chips = "".join(f"<li>{_badge(v)} {n}</li>" for v, n in counts.items() if n)
    sources = list(dict.fromkeys(
        f"{get(r, 'model', 'source', 'kind', default='?')} {get(r, 'model', 'source', 'location', default='?')}" for r in reports if get(r, "model", "source")
    ))
    params = next((get(r, "model", "parameters") for r in reports if get(r, "model", "parameters") is not None), None)
    subtitle = "; ".join(filter(None, [
        f"source: {', '.join(sources)}" if sources else "",
        f"{params:,} parameters" if isinstance(params, int) else "",
        f"{len(reports)} artifact{'s' if len(reports) != 1 else ''}",
    ]))
    sections = [
        _summary(reports), _drift(reports), _conversion_vs_quantization(reports), accuracy_levels_section(reports), _layers(reports),
        compression_section(reports), _plans(reports), _data(reports), _executors(reports), _bundles(reports),
    ]
    sections = [s for s in sections if s]
    nav = "".join(
        f'<li><a href="#{ident}">{e(label)}</a></li>'
        for ident, label in (
            ("summary", "Summary"), ("drift", "Drift per output"), ("conversion-vs-quantization", "Conversion vs quantization"),
            ("accuracy-levels", "Weight vs kernel error"), ("layers", "Per-layer drift"), ("compression", "Compression"), ("plans", "Quantization plans"), ("data", "Validation data"),
            ("executors", "Who ran each artifact"), ("bundles", "Bundles"),
        )
        if any(f'id="{ident}"' in s for s in sections)
    )
    versions = sorted({str(get(r, "versions", "edgeq")) for r in reports if get(r, "versions", "edgeq")})
    made_by = f"edgeq {', '.join(versions)}" if versions else "edgeq"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
        f"<title>{e(title)}</title><style>{_CSS}</style></head>\n<body><main>"
        f'<header><h1>{e(title)}</h1><p class="dim">{e(subtitle)}</p><ul class="chips" aria-label="verdicts">{chips}</ul>'
        f'<nav aria-label="sections"><ul>{nav}</ul></nav></header>\n'
        + "\n".join(sections)
        + f"\n<footer>Made by {e(made_by)} from the bundles' report.json files (schema: docs/report-schema.md). "
        "Drift is against FP32 PyTorch unless a table says otherwise.</footer></main></body></html>\n"
    )


__all__ = ["load_reports", "render_html"]
