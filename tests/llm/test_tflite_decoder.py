"""TFLite decoders (edgeq/llm/tflite_decoder.py) against FP32 PyTorch, through the StepRunner protocol, in LiteRT.

The reference is the Hugging Face model run on the whole sequence at once (no cache): what the exported
prefill/decode signatures and their external KV cache must reproduce position by position.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.llm.tiny import token_sequences, tiny_decoder

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")

MAX_CONTEXT = 48
GREEDY_TOKENS = 16


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(ids)[None]).logits[0].float().numpy()


def reference_greedy(model, prompt: np.ndarray, steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(reference_logits(model, np.asarray(ids, np.int64))[-1].argmax()))
    return ids[len(prompt):]


def runner_logits(runner, ids: np.ndarray, splits=(5, 37)) -> np.ndarray:
    """Teacher-forced logits of every position: a short prefill (padded), a long one (one full chunk), the rest
    one token at a time, so padding, chunking and decode are all on the path."""
    runner.reset()
    first, second = splits
    rows = [runner.prefill(ids[:first]), runner.prefill(ids[first:second])]
    rows += [runner.decode(int(token))[None] for token in ids[second:]]
    return np.concatenate(rows)


def runner_greedy(runner, prompt: np.ndarray, steps: int) -> list[int]:
    runner.reset()
    token = int(runner.prefill(prompt)[-1].argmax())
    out = [token]
    for _ in range(steps - 1):
        token = int(runner.decode(token).argmax())
        out.append(token)
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def llama_fp32(tmp_path_factory):
    from edgeq.llm.tflite_decoder import export_decoder

    model = tiny_decoder("llama")
    path = export_decoder(model, MAX_CONTEXT, tmp_path_factory.mktemp("tflite") / "llama.tflite")
    return model, path


def check_fp32(model, path) -> None:
    from edgeq.llm.steps import StepRunner
    from edgeq.llm.tflite_decoder import open_runner

    runner = open_runner(path, MAX_CONTEXT)
    assert isinstance(runner, StepRunner) and runner.max_context == MAX_CONTEXT
    for ids in token_sequences(2, 40):
        got, want = runner_logits(runner, ids), reference_logits(model, ids)
        assert got.shape == want.shape
        assert (got.argmax(-1) == want.argmax(-1)).all()
        assert cosine(got, want).min() >= 0.9999
    prompt = token_sequences(1, 8, seed=1)[0]
    assert runner_greedy(runner, prompt, GREEDY_TOKENS) == reference_greedy(model, prompt, GREEDY_TOKENS)


def test_llama_fp32_matches_pytorch(llama_fp32):
    """GQA 4/2, rotary, tied embeddings: the model's weights exactly, position by position."""
    check_fp32(*llama_fp32)


def test_cache_layout_is_litert_torch_generative(llama_fp32):
    """Signatures and cache tensors as litert-torch's export_hf lays them out (K [1, kv, S, D], V [1, kv, D, S])."""
    from ai_edge_litert.interpreter import Interpreter

    model, path = llama_fp32
    signatures = Interpreter(model_path=str(path)).get_signature_list()
    assert set(signatures) == {"prefill", "decode"}
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    caches = {f"kv_cache_{kv}_{i}" for kv in "kv" for i in range(layers)}
    for name, io in signatures.items():
        assert set(io["inputs"]) == caches | {"tokens", "input_pos", "mask"}
        assert set(io["outputs"]) == caches | {"logits"}
    details = Interpreter(model_path=str(path)).get_signature_runner("decode").get_input_details()
    assert list(details["kv_cache_k_0"]["shape"]) == [1, kv_heads, MAX_CONTEXT, head_dim]
    assert list(details["kv_cache_v_0"]["shape"]) == [1, kv_heads, head_dim, MAX_CONTEXT]


def test_compute_runs_in_xnnpack(llama_fp32):
    """Every matmul, attention product and softmax of both signatures runs in XNNPACK; what stays in LiteRT's
    builtin kernels is the cache update (DYNAMIC_UPDATE_SLICE), the embedding gather and index plumbing."""
    from edgeq.validate.runners.tflite_decoder_delegation import placements_by_signature

    for signature, placements in placements_by_signature(llama_fp32[1]).items():
        compute = [p for p in placements if p.op_name in ("FULLY_CONNECTED", "BATCH_MATMUL", "SOFTMAX")]
        assert compute and all(p.delegated for p in compute), signature
        left = {p.op_name for p in placements if not p.delegated}
        assert left <= {"DYNAMIC_UPDATE_SLICE", "EMBEDDING_LOOKUP", "RESHAPE", "PACK", "CAST", "SLICE"}, left


def test_cache_kept_in_place_matches_the_public_signature_runners(llama_fp32):
    """The cache kept in the interpreter's tensors (only the rows a call wrote copied back) gives bit-identical
    logits to passing the whole cache through LiteRT's public signature runners: padded and chunked prefill,
    prefill to decode and back, a prompt running up to the last position, and a reset in between."""
    from edgeq.llm.tflite_decoder import open_runner
    from edgeq.validate.runners.tflite_kv_carry import NumpyCarry

    fast, plain = open_runner(llama_fp32[1], MAX_CONTEXT), open_runner(llama_fp32[1], MAX_CONTEXT)
    assert fast._carry.mode == "in-place"  # ai-edge-litert exposes what the fast path needs
    plain._carry = NumpyCarry(plain.interpreter, ["prefill", "decode"], plain.cache_names)
    ids = token_sequences(1, MAX_CONTEXT, seed=5)[0]

    def session(runner) -> np.ndarray:
        rows = [runner_logits(runner, ids[:40], splits=(3, 20))]
        runner.reset()
        rows.append(runner.prefill(ids[:9]))
        rows += [runner.decode(int(t))[None] for t in ids[9:12]]
        rows.append(runner.prefill(ids[12:MAX_CONTEXT - 1]))  # chunks, then decode once a chunk would not fit
        rows.append(runner.decode(int(ids[-1]))[None])
        return np.concatenate(rows)

    got, want = session(fast), session(plain)
    assert got.shape == want.shape and np.array_equal(got, want)
    assert fast.cache_dtype == np.float32


def test_runner_refuses_what_does_not_fit(llama_fp32):
    from edgeq.errors import UsageError
    from edgeq.llm.tflite_decoder import open_runner
    from edgeq.validate.runners.base import RunnerError

    runner = open_runner(llama_fp32[1], MAX_CONTEXT)
    runner.prefill(np.arange(MAX_CONTEXT - 1))
    runner.decode(3)  # the last position
    with pytest.raises(UsageError, match="maximum context"):
        runner.decode(3)
    with pytest.raises(RunnerError, match="maximum context of 48"):
        open_runner(llama_fp32[1], 64)


def test_export_refuses_context_beyond_positions(tmp_path):
    from edgeq.errors import UsageError
    from edgeq.llm.tflite_decoder import export_decoder

    with pytest.raises(UsageError, match="positions"):
        export_decoder(tiny_decoder("llama"), 4096, tmp_path / "x.tflite")


def test_int4_weights_verbatim_and_faithful(tmp_path):
    """int4 per group of 32 (RTN) on every linear layer and the embedding table: the plan's codes and scales
    stored exactly (weight parity), the low-bit ops in XNNPACK, and the artifact agrees with the plan simulated
    in PyTorch (dequantized weights) on >= 90% of teacher-forced tokens; its lower agreement with FP32 is the
    4-bit rounding of random weights (printed)."""
    from edgeq.converters.parity import artifact_weights, compare_weights
    from edgeq.llm.tflite_decoder import export_decoder, open_runner
    from edgeq.llm.tflite_lowbit_decoder import int4_plan

    model = tiny_decoder("llama")
    plan = int4_plan(model, token_sequences(2, 24, seed=3))
    path = export_decoder(model, MAX_CONTEXT, tmp_path / "llama_int4.tflite", plan=plan)
    parity = compare_weights(plan, artifact_weights(path, "tflite"))
    planned = [fqn for fqn, layer in plan.layers.items() if layer.weight is not None]
    assert parity.checked == len(planned) and not parity.mismatches and not parity.missing
    simulated = simulate_plan(model, plan)
    runner = open_runner(path, MAX_CONTEXT)
    vs_sim, vs_fp32 = [], []
    for ids in token_sequences(2, 40):
        got = runner_logits(runner, ids).argmax(-1)
        vs_sim.append(np.mean(got == reference_logits(simulated, ids).argmax(-1)))
        vs_fp32.append(np.mean(got == reference_logits(model, ids).argmax(-1)))
    print(f"int4 g32 tiny llama teacher-forced top-1: {np.mean(vs_sim):.3f} vs PyTorch plan, {np.mean(vs_fp32):.3f} vs FP32")
    assert np.mean(vs_sim) >= 0.9
    # Constant bytes, not the file: in a model this small, litert-torch's long scope names of ~400 tensors are most of it.
    assert stored_bytes(path) < 0.4 * sum(p.numel() * 4 for p in model.parameters())


def simulate_plan(model, plan):
    """A float copy of `model` holding the plan's dequantized weights (a tied LM head gets its own)."""
    import copy

    import torch

    simulated = copy.deepcopy(model)
    modules = dict(simulated.named_modules())
    with torch.no_grad():
        for fqn, layer in plan.layers.items():
            if layer.weight is None:
                continue
            weight = torch.from_numpy(layer.weight.dequantize(layer.weight_codes)).float()
            modules[fqn].weight = torch.nn.Parameter(weight)  # a new Parameter: unties a shared table
    return simulated


def stored_bytes(path) -> int:
    from edgeq.converters.parity_tflite import read_model

    return sum(0 if buffer.data is None else len(buffer.data) for buffer in read_model(path.read_bytes()).buffers)
