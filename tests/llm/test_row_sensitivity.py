"""The few linears whose int8 input rows cost most stay float whole (edgeq/llm/row_sensitivity.py): a tiny Q4_1
Llama's linears are measured end to end, the worst ones holding a share of the summed drift become exact float
linears the plan keeps float, worst first and within the share cap (which keeps a tiny model's layers all 4-bit by
default)."""

from __future__ import annotations

import torch

from edgeq.compress.qdq import DynamicActivationQuant
from edgeq.llm.outlier_split import outlier_split_class, split_outlier_inputs
from edgeq.llm.row_sensitivity import describe_float, keep_sensitive_float, row_drifts
from edgeq.plan import QDtype
from tests.llm.test_outlier_split import CHANNELS, outlier_llama
from tests.llm.tiny import token_sequences


def test_the_row_emulation_is_xnnpack_dynamic_int8():
    x = torch.tensor([[-1.0, 0.0, 0.5, 3.0], [0.2, 0.4, 0.6, 0.8]])
    got = DynamicActivationQuant(QDtype.INT8)(x)  # what row_drifts quantizes a layer's input rows with
    for row, out in zip(x, got):  # 256 levels over the row's range with 0 included, each value within half a step
        step = (row.max().clamp(min=0) - row.min().clamp(max=0)) / 255
        assert (out - row).abs().max() <= step / 2 + 1e-7
        assert torch.isclose(out[row == 0], torch.zeros(1)).all()


def test_the_worst_layers_go_float_exactly():
    _, grid = outlier_llama()
    split_outlier_inputs(grid, token_sequences(2, 24, seed=3), CHANNELS)
    samples = token_sequences(3, 16, seed=5)
    drifts = row_drifts(grid, samples)
    assert len(drifts) == 15 and min(drifts.values()) > 0
    ids = torch.as_tensor(samples[0])[None]
    with torch.no_grad():
        before = grid(ids).logits
    floated = keep_sensitive_float(grid, samples, share=0.08, max_share=0.2)
    worst = max((name for name in drifts if name != "lm_head"), key=drifts.get)
    total = sum(drifts.values())
    assert worst in floated and "lm_head" not in floated  # the head is over a fifth of the weights
    assert all(drifts[name] >= 0.08 * total for name in floated)
    assert list(floated) == sorted(floated, key=drifts.get, reverse=True)  # worst first
    owners = dict(grid.named_modules())
    for name in floated:
        assert type(owners[name]) is torch.nn.Linear and "int8 input rows" in owners[name].edgeq_float_reason
    assert sum(isinstance(m, outlier_split_class()) for m in grid.modules()) == 15 - len(floated)
    with torch.no_grad():
        after = grid(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=2e-5 * before.abs().max().item())
    assert worst in describe_float(floated)


def test_nothing_floats_under_the_default_share_of_a_tiny_model():
    _, grid = outlier_llama()
    split_outlier_inputs(grid, token_sequences(2, 24, seed=3), CHANNELS)
    assert keep_sensitive_float(grid, token_sequences(2, 16, seed=5)) == {}  # one down_proj is > 2% of its weights
