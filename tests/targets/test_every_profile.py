"""Every shipped profile converts and validates a small model at its default scheme, or refuses it with a
message that names the target, the scheme and what edgeq lowers today."""

from __future__ import annotations

import pytest

from edgeq.converters import get_converter
from edgeq.targets import list_profiles
from edgeq.validate.verdict import Verdict
from tests.helpers import convert_source

RUNTIME_MODULES = {"onnx": "onnxruntime", "tflite": "litert_torch", "coreml": "coremltools"}
# Lowered, but refused for this model: tiny_mlp's LayerNorm lowers to several ops (RSQRT, MEAN, ...) that
# would stay float on a full-integer target (its GELU runs in int8).
REFUSED = {"tflite-edgetpu": "target tflite-edgetpu runs integer ops only, but the converted model still computes"}


@pytest.mark.parametrize("profile", list_profiles(), ids=lambda p: p.id)
def test_profile_default_scheme_converts_or_refuses(tmp_path, profile):
    pytest.importorskip(RUNTIME_MODULES[profile.runtime.value])
    outcome = convert_source("edgeq.examples:tiny_mlp", profile.id, profile.default_precision.value, tmp_path)
    if profile.id in REFUSED:
        assert outcome.verdict == Verdict.CONVERSION_FAILED
        assert REFUSED[profile.id] in outcome.error and "RSQRT" in outcome.error
    elif profile.default_precision in get_converter(profile.runtime).implemented:
        assert outcome.verdict in (Verdict.PASSED, Verdict.NOT_VALIDATED), outcome.error
    else:
        assert outcome.verdict == Verdict.CONVERSION_FAILED
        assert f"target {profile.id} runs {profile.default_precision.value}" in outcome.error
        assert "does not lower it yet" in outcome.error
