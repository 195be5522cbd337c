"""STS Benchmark evaluation of sentence-embedding artifacts: the Spearman correlation (x100) between the
cosine of each pair's embeddings and the gold similarity scores, the standard STS-B figure.

Reads the tab-separated sts-*.csv of ../shared/data/stsb (genre, file, year, id, score, sentence1, sentence2).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np

STSB_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb"


def read_pairs(path: Path, limit: int | None = None) -> tuple[list[str], list[str], np.ndarray]:
    with open(path, newline="") as handle:
        rows = [row for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if len(row) >= 7]
    rows = rows[:limit] if limit else rows
    return [r[5] for r in rows], [r[6] for r in rows], np.array([float(r[4]) for r in rows])


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (what Spearman's rho needs)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    result = np.empty(len(values))
    start = 0
    while start < len(values):
        stop = start
        while stop + 1 < len(values) and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        result[order[start : stop + 1]] = (start + stop) / 2.0
        start = stop + 1
    return result


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho x 100."""
    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1] * 100)


def pair_cosines(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    first = first / np.linalg.norm(first, axis=-1, keepdims=True)
    second = second / np.linalg.norm(second, axis=-1, keepdims=True)
    return np.sum(first * second, axis=-1)


def stsb_spearman(embed: Callable[[list[str]], np.ndarray], path: Path, limit: int | None = None) -> float:
    """Spearman x100 of the pairs' embedding cosines against the gold scores; `embed` maps texts to [n, dim]."""
    first, second, gold = read_pairs(path, limit)
    embeddings = embed(first + second)
    return spearman(pair_cosines(embeddings[: len(first)], embeddings[len(first) :]), gold)
