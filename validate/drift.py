"""DriftReport: how far an artifact's outputs are from the FP32 PyTorch outputs, per output."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from edgeq.validate import metrics


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

    def value(self, metric: str) -> float | None:
        return getattr(self, metric)


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
        return data


def json_floats(record: dict) -> dict:
    """`record` with infinite floats as the strings "inf" / "-inf": JSON has no infinity."""
    return {k: ("inf" if v > 0 else "-inf") if isinstance(v, float) and math.isinf(v) else v for k, v in record.items()}


def is_logits(name: str) -> bool:
    """Outputs named `logits` (or `*_logits`, `*.logits`) are classifier scores and get top-k agreement."""
    return name == "logits" or name.endswith(("_logits", ".logits"))


def compare(
    references: list[dict[str, np.ndarray]],
    candidates: list[dict[str, np.ndarray]],
    output_names: list[str],
    executor: str,
) -> DriftReport:
    """Compare sample-by-sample outputs of the reference and the artifact, for every named output."""
    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} reference samples but {len(candidates)} candidate samples")
    drifts = []
    for name in output_names:
        ref = [np.asarray(sample[name], dtype=np.float64) for sample in references]
        cand = [np.asarray(sample[name], dtype=np.float64) for sample in candidates]
        for index, (r, c) in enumerate(zip(ref, cand)):
            if r.shape != c.shape:
                raise ValueError(
                    f"output {name!r}, sample {index}: the artifact returned shape {c.shape}, PyTorch {r.shape}"
                )
        ref_all, cand_all = np.stack(ref), np.stack(cand)
        cosines = [metrics.cosine(r, c) for r, c in zip(ref, cand)]
        logits = is_logits(name) and ref_all.shape[-1] > 1
        drifts.append(
            OutputDrift(
                name=name,
                max_abs=metrics.max_abs(ref_all, cand_all),
                mean_abs=metrics.mean_abs(ref_all, cand_all),
                rel_l2=metrics.rel_l2(ref_all, cand_all),
                sqnr_db=metrics.sqnr_db(ref_all, cand_all),
                cosine=float(np.mean(cosines)),
                cosine_min=float(np.min(cosines)),
                top1=metrics.topk_agreement(ref_all, cand_all, 1) if logits else None,
                top5=metrics.topk_agreement(ref_all, cand_all, 5) if logits else None,
            )
        )
    return DriftReport(status=Status.VALIDATED, executor=executor, samples=len(references), outputs=drifts)
