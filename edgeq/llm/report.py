"""The text-generation bundle's manifest.json and report.md (greedy continuations side by side)."""

from __future__ import annotations

from pathlib import Path


def _size(path: Path) -> int:
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def manifest(artifact, source, options, runtime, precision, plan, notes, report, violations, seconds, kv=None) -> dict:
    """The bundle's manifest. `kv`: the int8 KV cache's block (edgeq/llm/kv_cache.py `prepare`: scales, bytes,
    and the cache's own drift with FP32 weights), or None for the model's float cache."""
    import edgeq

    planned = [layer for layer in plan.layers.values() if layer.weight is not None] if plan is not None else []
    return {
        "edgeq": getattr(edgeq, "__version__", "0.1.0"),
        "task": "text-generation",
        "source": source.origin,
        "model": type(source.model).__name__,
        "target": runtime,
        "precision": precision,
        "max_context": options.max_context,
        "artifact": {"file": Path(artifact).name, "size_bytes": _size(artifact)},
        "plan": None if plan is None else {
            "scheme": plan.scheme, "algorithm": options.algo or "rtn", "group_size": options.group_size,
            "layers": len(planned), "keep_float": list(options.keep_float), **coverage(plan, source.model),
            "notes": list(plan.notes)},
        "kv_cache": kv if kv is not None else {"dtype": "float32"},
        "notes": list(notes),
        "validation": {"reference": "FP32 PyTorch (transformers, its own KV cache)", "data": str(options.data or "built-in prompts"),
                       "teacher_forced_tokens": report.teacher_forced.tokens, "prompts": len(report.greedy.prompts),
                       "greedy_steps": max((p.steps for p in report.greedy.prompts), default=0)},
        "metrics": report.metrics(),
        "budget": options.budget,
        "violations": violations,
        "verdict": "over-budget" if violations else "ok",
        "export_seconds": round(seconds, 1),
    }


def coverage(plan, model) -> dict:
    """What the plan quantized and what it left float: per layer (float ones with their reason) and as a share of
    the source model's parameters (norms included; a tied head counted again, as it gets codes of its own). The
    low-bit footprint note divides by the weights of the model as planned instead, which a rewrite may have grown
    (the TFLite outlier split's float side paths), so its share reads lower."""
    import numpy as np

    from edgeq.footprint import tied_head

    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    if (head := tied_head(model)) is not None:
        total += head.weight.numel()  # a tied head gets its own codes in the artifact (its own plan entry)
    quantized = {fqn: int(np.prod(layer.weight_codes.shape)) for fqn, layer in plan.layers.items() if layer.weight is not None}
    return {"quantized_weight_share": round(sum(quantized.values()) / max(total, 1), 4),
            "float_layers": {fqn: layer.reason for fqn, layer in plan.layers.items() if layer.weight is None}}


def markdown(data: dict, full: dict) -> str:
    m = data["metrics"]
    lines = [
        f"# {data['model']} -> {data['target']} {data['precision']} (max context {data['max_context']})", "",
        f"Source: `{data['source']}`; artifact `{data['artifact']['file']}`, {data['artifact']['size_bytes'] / 1e6:.2f} MB.", "",
        "| metric | value |", "|---|---|",
        f"| teacher-forced top-1 agreement | {m['token_agreement']:.4f} over {full['teacher_forced']['tokens']} tokens |",
        f"| perplexity FP32 / artifact (delta) | {m['ppl_reference']:.3f} / {m['ppl_candidate']:.3f} ({m['ppl_delta']:+.4f}) |",
        f"| greedy agreement (tokens before divergence / decoded) | {m['greedy_agreement']:.3f} |",
        f"| worst logit cosine, teacher-forced / along the decode | {m['logit_cosine_min']:.6f} / {m['step_cosine_min']:.6f} |",
        f"| verdict | {data['verdict']}{': ' + '; '.join(data['violations']) if data['violations'] else ''} |", "",
    ]
    lines += _kv_cache(data.get("kv_cache") or {}, m)
    plan = data.get("plan")
    if plan:
        lines += [f"Plan: {plan['scheme']}, {plan['layers']} layers quantized ({plan['quantized_weight_share']:.1%} of the "
                  f"source model's parameters), {len(plan['float_layers'])} float:", *[f"- {n}" for n in plan["notes"]],
                  *[f"- `{fqn}` float: {why.removeprefix('float: ')}" for fqn, why in list(plan["float_layers"].items())[:12]],
                  *([f"- ... {len(plan['float_layers']) - 12} more float layers in manifest.json"]
                    if len(plan["float_layers"]) > 12 else []), ""]
    if data["notes"]:
        lines += ["Notes:", *[f"- {n}" for n in data["notes"]], ""]
    lines += ["## Drift along the decode", "", "| step | cosine mean | cosine min | max abs |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['cosine_mean']:.6f} | {r['cosine_min']:.6f} | {r['max_abs']:.4g} |" for r in full["drift_by_step"]]
    lines += ["", "## Greedy continuations (FP32 PyTorch | artifact)", "",
              "| # | matched | FP32 PyTorch | artifact |", "|---|---|---|---|"]
    for i, p in enumerate(full["prompts"]):
        ref = p.get("reference_text") if p.get("reference_text") is not None else " ".join(map(str, p["reference_tokens"]))
        cand = p.get("candidate_text") if p.get("candidate_text") is not None else " ".join(map(str, p["candidate_tokens"] or []))
        lines.append(f"| {i} | {p['matched']}/{p['steps']} | {_cell(ref)} | {_cell(cand)} |")
    return "\n".join(lines) + "\n"


def _kv_cache(kv: dict, artifact: dict) -> list[str]:
    """The int8 KV cache's section: its own drift (FP32 weights) beside the artifact's (weights and cache)."""
    if kv.get("dtype") != "int8":
        return []
    c, size = kv["cache_only_drift"], kv["cache_bytes_at_max_context"]
    return [
        "## int8 KV cache", "",
        f"Scales {kv['granularity']}: {kv['computed']} (`{kv['scales_file']}`). Cache at max context "
        f"{size['int8'] / 2**20:.2f} MiB (float32 {size['float32'] / 2**20:.2f} MiB).", "",
        "| against FP32 PyTorch | token agreement | ppl delta | greedy agreement | worst logit cosine (teacher-forced / decode) |",
        "|---|---|---|---|---|",
        f"| int8 KV cache alone (FP32 weights, PyTorch simulation) | {c['token_agreement']:.4f} | {c['ppl_delta']:+.4f} "
        f"| {c['greedy_agreement']:.3f} | {c['logit_cosine_min']:.6f} / {c['step_cosine_min']:.6f} |",
        f"| this artifact (its weights + int8 KV cache) | {artifact['token_agreement']:.4f} | {artifact['ppl_delta']:+.4f} "
        f"| {artifact['greedy_agreement']:.3f} | {artifact['logit_cosine_min']:.6f} / {artifact['step_cosine_min']:.6f} |", "",
    ]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ").strip()
