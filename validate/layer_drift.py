"""Per-layer drift: each layer's output in the artifact against FP32 PyTorch, and where the drift comes from.

A layer's SQNR alone does not localize drift: every layer after a bad one inherits its noise. What a layer
adds is what its output noise has beyond its input's. Noise powers of independent sources add, so with
n = 10^(-SQNR/10) the noise-to-signal ratio of a tensor, a layer adds

    n_added = n_out - n_in,      local SQNR = -10 log10(n_added)    (inf when the layer adds none)

which ranks the layer that injects the noise first, whatever its depth. n_in is the noise of the tensor the
layer reads: its producer's output when a tapped module made it, the model input when it came from there
(noise-free), otherwise the nearest tapped layer before it in execution order (an approximation for tensors
made by functional ops, such as residual sums). numpy only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from edgeq.validate.drift import json_floats
from edgeq.validate.metrics import cosine

TOP = 5  # offenders named in reports


@dataclass
class LayerDrift:
    name: str  # torch FQN
    kind: str  # module class name
    tensor: str  # what the runtime calls the tapped value (ONNX value name, TFLite tensor name)
    sqnr_db: float
    cosine: float  # mean over samples
    input_sqnr_db: float  # of the tensor the layer reads (inf: the model input)
    local_sqnr_db: float  # of the noise this layer adds (inf: none)
    local_method: str  # isolated: FP32 PyTorch re-run on the artifact's input; estimated: from SQNRs
    sqnr_lost_db: float | None  # input_sqnr_db - sqnr_db; None when the input is noise-free
    fused: list[str] = field(default_factory=list)  # later modules computed by the same runtime op


@dataclass
class LayerReport:
    reference: str
    executor: str
    samples: int
    rows: list[LayerDrift] = field(default_factory=list)  # execution order
    unmatched: list[str] = field(default_factory=list)  # modules the artifact has no tensor for (fused, folded)
    notes: list[str] = field(default_factory=list)

    @property
    def top(self) -> list[str]:
        """The layers adding the most noise, worst first (layers adding none are never offenders)."""
        ranked = sorted((r for r in self.rows if math.isfinite(r.local_sqnr_db)), key=lambda r: r.local_sqnr_db)
        return [r.name for r in ranked[:TOP]]

    def to_json(self) -> dict:
        data = asdict(self)
        data["rows"] = [json_floats(row) for row in data["rows"]]
        data["top"] = self.top
        return data


def pooled_sqnr_db(references: list[np.ndarray], candidates: list[np.ndarray], signal: list[np.ndarray] | None = None) -> float:
    """SQNR over all samples together: 10 log10(sum signal^2 / sum (ref - cand)^2); the signal is the
    references unless given (a layer's noise beyond a re-run is measured against its FP32 output)."""
    power = sum(float(np.sum(np.square(s, dtype=np.float64))) for s in (references if signal is None else signal))
    noise = sum(float(np.sum(np.square(r.astype(np.float64) - c, dtype=np.float64))) for r, c in zip(references, candidates))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(power, 1e-30) / noise)


def mean_cosine(references: list[np.ndarray], candidates: list[np.ndarray]) -> float:
    return float(np.mean([cosine(r, c) for r, c in zip(references, candidates)]))


def local_sqnr_db(input_sqnr: float, output_sqnr: float) -> float:
    """SQNR of the noise a layer adds, from its input's and its output's SQNR (see the module docstring)."""
    added = _noise(output_sqnr) - _noise(input_sqnr)
    return math.inf if added <= 0 else -10.0 * math.log10(added)


def _noise(sqnr: float) -> float:
    return 0.0 if math.isinf(sqnr) and sqnr > 0 else 10.0 ** (-sqnr / 10.0)
