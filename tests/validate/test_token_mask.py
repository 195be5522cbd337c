"""Token outputs: drift measured on the positions attention_mask marks real, the all-positions figure beside."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeq.bundle import read_golden, read_golden_token_outputs, write_golden
from edgeq.validate.budget import parse_budget
from edgeq.validate.drift import compare
from edgeq.validate.token_mask import token_masks, token_outputs

SEQ, HIDDEN = 8, 6


def _padded_samples(lengths, seed=0):
    """Inputs with a 0/1 attention_mask and references shaped like a text model's: [1, seq, hidden] token states,
    [1, hidden] pooled, [1, seq] per-token scores; the artifact matches PyTorch on real tokens and is noise on padding."""
    rng = np.random.default_rng(seed)
    inputs, refs, cands = [], [], []
    for length in lengths:
        mask = (np.arange(SEQ) < length).astype(np.int64)[None]
        inputs.append({"input_ids": rng.integers(0, 99, (1, SEQ)), "attention_mask": mask})
        ref = {"last_hidden_state": rng.standard_normal((1, SEQ, HIDDEN)), "pooled": rng.standard_normal((1, HIDDEN)),
               "start_logits": rng.standard_normal((1, SEQ))}
        cand = {k: v + 1e-4 * rng.standard_normal(v.shape) for k, v in ref.items()}
        cand["last_hidden_state"][0, length:] = 5 * rng.standard_normal((SEQ - length, HIDDEN))  # padding: garbage
        refs.append(ref)
        cands.append(cand)
    return inputs, refs, cands


NAMES = ["last_hidden_state", "pooled", "start_logits"]


def test_only_outputs_shaped_batch_seq_then_more_are_token_outputs():
    inputs, refs, _ = _padded_samples([3, 5])
    assert token_outputs(inputs, refs, NAMES) == {"last_hidden_state": "attention_mask"}
    # a pooled output whose width equals the sequence length is not one: [batch, seq] alone cannot be told apart
    square = [{**r, "pooled": np.zeros((1, SEQ))} for r in refs]
    assert "pooled" not in token_outputs(inputs, square, ["pooled"])
    assert token_outputs([{k: v for k, v in s.items() if k != "attention_mask"} for s in inputs], refs, NAMES) == {}
    additive = [{**s, "attention_mask": np.where(s["attention_mask"] > 0, 0.0, -np.inf)} for s in inputs]
    assert token_outputs(additive, refs, NAMES) == {}  # 0 means *real* there: not read as positions


def test_token_outputs_are_judged_on_real_positions_with_the_unmasked_figure_beside():
    inputs, refs, cands = _padded_samples([3, 5, 8, 1])
    report = compare(refs, cands, NAMES, "test", token_masks(inputs, refs, NAMES))
    hidden, pooled, start = report.outputs
    assert (hidden.mask_input, hidden.positions, hidden.positions_total) == ("attention_mask", 17, 32)
    assert hidden.cosine > 0.9999 and hidden.sqnr_db > 60  # real tokens: only the 1e-4 noise
    assert hidden.unmasked["cosine"] < 0.8 and hidden.unmasked["sqnr_db"] < 5  # padding's garbage counted
    assert pooled.positions is None and pooled.unmasked is None and start.positions is None
    budget = parse_budget("cosine>=0.999,sqnr_db>=30")
    assert budget.violations(report) == []
    strict = parse_budget("sqnr_db>=200").violations(report)
    assert "on the 17 of 32 token positions attention_mask marks real" in strict[0]
    data = json.loads(json.dumps(report.to_json()))
    assert data["outputs"][0]["positions"] == 17 and data["outputs"][0]["unmasked"]["cosine"] < 0.8
    assert "over all positions, padding included: cosine" in hidden.positions_note()


def test_a_sample_with_no_real_token_drops_out_of_the_mean_cosine():
    inputs, refs, cands = _padded_samples([4, 0])
    report = compare(refs, cands, NAMES, "test", token_masks(inputs, refs, NAMES))
    assert report.outputs[0].positions == 4 and report.outputs[0].cosine_min > 0.9999


def test_golden_files_record_the_token_outputs_and_old_ones_compare_every_position(tmp_path):
    inputs, refs, cands = _padded_samples([3, 5])
    write_golden(tmp_path / "golden.npz", inputs, refs)
    assert read_golden_token_outputs(tmp_path / "golden.npz") == {"last_hidden_state": "attention_mask"}
    golden_inputs, golden_refs = read_golden(tmp_path / "golden.npz")
    assert list(golden_refs[0]) == NAMES and list(golden_inputs[0]) == ["input_ids", "attention_mask"]
    with np.load(tmp_path / "golden.npz") as archive:  # a golden file from before: inputs and outputs only
        np.savez(tmp_path / "old.npz", **{k: archive[k] for k in archive.files if not k.startswith("token_mask/")})
    assert read_golden_token_outputs(tmp_path / "old.npz") == {}
    masks = token_masks(inputs, refs, NAMES, recorded={})
    assert compare(refs, cands, NAMES, "test", masks).outputs[0].positions is None


def test_a_recorded_token_output_that_no_longer_fits_its_mask_is_refused():
    inputs, refs, _ = _padded_samples([3])
    with pytest.raises(ValueError, match="output 'pooled', sample 0: the golden file marks it a token output"):
        token_masks(inputs, refs, NAMES, recorded={"pooled": "attention_mask"})
