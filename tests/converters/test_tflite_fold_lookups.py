"""An int8 table looked up at constant indices (BERT's positions) is folded into the float rows it produces
(converters/tflite_fold_lookups.py): no run-time EMBEDDING_LOOKUP for it, outputs bit-identical to the lookup's,
and weight parity checks the rows against the plan's codes x scale (and fails when they differ)."""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from edgeq.validate.verdict import Verdict
from tests.conftest import TFLITE
from tests.helpers import convert_source

pytestmark = TFLITE


class Positions(nn.Module):
    """Word and position embeddings (positions from a buffer, as BERT's), a LayerNorm and a linear head."""

    def __init__(self, vocab=40, width=16, max_positions=32):
        super().__init__()
        self.word, self.position = nn.Embedding(vocab, width), nn.Embedding(max_positions, width)
        self.register_buffer("position_ids", torch.arange(max_positions)[None], persistent=False)
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 8)

    def forward(self, input_ids):
        positions = self.position_ids[:, : input_ids.shape[1]]
        return self.head(self.norm(self.word(input_ids) + self.position(positions)))


def positions():
    torch.manual_seed(0)
    return Positions().eval(), (torch.randint(0, 40, (1, 12)),)


def _lookups(path):
    from ai_edge_litert.interpreter import Interpreter

    return sum(op["op_name"] == "EMBEDDING_LOOKUP" for op in Interpreter(model_path=str(path))._get_ops_details())


def _run(path, ids):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner()
    (name,) = runner.get_input_details()
    return next(iter(runner(**{name: ids.astype(np.int32)}).values()))


def test_position_lookup_is_folded_into_the_plans_rows(tmp_path, monkeypatch):
    from edgeq.converters import tflite_fold_lookups
    from edgeq.converters.parity import compare_weights
    from edgeq.converters.parity_tflite import tflite_weights
    from edgeq.plan import QuantPlan

    outcome = convert_source("tests.converters.test_tflite_fold_lookups:positions", "tflite", "int8-dynamic", tmp_path / "folded")
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    assert "folded into float32 rows" in json.dumps(manifest) and "position" in json.dumps(manifest)
    parity = manifest["weight_parity"]
    assert parity["mismatches"] == [] and parity["missing"] == [] and parity["checked_layers"] == 3  # word, position, head
    assert _lookups(outcome.path / "model.tflite") == 1  # the word lookup only

    monkeypatch.setattr(tflite_fold_lookups, "fold_constant_lookups", lambda *args: [])
    unfolded = convert_source("tests.converters.test_tflite_fold_lookups:positions", "tflite", "int8-dynamic", tmp_path / "lookup")
    assert _lookups(unfolded.path / "model.tflite") == 2
    for seed in range(3):
        ids = np.random.default_rng(seed).integers(0, 40, (1, 12))
        assert np.array_equal(_run(outcome.path / "model.tflite", ids), _run(unfolded.path / "model.tflite", ids))  # bit for bit

    # Parity reads the rows back: a changed row is a mismatch, not a pass.
    plan = QuantPlan.load(outcome.path)
    stored = tflite_weights(outcome.path / "model.tflite")
    start, rows = stored.folded_rows["position"]
    assert start == 0 and rows.shape == (12, 16)
    rows = rows.copy()
    rows[3, 5] += 1e-3
    stored.folded_rows["position"] = (start, rows)
    assert any("position: the folded rows" in m for m in compare_weights(plan, stored).mismatches)
