"""Tiny convert-and-validate helper for converter tests."""

from __future__ import annotations

from pathlib import Path

from edgeq.load import load_model
from edgeq.pipeline import ConvertOptions, convert


def convert_source(source: str, target: str, precision: str, out: Path, **load_args):
    """Run the whole pipeline for one target/precision and return its Outcome."""
    model = load_model(source, **load_args)
    options = ConvertOptions(targets=[target], out=out, precisions=[precision], samples=8)
    (outcome,) = convert(model, options)
    return outcome
