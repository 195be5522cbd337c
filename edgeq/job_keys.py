"""The keys of a conversion job: the same names in edgeq.toml and (as --flags) on the command line, each with
the type and range it accepts. Checked before anything heavy loads, so a typo costs milliseconds.

TOML has booleans that Python counts as integers (`samples = true` would be 1): an integer key takes only
real integers, and a list key only lists whose items are all of the item type.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from edgeq.errors import UsageError
from edgeq.quantize import ALGORITHM_NAMES, DEVICE_NAMES, OBSERVER_NAMES


@dataclass(frozen=True)
class Key:
    accepts: Callable[[object], bool]
    expected: str  # what would work, for the message
    flag: str  # the command-line spelling


def _string(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _integer(low: int | None = None, high: int | None = None) -> Callable[[object], bool]:
    def accepts(value) -> bool:
        return (
            isinstance(value, int) and not isinstance(value, bool)
            and (low is None or value >= low) and (high is None or value <= high)
        )

    return accepts


def _number(low: float, high: float) -> Callable[[object], bool]:
    def accepts(value) -> bool:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and low <= value <= high
        )

    return accepts


def _strings(value) -> bool:
    return isinstance(value, list) and all(_string(item) for item in value)


def _boolean(value) -> bool:
    return isinstance(value, bool)


def _smoothquant(value) -> bool:
    return _number(0, 1)(value) or (isinstance(value, str) and value.strip().lower() == "off") or (
        isinstance(value, str) and _float_in(value, 0, 1)
    )


def _float_in(text: str, low: float, high: float) -> bool:
    try:
        number = float(text)
    except ValueError:
        return False
    return math.isfinite(number) and low <= number <= high


def _column(value) -> bool:
    return _string(value) or _integer(0)(value)


KEYS: dict[str, Key] = {
    "source": Key(_string, "a path or 'package.module:callable'", "SOURCE"),
    "targets": Key(_strings, 'a list of targets, e.g. ["onnx", "tflite"]', "--target"),
    "precisions": Key(_strings, 'a list of precisions, e.g. ["fp32", "int8-dynamic"]', "--precision"),
    "inputs": Key(_strings, 'a list of input specs, e.g. ["pixels:1x3x224x224:float32"]', "--input"),
    "task": Key(_string, "a task name, e.g. 'feature-extraction'", "--task"),
    "factory": Key(_string, "'package.module:callable'", "--factory"),
    "trust_pickle": Key(_boolean, "true or false", "--trust-pickle"),
    "data": Key(_string, "a file, folder or 'module:function'", "--data"),
    "text_column": Key(_column, "a column index (0 or more) or header name", "--text-column"),
    "preprocess": Key(_string, "'key=value,...', e.g. 'resize=256,crop=224'", "--preprocess"),
    "sample_rate": Key(_integer(1), "a rate in Hz, e.g. 16000", "--sample-rate"),
    "samples": Key(_integer(1), "a whole number of samples, 1 or more, e.g. 32", "--samples"),
    "seed": Key(_integer(0, 2**32 - 1), "a whole number from 0 to 2**32-1", "--seed"),
    "budget": Key(lambda v: isinstance(v, str), "'METRIC>=VALUE,...', e.g. 'cosine>=0.999', or 'none'", "--budget"),
    "out": Key(_string, "a folder path", "--out"),
    "name": Key(_string, "a folder name, e.g. 'classifier'", "--name"),
    "keep_float": Key(_strings, "a list of layer FQNs or 're:REGEX' patterns", "--keep-float"),
    "calibration_samples": Key(_integer(0), "a whole number, 0 or more, e.g. 32", "--calibration-samples"),
    "observer": Key(lambda v: v in OBSERVER_NAMES, f"one of {', '.join(OBSERVER_NAMES)}", "--observer"),
    "smoothquant": Key(_smoothquant, "an alpha in [0, 1] or 'off'", "--smoothquant"),
    "auto_fallback": Key(_boolean, "true or false", "--auto-fallback"),
    "fallback_max": Key(_number(0, 1), "a fraction in [0, 1], e.g. 0.1", "--fallback-max"),
    "layers": Key(_boolean, "true or false", "--layers"),
    "algo": Key(lambda v: v in ALGORITHM_NAMES, f"one of {', '.join(ALGORITHM_NAMES)}", "--algo"),
    "group_size": Key(lambda v: v == "channel" or _integer(1)(v) or (isinstance(v, str) and v.isdigit() and int(v) >= 1),
                      "a number of input channels per scale (32, 64, 128) or 'channel'", "--group-size"),
    "device": Key(lambda v: v in DEVICE_NAMES, f"one of {', '.join(DEVICE_NAMES)} (where low-bit calibration runs)", "--device"),
    # Specs are parsed by edgeq.compress.spec (make_job), which says what would work; here only the shape.
    "prune": Key(_string, "a pruning spec, e.g. 'structured:0.5', 'unstructured:0.5', '2:4', 'heads:0.33'", "--prune"),
    "prune_layers": Key(lambda v: isinstance(v, dict) or _strings(v),
                        'a table of layer patterns and ratios in [0, 1), e.g. { "features.0" = 0.25, "classifier" = 0 }',
                        "--prune-layers"),
    "lowrank": Key(_string, "a low-rank spec, e.g. 'energy:0.95', 'rank:0.5', 'params:0.5'", "--lowrank"),
    "lowrank_layers": Key(_strings, "a list of layer FQNs, globs or 're:REGEX' patterns", "--lowrank-layers"),
    "recover": Key(_string, "a recovery spec, e.g. 'distill', 'distill:steps=300,lr=5e-5', 'qat', 'lora:rank=8'", "--recover"),
    # Values and patterns are checked by edgeq.layer_overrides (make_job); here only the shape.
    "per_layer": Key(lambda v: isinstance(v, dict) or _strings(v),
                     'a table of layer patterns and schemes, e.g. { "classifier" = "float", "*.intermediate.dense" = "int3" }',
                     "--per-layer"),
}


def check_values(table: dict, label: Callable[[str], str]) -> None:
    """Every key known and every value of its type and range; `label(key)` names it in the message."""
    for key, value in table.items():
        if key not in KEYS:
            raise UsageError(f"{label(key)}: unknown key; known keys: {', '.join(KEYS)}")
        check_value(key, value, label(key))


def check_value(key: str, value, label: str) -> None:
    spec = KEYS[key]
    if not spec.accepts(value):
        raise UsageError(f"{label}: {_shown(value)} is not valid; expected {spec.expected}")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
