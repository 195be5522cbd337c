"""A sweep's results as one table: the terminal, sweep.json (for tools), sweep.md and sweep.html (for people),
each row linking the report of the run that made its bundle. Written atomically into the sweep's folder."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from edgeq.bundle import write_atomic
from edgeq.report_markdown import cell
from edgeq.sweep.task import FAILED, TaskResult

COLUMNS = ("model", "recipe", "target", "scheme", "status", "cosine", "SQNR dB", "size", "ms", "tries", "s", "note")
_STYLE = {"passed": "green", "not_validated": "yellow", FAILED: "red"}
# Most severe first: a failed task's own code (1 internal or lost worker, 2 usage, 3 bad model or data), then
# the verdicts' order of `edgeq convert` (conversion 4 > validation 5 > budget 6).
_SEVERITY = (1, 3, 2, 4, 5, 6)


def exit_code(results: list[TaskResult]) -> int:
    codes = {r.exit_code for r in results} - {0}
    return next((code for code in _SEVERITY if code in codes), max(codes, default=0))


def row(result: TaskResult) -> list[str]:
    """The table's cells for one task (terminal, Markdown and HTML share them)."""
    return [
        result.model, result.recipe, result.target, result.scheme, result.status,
        _number(result.cosine, 6), _number(result.sqnr_db, 4), _size(result.size_bytes), _number(result.latency_ms, 3),
        str(result.attempts) if not result.reused else "-", _number(result.seconds, 3) if not result.reused else "-",
        note(result),
    ]


def note(result: TaskResult) -> str:
    if result.reused:
        return "reused: same inputs, bundle in place"
    if result.error:
        return result.error.splitlines()[0][:160]
    if result.notes:
        return result.notes[0][:160]
    return "retried after a lost worker" if result.attempts > 1 else ""


def print_table(results: list[TaskResult], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in ("cosine", "SQNR dB", "size", "ms", "tries", "s") else "left")
    for result in results:
        cells = row(result)
        style = _STYLE.get(result.status, "red")
        cells[4] = f"[{style}]{cells[4]}[/]"
        table.add_row(*cells[:4], cells[4], *(c.replace("[", "\\[") for c in cells[5:]))
    Console(highlight=False, width=180).print(table)


def write_reports(out: Path, results: list[TaskResult], meta: dict) -> list[Path]:
    """sweep.json, sweep.md and sweep.html in `out`; returns the paths written."""
    out = Path(out)
    counts = {}
    for result in results:
        counts[result.status] = counts.get(result.status, 0) + 1
    data = {**meta, "counts": counts, "reused": sum(r.reused for r in results), "exit_code": exit_code(results),
            "tasks": [r.to_json() for r in results]}
    return [
        write_atomic(out / "sweep.json", json.dumps(data, indent=2, default=str) + "\n"),
        write_atomic(out / "sweep.md", _markdown(out, results, data)),
        write_atomic(out / "sweep.html", _html(out, results, data)),
    ]


def _markdown(out: Path, results: list[TaskResult], data: dict) -> str:
    lines = [f"# edgeq sweep: {len(results)} tasks", "", _summary(data), "",
             "| " + " | ".join(COLUMNS) + " | report |", "|" + "---|" * (len(COLUMNS) + 1)]
    for result in results:
        link = _link(out, result.report, ".md")
        lines.append("| " + " | ".join(cell(c) for c in row(result)) + f" | {f'[report]({link})' if link else '-'} |")
    problems = [r for r in results if r.error and not r.reused]
    if problems:
        lines += ["", "## Errors", ""]
        lines += [f"- `{r.id}`: {cell(r.error.splitlines()[0])}" for r in problems]
    return "\n".join(lines) + "\n"


def _html(out: Path, results: list[TaskResult], data: dict) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in (*COLUMNS, "report"))
    body = []
    for result in results:
        link = _link(out, result.report, ".html")
        cells = "".join(f"<td>{html.escape(c)}</td>" for c in row(result))
        anchor = f'<a href="{html.escape(link)}">report</a>' if link else "-"
        body.append(f'<tr class="{html.escape(result.status)}">{cells}<td>{anchor}</td></tr>')
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>edgeq sweep</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left}"
        ".passed td:nth-child(5){color:#080}.failed td:nth-child(5),.over_budget td:nth-child(5),"
        ".conversion_failed td:nth-child(5),.validation_failed td:nth-child(5){color:#b00}"
        f"</style></head><body><h1>edgeq sweep: {len(results)} tasks</h1><p>{html.escape(_summary(data))}</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></body></html>\n"
    )


def _summary(data: dict) -> str:
    counts = ", ".join(f"{n} {status}" for status, n in sorted(data["counts"].items()))
    return (f"{counts}; {data['reused']} reused from a previous run; ran on {data.get('runner')}; "
            f"{data.get('seconds')} s; exit code {data['exit_code']}")


def _link(out: Path, report: str | None, suffix: str) -> str | None:
    """The run report beside a task's bundle, relative to the sweep's folder (the pages move with it)."""
    if not report:
        return None
    path = Path(report).with_suffix(suffix)
    if not path.is_file():
        return None
    return Path(os.path.relpath(path, out)).as_posix()


def _number(value, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):  # JSON's "inf"
        return value
    return f"{value:.{digits}g}"


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    return f"{size / 1024:.1f} kB" if size < 1 << 20 else f"{size / (1 << 20):.2f} MB"


__all__ = ["exit_code", "print_table", "write_reports"]
