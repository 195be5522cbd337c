"""Intermediate tensors read from the runtime itself, each labelled with the torch module scope that made it.

numpy + the runtime (+ the `onnx` package for ONNX graphs); no torch. What ties a runtime tensor to a torch
module is what the converters leave in the artifact (measured, TOOLCHAIN.md):

- ONNX (torch.onnx dynamo export): every node carries `pkg.torch.onnx.name_scopes`, the FQNs of the modules
  on the call stack (relative to edgeq's wrapper) then the op's own name, e.g.
  `['', 'inner', 'inner.features', 'inner.features.0', 'conv2d']`. A tapped value becomes an extra graph
  output of a temporary copy of the graph, run with the artifact's own session settings.
- TFLite (litert-torch): an op's output tensor is named after the modules on the call stack,
  `<module.Class>_<attribute>` per called module joined by '/', and a fused op joins the locations of the
  ops it fused with ';', outermost (the last one executed) first: a conv+bn+relu tensor starts with the ReLU.
  Tensors are read with `experimental_preserve_all_tensors`, which needs the builtin kernels: the XNNPACK
  delegate would keep its intermediates to itself. The layer figures therefore come from LiteRT's reference
  kernels, and the artifact's outputs from the same run are reported beside the deployed ones.
"""

from __future__ import annotations

import ast
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Tensor:
    """A value the runtime computes: its key (ONNX value name / TFLite tensor index) and its module scopes."""

    key: str | int
    scopes: tuple[str, ...]  # ONNX: module FQNs, outermost first; TFLite: the first location's '/'-segments
    shape: tuple[int, ...] | None  # None where the graph does not say
    fused: tuple[tuple[str, ...], ...] = ()  # TFLite: the '/'-segments of the other locations fused into it


class OnnxTaps:
    """An ONNX graph read once, with shapes inferred once: `tensors` lists every node output in node order
    with the node's module scopes; `run` returns chosen values as extra outputs of a copy of the graph."""

    def __init__(self, path: Path, settings: dict):
        import onnx

        self.proto = onnx.load(str(path))
        self.settings = settings
        try:
            inferred = onnx.shape_inference.infer_shapes(self.proto).graph
            self.value_info = {info.name: info for info in (*inferred.value_info, *inferred.output)}
        except Exception:  # shape inference is a help for matching, not a requirement
            self.value_info = {}
        self.tensors = []
        for node in self.proto.graph.node:
            meta = {prop.key: prop.value for prop in node.metadata_props}
            scopes = _literal_list(meta.get("pkg.torch.onnx.name_scopes"))
            if not scopes or not node.output or not node.output[0]:
                continue
            # The last entry names the op itself, the first is the wrapper's empty root: the rest are modules.
            self.tensors.append(Tensor(node.output[0], tuple(scopes[1:-1]), self._shape(node.output[0])))

    def _shape(self, name: str) -> tuple[int, ...] | None:
        info = self.value_info.get(name)
        dims = info.type.tensor_type.shape.dim if info is not None else ()
        return tuple(int(d.dim_value) for d in dims) if dims and all(d.HasField("dim_value") for d in dims) else None

    def run(self, names: list[str], samples: list[dict]) -> tuple[list[dict], str]:
        """Per sample {name: array}, the artifact's outputs included; and the executor."""
        import onnx

        from edgeq.validate.runners.onnxruntime import OnnxRuntimeRunner

        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        present = {output.name for output in proto.graph.output}
        for name in names:
            if name not in present:
                info = self.value_info.get(name) or onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                proto.graph.output.append(info)
                present.add(name)
        with tempfile.TemporaryDirectory(prefix="edgeq-taps-") as folder:
            copy = Path(folder) / "taps.onnx"
            onnx.save_model(proto, str(copy))
            runner = OnnxRuntimeRunner(copy, **self.settings)
            results = [runner.run(sample) for sample in samples]
        floats = [{k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in r.items()} for r in results]
        return floats, runner.executor


def _literal_list(text: str | None) -> list[str]:
    try:
        value = ast.literal_eval(text) if text else []
    except (ValueError, SyntaxError):
        return []
    return [str(item) for item in value] if isinstance(value, list) else []


class TFLiteTaps:
    """A LiteRT interpreter that keeps every tensor: `tensors` lists the op outputs in execution order."""

    def __init__(self, path: Path):
        from edgeq.validate.runners.litert import LiteRTRunner

        self.runner = LiteRTRunner(Path(path), preserve_tensors=True)
        interpreter = self.runner.interpreter
        self.details = {d["index"]: d for d in interpreter.get_tensor_details()}
        self.tensors = []
        for op in interpreter._get_ops_details():  # op order is execution order
            for index in op["outputs"]:
                detail = self.details[int(index)]
                # "<location>;<counter>" pairs, one per op fused into this tensor's op, outermost first
                locations = [tuple(loc.split("/")) for loc in detail["name"].split(";")[0::2] if loc]
                if locations:
                    shape = tuple(int(s) for s in detail["shape"])
                    self.tensors.append(Tensor(int(index), locations[0], shape, tuple(locations[1:])))

    def run(self, indices: list[int], samples: list[dict]) -> tuple[list[dict], str]:
        """Per sample {index: float32 array} (quantized tensors dequantized with their own scale and zero point)
        plus the artifact's outputs by name; and the executor."""
        from edgeq.validate.runners.litert import dequantize

        results = []
        for sample in samples:
            values: dict = dict(self.runner.run(sample))
            for index in indices:
                array = np.array(self.runner.interpreter.get_tensor(index))
                quant = self.details[index].get("quantization_parameters") or {}
                scales = np.asarray(quant.get("scales", []), dtype=np.float32)
                if np.issubdtype(array.dtype, np.integer) and scales.size == 1:
                    array = dequantize(array, float(scales[0]), int(np.asarray(quant["zero_points"])[0]))
                values[index] = array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array
            results.append(values)
        return results, self.runner.executor
