"""The LM head's columns equalized before its int8 rows, the inverse folded into the final norm
(edgeq/llm/head_equalize.py): the model computes the same function, a tied head gets its own weight while the
input table keeps the original, and the head's per-row int8 error falls on a head with uneven columns."""

from __future__ import annotations

import copy

import torch

from edgeq.llm.head_equalize import equalize_head
from tests.llm.tiny import tiny_decoder, token_sequences


def int8_row_error(weight: torch.Tensor) -> float:
    scale = weight.abs().amax(1, keepdim=True) / 127
    return ((torch.round(weight / scale) * scale - weight).norm() / weight.norm()).item()


def test_equalized_head_computes_the_model_with_a_finer_int8_grid():
    model = tiny_decoder("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, [2, 30]] *= 20  # uneven columns, as trained embeddings have
    equalized = copy.deepcopy(model)
    note = equalize_head(equalized, token_sequences(1, 12)[0])
    assert note and "model.norm" in note
    ids = torch.as_tensor(token_sequences(1, 24, seed=1)[0])[None]
    with torch.no_grad():
        want, got = model(ids).logits, equalized(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
    assert equalized.lm_head.weight is not equalized.model.embed_tokens.weight  # untied
    torch.testing.assert_close(equalized.model.embed_tokens.weight, model.model.embed_tokens.weight, rtol=0, atol=0)
    before, after = int8_row_error(model.lm_head.weight.detach()), int8_row_error(equalized.lm_head.weight.detach())
    assert after < 0.7 * before, (before, after)  # the 20x columns no longer set every row's scale


def test_a_model_without_a_norm_before_the_head_is_left_alone():
    model = tiny_decoder("llama")
    model.model.norm = torch.nn.Identity()  # the head reads the residual stream itself
    before = copy.deepcopy(model.state_dict())
    assert equalize_head(model, token_sequences(1, 12)[0]) is None
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
