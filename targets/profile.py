"""The strict TargetProfile loader: an unknown key or an unsupported value is an error naming file and key."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from edgeq.errors import UsageError

PROFILE_DIR = Path(__file__).parent / "profiles"


class Runtime(StrEnum):
    ONNX = "onnx"
    TFLITE = "tflite"
    COREML = "coreml"


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"


# Per-runtime settings a profile may state, with their types; anything else is refused.
RUNTIME_OPTIONS: dict[Runtime, dict[str, type]] = {
    Runtime.ONNX: {"opset": int, "providers": list, "graph_optimization": str},
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
}
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
        from edgeq.validate.budget import BudgetSyntaxError, parse_budget

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
        path=path,
    )


def _enum(kind, value, error):
    try:
        return kind(value)
    except ValueError:
        raise error(f"{value!r} is not one of {', '.join(v.value for v in kind)}") from None
