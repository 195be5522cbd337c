"""Terminal tables of drift (rich). Imports no toolchain: used by `edgeq validate` on devices too."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from edgeq.footprint import OTHER

_STYLE = {
    "passed": "green",
    "not_validated": "yellow",
    "over_budget": "red",
    "validation_failed": "red",
    "conversion_failed": "red",
}


def _console() -> Console:
    return Console(stderr=False, highlight=False, width=160)


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


def drift_rows(table: Table, prefix: list[str], report, tail: list[str], extra=None) -> None:
    """One row per output: cosine (mean and min), SQNR dB, max abs, top-1, then `extra(output name)` cells."""
    extra = extra or (lambda _: [])
    if report is None or not report.outputs:
        table.add_row(*prefix, "-", "-", "-", "-", "-", "-", *extra(None), *tail)
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
            *extra(drift.name),
            *tail,
        )


def token_lines(report) -> list[str]:
    """Per token output: the table's figures are over the real token positions; the all-positions figures beside."""
    if report is None:
        return []
    return [f"{d.name}: drift {note}" for d in report.outputs if (note := d.positions_note())]


def _against_fp32_artifact(quantization):
    """Cells for one output: cosine and SQNR dB of the quantized artifact against the FP32 artifact."""

    def cells(name):
        report = None if quantization is None else quantization.report
        drift = next((d for d in report.outputs if d.name == name), None) if report is not None else None
        return ["-", "-"] if drift is None else [_fmt(drift.cosine, 7), _fmt(drift.sqnr_db, 4)]

    return cells


def _bits(storage) -> str:
    return "-" if storage is None else f"{storage.bits_per_weight:.2f}"


def storage_lines(storage) -> list[str]:
    """The weights as stored: bits per weight over the model, bytes by kind, and the layers grouped by how they
    are stored (e.g. "36 int4 layers at 4.50 bits/weight"). Nothing for float artifacts: the table's bits/w says it."""
    if storage is None or not storage.quantized:
        return []
    kinds = storage.bytes_by_kind()
    lines = [
        f"weights as stored: {storage.bits_per_weight:.2f} bits/weight over {storage.weights:,} weights "
        f"({_size(kinds['quantized_weights'])} codes, {_size(kinds['scales_zero_points_luts'])} scales/zero points/LUTs, "
        f"{_size(kinds['float_weights'])} float)"
    ]
    groups: dict[tuple, list] = {}
    for layer in storage.layers:
        groups.setdefault((layer.dtype, layer.container_bits, round(layer.bits_per_weight, 2), layer.name == OTHER), []).append(layer)
    parts = []
    for (dtype, container, bits, other), layers in groups.items():
        what = f"other parameters ({layers[0].weights:,})" if other else f"{len(layers)} {dtype} layer{'s' if len(layers) != 1 else ''}"
        held = f" in {container}-bit containers" if not other and container > layers[0].code_width else ""
        parts.append(f"{what}{held} at {bits:.2f}")
    lines.append("bits/weight per layer: " + "; ".join(parts))
    return lines


def accuracy_level_lines(levels) -> list[str]:
    """ONNX MatMulNBits: the deployed accuracy_level's drift beside level 1's (the weights alone) and the kernel's."""
    if levels is None:
        return []
    if levels.weight is None or not levels.weight.outputs:
        return [f"accuracy_level {levels.deployed} (deployed): {levels.reason}"]
    weight = ", ".join(f"{d.name} cosine {_fmt(d.cosine, 7)}, SQNR {_fmt(d.sqnr_db, 4)} dB" for d in levels.weight.outputs)
    if levels.kernel is None:
        return [f"accuracy_level {levels.deployed} (deployed, fp32 math): the drift above is the weights' error alone"]
    kernel = ", ".join(f"{d.name} SQNR {_fmt(d.sqnr_db, 4)} dB, max abs {_fmt(d.max_abs, 3)}" for d in levels.kernel.outputs)
    return [
        f"accuracy_level {levels.deployed} (deployed) holds the budget; at level 1 (fp32 math: weight error) {weight}",
        f"kernel error (level {levels.deployed} against level 1): {kernel}",
    ]


def _latency(latency) -> str:
    return "-" if latency is None else f"{latency.median_ms:.3g}"


def print_outcomes(outcomes) -> None:
    console = _console()
    table = Table(
        title="edgeq: drift against FP32 PyTorch (total) and against the target's FP32 artifact (quantization)",
        show_lines=False,
    )
    numeric = ("cosine", "cos min", "SQNR dB", "max abs", "top-1", "art. cos", "art. SQNR", "ms", "size", "bits/w")
    for column in ("target", "precision", "output", *numeric, "verdict"):
        table.add_column(column, justify="right" if column in numeric else "left")
    for outcome in outcomes:
        verdict = f"[{_STYLE[outcome.verdict.value]}]{outcome.verdict.value}[/]"
        tail = [_latency(outcome.latency), _size(outcome.size_bytes), _bits(outcome.storage), verdict]
        drift_rows(table, [outcome.target, outcome.precision], outcome.report, tail, _against_fp32_artifact(outcome.quantization))
    console.print(table)
    console.print(
        "  art. cos / art. SQNR: against the FP32 artifact of the same runtime; ms: median latency of one run here "
        "(1 thread unless the profile states its threads, warm; quantized artifacts interleaved with their FP32 artifact); "
        "bits/w: weights as stored"
    )
    for outcome in outcomes:
        where = f"{outcome.target} {outcome.precision}"
        if outcome.path:
            console.print(f"  {where}: {outcome.path}")
        for line in token_lines(outcome.report):
            console.print(f"  {where}: {line}", markup=False)
        if outcome.quantization is not None:
            for line in _fp32_lines(outcome):
                console.print(f"  {where}: {line}", markup=False)
        for note in outcome.plan_notes:
            console.print(f"  {where}: plan: {note}", markup=False)
        for line in storage_lines(outcome.storage) + accuracy_level_lines(outcome.accuracy_levels):
            console.print(f"  {where}: {line}", markup=False)
        if outcome.report is not None and outcome.report.status == "not_executed":
            console.print(f"  [yellow]{where}: not executed:[/] {outcome.report.reason}")
        for line in outcome.violations:
            console.print(f"  [red]{where}: over budget:[/] {line}")
        if outcome.layers is not None and outcome.layers.top:
            bits = _layer_bits(outcome.storage)
            worst = ", ".join(
                f"{name} ({_fmt(row.local_sqnr_db, 3)} dB added noise{bits.get(name, '')})"
                for name in outcome.layers.top[:3] for row in outcome.layers.rows if row.name == name
            )
            console.print(f"  {where}: layers adding the most noise: {worst}", markup=False)
        if outcome.error:
            console.print(f"  {where}: {outcome.error}", markup=False)


def _fp32_lines(outcome) -> list[str]:
    """Latency against the FP32 artifact, and that artifact's own drift against PyTorch (conversion drift)."""
    quantization = outcome.quantization
    fp32 = quantization.fp32
    if fp32 is None:
        return []  # the quantized artifact did not run: its own line says why
    if fp32.outputs is None:
        return [f"not compared with an FP32 artifact: {quantization.report.reason}"]
    lines = []
    if outcome.latency is not None and fp32.latency is not None:
        lines.append(f"{outcome.latency.median_ms:.3g} ms vs {fp32.latency.median_ms:.3g} ms for FP32 (medians; {outcome.latency.method}): {quantization.speed}")
    if fp32.report is not None and fp32.report.outputs:
        drift = ", ".join(f"{d.name} cosine {_fmt(d.cosine, 7)}, SQNR {_fmt(d.sqnr_db, 4)} dB" for d in fp32.report.outputs)
        lines.append(f"conversion drift (its {fp32.source} FP32 artifact vs PyTorch): {drift}")
    return lines


def _layer_bits(storage) -> dict[str, str]:
    """", 4.50 bits/weight" per layer FQN of a storage account (none without one)."""
    if storage is None:
        return {}
    return {layer.name: f", {layer.bits_per_weight:.2f} bits/weight" for layer in storage.layers}


def print_bundle_check(result) -> None:
    console = _console()
    table = Table(title=f"edgeq validate {result.bundle}")
    for column in ("output", "cosine", "cos min", "SQNR dB", "max abs", "top-1", "verdict"):
        table.add_column(column)
    drift_rows(table, [], result.report, [f"[{_STYLE[result.verdict.value]}]{result.verdict.value}[/]"])
    console.print(table)
    console.print(f"  executed by: {result.report.executor}; budget: {result.budget or 'none'}")
    for line in token_lines(result.report):
        console.print(f"  {line}", markup=False)
    if result.report.reason:
        console.print(f"  {result.report.reason}", markup=False)
    for line in result.violations:
        console.print(f"  over budget: {line}", markup=False)


def print_layers(layers, title: str, storage: dict | None = None) -> None:
    """The layers adding the most noise, worst first, then what could not be compared. `storage`: a manifest's
    artifact.storage (edgeq.footprint), which adds each layer's stored bits per weight."""
    console = _console()
    rows = {row.name: row for row in layers.rows}
    bits = {str(layer.get("name")): layer.get("bits_per_weight") for layer in (storage or {}).get("layers") or []}
    table = Table(title=f"{title}: per-layer drift against {layers.reference} ({layers.samples} samples), worst first")
    for column in ("#", "layer", "kind", "SQNR dB", "input SQNR", "added-noise SQNR", "cosine", "bits/w"):
        table.add_column(column, justify="left" if column in ("layer", "kind") else "right")
    for rank, name in enumerate(layers.top, 1):
        row = rows[name]
        table.add_row(str(rank), name, row.kind, _fmt(row.sqnr_db, 4), _fmt(row.input_sqnr_db, 4), _fmt(row.local_sqnr_db, 4), _fmt(row.cosine, 7),
                      _fmt(bits.get(name), 3))
    console.print(table)
    console.print(f"  {len(layers.rows)} layers compared; executed by {layers.executor}", markup=False)
    console.print("  added-noise SQNR: of the noise the layer adds to what it reads (low = this layer makes the drift)", markup=False)
    if layers.unmatched:
        console.print(f"  no tensor of their own in the artifact (fused or folded): {', '.join(layers.unmatched)}", markup=False)
    for note in layers.notes:
        console.print(f"  {note}", markup=False)
