"""DriftReport: how far an artifact's outputs are from the FP32 PyTorch outputs, per output."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from edgeq.validate import metrics
from edgeq.validate.token_mask import TokenMask


class Status:
    VALIDATED = "validated"  # the artifact ran in its runtime and was compared
    NOT_EXECUTED = "not_executed"  # this machine cannot run the runtime (e.g. Core ML off macOS)
    ERROR = "error"  # the runtime failed to load or run the artifact


@dataclass
class OutputDrift:
    """Drift of one output over all validation samples. `cosine` is the mean of per-sample cosines."""

    name: str
    max_abs: float
    mean_abs: float
    rel_l2: float
    sqnr_db: float
    cosine: float
    cosine_min: float
    top1: float | None = None  # only for logits outputs: same argmax as the reference
    top5: float | None = None  # only for logits outputs: argmax within the reference's top 5
    # Token outputs (validate.token_mask): the figures above are over the positions `mask_input` marks real,
    # `positions` of `positions_total` over all samples; `unmasked` holds the same figures over every position,
    # padding included, for those who read it. Budgets hold the figures above. None for other outputs.
    mask_input: str | None = None
    positions: int | None = None
    positions_total: int | None = None
    unmasked: dict | None = None

    def value(self, metric: str) -> float | None:
        return getattr(self, metric)

    def positions_note(self) -> str | None:
        return positions_note(asdict(self))


@dataclass
class DriftReport:
    status: str
    executor: str
    samples: int = 0
    outputs: list[OutputDrift] = field(default_factory=list)
    reason: str | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        data["outputs"] = [json_floats(output) for output in data["outputs"]]
        for output in data["outputs"]:
            if output.get("unmasked"):
                output["unmasked"] = json_floats(output["unmasked"])
        return data


def json_floats(record: dict) -> dict:
    """`record` with infinite floats as the strings "inf" / "-inf": JSON has no infinity."""
    return {k: ("inf" if v > 0 else "-inf") if isinstance(v, float) and math.isinf(v) else v for k, v in record.items()}


def positions_note(output: dict) -> str | None:
    """For a token output (an OutputDrift as a dict, or as report.json holds it), which positions its figures
    are over, and its figures over every position: "on 412 of 4096 token positions (the ones attention_mask
    marks real); over all positions, padding included: cosine 0.8812, SQNR 9.12 dB". None for other outputs."""
    if output.get("positions") is None:
        return None
    note = (f"on {output['positions']} of {output.get('positions_total')} token positions "
            f"(the ones {output.get('mask_input')} marks real)")
    unmasked = output.get("unmasked") or {}
    if unmasked:
        note += (f"; over all positions, padding included: cosine {_short(unmasked.get('cosine'), 7)}, "
                 f"SQNR {_short(unmasked.get('sqnr_db'), 4)} dB")
    return note


def _short(value, digits: int) -> str:
    return f"{value:.{digits}g}" if isinstance(value, (int, float)) else str(value)


def is_logits(name: str) -> bool:
    """Outputs named `logits` (or `*_logits`, `*.logits`) are classifier scores and get top-k agreement."""
    return name == "logits" or name.endswith(("_logits", ".logits"))


def compare(
    references: list[dict[str, np.ndarray]],
    candidates: list[dict[str, np.ndarray]],
    output_names: list[str],
    executor: str,
    masks: dict[str, TokenMask] | None = None,
) -> DriftReport:
    """Compare sample-by-sample outputs of the reference and the artifact, for every named output. Outputs in
    `masks` (token outputs, validate.token_mask) are judged on their real positions, with every position's
    figures kept beside them."""
    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} reference samples but {len(candidates)} candidate samples")
    masks = masks or {}
    drifts = []
    for name in output_names:
        ref = [np.asarray(sample[name], dtype=np.float64) for sample in references]
        cand = [np.asarray(sample[name], dtype=np.float64) for sample in candidates]
        for index, (r, c) in enumerate(zip(ref, cand)):
            if r.shape != c.shape:
                raise ValueError(
                    f"output {name!r}, sample {index}: the artifact returned shape {c.shape}, PyTorch {r.shape}"
                )
        everywhere = _figures(name, ref, cand)
        mask = masks.get(name)
        if mask is None or mask.positions == 0:
            drifts.append(OutputDrift(name=name, **everywhere))
            continue
        # Samples with no real token (an empty text) have nothing to compare: they drop out of the mean cosine.
        kept = [i for i in range(len(ref)) if mask.real[i].any()]
        real = _figures(name, [mask.select(i, ref[i]) for i in kept], [mask.select(i, cand[i]) for i in kept])
        drifts.append(OutputDrift(
            name=name, **real, mask_input=mask.input, positions=mask.positions, positions_total=mask.positions_total,
            unmasked=everywhere,
        ))
    return DriftReport(status=Status.VALIDATED, executor=executor, samples=len(references), outputs=drifts)


def _figures(name: str, ref: list[np.ndarray], cand: list[np.ndarray]) -> dict:
    """Every metric of one output over the samples `ref` / `cand` (any shapes, equal pairwise)."""
    ref_all, cand_all = np.concatenate([_rows(r) for r in ref]), np.concatenate([_rows(c) for c in cand])
    cosines = [metrics.cosine(r, c) for r, c in zip(ref, cand)]
    logits = is_logits(name) and ref_all.shape[-1] > 1
    return dict(
        max_abs=metrics.max_abs(ref_all, cand_all),
        mean_abs=metrics.mean_abs(ref_all, cand_all),
        rel_l2=metrics.rel_l2(ref_all, cand_all),
        sqnr_db=metrics.sqnr_db(ref_all, cand_all),
        cosine=float(np.mean(cosines)),
        cosine_min=float(np.min(cosines)),
        top1=metrics.topk_agreement(ref_all, cand_all, 1) if logits else None,
        top5=metrics.topk_agreement(ref_all, cand_all, 5) if logits else None,
    )


def _rows(array: np.ndarray) -> np.ndarray:
    """`array` as rows of its last axis (one row for a scalar), so samples of token outputs, each with its own
    count of real positions, concatenate; every metric but top-k reads the values alone, top-k reads rows."""
    if array.ndim == 0 or array.size == 0:
        return array.reshape(-1, 1)
    return array.reshape(-1, array.shape[-1])
