"""QuantPlan: per layer (by torch FQN), the exact quantization decided in PyTorch.

It is the one source of truth for every number: converters write its codes, scales and zero-points into
the artifact, and the weight-parity check reads them back. Saved as `plan.json` (diffable structure and
summary) and `scales.npz` (the arrays; no pickles).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np


class QDtype(StrEnum):
    INT2 = "int2"
    INT3 = "int3"
    INT4 = "int4"
    UINT2 = "uint2"
    UINT3 = "uint3"
    UINT4 = "uint4"
    INT8 = "int8"
    UINT8 = "uint8"
    INT16 = "int16"
    UINT16 = "uint16"

    @property
    def bits(self) -> int:
        return int(self.value.removeprefix("u").removeprefix("int"))

    @property
    def qmin(self) -> int:
        return 0 if self.value.startswith("u") else -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1 if self.value.startswith("u") else 2 ** (self.bits - 1) - 1

    @property
    def storage(self) -> np.dtype:
        """The numpy dtype that holds the codes (sub-byte codes live in int8 / uint8, one per byte)."""
        width = 8 if self.bits <= 8 else 16
        return np.dtype(f"{'u' if self.value.startswith('u') else ''}int{width}")

    @property
    def signed(self) -> bool:
        return self.qmin < 0


@dataclass(frozen=True)
class PerTensor:
    def to_json(self) -> dict:
        return {"kind": "per_tensor"}


@dataclass(frozen=True)
class PerChannel:
    axis: int

    def to_json(self) -> dict:
        return {"kind": "per_channel", "axis": self.axis}


@dataclass(frozen=True)
class PerGroup:
    axis: int  # the axis that is split into groups (the input/reduction axis of a weight)
    size: int  # elements per group

    def __post_init__(self):
        if self.size <= 0:
            raise ValueError(f"group size must be positive, got {self.size}")

    def to_json(self) -> dict:
        return {"kind": "per_group", "axis": self.axis, "size": self.size}


Granularity = PerTensor | PerChannel | PerGroup


def granularity_from_json(data: dict) -> Granularity:
    kind = data["kind"]
    if kind == "per_tensor":
        return PerTensor()
    if kind == "per_channel":
        return PerChannel(int(data["axis"]))
    if kind == "per_group":
        return PerGroup(int(data["axis"]), int(data["size"]))
    raise ValueError(f"unknown granularity {kind!r}")


@dataclass
class TensorQuant:
    """Affine quantization of one tensor: real = scale * (code - zero_point).

    `scale`/`zero_point` have shape () per tensor, (channels,) per channel, and the weight's shape with the
    grouped axis divided by the group size per group.
    """

    dtype: QDtype
    granularity: Granularity
    symmetric: bool
    scale: np.ndarray
    zero_point: np.ndarray

    def __post_init__(self):
        self.scale = np.asarray(self.scale, dtype=np.float32)
        self.zero_point = np.asarray(self.zero_point, dtype=np.int32)
        if self.scale.shape != self.zero_point.shape:
            raise ValueError(f"scale {self.scale.shape} and zero_point {self.zero_point.shape} differ in shape")
        if not np.all(np.isfinite(self.scale)) or np.any(self.scale <= 0):
            raise ValueError("scales must be finite and positive")
        if np.any(self.zero_point < self.dtype.qmin) or np.any(self.zero_point > self.dtype.qmax):
            raise ValueError(f"zero points outside the {self.dtype} range")
        if self.symmetric and np.any(self.zero_point != symmetric_zero_point(self.dtype)):
            raise ValueError(f"a symmetric {self.dtype} tensor has zero point {symmetric_zero_point(self.dtype)}")

    def _broadcast(self, array: np.ndarray, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        g = self.granularity
        if isinstance(g, PerTensor):
            return self.scale, self.zero_point
        if isinstance(g, PerChannel):
            shape = [1] * ndim
            shape[g.axis] = -1
            return self.scale.reshape(shape), self.zero_point.reshape(shape)
        return np.repeat(self.scale, g.size, axis=g.axis), np.repeat(self.zero_point, g.size, axis=g.axis)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """Round-to-nearest-even codes, clamped to the dtype's range."""
        values = np.asarray(values, dtype=np.float32)
        scale, zero = self._broadcast(values, values.ndim)
        codes = np.clip(np.rint(values / scale) + zero, self.dtype.qmin, self.dtype.qmax)
        return codes.astype(self.dtype.storage)

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        scale, zero = self._broadcast(codes, codes.ndim)
        return ((codes.astype(np.int32) - zero) * scale).astype(np.float32)

    def describe(self) -> dict:
        return {"dtype": self.dtype.value, "granularity": self.granularity.to_json(), "symmetric": self.symmetric}


def symmetric_zero_point(dtype: QDtype) -> int:
    """0 for signed codes; the midpoint for unsigned (uint8 128), as ONNX and QNN expect."""
    return 0 if dtype.signed else (dtype.qmax + 1) // 2


class OpKind(StrEnum):
    LINEAR = "linear"
    CONV = "conv"
    EMBEDDING = "embedding"


@dataclass
class LayerPlan:
    """What happens to one layer. `weight`/`activation` None means that tensor stays float.

    `activation` quantizes the layer's input; `dynamic_activation` quantizes it at run time instead (its
    range is measured per call, so no scale is stored). `output` quantizes the layer's output, so integer
    kernels can write integer results (static schemes). `weight_codes` are the integer weights (rounded by
    the calibration algorithm, which may differ from round-to-nearest). `smooth` is SmoothQuant's
    per-input-channel factor: the layer computes (x / smooth) @ (W * smooth)^T, and the codes are of W * smooth.
    """

    fqn: str
    op: OpKind
    weight: TensorQuant | None = None
    weight_codes: np.ndarray | None = None
    activation: TensorQuant | None = None
    dynamic_activation: QDtype | None = None
    output: TensorQuant | None = None
    smooth: np.ndarray | None = None
    bias_correction: np.ndarray | None = None  # added to the float bias (per output channel): bias correction
    reason: str | None = None  # why the layer stays float, when it does
    # A k-means palette instead of an affine grid: float32 [N / group_channels, 2^bits], row g the table of
    # output channels g*gc .. (g+1)*gc - 1 (one row: per tensor); weight_codes then hold the indices (uint8
    # [N, K]) and `weight` is None.
    palette: np.ndarray | None = None

    @property
    def is_float(self) -> bool:
        return self.weight is None and self.palette is None and self.activation is None and self.dynamic_activation is None


INPUT_PREFIX = "input:"  # tensor points on model inputs are keyed "input:<input name>"


@dataclass
class QuantPlan:
    """`layers` by FQN. `tensors` holds the extra static activation points of full-integer targets, where
    no layer's own q/dq reaches: "input:<name>" quantizes a model input, "<module FQN>" the output of that
    leaf module (an activation, pooling, flatten), so the ops between quantized layers run on integers too.
    `inputs` is the model's input names in call order, which places the "input:" points."""

    scheme: str
    target: str
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tensors: dict[str, TensorQuant] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    # wall-clock seconds of the steps that decided it (calibration, fallback): reported in the manifest as timing
    # fields, never in plan.json or the notes, so two runs on the same inputs write the same plan
    seconds: dict[str, float] = field(default_factory=dict)
    # every weight tensor (2-D or more) of the model that no layer above holds, with why it stays float, and the
    # fraction of the model's parameter bytes (FP32) stored quantized: edgeq.coverage.account_weights fills them
    other_weights: dict[str, str] = field(default_factory=dict)
    quantized_share: float | None = None
    # the compression stages the quantized model went through (edgeq.compress.stage.StageResult.to_json(): stage,
    # spec, per-layer changes, notes, skipped), in order: prune, lowrank, recover, then this plan's own qat / lora
    compression: list[dict] = field(default_factory=list)

    def quantized(self) -> list[LayerPlan]:
        return [layer for layer in self.layers.values() if not layer.is_float]

    def summary(self) -> dict:
        quantized = self.quantized()
        return {
            "scheme": self.scheme,
            "target": self.target,
            "layers": len(self.layers),
            "quantized_layers": len(quantized),
            "float_layers": sorted(fqn for fqn, layer in self.layers.items() if layer.is_float),
        } | ({"quantized_tensors": len(self.tensors)} if self.tensors else {}) | self._coverage()

    def _coverage(self) -> dict:
        """Every weight tensor counted (plan layers and other weights), when edgeq.coverage accounted them."""
        if self.quantized_share is None:
            return {}
        return {
            "weights": len(self.layers) + len(self.other_weights),
            "quantized_weights": len(self.quantized()),
            "quantized_weight_share": round(self.quantized_share, 4),
            "other_weights": dict(self.other_weights),
        }

    def coverage_notes(self) -> list[str]:
        """'N of M weights quantized (share of the parameter bytes)', then the float ones grouped by reason."""
        summary = self.summary()
        if "weights" not in summary:
            return [f"{summary['quantized_layers']} of {summary['layers']} layers quantized"]
        notes = [f"{summary['quantized_weights']} of {summary['weights']} weights quantized "
                 f"({100 * self.quantized_share:.1f}% of the parameter bytes)"]
        reasons: dict[str, list[str]] = {}
        for fqn, layer in self.layers.items():
            if layer.is_float:
                reasons.setdefault(layer.reason or "float", []).append(fqn)
        for name, reason in self.other_weights.items():
            reasons.setdefault(reason, []).append(name)
        notes += [f"float: {', '.join(names)} ({reason})" for reason, names in reasons.items()]
        return notes

    def save(self, folder: Path) -> tuple[Path, Path]:
        """Write plan.json and scales.npz into `folder`; returns their paths."""
        arrays, layers = {}, {}
        for fqn, layer in self.layers.items():
            entry = {"op": layer.op.value}
            if layer.reason:
                entry["reason"] = layer.reason
            for role, quant in (("weight", layer.weight), ("activation", layer.activation), ("output", layer.output)):
                if quant is not None:
                    entry[role] = quant.describe()
                    arrays[f"{fqn}/{role}_scale"] = quant.scale
                    arrays[f"{fqn}/{role}_zero_point"] = quant.zero_point
            if layer.weight_codes is not None:
                arrays[f"{fqn}/weight_codes"] = layer.weight_codes
            if layer.palette is not None:
                entry["palette"] = {"entries": int(layer.palette.shape[1]), "tables": int(layer.palette.shape[0])}
                arrays[f"{fqn}/palette"] = layer.palette
            if layer.smooth is not None:
                entry["smooth"] = True
                arrays[f"{fqn}/smooth"] = layer.smooth
            if layer.bias_correction is not None:
                entry["bias_correction"] = True
                arrays[f"{fqn}/bias_correction"] = layer.bias_correction
            if layer.dynamic_activation is not None:
                entry["dynamic_activation"] = layer.dynamic_activation.value
            layers[fqn] = entry
        tensors = {}
        for key, quant in self.tensors.items():
            tensors[key] = quant.describe()
            arrays[f"{key}/tensor_scale"] = quant.scale
            arrays[f"{key}/tensor_zero_point"] = quant.zero_point
        document = {"summary": self.summary(), "notes": self.notes, "layers": layers}
        if self.quantized_share is not None:
            document["quantized_share"] = self.quantized_share
        if self.compression:
            document["compression"] = self.compression
        if tensors:
            document |= {"inputs": self.inputs, "tensors": tensors}
        plan_path, scales_path = Path(folder) / "plan.json", Path(folder) / "scales.npz"
        plan_path.write_text(json.dumps(document, indent=2) + "\n")
        with open(scales_path, "wb") as handle:
            np.savez(handle, **arrays)
        return plan_path, scales_path

    @classmethod
    def load(cls, folder: Path) -> QuantPlan:
        data = json.loads((Path(folder) / "plan.json").read_text())
        with np.load(Path(folder) / "scales.npz", allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        plan = cls(data["summary"]["scheme"], data["summary"]["target"], notes=data.get("notes", []), inputs=data.get("inputs", []),
                   other_weights=data["summary"].get("other_weights", {}), quantized_share=data.get("quantized_share"),
                   compression=data.get("compression", []))

        def quant(described: dict, prefix: str) -> TensorQuant:
            return TensorQuant(
                QDtype(described["dtype"]),
                granularity_from_json(described["granularity"]),
                described["symmetric"],
                arrays[f"{prefix}_scale"],
                arrays[f"{prefix}_zero_point"],
            )

        for fqn, entry in data["layers"].items():
            quants = {role: quant(entry[role], f"{fqn}/{role}") for role in ("weight", "activation", "output") if role in entry}
            dynamic = entry.get("dynamic_activation")
            plan.layers[fqn] = LayerPlan(
                fqn,
                OpKind(entry["op"]),
                weight=quants.get("weight"),
                weight_codes=arrays.get(f"{fqn}/weight_codes"),
                activation=quants.get("activation"),
                dynamic_activation=QDtype(dynamic) if dynamic else None,
                output=quants.get("output"),
                smooth=arrays.get(f"{fqn}/smooth"),
                bias_correction=arrays.get(f"{fqn}/bias_correction"),
                reason=entry.get("reason"),
                palette=arrays.get(f"{fqn}/palette"),
            )
        for key, described in data.get("tensors", {}).items():
            plan.tensors[key] = quant(described, f"{key}/tensor")
        return plan
