"""Weight parity: the artifact's integer codes and scales equal the plan's, per quantized layer.

Readers exist per runtime; each returns {user FQN: (codes, scale)} as stored in the artifact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.plan import QuantPlan


@dataclass
class ParityResult:
    checked: int
    mismatches: list[str]  # "fqn: what differs"; empty when every layer matches exactly
    missing: list[str]  # quantized in the plan, but float in the artifact
    removed: list[str]  # in the plan, but the exporter dropped the layer as dead code (its output is unused)

    def to_json(self) -> dict:
        return {"checked_layers": self.checked, "mismatches": self.mismatches, "missing": self.missing, "removed_as_unused": self.removed}


@dataclass
class StoredWeights:
    quantized: dict[str, tuple[np.ndarray, np.ndarray]]  # user FQN -> (codes, scale) as stored
    names: set[str]  # every stored tensor name, to tell a float layer from one the exporter removed
    zero_points: dict[str, np.ndarray] = field(default_factory=dict)  # user FQN -> zero points, where stored (low-bit)
    # user FQN -> (first row, float rows) of a table whose lookup at constant indices was folded into the rows it
    # produces (converters/tflite_fold_lookups.py): checked against the plan's codes x scale, bit for bit
    folded_rows: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)

    def present(self, fqn: str) -> bool:
        return any(name.startswith((f"{fqn}.", f"inner.{fqn}.")) for name in self.names)


def onnx_tensors(graph) -> dict:
    """name -> TensorProto of every constant a graph stores: initializers and Constant nodes' values."""
    constants = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute}
    return {**constants, **{i.name: i for i in graph.initializer}}


def onnx_weights(path: Path) -> StoredWeights:
    """Codes and scales of every DequantizeLinear over an int8 initializer named `<fqn>.weight.codes`."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    tensors = onnx_tensors(graph)
    found = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or not node.input[0].endswith((".weight.codes", ".weight.codes.T")):
            continue
        codes = numpy_helper.to_array(tensors[node.input[0]])
        if node.input[0].endswith(".T"):  # stored [in, out] for ORT's fusions (converters/onnx_graph_shape.py)
            codes = codes.T
        scale = numpy_helper.to_array(tensors[node.input[1]])
        fqn = node.input[0].removesuffix(".T").removesuffix(".weight.codes").removeprefix("inner.")
        found[fqn] = (codes, scale)
    for node in graph.node:  # dynamic int8: MatMulInteger over transposed codes (converters/onnx_dynamic.py)
        if node.op_type == "MatMulInteger" and node.input[1].endswith(".weight.codes.T"):
            stem = node.input[1].removesuffix(".codes.T")
            codes = numpy_helper.to_array(tensors[node.input[1]]).T
            scale = numpy_helper.to_array(tensors[f"{stem}.scale"])
            found[stem.removesuffix(".weight").removeprefix("inner.")] = (codes, scale)
    for node in graph.node:  # int8 tables gathered as codes (converters/onnx_dynamic.py gather_int8_tables)
        if node.op_type == "Gather" and node.input[0].endswith(".weight.codes") and node.input[0] in tensors:
            stem = node.input[0].removesuffix(".codes")
            if f"{stem}.scale" in tensors:
                scale = numpy_helper.to_array(tensors[f"{stem}.scale"])
                found[stem.removesuffix(".weight").removeprefix("inner.")] = (numpy_helper.to_array(tensors[node.input[0]]), scale)
    zero_points = {}
    if any(node.op_type in ("MatMulNBits", "GatherBlockQuantized") for node in graph.node):  # low-bit: converters/onnx_lowbit.py
        from edgeq.converters.onnx_lowbit import read_matmul_nbits

        for fqn, (codes, scale, zero) in read_matmul_nbits(graph, tensors).items():
            found[fqn], zero_points[fqn] = (codes, scale), zero
    return StoredWeights(found, set(tensors), zero_points)


def artifact_weights(path: Path, runtime: str) -> StoredWeights:
    if runtime == "onnx":
        return onnx_weights(path)
    if runtime == "coreml":
        from edgeq.converters.parity_coreml import coreml_weights

        return coreml_weights(path)
    if runtime == "tflite":
        from edgeq.converters.parity_tflite import tflite_weights

        return tflite_weights(path)
    raise NotImplementedError(f"no weight reader for {runtime} yet")


def compare_weights(plan: QuantPlan, stored: StoredWeights) -> ParityResult:
    mismatches, missing, removed, checked = [], [], [], 0
    for fqn, layer in plan.layers.items():
        palette = getattr(layer, "palette", None)  # a palettized layer: weight_codes are its indices, palette its LUTs
        if layer.weight is None and palette is None:
            continue
        if fqn in stored.folded_rows and fqn not in stored.quantized and layer.weight_codes is not None and layer.weight_codes.ndim == 2:
            checked += 1
            start, rows = stored.folded_rows[fqn]
            codes = layer.weight_codes[start:start + rows.shape[0]]
            expected = codes.astype(np.float32) * np.asarray(layer.weight.scale, np.float32).ravel()[start:start + rows.shape[0], None]
            if rows.shape != expected.shape or not np.array_equal(rows, expected):
                mismatches.append(f"{fqn}: the folded rows [{start}:{start + rows.shape[0]}] are not the plan's codes x scale")
            continue
        if fqn not in stored.quantized:
            (missing if stored.present(fqn) else removed).append(fqn)
            continue
        checked += 1
        codes, scale = stored.quantized[fqn]
        if codes.shape != layer.weight_codes.shape or not np.array_equal(codes, layer.weight_codes):
            differing = int(np.sum(codes != layer.weight_codes)) if codes.shape == layer.weight_codes.shape else "all"
            mismatches.append(f"{fqn}: {differing} weight codes differ")
        expected = np.asarray(palette if layer.weight is None else layer.weight.scale, dtype=np.float32)
        if np.asarray(scale).size != expected.size:
            mismatches.append(f"{fqn}: {np.asarray(scale).size} scales stored, the plan has {expected.size}")
        elif not np.array_equal(np.asarray(scale, dtype=np.float32).ravel(), expected.ravel()):
            mismatches.append(f"{fqn}: scales differ (max {float(np.max(np.abs(scale.ravel() - expected.ravel()))):.3g})")
        zero = stored.zero_points.get(fqn) if layer.weight is not None else None
        if zero is not None and not np.array_equal(np.asarray(zero).ravel(), layer.weight.zero_point.ravel()):
            mismatches.append(f"{fqn}: zero points differ")
    return ParityResult(checked, mismatches, missing, removed)
