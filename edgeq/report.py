"""Terminal tables of drift (rich). Imports no toolchain: used by `edgeq validate` on devices too."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

_STYLE = {
    "passed": "green",
    "not_validated": "yellow",
    "over_budget": "red",
    "validation_failed": "red",
    "conversion_failed": "red",
}


def _console() -> Console:
    return Console(stderr=False, highlight=False, width=140)


def _fmt(value, digits: int = 6) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if value == float("inf") else f"{value:.{digits}g}"
    return str(value)


def _size(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "-"
    return f"{size_bytes / 1e6:.2f} MB" if size_bytes >= 1e5 else f"{size_bytes / 1e3:.1f} kB"


def drift_rows(table: Table, prefix: list[str], report, tail: list[str]) -> None:
    """One row per output: cosine (mean and min), SQNR dB, max abs, top-1."""
    if report is None or not report.outputs:
        table.add_row(*prefix, "-", "-", "-", "-", "-", "-", *tail)
        return
    for drift in report.outputs:
        table.add_row(
            *prefix,
            drift.name,
            _fmt(drift.cosine, 7),
            _fmt(drift.cosine_min, 7),
            _fmt(drift.sqnr_db, 4),
            _fmt(drift.max_abs, 3),
            _fmt(drift.top1, 3),
            *tail,
        )


def print_outcomes(outcomes) -> None:
    console = _console()
    table = Table(title="edgeq: drift against FP32 PyTorch", show_lines=False)
    for column in ("target", "precision", "output", "cosine", "cos min", "SQNR dB", "max abs", "top-1", "size", "verdict"):
        table.add_column(column, justify="right" if column in ("cosine", "cos min", "SQNR dB", "max abs", "top-1", "size") else "left")
    for outcome in outcomes:
        verdict = f"[{_STYLE[outcome.verdict.value]}]{outcome.verdict.value}[/]"
        drift_rows(table, [outcome.target, outcome.precision], outcome.report, [_size(outcome.size_bytes), verdict])
    console.print(table)
    for outcome in outcomes:
        where = f"{outcome.target} {outcome.precision}"
        if outcome.path:
            console.print(f"  {where}: {outcome.path}")
        if outcome.report is not None and outcome.report.status == "not_executed":
            console.print(f"  [yellow]{where}: not executed:[/] {outcome.report.reason}")
        for line in outcome.violations:
            console.print(f"  [red]{where}: over budget:[/] {line}")
        if outcome.error:
            console.print(f"  {where}: {outcome.error}", markup=False)


def print_bundle_check(result) -> None:
    console = _console()
    table = Table(title=f"edgeq validate {result.bundle}")
    for column in ("output", "cosine", "cos min", "SQNR dB", "max abs", "top-1", "verdict"):
        table.add_column(column)
    drift_rows(table, [], result.report, [f"[{_STYLE[result.verdict.value]}]{result.verdict.value}[/]"])
    console.print(table)
    console.print(f"  executed by: {result.report.executor}; budget: {result.budget or 'none'}")
    if result.report.reason:
        console.print(f"  {result.report.reason}", markup=False)
    for line in result.violations:
        console.print(f"  over budget: {line}", markup=False)
