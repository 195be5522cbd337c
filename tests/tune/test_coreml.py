"""`edgeq tune` on a Core ML target (the `coreml` profile) with the tiny MLP of tests/tune/tiny.py: one plan mixing
int4 groups, a 4-bit palette and int8, validated by edgeq's MIL reference executor (and the report says so, never
Apple's runtime), `edgeq validate` passing on the chosen bundle, and tuned.toml making the same artifact bytes."""

from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from tests.conftest import COREML

pytestmark = COREML

SOURCE = "tests.tune.tiny:build"
SMALL = ["--samples", "8", "--calibration-samples", "16", "--name", "tiny"]
EXECUTOR = "edgeq MIL reference executor"


def _digests(package) -> dict[str, str]:
    """sha256 of every file of a .mlpackage, by its path inside it."""
    return {str(p.relative_to(package)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(package.rglob("*")) if p.is_file()}


def test_a_tuned_core_ml_plan_converts_validates_and_reproduces(tmp_path):
    out = tmp_path / "tune"
    result = CliRunner().invoke(main, ["tune", SOURCE, "-t", "coreml", "--budget", "cosine>=0.99", "-o", str(out),
                                       "--uniform", "int8-weight", "--choices", "int4:g32,lut4,int8,float", *SMALL])
    assert result.exit_code == 0, result.output
    folder = out / "tiny"
    (target,) = json.loads((folder / "tune.json").read_text())["targets"]
    assert target["profile"] == "coreml" and target["plan_precision"] == "int4-weight"
    assert target["choices"] == ["int4:g32", "lut4", "int8", "float"] and not target["choices_excluded"]
    chosen = target["chosen"]
    assert chosen["kind"] == "tuned" and chosen["verdict"] == "passed" and chosen["cosine"] >= 0.99, result.output
    uniform = next(c for c in target["candidates"] if c["label"] == "int8-weight")
    assert uniform["verdict"] == "passed" and chosen["size_bytes"] < uniform["size_bytes"]
    # the plan spends bits unevenly, across the target's formats: palettes, int4 groups and int8 in one program
    layers = {row["layer"]: row for row in target["layers"]}
    assert set(chosen["per_layer"]) == set(layers) == {"up", "mid", "down", "head"}
    assert layers["mid"]["choice"] == "int8" and layers["mid"]["sensitivity_rank"] == 1
    assert {"lut4", "int8"} <= {row["choice"] for row in layers.values()}
    assert all("sensitivity rank" in row["why"] and "cosine>=0.99" in row["why"] for row in layers.values())
    # validated by edgeq's MIL reference executor, and the pages say so; latency is an estimate, said as such
    assert target["validated_by"].startswith(EXECUTOR) and "not Apple's Core ML runtime" in target["validated_by"]
    assert target["latency_method"].startswith("estimated, not measured")
    page, markdown = (folder / "tune.html").read_text(), (folder / "tune.md").read_text()
    assert EXECUTOR in page and EXECUTOR in markdown and "ms (estimated)" in markdown
    bundle = folder / "coreml" / "int4-weight"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["budget"]["verdict"] == "passed" and manifest["validation"]["executor"].startswith(EXECUTOR)
    check = CliRunner().invoke(main, ["validate", str(bundle), "--budget", "cosine>=0.99"])
    assert check.exit_code == 0, check.output

    again = CliRunner().invoke(main, ["convert", "-c", str(folder / "tuned.toml"), "-o", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    copy = tmp_path / "again" / "tiny" / "coreml" / "int4-weight"
    plans = [json.loads((b / "plan.json").read_text())["layers"] for b in (bundle, copy)]
    assert {k: v.get("weight") for k, v in plans[0].items()} == {k: v.get("weight") for k, v in plans[1].items()}
    assert _digests(bundle / "model.mlpackage") == _digests(copy / "model.mlpackage")  # same plan, same program and weights
