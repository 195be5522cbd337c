"""Report pieces for what the weights occupy and for ORT's accuracy levels, read from report.json dicts.

`artifact.storage` (edgeq/footprint.py) holds bits per weight over the model and per layer, with bytes by kind;
`validation.accuracy_levels` (validate/check.py) an ONNX low-bit artifact's drift at its deployed
MatMulNBits accuracy_level beside its drift at level 1 (fp32 math: the weights' error alone) and the deployed
outputs against level 1's (the kernel's error). Shared by report_html and report_markdown; imports no toolchain.
"""

from __future__ import annotations

from edgeq.report_html import _table, e, fmt, fmt_size, get, number, outputs_of, target_of


def storage_of(report: dict) -> dict | None:
    storage = get(report, "artifact", "storage")
    return storage if isinstance(storage, dict) else None


def bits_per_weight(report: dict) -> float | None:
    """Stored bits per weight over the whole model, or None where the report has no storage account."""
    return number(get(storage_of(report), "bits_per_weight"))


def layer_bits(report: dict) -> dict[str, float | None]:
    """Stored bits per weight by layer FQN."""
    layers = get(storage_of(report), "layers", default=[]) or []
    return {str(row.get("name")): number(row.get("bits_per_weight")) for row in layers if isinstance(row, dict)}


def storage_text(report: dict) -> str | None:
    """"4.61 bits/weight: 1.20 MB codes, 152.3 kB scales/zero points/LUTs, 45.10 MB float" (None without an account)."""
    storage = storage_of(report)
    if storage is None:
        return None
    kinds = get(storage, "bytes", default={}) or {}
    return (
        f"{fmt(storage.get('bits_per_weight'), 3)} bits/weight over {fmt(storage.get('weights'), 12)} weights: "
        f"{fmt_size(kinds.get('quantized_weights'))} codes, {fmt_size(kinds.get('scales_zero_points_luts'))} "
        f"scales/zero points/LUTs, {fmt_size(kinds.get('float_weights'))} float"
    )


def accuracy_level_text(report: dict) -> str | None:
    """"accuracy_level 4 (deployed)" plus its kernel error, for a line; None for artifacts without MatMulNBits."""
    levels = get(report, "validation", "accuracy_levels")
    if not isinstance(levels, dict):
        return None
    deployed = levels.get("deployed")
    weight = [o for o in outputs_of({"validation": levels}, "weight_error")]
    kernel = [o for o in outputs_of({"validation": levels}, "kernel_error")]
    if not kernel:
        return f"ORT accuracy_level {fmt(deployed)} (deployed)" + (f": {levels['reason']}" if levels.get("reason") else "")
    worst_weight = min((number(o.get("cosine")) for o in weight if number(o.get("cosine")) is not None), default=None)
    worst_kernel = min((number(o.get("sqnr_db")) for o in kernel if number(o.get("sqnr_db")) is not None), default=None)
    return (
        f"ORT accuracy_level {fmt(deployed)} (deployed, budget held here); at level 1 (weight error only) worst cosine "
        f"{fmt(worst_weight, 7)}; kernel error (level {fmt(deployed)} vs 1) SQNR {fmt(worst_kernel, 4)} dB"
    )


# ---------------------------------------------------------------- html


def storage_items(report: dict) -> list[tuple[str, str]]:
    """Facts for a plan card: the weights as stored, and the ORT accuracy level where there is one."""
    items = []
    text = storage_text(report)
    if text:
        items.append(("weights as stored", text))
    level = get(report, "artifact", "ort_accuracy_level")
    if level is not None:
        items.append(("ORT accuracy_level", f"{fmt(level)} ({'int8 activations per block' if number(level) == 4 else 'fp32 math' if number(level) in (0, 1) else 'see ORT'})"))
    return items


def storage_table(report: dict, name: str) -> str:
    """Every layer's storage, in a collapsed table ("" without an account)."""
    storage = storage_of(report)
    layers = [row for row in get(storage, "layers", default=[]) or [] if isinstance(row, dict)]
    if not layers:
        return ""
    rows = []
    for row in layers:
        sizes = row.get("bytes") if isinstance(row.get("bytes"), dict) else {}
        rows.append([
            f'<code class="nowrap">{e(row.get("name"))}</code>', e(row.get("op") or "-"), e(row.get("dtype") or "-"),
            e(fmt(row.get("container_bits"))), e(fmt(row.get("weights"), 12)), e(fmt(row.get("bits_per_weight"), 4)),
            e(fmt_size(sizes.get("codes"))), e(fmt_size(sizes.get("scales"))), e(fmt_size(sizes.get("zero_points"))), e(fmt_size(sizes.get("luts"))),
        ])
    head = ["layer", "op", "stored as", "bits a code", "weights", "bits/weight", "codes", "scales", "zero points", "LUTs"]
    return (
        f"<details><summary>Bits per weight of all {len(layers)} layers</summary>"
        + _table(f"How {name} stores each layer's weight (codes in their containers, scales, zero points, LUTs)", head, rows, numeric=range(3, 10))
        + "</details>"
    )


def accuracy_levels_section(reports: list[dict]) -> str:
    """ONNX low-bit artifacts: drift at the deployed accuracy_level, at level 1, and between the two."""
    rows = []
    for r in reports:
        levels = get(r, "validation", "accuracy_levels")
        if not isinstance(levels, dict):
            continue
        weight = {o.get("name"): o for o in outputs_of({"validation": levels}, "weight_error")}
        kernel = {o.get("name"): o for o in outputs_of({"validation": levels}, "kernel_error")}
        for total in outputs_of(r) or [{}]:
            name = total.get("name")
            w, k = weight.get(name, {}), kernel.get(name, {})
            rows.append([
                e(target_of(r)), e(r.get("precision", "?")), e(name or "-"), e(fmt(levels.get("deployed"))),
                e(fmt(total.get("cosine"), 7)), e(fmt(total.get("sqnr_db"), 4)),
                e(fmt(w.get("cosine"), 7)), e(fmt(w.get("sqnr_db"), 4)),
                e(fmt(k.get("sqnr_db"), 4)), e(fmt(k.get("max_abs"), 3)),
                e(levels.get("reason") or "-"),
            ])
    if not rows:
        return ""
    head = ["target", "precision", "output", "deployed level", "deployed cos", "deployed SQNR", "weight-error cos", "weight-error SQNR",
            "kernel-error SQNR", "kernel max abs", "note"]
    return (
        '<section id="accuracy-levels"><h2>Weight error and kernel error (ORT accuracy_level)</h2>'
        "<p>ONNX Runtime's MatMulNBits computes with the plan's low-bit weights in the arithmetic its "
        "<code>accuracy_level</code> names: 1 is fp32 math, 4 quantizes activations to int8 per block at run time. "
        "<strong>Deployed</strong>: the artifact as shipped against FP32 PyTorch (the budget holds this). "
        "<strong>Weight error</strong>: the same bytes at level 1 against FP32 PyTorch (the plan's weights alone). "
        "<strong>Kernel error</strong>: the deployed outputs against level 1's. SQNR in dB.</p>"
        + _table("Each ONNX low-bit artifact at its deployed accuracy_level and at level 1", head, rows, numeric=range(3, 10))
        + "</section>"
    )
