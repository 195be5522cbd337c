"""A source's own 4-bit grid kept verbatim (edgeq/llm/source_grid.py): a tiny Llama whose linears are put on
GGUF's Q4_1 grid (per block of 32 inputs w = d * q + m, d and m float16, dequantized as gguf-py does) keeps
those codes in the plan and in each runtime's 4-bit artifact, which then computes the FP32 model itself; a
float weight, or one value off the grid by one ulp, is never taken for a grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeq.llm.source_grid import GROUP, find_affine_grid, split_source_grids
from tests.llm.tiny import tiny_decoder, token_sequences

CONTEXT = 40
KEEP = ("lm_head", "model.embed_tokens")  # the tiny model's tied table is float data, not a grid: kept float here


def q4_1(weight: np.ndarray) -> np.ndarray:
    """`weight` [N, K] rounded onto Q4_1 as llama.cpp quantizes it and gguf-py dequantizes it."""
    rows, columns = weight.shape
    blocks = weight.reshape(rows, columns // GROUP, GROUP).astype(np.float32)
    low, high = blocks.min(axis=2), blocks.max(axis=2)
    d = ((high - low) / 15).astype(np.float16).astype(np.float32)
    m = low.astype(np.float16).astype(np.float32)
    inverse = np.where(d > 0, 1 / np.where(d > 0, d, 1), 0)
    q = np.clip(np.floor((blocks - m[..., None]) * inverse[..., None] + 0.5), 0, 15).astype(np.float32)
    return ((d[..., None] * q) + m[..., None]).reshape(rows, columns)


def q4_1_llama(seed: int = 0):
    model = tiny_decoder("llama", seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(torch.from_numpy(q4_1(module.weight.numpy())))
    return model


def test_detection_is_exact_or_nothing():
    rng = np.random.default_rng(0)
    weight = q4_1(rng.standard_normal((8, 64)).astype(np.float32) * 0.1)
    codes, d, m = find_affine_grid(weight)
    rebuilt = (np.repeat(d, GROUP, 1) * codes.astype(np.float32)) + np.repeat(m, GROUP, 1)
    np.testing.assert_array_equal(rebuilt, weight)
    assert codes.max() <= 15 and codes.dtype == np.uint8
    assert find_affine_grid(rng.standard_normal((8, 64)).astype(np.float32)) is None  # float data
    off = weight.copy()
    off[3, 17] = np.nextafter(off[3, 17], np.float32(np.inf))
    assert find_affine_grid(off) is None  # one value one ulp off the grid
    assert find_affine_grid(weight[:, :48]) is None  # not whole groups


def test_split_model_computes_the_original():
    model = q4_1_llama()
    import copy

    split = copy.deepcopy(model)
    names = split_source_grids(split)
    assert len(names) == 2 * 7 and "lm_head" not in names  # q k v o gate up down per layer; the tied head is not a grid
    ids = torch.as_tensor(token_sequences(1, 24, seed=1)[0])[None]
    with torch.no_grad():
        want, got = model(ids).logits, split(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * want.abs().max().item())


@pytest.fixture(scope="module")
def split_llama():
    import copy

    model = q4_1_llama()
    split = copy.deepcopy(model)
    split_source_grids(split)
    return model, split


def _check_plan(plan, split):
    grids = [f for f in plan.layers if f.endswith(".grid")]
    assert len(grids) == 14
    for fqn in grids:
        layer = plan.layers[fqn]
        codes, _ = split.get_submodule(fqn).edgeq_source_codes
        np.testing.assert_array_equal(layer.weight_codes, codes.numpy(), err_msg=fqn)
    offsets = [f for f in plan.layers if f.endswith(".offset")]
    assert len(offsets) == 14 and all(plan.layers[f].weight is None and "source's affine 4-bit grid" in plan.layers[f].reason
                                      for f in offsets)


def _agreement(model, runner):
    from edgeq.llm.reference import TorchStepRunner
    from edgeq.validate import generation

    seqs, prompts = token_sequences(3, 20, seed=2), token_sequences(2, 6, seed=3)
    return generation.compare(TorchStepRunner(model, CONTEXT), runner, seqs, prompts, 10).metrics()


def test_onnx_int4_artifact_is_the_fp32_model(split_llama, tmp_path):
    pytest.importorskip("onnxruntime")
    from edgeq.llm.onnx_decoder import export_with_notes, open_runner
    from edgeq.llm.onnx_lowbit_decoder import int4_plan

    model, split = split_llama
    plan = int4_plan(split, token_sequences(2, 24, seed=3), keep_float=KEEP)
    _check_plan(plan, split)
    path, _ = export_with_notes(split, CONTEXT, tmp_path / "model.onnx", plan=plan)
    metrics = _agreement(model, open_runner(path, CONTEXT))
    assert metrics["token_agreement"] == 1.0 and metrics["greedy_agreement"] == 1.0, metrics
    assert metrics["logit_cosine_min"] >= 0.99999, metrics
    # the control: the same weights quantized again from their floats (symmetric RTN) are measurably apart
    requantized = int4_plan(model, token_sequences(2, 24, seed=3), keep_float=KEEP)
    again, _ = export_with_notes(model, CONTEXT, tmp_path / "again.onnx", plan=requantized)
    assert _agreement(model, open_runner(again, CONTEXT))["logit_cosine_min"] < 0.9999


def test_tflite_int4_artifact_keeps_the_source_codes(split_llama, tmp_path):
    """LiteRT's blockwise scales are bfloat16: d (float16) is rounded to the nearest, the codes stay the source's; the
    kernel quantizes input rows to int8 at run time (XNNPACK qd8-f32-qb4w). Both move the logits a little: on this
    random model (near-flat logits, perplexity ~530) top-1 0.965 and worst logit cosine 0.9988 were measured."""
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("litert_torch")
    from edgeq.llm.tflite_decoder import export_decoder, open_runner
    from edgeq.llm.tflite_lowbit_decoder import int4_plan

    model, split = split_llama
    plan = int4_plan(split, token_sequences(2, 24, seed=3), keep_float=KEEP)
    _check_plan(plan, split)
    metrics = _agreement(model, open_runner(export_decoder(split, CONTEXT, tmp_path / "m.tflite", plan=plan), CONTEXT))
    assert metrics["token_agreement"] >= 0.95 and metrics["logit_cosine_min"] >= 0.998, metrics


def test_coreml_int4_artifact_keeps_the_source_codes(split_llama, tmp_path):
    """Core ML holds float16 scales: d verbatim; the MIL executor's fp16 compute is the only difference (measured:
    top-1 1.0, worst logit cosine 0.99999)."""
    pytest.importorskip("coremltools")
    from edgeq.llm.coreml_decoder import export_decoder, open_runner
    from edgeq.llm.coreml_lowbit_decoder import int4_plan

    model, split = split_llama
    plan = int4_plan(split, token_sequences(2, 24, seed=3), keep_float=KEEP)
    _check_plan(plan, split)
    metrics = _agreement(model, open_runner(export_decoder(split, CONTEXT, tmp_path / "m.mlpackage", plan=plan), CONTEXT))
    assert metrics["token_agreement"] == 1.0 and metrics["logit_cosine_min"] >= 0.9999, metrics
