"""The compression step of `edgeq convert`: prune -> low-rank -> recover (distillation), once per run, on the
calibration split, before any FP32 artifact or quantization plan is made. Every target then converts the
compressed model, while the reference stays the ORIGINAL FP32 model's outputs: each artifact's drift includes
what compression cost.

Each stage is a function of its own module (edgeq/compress/stage.py says the contract); this module only
chooses them, checks what they return, and measures the model before and after each one: parameters, FP32
weight bytes, share of exact zeros, PyTorch drift against the original on the validation samples, and PyTorch
latency (one thread, warm, every model timed round by round with the others: validate/latency.py).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from edgeq.compress.spec import CompressionSpecs
from edgeq.compress.stage import StageResult
from edgeq.errors import ConversionError, UsageError

LATENCY_TARGET_S = 0.3  # per model: enough for a stable median of a small model, short for a big one (>= MIN_RUNS)


class Compressed(NamedTuple):
    model: object  # the LoadedModel every target converts (its module compressed)
    stages: list[StageResult]
    figures: dict  # the manifest's and report's "compression" section (compression_section)


def compress_model(model, specs: CompressionSpecs, calibration: list[dict[str, np.ndarray]], validation: list[dict[str, np.ndarray]],
                   references: list[dict[str, np.ndarray]] | None = None, on_step: Callable[[str], None] = lambda _: None) -> Compressed:
    """Run the asked stages on `model` (a LoadedModel; not changed) and return the compressed model, each stage's
    StageResult and the before/after figures. `references`: the original model's outputs on `validation`
    (computed when not given). A stage that refuses raises ConversionError naming the layer; nothing is exported."""
    from edgeq.calibration.collect import run_module

    if not specs.asked:
        return Compressed(model, [], {})
    check_patterns(model, specs)
    needing = specs.needing_data()
    if needing and not calibration:
        raise UsageError(
            f"{', '.join(needing)}: needs calibration samples and none are available; give --calibration-samples N "
            "(N >= 1, e.g. 32) and --data with more samples than --samples (calibration samples are drawn besides them)"
        )
    if references is None:
        references = run_module(model.module, validation, model.input_names, model.outputs, "FP32 reference outputs")
    teacher = model.module
    modules, stages = [teacher], []
    for name, run_stage in _stages(specs, teacher, model):
        on_step(f"compression: {name}")
        started = time.perf_counter()
        result = run_stage(modules[-1], calibration)
        result.seconds = result.seconds or time.perf_counter() - started
        _check_result(result, modules[-1], name)
        modules.append(result.module.eval())
        stages.append(result)
    if not stages:  # only qat / lora asked: they run per quantized plan (edgeq/quantize.py)
        return Compressed(model, [], {})
    compressed = dataclasses.replace(model, module=modules[-1])
    on_step("compression: measuring before/after")
    figures = _figures(model, modules, stages, validation, references)
    for line in summary_lines(figures):
        on_step(line)
    return Compressed(compressed, stages, figures)


def check_patterns(model, specs: CompressionSpecs) -> None:
    """Every prune_layers pattern names a layer of `model` (a LoadedModel), else a UsageError (exit 2): run by
    the pipeline as soon as the model is loaded, before any data or conversion work."""
    if specs.prune is not None and specs.prune.layers:
        from edgeq.compress.prune_layers import check_prune_layers

        check_prune_layers(model.module, specs.prune)


def summary_lines(figures: dict) -> list[str]:
    """One line per stage for the terminal: "prune structured:0.5: 29,258 -> 10,026 parameters, 117.0 -> 40.1 kB
    FP32, zeros 0.0% -> 0.0%, cosine 0.93 vs FP32, PyTorch 0.090 -> 0.064 ms"."""
    lines = []
    rows = (figures.get("latency") or {}).get("median_ms") or []
    for index, stage in enumerate(figures.get("stages") or []):
        params, size, zeros = stage["parameters"], stage["weight_bytes"], stage["zeros_share"]
        parts = [f"{params['before']:,} -> {params['after']:,} parameters",
                 f"{size['before'] / 1e3:.1f} -> {size['after'] / 1e3:.1f} kB FP32",
                 f"zeros {100 * zeros['before']:.1f}% -> {100 * zeros['after']:.1f}%"]
        parts += [f"{d['name']} cosine {d['cosine']:.4f} vs FP32" for d in stage["drift"]]
        if index < len(rows):
            parts.append(f"PyTorch {rows[index]['before']:.3g} -> {rows[index]['after']:.3g} ms")
        lines.append(f"compression: {stage['stage']} {stage['spec']}: " + ", ".join(parts))
    return lines


def _stages(specs: CompressionSpecs, teacher, model):
    """(name, run(module, calibration) -> StageResult) in the order they apply; the stage modules are imported
    when they run, so `edgeq --help` and the torch-free checks never load them."""
    names, example = model.input_names, model.example_inputs
    if specs.prune is not None:
        spec = specs.prune
        yield f"prune {spec.text or spec.kind}", lambda module, calibration: _prune(spec)(module, spec, calibration, names, example_inputs=example)
    if specs.lowrank is not None:
        spec = specs.lowrank

        def lowrank(module, calibration):
            from edgeq.compress.lowrank import factorize

            return factorize(module, spec, calibration, names, example_inputs=example)

        yield f"low-rank {spec.text or spec.mode}", lowrank
    if specs.distills:
        spec = specs.recover

        def recover(module, calibration):
            from edgeq.recover.distill import distill

            return distill(module, teacher, spec, calibration, names, model.outputs)

        yield f"recover {spec.text or 'distill'}", recover


def _prune(spec):
    if spec.kind == "channels":
        from edgeq.compress.prune_structured import prune_structured

        return prune_structured
    if spec.kind == "heads":
        from edgeq.compress.prune_heads import prune_heads

        return prune_heads
    from edgeq.compress.sparsity import prune_sparse

    return prune_sparse


def _check_result(result, given, name: str) -> None:
    if not isinstance(result, StageResult) or result.module is None:
        raise ConversionError(f"compression: {name} returned no module (a bug in the stage: it must return a StageResult)")
    if result.module is given:
        raise ConversionError(f"compression: {name} returned the module it was given (a bug in the stage: it must return a changed copy)")


def model_figures(module) -> dict:
    """parameters; weight_bytes: the state dict's floating-point tensors at 4 bytes each (what an FP32 artifact
    stores); zeros_share: exact zeros among the weight tensors (2-D or more), what sparse storage can skip."""
    parameters = sum(p.numel() for p in module.parameters())
    state = module.state_dict().values()
    tensors = {(t.data_ptr(), tuple(t.shape), t.dtype): t for t in state if t.numel()}.values()  # tied weights once
    weight_bytes = sum(4 * t.numel() for t in tensors if t.is_floating_point())
    weights = [t for t in tensors if t.is_floating_point() and t.dim() >= 2]
    total = sum(t.numel() for t in weights)
    zeros = sum(int((t == 0).sum()) for t in weights)
    return {"parameters": int(parameters), "weight_bytes": int(weight_bytes), "zeros_share": round(zeros / total, 4) if total else 0.0}


def _drift(module, model, validation, references) -> list[dict]:
    """Per output: mean cosine and SQNR dB of `module` against the original FP32 model on the validation samples."""
    from edgeq.calibration.collect import run_module
    from edgeq.validate.metrics import cosine, sqnr_db

    outputs = run_module(module, validation, model.input_names, model.outputs, "compressed model outputs")
    rows = []
    for name in model.outputs:
        pairs = [(ref[name], out[name]) for ref, out in zip(references, outputs) if np.issubdtype(ref[name].dtype, np.floating)]
        if not pairs:
            continue
        finite = all(np.isfinite(out).all() for _, out in pairs)
        if not finite:
            raise ConversionError(f"compression left output {name!r} with NaN or Inf on the validation samples; nothing exported")
        rows.append({
            "name": name,
            "cosine": round(float(np.mean([cosine(r, o) for r, o in pairs])), 7),
            "sqnr_db": round(float(np.mean([min(sqnr_db(r, o), 200.0) for r, o in pairs])), 4),  # 200 dB: exact
        })
    return rows


def _figures(model, modules: list, stages: list[StageResult], validation, references) -> dict:
    figures = [model_figures(m) for m in modules]
    drifts = [_drift(m, model, validation, references) for m in modules[1:]]
    latencies = _latencies(modules, model, validation)
    section_stages = []
    for index, result in enumerate(stages):
        before, after = figures[index], figures[index + 1]
        section_stages.append({
            **result.to_json(),
            **{key: {"before": before[key], "after": after[key]} for key in before},
            "drift": drifts[index],
        })
    return compression_section(section_stages, latencies, [round(r.seconds, 3) for r in stages], samples=len(validation))


def compression_section(stages: list[dict], latency: dict | None, seconds: list[float], samples: int) -> dict:
    """The manifest's "compression": stages (deterministic: spec, layers, figures, drift vs the original FP32
    model on `samples` validation samples) apart from `latency` and `seconds` (timing fields)."""
    return {"stages": stages, "drift_samples": samples, "latency": latency, "seconds": seconds}


def _latencies(modules: list, model, validation) -> dict | None:
    """PyTorch median ms of every model (original, then after each stage) on the first validation sample,
    timed round by round so machine load hits all alike."""
    import torch

    from edgeq.validate.latency import measure_interleaved

    if not validation:
        return None
    inputs = tuple(torch.from_numpy(np.ascontiguousarray(validation[0][n])) for n in model.input_names)

    def call(module):
        def run():
            with torch.no_grad():
                module(*inputs)

        return run

    timed = measure_interleaved([call(m) for m in modules], target_s=LATENCY_TARGET_S, threads=torch.get_num_threads())
    medians = [t.median_ms for t in timed]
    return {
        "method": f"PyTorch eager, {timed[0].method}, models interleaved", "host": timed[0].host,
        "median_ms": [{"before": medians[i], "after": medians[i + 1]} for i in range(len(modules) - 1)],
    }


def plan_records(stages: list[StageResult]) -> list[dict]:
    """What QuantPlan.compression (plan.json) keeps of the stages: their to_json(), no timings."""
    return [stage.to_json() for stage in stages]


__all__ = ["Compressed", "check_patterns", "compress_model", "compression_section", "model_figures", "plan_records", "summary_lines"]
