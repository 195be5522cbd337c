"""The verdict on one artifact, and the exit code it maps to."""

from __future__ import annotations

from enum import StrEnum

from edgeq.validate.drift import DriftReport, Status


class Verdict(StrEnum):
    PASSED = "passed"  # validated in the runtime and within budget
    NOT_VALIDATED = "not_validated"  # converted, but this machine cannot run the runtime
    OVER_BUDGET = "over_budget"  # validated, drift over budget: kept as <precision>.rejected
    VALIDATION_FAILED = "validation_failed"  # the runtime could not run the artifact
    CONVERSION_FAILED = "conversion_failed"  # refused or failed before an artifact existed

    @property
    def exit_code(self) -> int:
        return _EXIT_CODES[self]


_EXIT_CODES = {
    Verdict.PASSED: 0,
    Verdict.NOT_VALIDATED: 0,
    Verdict.CONVERSION_FAILED: 4,
    Verdict.VALIDATION_FAILED: 5,
    Verdict.OVER_BUDGET: 6,
}


def verdict_of(report: DriftReport, violations: list[str]) -> Verdict:
    if report.status == Status.NOT_EXECUTED:
        return Verdict.NOT_VALIDATED
    if report.status == Status.ERROR:
        return Verdict.VALIDATION_FAILED
    return Verdict.OVER_BUDGET if violations else Verdict.PASSED


def combined_exit_code(verdicts) -> int:
    """The most severe verdict decides: conversion (4) > validation (5) > budget (6) > success (0)."""
    codes = {v.exit_code for v in verdicts} - {0}
    return next((code for code in (4, 5, 6) if code in codes), 0)
