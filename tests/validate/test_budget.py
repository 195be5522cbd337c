"""Budgets: parsing, and holding every output of a drift report to them."""

from __future__ import annotations

import pytest

from edgeq.validate.budget import BudgetSyntaxError, parse_budget
from edgeq.validate.drift import DriftReport, OutputDrift, Status


def _report(cosine: float, sqnr: float, top1=None) -> DriftReport:
    drift = OutputDrift("logits", max_abs=0.1, mean_abs=0.01, rel_l2=0.01, sqnr_db=sqnr, cosine=cosine, cosine_min=cosine, top1=top1)
    return DriftReport(Status.VALIDATED, "test", samples=4, outputs=[drift])


def test_parse_and_hold():
    budget = parse_budget("cosine>=0.999, sqnr_db>=30,max_abs<=0.5")
    assert str(budget) == "cosine>=0.999,sqnr_db>=30,max_abs<=0.5"
    assert budget.violations(_report(0.9995, 40)) == []
    lines = budget.violations(_report(0.99, 20))
    assert len(lines) == 2 and "cosine 0.99 breaks cosine>=0.999" in lines[0] and "'logits'" in lines[0]


def test_metric_absent_for_an_output_is_not_held():
    assert parse_budget("top1>=0.99").violations(_report(1.0, 80, top1=None)) == []
    assert parse_budget("top1>=0.99").violations(_report(1.0, 80, top1=0.5))


def test_empty_budget_holds_nothing():
    assert parse_budget("").violations(_report(0.0, -10)) == []


@pytest.mark.parametrize(
    "text, message",
    [
        ("cosine>0.9", "expected METRIC>=VALUE"),
        ("cosin>=0.9", "unknown metric"),
        ("cosine<=0.9", "better when higher"),
        ("max_abs>=0.1", "better when lower"),
    ],
)
def test_bad_budgets_say_what_would_work(text, message):
    with pytest.raises(BudgetSyntaxError, match=message):
        parse_budget(text)
