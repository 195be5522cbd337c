"""Outlier input channels in float beside LiteRT's 4-bit kernel (edgeq/llm/outlier_split.py): the split computes
the model exactly in PyTorch, the plan keeps the 4-bit layer's codes and the two small linears float, and the
.tflite decoder of a tiny Q4_1 Llama with outlier channels (large norm gains and up_proj rows, as trained
decoders have) comes much closer to FP32 than without the split."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edgeq.errors import UsageError
from edgeq.llm.outlier_split import split_outlier_inputs
from edgeq.llm.source_grid import split_source_grids
from tests.llm.test_source_grid import CONTEXT, _agreement, q4_1
from tests.llm.tiny import tiny_decoder, token_sequences

CHANNELS = 4
ATTENTION_IN, MLP_IN, DOWN_IN = [3, 40], [7], [5, 77]  # the channels made large


def outlier_llama():
    """The tiny Llama with a few input channels 25x larger, then its linears on the Q4_1 grid (a GGUF source)."""
    model = tiny_decoder("llama", 0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[ATTENTION_IN] *= 25
            layer.post_attention_layernorm.weight[MLP_IN] *= 25
            layer.mlp.up_proj.weight[DOWN_IN] *= 25
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(torch.from_numpy(q4_1(module.weight.numpy())))
    grid = copy.deepcopy(model)
    split_source_grids(grid)
    return model, grid


@pytest.fixture(scope="module")
def models():
    model, grid = outlier_llama()
    split = copy.deepcopy(grid)
    names = split_outlier_inputs(split, token_sequences(2, 24, seed=3), CHANNELS)
    return model, grid, split, names


def test_split_computes_the_model_and_picks_the_large_channels(models):
    model, _, split, names = models
    assert len(names) == 2 * 7 + 1 and names["lm_head"] == "lm_head.linear"  # every 4-bit linear, and the head
    assert all(before == now for before, now in names.items() if before != "lm_head")  # grids keep their names
    ids = torch.as_tensor(token_sequences(1, 24, seed=1)[0])[None]
    with torch.no_grad():
        want, got = model(ids).logits, split(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * want.abs().max().item())
    layers = split.model.layers
    for module, large in ((layers[1].self_attn.v_proj, ATTENTION_IN), (layers[1].mlp.gate_proj, MLP_IN),
                          (layers[1].mlp.down_proj, DOWN_IN)):
        picked = sorted(torch.nonzero(module.keep == 0).flatten().tolist())
        assert set(large) <= set(picked) and len(picked) == CHANNELS
        groups = module.in_features // module.group  # the side path: the grid's group sums, then the picked channels
        np.testing.assert_array_equal(module.side_out.weight.detach().numpy()[:, groups:],
                                      module.grid.weight.detach().numpy()[:, picked])
        np.testing.assert_array_equal(module.side_in.weight.detach().numpy().argmax(1), picked)
    assert split.lm_head.linear.weight is split.model.embed_tokens.weight  # the tied head is wrapped, the tie kept


def test_plan_keeps_the_codes_and_the_split_float(models):
    from edgeq.llm.tflite_lowbit_decoder import int4_plan

    _, _, split, _ = models
    plan = int4_plan(split, token_sequences(2, 24, seed=3), keep_float=("lm_head.linear", "model.embed_tokens"))
    inner = [f for f in plan.layers if f.endswith(".grid")]
    assert len(inner) == 14  # split or not, every grid keeps its codes
    for fqn in inner:
        codes, d = split.get_submodule(fqn).edgeq_source_codes
        np.testing.assert_array_equal(plan.layers[fqn].weight_codes, codes.numpy(), err_msg=fqn)
        # bfloat16 block scales, the source's float16 d rounded to the nearest (not up: that biases every weight)
        np.testing.assert_array_equal(plan.layers[fqn].weight.scale, d.to(torch.bfloat16).float().numpy(), err_msg=fqn)
    parts = [f for f in plan.layers if f.endswith((".side_in", ".side_out"))]
    assert len(parts) == 2 * 15 and all(plan.layers[f].weight is None and "float" in plan.layers[f].reason for f in parts)


def test_tflite_decoder_with_the_split_comes_close_to_fp32(models, tmp_path):
    """The text-generation default: every linear 4-bit with the split, the tied head and table int8. Measured on
    this model (random weights, near-flat logits, ppl 546): worst logit cosine 0.986, ppl delta +0.19, top-1
    0.912; without the split (head and table float) 0.852, +5.4 and 0.877: int8 input rows dominated by the large
    channels. The tied head's int8 codes are the table's: one buffer holds them (SmolLM2-135M: 28.3 MB saved)."""
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("litert_torch")
    from edgeq.converters.parity_tflite import read_model, tensor_name
    from edgeq.layer_overrides import parse_per_layer
    from edgeq.llm.tflite_decoder import export_decoder, open_runner
    from edgeq.llm.tflite_lowbit_decoder import int4_plan

    model, _, split, _ = models
    overrides = parse_per_layer(["lm_head.linear=int8", "model.embed_tokens=int8"], "--per-layer")
    plan = int4_plan(split, token_sequences(2, 24, seed=3), overrides=overrides)
    path = export_decoder(split, CONTEXT, tmp_path / "split.tflite", plan=plan)
    metrics = _agreement(model, open_runner(path, CONTEXT))
    assert metrics["logit_cosine_min"] >= 0.98 and metrics["token_agreement"] >= 0.9, metrics
    assert abs(metrics["ppl_delta"]) <= 0.01 * metrics["ppl_reference"], metrics
    buffers = {tensor_name(t): t.buffer for sg in read_model(path.read_bytes()).subgraphs for t in sg.tensors
               if tensor_name(t) in ("lm_head.linear.weight", "model.embed_tokens.weight")}
    assert len(buffers) == 2 and len(set(buffers.values())) == 1, buffers


def test_options_refuse_what_does_not_apply():
    from edgeq.llm.pipeline import Options, check_options

    with pytest.raises(UsageError, match="only -t tflite"):
        check_options(Options("m", ["onnx"], ["int4-weight"], None, outlier_channels=8))
    with pytest.raises(UsageError, match="0 \\(none\\) to 256"):
        check_options(Options("m", ["tflite"], ["int4-dynamic"], None, outlier_channels=-1))


def test_user_layer_names_follow_the_wrapped_layer(models):
    """A plain linear's planned layer becomes NAME.linear inside the wrapper: exact names given by the user follow
    it (a grid's planned `.grid` keeps its name); globs and regexes are left as written."""
    from edgeq.llm.pipeline import Options, outlier_split_model

    model, _, _, _ = models  # float linears, no grid
    options = Options("m", ["tflite"], ["int4-dynamic"], None, keep_float=["model.layers.0.self_attn.q_proj", "re:.*o_proj.*"],
                      per_layer=["model.layers.1.mlp.up_proj=int8", "*.down_proj*=float"])
    split, notes, moved = outlier_split_model(model, token_sequences(2, 24, seed=3), options, echo=lambda text: None)
    assert moved.keep_float == ["model.layers.0.self_attn.q_proj.linear", "re:.*o_proj.*"]
    assert moved.per_layer == ["model.layers.1.mlp.up_proj.linear=int8", "*.down_proj*=float"]
    assert options.keep_float[0] == "model.layers.0.self_attn.q_proj"
    assert len(notes) == 1 and "linears: the 16 input channels" in notes[0]  # the default
