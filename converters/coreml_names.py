"""Core ML feature names for a model's inputs and outputs, and the record of those Core ML cannot take.

An ML program's inputs and outputs must be identifiers ([a-zA-Z_][a-zA-Z0-9_]*) and must not be one of the
words MIL reserves for its own syntax (`state`, `tensor`, `fp16`, ...): coremltools' `rename_feature` raises a
ValueError for them. A model whose input is called `state` (a streaming voice-activity model's recurrent
state) is common, so such a name gets the spelling coremltools itself gives it (`state_workaround`), and the
artifact records the mapping in its user metadata (FEATURE_NAMES_KEY). edgeq's Core ML runner reads that
record and shows the model's own names to validation, golden files and the device bundle, so nothing outside
the artifact sees the Core ML spelling, except an app calling Core ML directly: the manifest's notes name it.
"""

from __future__ import annotations

import re

from edgeq.validate.runners.coreml import FEATURE_NAMES_KEY, read_feature_names

__all__ = ["FEATURE_NAMES_KEY", "core_ml_name", "describe", "feature_names", "is_valid", "read_feature_names"]

# coremltools 9, converters/mil/mil/passes/defs/preprocess.py (NameSanitizer.sanitize_name): MIL's reserved words
RESERVED = frozenset({
    "any", "bool", "program", "func", "tensor", "list", "dict", "tuple", "true", "false", "string",
    "bf16", "fp16", "fp32", "fp64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "state",
})
_IDENTIFIER = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def core_ml_name(name: str) -> str:
    """The spelling coremltools' sanitizer gives `name`: invalid characters as `_`, a leading `_` before a
    digit, `_workaround` after a reserved word."""
    sanitized = re.sub(r"[^a-zA-Z0-9_]", "_", name)
    if not re.match(r"[a-zA-Z_]", sanitized):
        sanitized = "_" + sanitized
    return sanitized + "_workaround" if sanitized in RESERVED else sanitized


def is_valid(name: str) -> bool:
    return bool(_IDENTIFIER.fullmatch(name)) and name not in RESERVED


def feature_names(inputs: list[str], outputs: list[str]) -> dict[str, dict[str, str]]:
    """{"inputs": {name: Core ML name}, "outputs": {...}} for the names Core ML cannot take; each Core ML
    name unique among all the features (a numeric suffix where two names sanitize alike)."""
    taken = {n for n in (*inputs, *outputs) if is_valid(n)}
    mapping: dict[str, dict[str, str]] = {"inputs": {}, "outputs": {}}
    for kind, names in (("inputs", inputs), ("outputs", outputs)):
        for name in names:
            if is_valid(name) or name in mapping[kind]:
                continue
            base = candidate = core_ml_name(name)
            count = 1
            while candidate in taken:
                candidate = f"{base}_{count}"
                count += 1
            taken.add(candidate)
            mapping[kind][name] = candidate
    return mapping


def describe(mapping: dict[str, dict[str, str]]) -> list[str]:
    """One note per renamed feature, for the manifest."""
    return [
        f"Core ML {kind[:-1]} {name!r} is named {core!r} in the artifact ({name!r} is a word MIL reserves or not an "
        "identifier); edgeq's runner and bundles use the model's name, an app calling Core ML directly uses the artifact's"
        for kind in ("inputs", "outputs") for name, core in mapping[kind].items()
    ]
