"""int8 KV cache on the ONNX decoder (edgeq/llm/kv_cache.py) on a tiny Llama (GQA, rope): the graph against the
PyTorch simulation of the same cache, stored codes bit-exact across steps, int8 dtypes, ORT GenAI's generate
loop, the cache-only drift in the bundle, refusals on the runtimes that hold float caches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("onnxruntime")

from edgeq.cli import main
from edgeq.llm.kv_cache import QMAX, Int8CacheTorchRunner, calibrate
from edgeq.llm.onnx_decoder import export_decoder, open_runner
from edgeq.llm.reference import TorchStepRunner
from tests.llm.tiny import save_folder, tiny_decoder, token_sequences, word_texts

CONTEXT = 48


@pytest.fixture(scope="module")
def int8_llama(tmp_path_factory):
    model = tiny_decoder("llama")
    plan = calibrate(model, token_sequences(8, 24, seed=7))
    path = export_decoder(model, CONTEXT, tmp_path_factory.mktemp("onnx_kv") / "model.onnx", kv_cache=plan)
    return model, plan, path


def _walk(runner, ids):
    """The logits of a prefill in two chunks, then six decode steps."""
    steps = [runner.prefill(ids[:6]), runner.prefill(ids[6:11])] + [runner.decode(t) for t in ids[11:17]]
    return steps


def test_graph_equals_pytorch_simulation(int8_llama):
    """Same arithmetic in both: logits to float tolerance, the cache codes equal (a value on a rounding
    boundary may move one step: at most a handful of codes)."""
    model, plan, path = int8_llama
    graph, simulation = open_runner(path, CONTEXT), Int8CacheTorchRunner(model, plan, CONTEXT)
    ids = token_sequences(1, 17, seed=11)[0]
    for ours, theirs in zip(_walk(graph, ids), _walk(simulation, ids)):
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    codes = [(np.asarray(g, np.int32), s.numpy().astype(np.int32)) for g, s in zip(graph._past, simulation.past)]
    assert all(g.shape == s.shape == (1, 2, 17, 16) for g, s in codes)
    assert max(np.abs(g - s).max() for g, s in codes) <= 1
    assert sum(int((g != s).sum()) for g, s in codes) <= 4


def test_cache_is_int8_not_float(int8_llama):
    """Past and present are int8 in the graph and in the runner, and the logits are the int8 cache's: they
    leave FP32 PyTorch's by far more than float rounding (a silently float cache would match it to ~1e-6)."""
    import onnx

    model, _, path = int8_llama
    graph = onnx.load(str(path)).graph
    caches = [v for v in [*graph.input, *graph.output] if v.name.startswith(("past_key_values.", "present."))]
    assert len(caches) == 8 and {v.type.tensor_type.elem_type for v in caches} == {onnx.TensorProto.INT8}
    runner, reference = open_runner(path, CONTEXT), TorchStepRunner(model, CONTEXT)
    ids = token_sequences(1, 12, seed=12)[0]
    ours, fp32 = runner.prefill(ids), reference.prefill(ids)
    assert all(p.dtype == np.int8 for p in runner._past)
    assert np.abs(ours - fp32).max() > 1e-3
    ops = {n.op_type for n in graph.node}
    assert {"Round", "Clip", "Cast"} <= ops


def test_stored_codes_pass_through_bit_exact(int8_llama):
    """present = concat(past codes, quantize(new)): any past, even codes the model would never write (all of
    -127..127), comes back unchanged, step after step, never requantized."""
    import onnxruntime as ort

    _, _, path = int8_llama
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    past = {i.name: rng.integers(-QMAX, QMAX + 1, size=(1, 2, 9, 16), dtype=np.int8)
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    first = dict(past)
    for step in range(3):
        length = 9 + step
        feed = {"input_ids": np.array([[5 + step]]), "attention_mask": np.ones((1, length + 1), np.int64),
                "position_ids": np.array([[length]]), **past}
        out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        past = {name: out[name.replace("past_key_values.", "present.")] for name in past}
        for name, codes in first.items():
            assert past[name].dtype == np.int8 and past[name].shape[2] == length + 1
            np.testing.assert_array_equal(past[name][:, :, :9], codes)


def test_scales_cover_the_calibration(int8_llama):
    """No calibration value is clipped: each channel's scale x 127 is its absmax with the headroom."""
    model, plan, _ = int8_llama
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(token_sequences(8, 24, seed=7)[3])[None], use_cache=True)
    keys = out.past_key_values.layers[1].keys[0].abs().amax(dim=1).numpy()  # [kv_heads, head_dim]
    assert plan.key_scales.shape == (2, 2, 16) and (keys <= plan.key_scales[1] * QMAX / plan.headroom + 1e-6).all()


def test_onnxruntime_genai_runs_the_int8_cache(int8_llama):
    """ONNX Runtime GenAI's generate loop carries the int8 presents and decodes what the simulation decodes."""
    og = pytest.importorskip("onnxruntime_genai")
    model, plan, path = int8_llama
    prompt = token_sequences(1, 6, seed=3)[0]
    genai = og.Model(str(path.parent))
    params = og.GeneratorParams(genai)
    params.set_search_options(do_sample=False, max_length=30)
    generator = og.Generator(genai, params)
    generator.append_tokens(prompt.astype(np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    simulation = Int8CacheTorchRunner(model, plan, CONTEXT)
    expected = [int(simulation.prefill(prompt)[-1].argmax())]
    while len(expected) < len(tokens):
        expected.append(int(simulation.decode(expected[-1]).argmax()))
    assert len(tokens) == 24 and tokens == expected


def test_convert_int4_with_int8_cache_reports_the_cache_apart(tmp_path):
    """--kv-cache int8 composes with int4-weight; the bundle holds the cache's own drift (FP32 weights) beside the
    artifact's, its scales, the int8 graph, and the terminal line says both."""
    folder = save_folder(tiny_decoder("llama"), tmp_path / "tiny-llama")
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(word_texts(6, 16, seed=4)) + "\n")
    result = CliRunner().invoke(main, ["convert", str(folder), "--task", "text-generation", "-t", "onnx",
                                       "-p", "int4-weight", "--kv-cache", "int8", "--max-context", str(CONTEXT),
                                       "--data", str(data), "--samples", "3", "--calibration-samples", "3",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "int8 KV cache alone: token agreement" in result.output
    bundle = tmp_path / "out" / "tiny-llama" / "onnx" / "int4-weight"
    manifest = json.loads((bundle / "manifest.json").read_text())
    kv = manifest["kv_cache"]
    assert kv["dtype"] == "int8" and kv["shape"] == [2, 2, 2, 16] and kv["scales_file"] == "kv_scales.npz"
    assert kv["cache_bytes_at_max_context"] == {"float32": 2 * 2 * 2 * 16 * CONTEXT * 4, "int8": 2 * 2 * 2 * 16 * CONTEXT}
    drift = kv["cache_only_drift"]
    assert drift["compared"].startswith("FP32 weights + int8 KV cache")
    assert {"token_agreement", "ppl_delta", "greedy_agreement", "logit_cosine_min"} <= set(drift)
    assert drift["token_agreement"] != manifest["metrics"]["token_agreement"]  # weights' drift is not in it
    scales = np.load(bundle / "kv_scales.npz")
    assert scales["key_scales"].shape == (2, 2, 16) and (scales["value_scales"] > 0).all()
    assert manifest["plan"]["layers"] == 16 and (bundle / "genai_config.json").exists()
    assert any("onnxruntime-genai" in note for note in manifest["notes"])
    report = (bundle / "report.md").read_text()
    assert "## int8 KV cache" in report and "int8 KV cache alone (FP32 weights" in report


@pytest.mark.parametrize("args, message", [
    (["--task", "text-generation", "-t", "tflite", "--kv-cache", "int8"], "LiteRTLMCache"),
    (["--task", "text-generation", "-t", "onnx,coreml", "--kv-cache", "int8"], "MLState"),
    (["-t", "onnx", "--kv-cache", "int8"], "--kv-cache belongs to --task text-generation"),
])
def test_refusals(tmp_path, args, message):
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "absent"), *args])
    assert result.exit_code == 2 and message in result.output, result.output
