"""The strict TargetProfile loader: an unknown key or an unsupported value is an error naming file and key."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from edgeq.errors import UsageError
from edgeq.validate.budget import BudgetSyntaxError, parse_budget

PROFILE_DIR = Path(__file__).parent / "profiles"


class Runtime(StrEnum):
    ONNX = "onnx"
    TFLITE = "tflite"
    COREML = "coreml"


class Precision(StrEnum):
    """A scheme: what the artifact's weights and activations are stored and computed in."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8_WEIGHT = "int8-weight"  # int8 weights, float activations (weight-only)
    INT8_DYNAMIC = "int8-dynamic"  # int8 weights, activations quantized at run time (dynamic range)
    W8A8 = "w8a8"  # int8 weights, calibrated static 8-bit activations
    W8A16 = "w8a16"  # int8 weights, calibrated static 16-bit activations (TFLite int16x8, QNN uint16)
    # Low-bit weights on linear layers (edgeq.scheme.Scheme holds bits, group size, symmetry, algorithm):
    INT4_WEIGHT = "int4-weight"  # 4-bit weights per group, float activations
    INT3_WEIGHT = "int3-weight"  # 3-bit weights (a 4-bit container where the runtime has no 3-bit type)
    INT2_WEIGHT = "int2-weight"
    INT4_DYNAMIC = "int4-dynamic"  # 4-bit weights, int8 activations quantized at run time
    LUT4_WEIGHT = "lut4-weight"  # k-means palettes (non-uniform): 16-entry look-up tables
    LUT3_WEIGHT = "lut3-weight"
    LUT2_WEIGHT = "lut2-weight"
    LUT6_WEIGHT = "lut6-weight"
    LUT8_WEIGHT = "lut8-weight"


class Granularity(StrEnum):
    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"


@dataclass(frozen=True)
class QuantCapabilities:
    """What the hardware runs well when quantized; resolve() refuses requests outside it."""

    weight_dtypes: tuple[str, ...] = ()
    weight_granularity: tuple[Granularity, ...] = ()
    weight_symmetric: bool = True
    activation_dtypes: tuple[str, ...] = ()  # static activation dtypes, e.g. ("uint8", "uint16")
    activation_symmetric: bool = False
    group_sizes: tuple[int, ...] = ()  # block sizes for per-group weights
    integer_io: bool = False  # inputs and outputs are integer tensors (full-integer targets)
    ops: tuple[str, ...] = ()  # layer kinds it quantizes: linear, conv, embedding
    scale_dtype: str = "float32"  # the precision the runtime keeps scales in; plans round theirs to it
    # The precision of low-bit (int2-int4) weight scales where it differs from scale_dtype (LiteRT: blockwise
    # scales are FLOAT16 that XNNPACK rounds to bfloat16); None: scale_dtype. Low-bit grids round to it.
    lowbit_scale_dtype: str | None = None
    # ONNX Runtime's MatMulNBits accuracy_level the int4-dynamic scheme deploys with (0-4; 4 = int8 activations per
    # block). Float-activation low-bit schemes always deploy at 1 (fp32 math). None: not an ONNX low-bit target.
    dynamic_accuracy_level: int | None = None
    # SmoothQuant in dynamic-activation schemes unless --smoothquant asks for it: each smoothed input is a float Mul
    # at run time, which pays where the runtime's activation grid is coarse (ORT: one uint8 range per tensor) and
    # costs more than it buys where it is fine (LiteRT: int8 per row; measured per profile in its comment).
    dynamic_smoothing: bool = True


# Per-runtime settings a profile may state, with their types; anything else is refused.
RUNTIME_OPTIONS: dict[Runtime, dict[str, type]] = {
    Runtime.ONNX: {"opset": int, "providers": list, "graph_optimization": str, "session_config": dict},
    Runtime.TFLITE: {"threads": int},
    Runtime.COREML: {"minimum_deployment_target": str, "compute_units": str},
}
_TOP_KEYS = {
    "id": str,
    "runtime": str,
    "hardware": str,
    "summary": str,
    "precisions": list,
    "default_precision": str,
    "dynamic_shapes": bool,
    "budgets": dict,
    "runtime_options": dict,
    "quantization": dict,
}
_QUANT_KEYS = {
    "weight_dtypes": list,
    "weight_granularity": list,
    "weight_symmetric": bool,
    "activation_dtypes": list,
    "activation_symmetric": bool,
    "group_sizes": list,
    "integer_io": bool,
    "ops": list,
    "scale_dtype": str,
    "lowbit_scale_dtype": str,
    "dynamic_accuracy_level": int,
    "dynamic_smoothing": bool,
}
_QUANT_VALUES = {
    "weight_dtypes": {"int2", "int3", "int4", "uint2", "uint3", "uint4", "int8", "uint8", "lut2", "lut3", "lut4", "lut6", "lut8"},
    "activation_dtypes": {"int8", "uint8", "int16", "uint16"},
    "ops": {"linear", "conv", "embedding"},
}
_QUANTIZED = {p.value for p in Precision} - {"fp32", "fp16"}
_REQUIRED = {"id", "runtime", "hardware", "summary", "precisions", "default_precision"}


@dataclass(frozen=True)
class TargetProfile:
    id: str
    runtime: Runtime
    hardware: str
    summary: str
    precisions: tuple[Precision, ...]
    default_precision: Precision
    dynamic_shapes: bool  # False: dynamic axes are frozen at their example size
    budgets: dict[Precision, str] = field(default_factory=dict)  # default drift budget per precision
    runtime_options: dict = field(default_factory=dict)
    quantization: QuantCapabilities = field(default_factory=QuantCapabilities)
    path: Path | None = None

    def budget_for(self, precision: Precision) -> str:
        return self.budgets.get(precision, "")


def load_profile(target: str | Path) -> TargetProfile:
    """Load a profile by id (`tflite`) or by path to a TOML file."""
    path = Path(target) if str(target).endswith(".toml") else PROFILE_DIR / f"{target}.toml"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(PROFILE_DIR.glob("*.toml")))
        raise UsageError(f"unknown target {str(target)!r}; known targets: {known} (or a path to a .toml profile)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from exc
    return _parse(data, path)


def list_profiles() -> list[TargetProfile]:
    return [load_profile(path) for path in sorted(PROFILE_DIR.glob("*.toml"))]


def _parse(data: dict, path: Path) -> TargetProfile:
    def fail(key: str, message: str) -> UsageError:
        return UsageError(f"{path}: key {key!r}: {message}")

    for key, value in data.items():
        if key not in _TOP_KEYS:
            raise fail(key, f"unknown key; known keys: {', '.join(sorted(_TOP_KEYS))}")
        if not isinstance(value, _TOP_KEYS[key]):
            raise fail(key, f"expected {_TOP_KEYS[key].__name__}, found {type(value).__name__}")
    for key in sorted(_REQUIRED - set(data)):
        raise fail(key, "missing")
    if data["id"] != path.stem:
        raise fail("id", f"{data['id']!r} must match the file name {path.stem!r}")
    runtime = _enum(Runtime, data["runtime"], lambda m: fail("runtime", m))
    precisions = tuple(_enum(Precision, p, lambda m: fail("precisions", m)) for p in data["precisions"])
    default = _enum(Precision, data["default_precision"], lambda m: fail("default_precision", m))
    if default not in precisions:
        raise fail("default_precision", f"{default} is not among precisions {[p.value for p in precisions]}")
    budgets = {}
    for key, text in data.get("budgets", {}).items():
        precision = _enum(Precision, key, lambda m: fail(f"budgets.{key}", m))
        try:
            parse_budget(text)
        except BudgetSyntaxError as exc:
            raise fail(f"budgets.{key}", str(exc)) from exc
        budgets[precision] = text
    options = data.get("runtime_options", {})
    allowed = RUNTIME_OPTIONS[runtime]
    for key, value in options.items():
        if key not in allowed:
            raise fail(f"runtime_options.{key}", f"unknown for {runtime}; known: {', '.join(allowed)}")
        if not isinstance(value, allowed[key]):
            raise fail(f"runtime_options.{key}", f"expected {allowed[key].__name__}, found {type(value).__name__}")
    quantization = _parse_quantization(data.get("quantization", {}), fail)
    if any(p.value in _QUANTIZED for p in precisions) and not quantization.weight_dtypes:
        raise fail("quantization", "quantized schemes are listed, so [quantization] must state weight_dtypes")
    return TargetProfile(
        id=data["id"],
        runtime=runtime,
        hardware=data["hardware"],
        summary=data["summary"],
        precisions=precisions,
        default_precision=default,
        dynamic_shapes=data.get("dynamic_shapes", False),
        budgets=budgets,
        runtime_options=dict(options),
        quantization=quantization,
        path=path,
    )


def _parse_quantization(table: dict, fail) -> QuantCapabilities:
    for key, value in table.items():
        if key not in _QUANT_KEYS:
            raise fail(f"quantization.{key}", f"unknown key; known keys: {', '.join(_QUANT_KEYS)}")
        if not isinstance(value, _QUANT_KEYS[key]):
            raise fail(f"quantization.{key}", f"expected {_QUANT_KEYS[key].__name__}, found {type(value).__name__}")
        for item in value if isinstance(value, list) and key in _QUANT_VALUES else []:
            if item not in _QUANT_VALUES[key]:
                raise fail(f"quantization.{key}", f"{item!r} is not one of {', '.join(sorted(_QUANT_VALUES[key]))}")
    granularity = tuple(_enum(Granularity, g, lambda m: fail("quantization.weight_granularity", m)) for g in table.get("weight_granularity", []))
    if table.get("scale_dtype", "float32") not in ("float32", "float16"):
        raise fail("quantization.scale_dtype", f"{table['scale_dtype']!r} is not one of float16, float32")
    if table.get("lowbit_scale_dtype", "float32") not in ("float32", "float16", "bfloat16"):
        raise fail("quantization.lowbit_scale_dtype", f"{table['lowbit_scale_dtype']!r} is not one of bfloat16, float16, float32")
    level = table.get("dynamic_accuracy_level")
    if level is not None and (isinstance(level, bool) or level not in range(5)):
        raise fail("quantization.dynamic_accuracy_level", f"{level!r} is not an ORT accuracy_level (0, 1, 2, 3 or 4)")
    sizes = table.get("group_sizes", [])
    if any(not isinstance(size, int) or size <= 0 for size in sizes):
        raise fail("quantization.group_sizes", "group sizes are positive integers")
    if sizes and Granularity.PER_GROUP not in granularity:
        raise fail("quantization.group_sizes", "group sizes need per_group in weight_granularity")
    return QuantCapabilities(
        weight_dtypes=tuple(table.get("weight_dtypes", [])),
        weight_granularity=granularity,
        weight_symmetric=table.get("weight_symmetric", True),
        activation_dtypes=tuple(table.get("activation_dtypes", [])),
        activation_symmetric=table.get("activation_symmetric", False),
        group_sizes=tuple(sizes),
        integer_io=table.get("integer_io", False),
        ops=tuple(table.get("ops", [])),
        scale_dtype=table.get("scale_dtype", "float32"),
        lowbit_scale_dtype=table.get("lowbit_scale_dtype"),
        dynamic_accuracy_level=level,
        dynamic_smoothing=table.get("dynamic_smoothing", True),
    )


def _enum(kind, value, error):
    try:
        return kind(value)
    except ValueError:
        raise error(f"{value!r} is not one of {', '.join(v.value for v in kind)}") from None
