"""Drift budgets: `cosine>=0.999,sqnr_db>=30,max_abs<=0.01`, held against every output of a DriftReport."""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

from edgeq.validate.drift import DriftReport

# metric -> the direction that is better; a bound must point the right way (cosine>=, max_abs<=)
METRICS = {
    "cosine": ">=",
    "cosine_min": ">=",
    "sqnr_db": ">=",
    "top1": ">=",
    "top5": ">=",
    "max_abs": "<=",
    "mean_abs": "<=",
    "rel_l2": "<=",
}
# The values each metric can take: a bound outside them can never hold (cosine>=1.5) and is refused at parse.
RANGES = {
    "cosine": (-1.0, 1.0),
    "cosine_min": (-1.0, 1.0),
    "sqnr_db": (-math.inf, math.inf),
    "top1": (0.0, 1.0),
    "top5": (0.0, 1.0),
    "max_abs": (0.0, math.inf),
    "mean_abs": (0.0, math.inf),
    "rel_l2": (0.0, math.inf),
}
_OPS = {">=": operator.ge, "<=": operator.le}
_BOUND = re.compile(r"^\s*([a-z_0-9]+)\s*(>=|<=)\s*([-+0-9.eE]+|[-+]?inf)\s*$")


class BudgetSyntaxError(ValueError):
    pass


@dataclass(frozen=True)
class Bound:
    metric: str
    op: str
    limit: float

    def __str__(self) -> str:
        # the shortest text that reads back as the same float: a manifest's budget re-parses to the same bound
        limit = int(self.limit) if self.limit.is_integer() and abs(self.limit) < 1e15 else self.limit
        return f"{self.metric}{self.op}{limit!r}"


@dataclass(frozen=True)
class Budget:
    bounds: tuple[Bound, ...]

    def __str__(self) -> str:
        return ",".join(str(b) for b in self.bounds)

    def violations(self, report: DriftReport) -> list[str]:
        """Every bound that an output breaks, as readable lines; empty when the report is within budget.
        Token outputs are held on their real positions (the figures a DriftReport gives first), never padding."""
        lines = []
        for output in report.outputs:
            for bound in self.bounds:
                value = output.value(bound.metric)
                if value is None:
                    continue  # e.g. top1 on a non-logits output
                if not _OPS[bound.op](value, bound.limit):
                    where = _positions(output)
                    lines.append(f"output {output.name!r}: {bound.metric} {value:.6g} breaks {bound}{where}")
        return lines


def _positions(output) -> str:
    """For a token output, which positions the figure is over (budgets hold token outputs on real tokens)."""
    if output.positions is None:
        return ""
    return f" (on the {output.positions} of {output.positions_total} token positions {output.mask_input} marks real)"


def parse_budget(text: str | None, require_terms: bool = False) -> Budget:
    """Parse `metric>=value,...`; an empty text is an empty budget (refused with `require_terms`: a user who
    types `--budget ''` most likely lost a shell variable, and would otherwise hold no budget at all)."""
    if not text or not text.strip():
        if require_terms:
            raise BudgetSyntaxError("empty budget; give terms such as 'cosine>=0.999', or 'none' to hold no budget")
        return Budget(())
    bounds = []
    for part in text.split(","):
        match = _BOUND.match(part)
        if not match:
            raise BudgetSyntaxError(f"budget term {part.strip()!r}: expected METRIC>=VALUE or METRIC<=VALUE")
        metric, op, limit = match.groups()
        if metric not in METRICS:
            raise BudgetSyntaxError(f"budget term {part.strip()!r}: unknown metric; known: {', '.join(METRICS)}")
        if op != METRICS[metric]:
            raise BudgetSyntaxError(
                f"budget term {part.strip()!r}: {metric} is better when {'higher' if METRICS[metric] == '>=' else 'lower'}; "
                f"write {metric}{METRICS[metric]}{limit}"
            )
        try:
            value = float(limit)
        except ValueError:
            raise BudgetSyntaxError(f"budget term {part.strip()!r}: {limit!r} is not a number") from None
        low, high = RANGES[metric]
        if (op == ">=" and value > high) or (op == "<=" and value < low):
            raise BudgetSyntaxError(
                f"budget term {part.strip()!r} can never hold: {metric} lies in [{low:g}, {high:g}]"
            )
        bounds.append(Bound(metric, op, value))
    return Budget(tuple(bounds))
