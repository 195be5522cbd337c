"""Stateful Core ML decoders (edgeq/llm/coreml_decoder.py) against FP32 PyTorch, run by edgeq's MIL executor.

Core ML prediction exists only on macOS, so on Linux the artifact's ML program runs in edgeq's MIL reference
executor with its state ops (validate/mil/ops_state.py), which holds the KV cache states between calls. The
reference is the Hugging Face model on the whole sequence at once (no cache). Tiny Llama: grouped-query
attention (4 heads / 2 KV heads), rotary embeddings, tied embeddings. Other families:
test_coreml_decoder_families.py; 4-bit: test_coreml_decoder_int4.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.llm.tiny import token_sequences, tiny_decoder

pytest.importorskip("coremltools")

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
    """Teacher-forced logits of every position: two prefills of different lengths, then one token at a time."""
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


def check_fp32(model, path) -> None:
    """Teacher-forced top-1 100%, logits cosine >= 0.9999 at every position, 16 greedy tokens identical."""
    from edgeq.llm.coreml_decoder import open_runner
    from edgeq.llm.steps import StepRunner

    runner = open_runner(path, MAX_CONTEXT)
    assert isinstance(runner, StepRunner) and runner.max_context == MAX_CONTEXT
    assert runner.name == "coreml-mil-executor" and "not Apple's Core ML runtime" in runner.executor
    for ids in token_sequences(2, 40):
        got, want = runner_logits(runner, ids), reference_logits(model, ids)
        assert got.shape == want.shape and got.dtype == np.float32
        assert (got.argmax(-1) == want.argmax(-1)).all()
        assert cosine(got, want).min() >= 0.9999  # the fp16 KV cache (Core ML states are fp16) is the only rounding
    prompt = token_sequences(1, 8, seed=1)[0]
    assert runner_greedy(runner, prompt, GREEDY_TOKENS) == reference_greedy(model, prompt, GREEDY_TOKENS)


@pytest.fixture(scope="module")
def llama_fp32(tmp_path_factory):
    from edgeq.llm.coreml_decoder import export_decoder

    model = tiny_decoder("llama")
    path = export_decoder(model, MAX_CONTEXT, tmp_path_factory.mktemp("coreml") / "llama.mlpackage")
    return model, path


def test_llama_fp32_agrees_with_pytorch(llama_fp32):
    check_fp32(*llama_fp32)


def test_program_is_stateful(llama_fp32):
    """KV cache as two fp16 Core ML states, read and written by the program; n flexible from 1 to max_context."""
    import coremltools as ct

    from edgeq.validate.mil import read_program

    model, path = llama_fp32
    spec = ct.utils.load_spec(str(path))
    assert spec.specificationVersion >= 9  # iOS18
    states = {s.name: tuple(s.type.stateType.arrayType.shape) for s in spec.description.state}
    assert states == {"k_cache": (2, MAX_CONTEXT, 2, 16), "v_cache": (2, MAX_CONTEXT, 2, 16)}  # layers, context, kv heads, head dim
    ids = next(i for i in spec.description.input if i.name == "input_ids")
    assert [(r.lowerBound, r.upperBound) for r in ids.type.multiArrayType.shapeRange.sizeRanges] == [(1, 1), (1, MAX_CONTEXT)]
    assert [o.name for o in spec.description.output] == ["logits"]
    ops = [op.type for op in read_program(path).main.ops]
    assert ops.count("read_state") == 2 and ops.count("write_state") == 2


def test_weights_exact(llama_fp32):
    """fp32 compute: every weight matrix of the HF model is a constant of the program, bit for bit."""
    from edgeq.validate.mil import MILExecutor

    model, path = llama_fp32
    executor = MILExecutor(path)
    stored = {np.asarray(executor.constant(name), np.float32).tobytes() for name in executor.constants
              if np.asarray(executor.constants[name]).dtype == np.float32 and np.asarray(executor.constants[name]).ndim == 2}
    for name, parameter in model.named_parameters():
        if parameter.dim() == 2:
            assert parameter.detach().numpy().astype(np.float32).tobytes() in stored, name


def test_reset_and_full_context_prefill(llama_fp32):
    """A prompt of max_context tokens is one call; reset empties the states (same logits twice)."""
    from edgeq.errors import UsageError
    from edgeq.llm.coreml_decoder import open_runner

    model, path = llama_fp32
    runner = open_runner(path, MAX_CONTEXT)
    ids = token_sequences(1, MAX_CONTEXT, seed=2)[0]
    first = runner.prefill(ids)
    with pytest.raises(UsageError, match="exceed the maximum context"):
        runner.decode(1)
    runner.reset()
    np.testing.assert_array_equal(runner.prefill(ids), first)
    assert (first.argmax(-1) == reference_logits(model, ids).argmax(-1)).all()


def test_refusals(llama_fp32, tmp_path):
    from edgeq.errors import UsageError
    from edgeq.llm.coreml_decoder import export_decoder, open_runner
    from edgeq.validate.runners.base import RunnerError

    model, path = llama_fp32
    with pytest.raises(RunnerError, match="maximum context of 48, not 32"):
        open_runner(path, 32)
    with pytest.raises(UsageError, match="exceeds the model's 128 positions"):
        export_decoder(model, 256, tmp_path / "big.mlpackage")
    with pytest.raises(RunnerError, match="not an edgeq stateful decoder"):
        open_runner(_plain_coreml(tmp_path), MAX_CONTEXT)


def _plain_coreml(tmp_path):
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec((2,))])
    def program(x):
        return mb.relu(x=x)

    path = tmp_path / "plain.mlpackage"
    ct.convert(program, convert_to="mlprogram").save(str(path))
    return path
