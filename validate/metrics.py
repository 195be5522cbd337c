"""Drift metrics between a reference (FP32 PyTorch) and a candidate (the artifact). numpy only.

Every function takes arrays of the same shape; the leading axis of a stacked batch is the sample axis.
"""

from __future__ import annotations

import numpy as np

_TINY = 1e-30  # guards divisions when a reference is all zeros


def _pair(reference, candidate) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs candidate {cand.shape}")
    return ref, cand


def max_abs(reference, candidate) -> float:
    ref, cand = _pair(reference, candidate)
    return float(np.max(np.abs(ref - cand))) if ref.size else 0.0


def mean_abs(reference, candidate) -> float:
    ref, cand = _pair(reference, candidate)
    return float(np.mean(np.abs(ref - cand))) if ref.size else 0.0


def rel_l2(reference, candidate) -> float:
    """||ref - cand|| / ||ref||."""
    ref, cand = _pair(reference, candidate)
    return float(np.linalg.norm(ref - cand) / max(np.linalg.norm(ref), _TINY))


def sqnr_db(reference, candidate) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(||ref||^2 / ||ref - cand||^2); inf when identical."""
    ref, cand = _pair(reference, candidate)
    noise = float(np.sum((ref - cand) ** 2))
    if noise == 0.0:
        return float("inf")
    return float(10.0 * np.log10(max(float(np.sum(ref**2)), _TINY) / noise))


def cosine(reference, candidate) -> float:
    """Cosine similarity of the flattened tensors; 1.0 when both are zero."""
    ref, cand = _pair(reference, candidate)
    norms = np.linalg.norm(ref) * np.linalg.norm(cand)
    if norms == 0.0:
        return 1.0 if np.array_equal(ref, cand) else 0.0
    return float(np.dot(ref.ravel(), cand.ravel()) / norms)


def topk_agreement(reference_logits, candidate_logits, k: int) -> float:
    """Fraction of rows whose top-1 class of the candidate is among the reference's top-k (k=1: same argmax)."""
    ref, cand = _pair(reference_logits, candidate_logits)
    ref = ref.reshape(-1, ref.shape[-1])
    cand = cand.reshape(-1, cand.shape[-1])
    k = min(k, ref.shape[-1])
    top_ref = np.argsort(-ref, axis=-1, kind="stable")[:, :k]
    top_cand = np.argmax(cand, axis=-1)
    return float(np.mean([c in r for c, r in zip(top_cand, top_ref)]))
