"""Weight parity: the artifact's integer codes and scales equal the plan's, per quantized layer.

Readers exist per runtime; each returns {user FQN: (codes, scale)} as stored in the artifact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.plan import QuantPlan


@dataclass
class ParityResult:
    checked: int
    mismatches: list[str]  # "fqn: what differs"; empty when every layer matches exactly
    missing: list[str]  # quantized in the plan but not found quantized in the artifact

    def to_json(self) -> dict:
        return {"checked_layers": self.checked, "mismatches": self.mismatches, "missing": self.missing}


def onnx_weights(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Codes and scales of every DequantizeLinear over an int8 initializer named `<fqn>.weight.codes`."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    initializers = {i.name: i for i in graph.initializer}
    constants = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute}
    found = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or not node.input[0].endswith(".weight.codes"):
            continue
        source = {**constants, **initializers}
        codes = numpy_helper.to_array(source[node.input[0]])
        scale = numpy_helper.to_array(source[node.input[1]])
        fqn = node.input[0].removesuffix(".weight.codes").removeprefix("inner.")
        found[fqn] = (codes, scale)
    return found


def compare_weights(plan: QuantPlan, stored: dict[str, tuple[np.ndarray, np.ndarray]]) -> ParityResult:
    mismatches, missing, checked = [], [], 0
    for fqn, layer in plan.layers.items():
        if layer.weight is None:
            continue
        if fqn not in stored:
            missing.append(fqn)
            continue
        checked += 1
        codes, scale = stored[fqn]
        if codes.shape != layer.weight_codes.shape or not np.array_equal(codes, layer.weight_codes):
            differing = int(np.sum(codes != layer.weight_codes)) if codes.shape == layer.weight_codes.shape else "all"
            mismatches.append(f"{fqn}: {differing} weight codes differ")
        if not np.array_equal(np.asarray(scale, dtype=np.float32).ravel(), layer.weight.scale.ravel()):
            mismatches.append(f"{fqn}: scales differ (max {float(np.max(np.abs(scale.ravel() - layer.weight.scale.ravel()))):.3g})")
    return ParityResult(checked, mismatches, missing)
