"""tune.html: per target, the front of size against drift as an inline SVG (no plotting dependency), the
candidates, the chosen point, and each layer's choice with the sensitivity behind it."""

from __future__ import annotations

import math
from html import escape

from edgeq.tune.report import _mb, _ms, _num, latency_header, layer_rows, validated_by

_W, _H, _PAD = 640, 320, 56
_FLOOR = 1e-6  # drift plotted on a log axis: exact FP32 agreement sits on the floor


def _drift(cosine: float) -> float:
    return max(1.0 - cosine, _FLOOR)


def _budget_drift(budget: str) -> float | None:
    from edgeq.validate.budget import parse_budget

    bound = next((b for b in parse_budget(budget).bounds if b.metric == "cosine"), None)
    return None if bound is None else max(1.0 - bound.limit, _FLOOR)


def front_svg(target, budget: str) -> str:
    """Predicted search steps (grey line), converted candidates (tuned blue, uniform orange), the chosen one
    ringed; x: size in MB (predicted weight bytes for steps, file bytes for candidates), y: 1 - mean cosine (log)."""
    # Steps are predicted weight bytes; a converted tuned plan shows how many bytes the file adds (graph, names).
    tuned = next((c for c in target.candidates if c.kind == "tuned" and c.outcome.size_bytes and c.predicted_size_bytes), None)
    offset = tuned.outcome.size_bytes - tuned.predicted_size_bytes if tuned is not None else 0
    steps = [(s.size_bytes + offset, _drift(s.cosine)) for s in target.steps]
    measured = [(c, c.outcome.size_bytes, _drift(c.cosine)) for c in target.candidates if c.cosine is not None and c.outcome.size_bytes]
    limit = _budget_drift(budget)
    xs = [x for x, _ in steps] + [x for _, x, _ in measured]
    ys = [y for _, y in steps] + [y for _, _, y in measured] + ([limit] if limit else [])
    if not xs:
        return "<p>nothing to plot</p>"
    x0, x1 = min(xs) * 0.97, max(xs) * 1.03 if max(xs) > min(xs) else min(xs) * 1.1
    y0, y1 = math.log10(min(ys)) - 0.2, math.log10(max(ys)) + 0.2

    def px(x):
        return _PAD + (x - x0) / (x1 - x0) * (_W - 2 * _PAD)

    def py(y):
        return _H - _PAD + (math.log10(y) - y0) / (y1 - y0) * -(_H - 2 * _PAD)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" font-size="11" font-family="sans-serif">',
             f'<rect x="{_PAD}" y="{_PAD}" width="{_W - 2 * _PAD}" height="{_H - 2 * _PAD}" fill="none" stroke="#bbb"/>']
    for i in range(5):
        x = x0 + (x1 - x0) * i / 4
        parts.append(f'<text x="{px(x):.1f}" y="{_H - _PAD + 16}" text-anchor="middle">{x / 1e6:.3g}</text>')
    for e in range(math.ceil(y0), math.floor(y1) + 1):
        parts.append(f'<text x="{_PAD - 6}" y="{py(10 ** e) + 4:.1f}" text-anchor="end">1e{e}</text>')
    parts.append(f'<text x="{_W / 2}" y="{_H - 12}" text-anchor="middle">size (MB)</text>')
    parts.append(f'<text x="14" y="{_H / 2}" transform="rotate(-90 14 {_H / 2})" text-anchor="middle">1 - mean cosine</text>')
    if limit:
        parts.append(f'<line x1="{_PAD}" x2="{_W - _PAD}" y1="{py(limit):.1f}" y2="{py(limit):.1f}" stroke="#c00" stroke-dasharray="4 3"/>'
                     f'<text x="{_W - _PAD - 4}" y="{py(limit) - 4:.1f}" text-anchor="end" fill="#c00">budget</text>')
    if steps:
        line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in steps)
        parts.append(f'<polyline points="{line}" fill="none" stroke="#999"/>')
        parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2" fill="#999"/>' for x, y in steps]
    for candidate, x, y in measured:
        colour = "#1f6fd1" if candidate.kind == "tuned" else "#e07b00"
        shape = (f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="{colour}"/>' if candidate.kind == "tuned" else
                 f'<rect x="{px(x) - 4:.1f}" y="{py(y) - 4:.1f}" width="8" height="8" fill="{colour}"/>')
        parts.append(shape + f'<text x="{px(x) + 7:.1f}" y="{py(y) - 6:.1f}">{escape(candidate.label)}</text>')
        if candidate is target.chosen:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="9" fill="none" stroke="#000" stroke-width="2"/>')
    parts.append("</svg>")
    return "".join(parts)


def tune_html(result) -> str:
    out = ["<!doctype html><meta charset='utf-8'><title>edgeq tune: " + escape(result.model) + "</title>",
           "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;font-size:13px}"
           "td,th{border:1px solid #ddd;padding:3px 6px;text-align:left}.pass{color:#080}.fail{color:#b00}</style>",
           f"<h1>edgeq tune: {escape(result.model)}</h1>",
           f"<p>Budget <code>{escape(result.budget)}</code>, objective {escape(result.objective)}; "
           f"{sum(t.evaluated for t in result.targets)} candidate artifacts converted and validated in their runtimes; "
           f"{result.seconds:.0f} s in all.</p>"]
    for target in result.targets:
        chosen = target.chosen
        out.append(f"<h2>{escape(target.target)}</h2>")
        out.append(f"<p>Per-layer plan inside {escape(str(target.precision))}; {target.evaluated} candidates evaluated; seconds: "
                   + escape(", ".join(f"{k} {v}" for k, v in target.seconds.items())) + ".</p>")
        if chosen is not None:
            state = "Chosen" if chosen.passed else "No candidate holds the budget; closest kept (rejected)"
            out.append(f"<p><b>{state}: {escape(chosen.label)}</b>, {_mb(chosen.outcome.size_bytes)}, mean cosine "
                       f"{_num(chosen.cosine)}: <code>{escape(str(chosen.outcome.path))}</code></p>")
        if target.objective_used:
            out.append(f"<p>Chosen by {escape(target.objective_used)}.</p>")
        if validated_by(target):
            out.append(f"<p>Validated by: {escape(validated_by(target))}.</p>")
        if target.latency_method:
            out.append(f"<p>Latency: {escape(target.latency_method)}.</p>")
        out.append(front_svg(target, result.budget))
        out.append("<p>Grey: the search's steps as predicted (simulation on held-out calibration samples; weight bytes plus what "
                   "the file of a converted tuned plan adds); "
                   "blue circles: tuned plans converted and validated; orange squares: uniform schemes; ringed: chosen; "
                   "dashed: the budget.</p>")
        out.append("<table><tr><th>candidate</th><th>kind</th><th>size</th><th>mean cosine</th><th>predicted</th>"
                   f"<th>{escape(latency_header(target))}</th><th>verdict</th></tr>")
        for c in target.candidates:
            css = "pass" if c.passed else "fail"
            out.append(f"<tr><td>{escape(c.label)}</td><td>{c.kind}</td><td>{_mb(c.outcome.size_bytes)}</td><td>{_num(c.cosine)}</td>"
                       f"<td>{_num(c.predicted_cosine)}</td><td>{_ms(c.latency_ms)}</td><td class='{css}'>{c.outcome.verdict.value}</td></tr>")
        out.append("</table>")
        out += [f"<p>{escape(note)}</p>" for note in target.notes]
        rows = layer_rows(target, result.budget)
        if chosen is not None and chosen.per_layer is None:
            out.append(f"<p>The chosen point is the uniform scheme {escape(chosen.label)}: every quantized layer at it (no per-layer plan).</p>")
        if rows:
            out.append("<h3>Per layer</h3><table><tr><th>layer</th><th>choice</th><th>bits/weight</th><th>drift alone</th><th>why</th></tr>")
            out += [f"<tr><td>{escape(r['layer'])}</td><td>{escape(r['choice'])}</td><td>{r['bits_per_weight']}</td>"
                    f"<td>{r['drift_alone']:.2g}</td><td>{escape(r['why'])}</td></tr>" for r in rows]
            out.append("</table>")
    return "\n".join(out) + "\n"
