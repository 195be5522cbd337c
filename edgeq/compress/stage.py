"""What a compression stage (prune, low-rank, recover) hands to the rest of the pipeline.

Each stage is a function `stage(module, spec, ...) -> StageResult` in its own module (edgeq/compress/prune_*.py,
sparsity.py, lowrank.py, edgeq/recover/). A stage never mutates the module it is given: it returns a changed copy,
and says per layer what it did, so the plan, the manifest and the report can show it. Converters stay unaware of
how a weight came to be: they see an ordinary, smaller (or sparser) nn.Module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageResult:
    module: Any  # the compressed nn.Module (a copy; eval mode)
    stage: str  # "prune", "lowrank", "recover"
    spec: str  # the user's spec text, e.g. "structured:0.5", "2:4:sparsegpt", "rank:0.5"
    # per torch FQN of the *input* module: what was done, JSON-able, e.g.
    #   {"out_channels": [64, 32]}, {"heads": [12, 8], "removed": [0, 5, 7, 9]},
    #   {"sparsity": 0.5, "pattern": "2:4"}, {"rank": 96, "full_rank": 384, "energy": 0.93, "params": [147456, 73728]}
    layers: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # one line each, for the plan notes and the report
    skipped: dict[str, str] = field(default_factory=dict)  # FQN -> why this layer was left as it was
    seconds: float = 0.0  # wall-clock time of the stage (reported as timing, never in plan.json)

    def to_json(self) -> dict:
        return {"stage": self.stage, "spec": self.spec, "layers": self.layers, "notes": list(self.notes),
                "skipped": dict(self.skipped)}
