"""The zoo's registry and its outcome matrix: which architectures exist, which runtimes and schemes each is
converted to, and how one conversion's Outcome reads as a matrix cell (pass / refused (reason) / fails (reason)).

tests/zoo/matrix.json holds the cells as the last recording run found them (EDGEQ_ZOO_RECORD=1); every zoo
run checks its own cells against it, and tools/readme_zoo.py renders it into the README. Nothing here imports
torch, so the README test stays instant.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

MATRIX = Path(__file__).with_name("matrix.json")

# architecture -> `package.module:callable` source (tests/zoo/*.py); the meta-test holds this to the files.
ZOO = {
    "mobilenet_v2": "tests.zoo.vision:mobilenet_v2",
    "mobilenet_v3": "tests.zoo.vision:mobilenet_v3",
    "resnet": "tests.zoo.vision:resnet",
    "efficientnet_lite": "tests.zoo.vision:efficientnet_lite",
    "unet": "tests.zoo.vision:unet",
    "vit": "tests.zoo.vision:vit",
    "convnext": "tests.zoo.vision:convnext",
    "gru_kws": "tests.zoo.sequence:gru_kws",
    "lstm_kws": "tests.zoo.sequence:lstm_kws",
    "conv1d_audio": "tests.zoo.sequence:conv1d_audio",
    "transformer_encoder": "tests.zoo.sequence:transformer_encoder",
    "bert": "tests.zoo.huggingface:bert",
    "distilbert": "tests.zoo.huggingface:distilbert",
    "roberta": "tests.zoo.huggingface:roberta",
    "hf_vit": "tests.zoo.huggingface:hf_vit",
    "mobilevit": "tests.zoo.huggingface:mobilevit",
    "whisper_encoder": "tests.zoo.huggingface:whisper_encoder",
    "wav2vec2_features": "tests.zoo.huggingface:wav2vec2_features",
    "gpt2": "tests.zoo.huggingface:gpt2",
    "llama": "tests.zoo.huggingface:llama",
}
RUNTIMES = ("onnx", "tflite", "coreml")
# fp32, fp16, int8 weights, and the int8 scheme with integer activations that all three runtimes run (static,
# calibrated): ORT's QDQ, TFLite's full-integer kernels, Core ML's quantize/dequantize. int8-dynamic exists on
# ONNX and TFLite only, so w8a8 is the default int8 scheme the matrix can compare across runtimes.
SCHEMES = ("fp32", "fp16", "int8-weight", "w8a8")
PASS, REFUSED, FAILS = "pass", "refused", "fails"


def cell_of(outcome) -> dict:
    """{'outcome': pass | refused | fails, 'reason': first line of why (empty for pass)}.

    Refused: the converter's check declined before any work ("target X refuses P: ..."). Fails: conversion or
    the quantization plan raised, weight parity broke, the runtime could not run the artifact, or drift broke
    the budget."""
    verdict = outcome.verdict.value
    if verdict == "passed":
        return {"outcome": PASS, "reason": ""}
    if verdict == "conversion_failed" and " refuses " in (outcome.error or "").splitlines()[0]:
        return {"outcome": REFUSED, "reason": _first_line(outcome.error)}
    if verdict == "over_budget":
        return {"outcome": FAILS, "reason": "over budget: " + "; ".join(outcome.violations)}
    return {"outcome": FAILS, "reason": _first_line(outcome.error or verdict)}


def _first_line(text: str) -> str:
    lines = [line.strip(" -") for line in (text or "").splitlines() if line.strip(" -")]
    # A refusal's header ("target X refuses P:") says less than its first item.
    line = lines[1] if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return line[:300]


def same_cell(recorded: dict, found: dict) -> bool:
    """Outcomes must match; reasons match with their numbers blanked (a cosine's last digits are the CPU's)."""
    return recorded.get("outcome") == found["outcome"] and _shape(recorded.get("reason", "")) == _shape(found["reason"])


def _shape(reason: str) -> str:
    return re.sub(r"\d+(\.\d+)?(e-?\d+)?", "#", reason)


def load_matrix() -> dict:
    return json.loads(MATRIX.read_text()) if MATRIX.is_file() else {}


def record_cells(architecture: str, runtime: str, cells: dict) -> None:
    """Write one (architecture, runtime) row into matrix.json, keeping the registry's order."""
    matrix = load_matrix()
    matrix.setdefault(architecture, {})[runtime] = cells
    ordered = {a: {r: matrix[a][r] for r in RUNTIMES if r in matrix[a]} for a in ZOO if a in matrix}
    MATRIX.write_text(dump_matrix(ordered))


def dump_matrix(matrix: dict) -> str:
    """JSON with one line per (architecture, runtime): a re-recorded cell shows as a one-line diff."""
    blocks = []
    for architecture, runtimes in matrix.items():
        rows = ",\n".join(f"  {json.dumps(runtime)}: {json.dumps(cells)}" for runtime, cells in runtimes.items())
        blocks.append(f"{json.dumps(architecture)}: {{\n{rows}\n }}")
    return "{\n" + ",\n".join(blocks) + "\n}\n"
