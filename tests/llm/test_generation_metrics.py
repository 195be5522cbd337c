"""validate/generation.py on tiny decoders: the reference against itself is perfect, against a perturbed
copy of itself measurably worse, and the greedy divergence point equals a free-running decode's."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from edgeq.llm.reference import TorchStepRunner
from edgeq.validate import generation
from tests.llm.tiny import tiny_llama, token_sequences


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=1)


def perturbed(model, scale: float, seed: int = 7):
    import torch

    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            if p.dim() >= 2:
                p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return other


def test_reference_against_itself_is_perfect(llama):
    ref = TorchStepRunner(llama, 48)
    same = TorchStepRunner(copy.deepcopy(llama), 48)
    report = generation.compare(ref, same, token_sequences(3, 20, seed=2), token_sequences(3, 6, seed=3), 8)
    m = report.metrics()
    assert m["token_agreement"] == 1.0 and m["greedy_agreement"] == 1.0
    assert abs(m["ppl_delta"]) < 1e-4 * m["ppl_reference"]
    assert m["step_cosine_min"] > 0.99999 and m["logit_cosine_min"] > 0.99999
    assert report.greedy.full_matches == 3
    assert all(p.candidate_tokens == p.reference_tokens for p in report.greedy.prompts)
    assert len(report.greedy.drift_by_step()) == 8
    assert report.to_dict()["teacher_forced"]["tokens"] == 3 * 19


def test_perturbed_copy_scores_lower(llama):
    ref = TorchStepRunner(llama, 48)
    noisy = TorchStepRunner(perturbed(llama, 0.5), 48)
    report = generation.compare(ref, noisy, token_sequences(4, 24, seed=2), token_sequences(3, 6, seed=3), 10)
    m = report.metrics()
    assert m["token_agreement"] < 0.9
    assert m["greedy_agreement"] < 1.0
    assert m["logit_cosine_min"] < 0.99
    assert m["ppl_candidate"] != pytest.approx(m["ppl_reference"], rel=1e-3)


def test_divergence_point_matches_free_running_decode(llama):
    ref = TorchStepRunner(llama, 48)
    noisy = TorchStepRunner(perturbed(llama, 0.3), 48)
    result = generation.greedy(ref, noisy, token_sequences(3, 5, seed=9), 10, continuations=True)
    for p in result.prompts:
        cand = p.candidate_tokens
        first = next((i for i, (a, b) in enumerate(zip(p.reference_tokens, cand)) if a != b), p.steps)
        assert first == p.matched


def test_steps_cut_to_context(llama):
    ref = TorchStepRunner(llama, 16)
    result = generation.greedy(ref, TorchStepRunner(llama, 16), [np.arange(10)], 20)
    assert result.prompts[0].steps == 6 and result.agreement == 1.0
