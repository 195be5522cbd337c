"""The README's core promises, each proved by a case that must FAIL when the promise is broken.

Other tests show that good artifacts pass; these show that bad ones do not: weights that differ from the plan
fail the conversion (exit 4, nothing published), an artifact the runtime cannot run is never passed (exit 5,
kept aside as `<precision>.rejected`), the most severe exit code wins, a republished bundle replaces the old one
instead of merging into it, calibration samples never reach validation, changed files are refused, and every
budget term is held. tools/mutation_check.py breaks the code on purpose and expects these to catch it.

Real runtimes (ONNX Runtime) and converters; monkeypatching edgeq's own steps is used only to make a bad
artifact or to observe what the pipeline passes along, never to stand in for a runtime.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.bundle import publish, staging
from edgeq.cli import main
from edgeq.validate.budget import METRICS, parse_budget
from edgeq.validate.drift import DriftReport, OutputDrift, Status
from edgeq.validate.verdict import Verdict, combined_exit_code, verdict_of
from tests.conftest import ONNX

SEVERITY = [4, 5, 6, 0]  # README "Exit codes": when several targets fail, the most severe code wins


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _after_onnx_convert(monkeypatch, hook):
    """Run `hook(request, artifact)` after the real ONNX converter wrote its artifact (to make a bad one)."""
    from edgeq.converters.onnx import OnnxConverter

    original = OnnxConverter.convert

    def convert(self, request, dest):
        artifact = original(self, request, dest)
        hook(request, artifact)
        return artifact

    monkeypatch.setattr(OnnxConverter, "convert", convert)


def _unrunnable(path: Path) -> None:
    """Rewrite an ONNX file so that ONNX Runtime refuses it: its first node becomes an op no runtime has."""
    import onnx

    model = onnx.load(str(path))
    model.graph.node[0].op_type = "EdgeqNoSuchOp"
    onnx.save(model, str(path))


# ---- exit codes and verdicts -----------------------------------------------------------------------------

def test_each_verdict_has_the_documented_exit_code():
    assert {v: v.exit_code for v in Verdict} == {
        Verdict.PASSED: 0, Verdict.NOT_VALIDATED: 0, Verdict.CONVERSION_FAILED: 4,
        Verdict.VALIDATION_FAILED: 5, Verdict.OVER_BUDGET: 6,
    }


def _report(status: str, **metrics) -> DriftReport:
    values = dict(max_abs=0.01, mean_abs=0.001, rel_l2=0.01, sqnr_db=40.0, cosine=0.99, cosine_min=0.98, top1=0.5, top5=0.75)
    values.update(metrics)
    outputs = [OutputDrift("logits", **values)] if status == Status.VALIDATED else []
    return DriftReport(status, "test", samples=2, outputs=outputs, reason=None if status == Status.VALIDATED else "why")


def test_verdict_of_each_run():
    assert verdict_of(_report(Status.VALIDATED), []) == Verdict.PASSED
    assert verdict_of(_report(Status.VALIDATED), ["output 'logits': cosine 0.9 breaks cosine>=0.99"]) == Verdict.OVER_BUDGET
    assert verdict_of(_report(Status.ERROR), []) == Verdict.VALIDATION_FAILED  # the runtime could not run it
    assert verdict_of(_report(Status.NOT_EXECUTED), []) == Verdict.NOT_VALIDATED  # honest: not a pass either


@pytest.mark.parametrize("count", [1, 2, 3])
def test_the_most_severe_exit_code_wins_in_every_combination(count):
    for verdicts in itertools.product(list(Verdict), repeat=count):
        codes = {v.exit_code for v in verdicts}
        expected = next(code for code in SEVERITY if code in codes)
        assert combined_exit_code(verdicts) == expected, verdicts
        assert combined_exit_code(iter(verdicts)) == expected, verdicts  # a generator, as the pipeline passes

    from edgeq.pipeline import Outcome, exit_code

    assert exit_code([Outcome("a", "fp32", Verdict.OVER_BUDGET), Outcome("b", "fp32", Verdict.VALIDATION_FAILED)]) == 5
    assert exit_code([]) == 0


@pytest.mark.parametrize("count", [1, 2, 3])
def test_the_device_run_ranks_refused_first_then_runtime_then_budget(count):
    """`python -m edgeq.device`: refused (3) > runtime could not run (5) > over budget (6) > passed (0)."""
    from edgeq.device.results import BundleRun, exit_code

    def bundle_run(code: int) -> BundleRun:
        check = None if code == 3 else SimpleNamespace(exit_code=code)
        return BundleRun("m/t/p", "here", {}, {}, "manifest", check=check, refused="changed" if code == 3 else None)

    for codes in itertools.product([0, 3, 5, 6], repeat=count):
        expected = next(code for code in (3, 5, 6, 0) if code in codes)
        assert exit_code([bundle_run(c) for c in codes]) == expected, codes


# ---- budgets ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", list(METRICS))
def test_every_budget_term_is_held(metric):
    """Each term of a budget is held on its own, wherever it stands in the text (first, middle or last)."""
    better = METRICS[metric] == ">="
    value = _report(Status.VALIDATED).outputs[0].value(metric)
    # a bound just out of reach, and one comfortably held (both possible: cosines and shares stay <= 1)
    broken = f"{metric}{METRICS[metric]}{((value + 1) / 2 if value < 1 else value * 1.5) if better else value / 2:g}"
    kept = f"{metric}{METRICS[metric]}{value / 2 if better else value * 2:g}"
    others = [m for m in ("cosine", "max_abs") if m != metric]
    held = [f"{m}{METRICS[m]}{0.5 if METRICS[m] == '>=' else 1.0}" for m in others]
    for position in range(len(held) + 1):
        terms = held[:position] + [broken] + held[position:]
        budget = parse_budget(",".join(terms))
        assert len(budget.bounds) == len(terms)
        violations = budget.violations(_report(Status.VALIDATED))
        assert len(violations) == 1 and metric in violations[0], (terms, violations)
        assert parse_budget(",".join(held[:position] + [kept] + held[position:])).violations(_report(Status.VALIDATED)) == []


def test_a_budget_holds_every_output():
    report = _report(Status.VALIDATED)
    report.outputs.append(OutputDrift("embedding", 0.5, 0.1, 0.5, 6.0, 0.8, 0.7))
    violations = parse_budget("cosine>=0.99").violations(report)
    assert violations == ["output 'embedding': cosine 0.8 breaks cosine>=0.99"]


# ---- calibration never reaches validation -----------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 7])
def test_the_split_never_shares_a_sample(seed):
    from edgeq.calibration.data import split

    for count in range(1, 12):
        samples = [{"x": np.full((2,), i, np.float32)} for i in range(count)]
        for calibration_count in range(0, count // 2 + 1):
            calibration, validation = split(samples, calibration_count=calibration_count, seed=seed)
            ids_c = [int(s["x"][0]) for s in calibration]
            ids_v = [int(s["x"][0]) for s in validation]
            assert len(ids_c) == calibration_count and len(ids_v) == count - calibration_count
            assert not set(ids_c) & set(ids_v), (count, calibration_count, ids_c, ids_v)
            assert sorted(ids_c + ids_v) == list(range(count))
            assert ids_c == sorted(ids_c) and ids_v == sorted(ids_v)  # kept in source order


@pytest.fixture(scope="module")
def w8a8_run(tmp_path_factory):
    """tiny_mlp to ONNX w8a8 from an .npz of exactly 4 distinct samples (2 for validation, 2 for calibration),
    observing the calibration samples the pipeline hands to the quantizer."""
    pytest.importorskip("onnxruntime")
    import edgeq.pipeline
    from edgeq.load import load_model
    from edgeq.pipeline import ConvertOptions, convert
    from edgeq.quantize import QuantizeOptions

    root = tmp_path_factory.mktemp("w8a8")
    source = np.stack([np.full((1, 16), i + 1, np.float32) * np.linspace(-1, 1, 16, dtype=np.float32) for i in range(4)])
    np.savez(root / "data.npz", x=source)
    seen = []
    original = edgeq.pipeline.quantization_plan

    def observed(model, profile, precision, options, keep_float, calibration, budget, **compression):
        seen.extend(calibration)
        return original(model, profile, precision, options, keep_float, calibration, budget, **compression)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(edgeq.pipeline, "quantization_plan", observed)
        options = ConvertOptions(
            targets=["onnx"], out=root / "out", precisions=["w8a8"], data=root / "data.npz", samples=2,
            quantize=QuantizeOptions(calibration_samples=2),
        )
        (outcome,) = convert(load_model("edgeq.examples:tiny_mlp"), options)
    return outcome, seen, source


@ONNX
def test_calibration_samples_never_reach_validation(w8a8_run):
    """The source holds exactly validation + calibration samples: each is used once, on one side."""
    from edgeq.bundle import read_golden

    outcome, calibration, source = w8a8_run
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    inputs, _ = read_golden(outcome.path / "golden.npz")
    validated = {s["x"].tobytes() for s in inputs}
    calibrated = {s["x"].tobytes() for s in calibration}
    assert len(validated) == 2 and len(calibrated) == 2
    assert not validated & calibrated
    assert validated | calibrated == {s.tobytes() for s in source}
    data = json.loads((outcome.path / "manifest.json").read_text())["validation"]["data"]
    assert "calibration" in json.dumps(data)  # the manifest records the split


# ---- weight parity: the artifact's numbers are the plan's -----------------------------------------------

def _plan_and_stored(scale_factor: float = 1.0, code_change: int = 0):
    """A two-layer int8 plan and the weights an artifact stores for it (built in code: no runtime needed)."""
    from edgeq.converters.parity import StoredWeights
    from edgeq.plan import LayerPlan, OpKind, PerChannel, QDtype, QuantPlan, TensorQuant

    rng = np.random.default_rng(0)
    plan, stored = QuantPlan("int8-weight", "onnx"), {}
    for fqn in ("encoder.0", "head"):
        weight = rng.standard_normal((4, 8)).astype(np.float32)
        scale = (np.abs(weight).max(axis=1) / 127).astype(np.float32)
        quant = TensorQuant(QDtype.INT8, PerChannel(0), True, scale, np.zeros(4, np.int32))
        codes = quant.quantize(weight)
        plan.layers[fqn] = LayerPlan(fqn, OpKind.LINEAR, weight=quant, weight_codes=codes)
        stored[fqn] = (codes.copy(), scale.copy())
    codes, scale = stored["head"]
    codes.flat[3] += code_change
    stored["head"] = (codes, (scale * np.float32(scale_factor)).astype(np.float32))
    return plan, StoredWeights(stored, {f"{fqn}.weight.codes" for fqn in stored})


def test_weight_parity_compares_codes_and_scales():
    from edgeq.converters.parity import compare_weights

    plan, stored = _plan_and_stored()
    assert compare_weights(plan, stored).mismatches == []
    one_ulp = float(np.nextafter(np.float32(1), np.float32(2)))  # the smallest change a float32 scale can show
    mismatches = compare_weights(*_plan_and_stored(scale_factor=one_ulp)).mismatches
    assert len(mismatches) == 1 and mismatches[0].startswith("head: scales differ"), mismatches
    assert compare_weights(*_plan_and_stored(code_change=1)).mismatches == ["head: 1 weight codes differ"]


@ONNX
def test_weight_parity_reads_the_artifact_and_reports_any_difference(w8a8_run):
    """Read back from the real artifact, the weights equal the plan's; a plan differing by one float32 ulp in
    one scale, or by one code, is reported for that layer (a parity check that ignores scales would pass it)."""
    import copy

    from edgeq.converters.parity import artifact_weights, compare_weights
    from edgeq.plan import QuantPlan

    outcome, _, _ = w8a8_run
    plan = QuantPlan.load(outcome.path)
    stored = artifact_weights(outcome.path / "model.onnx", "onnx")
    clean = compare_weights(plan, stored)
    assert clean.checked == 2 and clean.mismatches == [] and clean.missing == []

    fqn = next(f for f, layer in plan.layers.items() if layer.weight is not None)
    nudged = copy.deepcopy(plan)
    layer = nudged.layers[fqn]
    layer.weight.scale = layer.weight.scale.copy()
    layer.weight.scale.flat[0] = np.nextafter(layer.weight.scale.flat[0], np.float32(np.inf))
    result = compare_weights(nudged, stored)
    assert len(result.mismatches) == 1 and result.mismatches[0].startswith(f"{fqn}: scales differ"), result.mismatches

    recoded = copy.deepcopy(plan)
    codes = recoded.layers[fqn].weight_codes
    codes.flat[0] = codes.flat[0] + (1 if codes.flat[0] < 127 else -1)
    result = compare_weights(recoded, stored)
    assert result.mismatches == [f"{fqn}: 1 weight codes differ"], result.mismatches


@ONNX
def test_weights_that_differ_from_the_plan_fail_with_exit_4_and_publish_nothing(w8a8_run, tmp_path, monkeypatch):
    """The converter's artifact no longer matches the plan (one scale one ulp off): the run stops with exit 4,
    names the layer, publishes no bundle (not even a rejected one) and keeps the previous good bundle."""
    outcome, _, _ = w8a8_run
    out = tmp_path / "out"
    previous = out / "tiny_mlp" / "onnx" / "int8-weight"
    shutil.copytree(outcome.path, previous)  # a good bundle already there (its contents do not matter here)
    before = _snapshot(previous)
    changed = []

    def nudge_a_scale(request, artifact):
        if request.plan is None:
            return
        fqn, layer = next((f, l) for f, l in request.plan.layers.items() if l.weight is not None)
        layer.weight.scale = np.nextafter(layer.weight.scale, np.float32(np.inf)).astype(np.float32)
        changed.append(fqn)

    _after_onnx_convert(monkeypatch, nudge_a_scale)
    result = run("convert", "edgeq.examples:tiny_mlp", "-t", "onnx", "-p", "int8-weight", "--samples", "2",
                 "--calibration-samples", "2", "--out", out)
    assert changed, "the converter hook never ran"
    assert result.exit_code == 4, result.output
    assert "weight parity failed" in result.output and f"{changed[0]}: scales differ" in result.output.replace("\n", "")
    assert _snapshot(previous) == before
    assert sorted(p.name for p in previous.parent.iterdir()) == ["int8-weight"]  # no .rejected, no staging left


# ---- an artifact the runtime cannot run is never passed ----------------------------------------------------

@ONNX
def test_an_artifact_the_runtime_cannot_run_exits_5_and_is_kept_aside(tmp_path, monkeypatch):
    _after_onnx_convert(monkeypatch, lambda request, artifact: _unrunnable(artifact.path))
    result = run("convert", "edgeq.examples:tiny_mlp", "-t", "onnx", "-p", "fp32", "--samples", "2", "--out", tmp_path)
    assert result.exit_code == 5, result.output
    assert "EdgeqNoSuchOp" in result.output or "could not load" in result.output, result.output
    folder = tmp_path / "tiny_mlp" / "onnx"
    assert not (folder / "fp32").exists()  # the canonical path only holds bundles that passed
    manifest = json.loads((folder / "fp32.rejected" / "manifest.json").read_text())
    assert manifest["budget"]["verdict"] == "validation_failed"
    assert manifest["validation"]["status"] == "error"


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory) -> Path:
    """A good tiny_mlp ONNX FP32 bundle written by `edgeq convert` (copy it before changing it)."""
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("fp32")
    result = run("convert", "edgeq.examples:tiny_mlp", "-t", "onnx", "-p", "fp32", "--samples", "2", "--out", out)
    assert result.exit_code == 0, result.output
    return out / "tiny_mlp" / "onnx" / "fp32"


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "tiny_mlp" / "onnx" / "fp32"
    shutil.copytree(bundle, dest)
    return dest


def _rehash(bundle: Path, part: str) -> None:
    """Record the file's current sha256 in the manifest, as if edgeq had written it so."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    path = bundle / manifest[part]["file"]
    manifest[part]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@ONNX
def test_validate_exits_5_when_the_runtime_cannot_run_a_checksummed_artifact(fp32_bundle, tmp_path):
    bundle = _copy(fp32_bundle, tmp_path)
    _unrunnable(bundle / "model.onnx")
    _rehash(bundle, "artifact")
    result = run("validate", bundle)
    assert result.exit_code == 5, result.output


@ONNX
def test_a_good_bundle_validates(fp32_bundle, tmp_path):
    result = run("validate", _copy(fp32_bundle, tmp_path))
    assert result.exit_code == 0 and "passed" in result.output, result.output


# ---- tamper refusal --------------------------------------------------------------------------------------

def _flip(path: Path, offset: int = 200) -> None:
    data = bytearray(path.read_bytes())
    data[min(offset, len(data) - 1)] ^= 0x01
    path.write_bytes(bytes(data))


@ONNX
@pytest.mark.parametrize("victim", ["model.onnx", "golden.npz"])
def test_a_changed_file_is_refused_with_exit_3(fp32_bundle, tmp_path, victim):
    bundle = _copy(fp32_bundle, tmp_path)
    _flip(bundle / victim)
    result = run("validate", bundle)
    assert result.exit_code == 3, result.output
    assert victim in result.output and "does not match the manifest" in result.output


@ONNX
def test_changed_golden_outputs_are_refused_even_when_the_npz_is_valid(fp32_bundle, tmp_path):
    """Golden outputs rewritten to match a bad artifact (a valid .npz, other numbers) are refused, not held."""
    bundle = _copy(fp32_bundle, tmp_path)
    with np.load(bundle / "golden.npz") as golden:
        arrays = {k: golden[k] for k in golden.files}
    for key in arrays:
        if key.startswith("output/"):
            arrays[key] = arrays[key] * 2
    with open(bundle / "golden.npz", "wb") as handle:
        np.savez(handle, **arrays)
    result = run("validate", bundle)
    assert result.exit_code == 3 and "golden.npz" in result.output, result.output


@ONNX
def test_a_missing_artifact_is_refused(fp32_bundle, tmp_path):
    bundle = _copy(fp32_bundle, tmp_path)
    (bundle / "model.onnx").unlink()
    result = run("validate", bundle)
    assert result.exit_code == 3 and "model.onnx" in result.output, result.output


# ---- publishing replaces, atomically -------------------------------------------------------------------

def _publish(dest: Path, files: dict[str, str]) -> None:
    with staging(dest) as stage:
        for name, text in files.items():
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            (stage / name).write_text(text)
    publish(stage, dest)


def test_republishing_replaces_the_old_bundle_instead_of_merging():
    """A file the new bundle lacks (a previous run's sensitivity.json, say) must not survive a republish."""
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        dest = Path(root) / "m" / "onnx" / "w8a8"
        _publish(dest, {"manifest.json": "old", "sensitivity.json": "old", "sub/old.txt": "old"})
        _publish(dest, {"manifest.json": "new"})
        assert _snapshot(dest) == {"manifest.json": b"new"}
        assert sorted(p.name for p in dest.parent.iterdir()) == ["w8a8"]  # no staging or old copies left


def test_a_publish_that_fails_puts_the_previous_bundle_back(tmp_path, monkeypatch):
    dest = tmp_path / "m" / "onnx" / "fp32"
    _publish(dest, {"manifest.json": "good", "model.onnx": "good"})
    with staging(dest) as stage:
        (stage / "manifest.json").write_text("new")
    real_rename = os.rename

    def rename(source, target):
        if Path(source) == stage:
            raise OSError("disk full (simulated) while moving the new bundle into place")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        publish(stage, dest)
    monkeypatch.undo()
    assert _snapshot(dest) == {"manifest.json": b"good", "model.onnx": b"good"}


@ONNX
def test_a_rerun_replaces_a_bundle_with_stray_files(fp32_bundle, tmp_path):
    """End to end: a bundle folder holding a file from elsewhere is replaced whole by the rerun."""
    bundle = _copy(fp32_bundle, tmp_path)
    (bundle / "stray.txt").write_text("left by an older run")
    result = run("convert", "edgeq.examples:tiny_mlp", "-t", "onnx", "-p", "fp32", "--samples", "2", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in bundle.iterdir()) == ["golden.npz", "manifest.json", "model.onnx", "report.json"]


# ---- several targets: the most severe code, end to end -------------------------------------------------

@ONNX
def test_a_refused_target_outranks_one_over_budget(tmp_path):
    """Core ML refuses int8-dynamic (4); ONNX converts it but misses an impossible budget (6): exit 4, and the
    ONNX bundle is kept aside as int8-dynamic.rejected."""
    result = run("convert", "edgeq.examples:tiny_mlp", "-t", "coreml,onnx", "-p", "int8-dynamic", "--samples", "2",
                 "--calibration-samples", "2", "--budget", "sqnr_db>=300", "--out", tmp_path)
    assert result.exit_code == 4, result.output
    folder = tmp_path / "tiny_mlp" / "onnx"
    assert sorted(p.name for p in folder.iterdir()) == ["int8-dynamic.rejected"]
    manifest = json.loads((folder / "int8-dynamic.rejected" / "manifest.json").read_text())
    assert manifest["budget"]["verdict"] == "over_budget" and manifest["budget"]["violations"]
    assert not (tmp_path / "tiny_mlp" / "coreml").exists()
