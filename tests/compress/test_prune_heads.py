"""Attention-head pruning (edgeq/compress/prune_heads.py): removing heads computes exactly what masking them
does, the attributes the forward reads follow, the pruned tiny BERT converts and validates on every runtime,
and attention edgeq cannot prune is refused with the layer named."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from edgeq.compress.prune_heads import prune_heads
from edgeq.compress.spec import PruneSpec
from edgeq.errors import ConversionError
from tests.conftest import COREML, ONNX, TFLITE, requires

pytestmark = requires("transformers")


def tiny_bert():
    """BERT with 2 layers of 4 heads (width 32): a `tests.compress.test_prune_heads:tiny_bert` source."""
    from transformers import BertConfig, BertModel

    from tests.zoo.huggingface import TEXT, _build, _text_inputs

    config = BertConfig(**{**TEXT, "num_hidden_layers": 2, "num_attention_heads": 4}, add_pooling_layer=False)
    return _build(BertModel, config, "last_hidden_state"), _text_inputs()


def tiny_distilbert():
    from transformers import DistilBertConfig, DistilBertModel

    from tests.zoo.huggingface import _build, _text_inputs

    config = DistilBertConfig(vocab_size=96, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_position_embeddings=32)
    return _build(DistilBertModel, config, "last_hidden_state"), _text_inputs()


def _spec(ratio=0.5, importance="l2", scope="layer"):
    spec = PruneSpec("heads", ratio, importance=importance, text=f"heads:{ratio}")
    return spec if scope == "layer" else SimpleNamespace(**{**dataclasses.asdict(spec), "scope": scope})


def _flat(factory):
    """The factory's model as edgeq loads it (positional inputs, a tuple out) and its example tuple."""
    from edgeq.load.wrap import FlatModel

    module, examples = factory()
    return FlatModel(module, list(examples)).eval(), list(examples), tuple(examples.values())


def _masked(module, result, examples):
    """The original model's output with the removed heads' context zeroed before the output projection."""
    hooks = []
    for name, record in result.layers.items():
        layer = module.inner.get_submodule(name)
        out = layer.out_lin if hasattr(layer, "out_lin") else module.inner.get_submodule(name.rsplit(".", 1)[0]).output.dense
        size = record["head_size"]

        def zero(_layer, inputs, removed=record["removed"], size=size):
            x = inputs[0].clone()
            for head in removed:
                x[..., head * size:(head + 1) * size] = 0
            return (x,)

        hooks.append(out.register_forward_pre_hook(zero))
    try:
        with torch.no_grad():
            return module(*examples)[0]
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("factory, importance", [(tiny_bert, "l2"), (tiny_bert, "taylor"), (tiny_distilbert, "activation")])
def test_removing_heads_computes_what_masking_them_does(factory, importance):
    module, names, examples = _flat(factory)
    calibration = [{name: x.numpy() for name, x in zip(names, examples)}]
    result = prune_heads(module, _spec(0.5, importance), calibration, names, examples)
    for name, record in result.layers.items():
        assert record["heads"] == [4, 2] and len(record["removed"]) == 2
        layer = result.module.inner.get_submodule(name)
        heads = getattr(layer, "num_attention_heads", getattr(layer, "n_heads", None))
        assert heads == 2 and max(p.out_features for p in layer.children() if isinstance(p, nn.Linear) and p.out_features <= 16) == 16
    with torch.no_grad():
        pruned = result.module(*examples)[0]
    torch.testing.assert_close(pruned, _masked(module, result, examples), rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in module.parameters()) > sum(p.numel() for p in result.module.parameters())  # input untouched


@requires("torch_pruning")
def test_bert_with_heads_and_channels_pruned_converts_and_validates_on_every_runtime(tmp_path):
    from edgeq.compress.prune_structured import prune_structured
    from edgeq.load import load_model
    from edgeq.pipeline import ConvertOptions, convert
    from edgeq.validate.verdict import Verdict

    loaded = load_model("tests.compress.test_prune_heads:tiny_bert")
    result = prune_heads(loaded.module, _spec(0.5), [], loaded.input_names, loaded.example_inputs)
    attention = result.module.inner.model.encoder.layer[0].attention
    assert attention.self.query.weight.shape == (16, 32) and attention.self.all_head_size == 16
    assert attention.output.dense.in_features == 16 and result.layers["model.encoder.layer.1.attention.self"]["heads"] == [4, 2]
    assert "8 -> 4 heads in 2 attention layers" in result.notes[0]
    # Then the feed-forward channels: attention projections are left to head pruning, the hidden width is the output's.
    channels = prune_structured(result.module, PruneSpec("channels", 0.5), [], loaded.input_names, loaded.example_inputs)
    assert channels.layers["model.encoder.layer.0.intermediate.dense"] == {"out_features": [64, 32]}
    assert "heads" in channels.skipped["model.encoder.layer.0.attention.self.value"]
    assert not any(name.endswith(("query", "key", "value")) for name in channels.layers)

    targets = [t for t, mark in (("onnx", ONNX), ("tflite", TFLITE), ("coreml", COREML)) if not mark.args[0]]
    options = ConvertOptions(targets=targets, out=tmp_path, precisions=["fp32"], samples=2)
    outcomes = convert(dataclasses.replace(loaded, module=channels.module), options)
    assert [o.target for o in outcomes] == targets
    for outcome in outcomes:
        assert outcome.verdict == Verdict.PASSED, (outcome.target, outcome.error or outcome.violations)


def test_global_ranking_keeps_a_head_in_every_layer():
    module, names, examples = _flat(tiny_bert)
    result = prune_heads(module, _spec(0.75, scope="global"), [], names, examples)
    kept = [record["heads"][1] for record in result.layers.values()]
    assert sum(kept) == 2 and all(k >= 1 for k in kept)


class MultiheadEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


def test_multihead_attention_is_refused_with_the_layer_named():
    with pytest.raises(ConversionError, match="head pruning refused at layer 'attention': nn.MultiheadAttention") as refused:
        prune_heads(MultiheadEncoder().eval(), _spec(), [], ["x"], (torch.randn(1, 5, 16),))
    assert refused.value.exit_code == 4
