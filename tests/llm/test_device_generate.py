"""`python -m edgeq.device` on text-generation bundles: a greedy generate loop with numpy and the runtime only,
from the prompts in generation.json, held against the golden continuations (edgeq/device/generate.py)."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")

from edgeq.device.cli import main as device_main
from edgeq.hashing import sha256_path
from tests.llm.tiny import save_folder, tiny_decoder, word_texts

REPO = Path(__file__).resolve().parents[2]
# Run the device CLI with an import hook that refuses the host's heavy packages and records every attempt, so an
# import caught and ignored somewhere still shows.
NO_TORCH = """
import importlib.abc, json, sys
HEAVY = {"torch", "transformers", "litert_torch", "onnx", "tensorflow", "coremltools", "click"}
tried = []
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            tried.append(name)
            raise ImportError(f"{name} is not on this device")
sys.meta_path.insert(0, Refuse())
from edgeq.device.cli import main
code = main(sys.argv[1:])
print("TRIED", json.dumps(sorted(set(tried))))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama converted for onnx (fp32; int4-weight with an int8 KV cache) and tflite (fp32), three prompts of
    12 word tokens each."""
    from edgeq.llm.pipeline import Options, run

    work = tmp_path_factory.mktemp("device-generate")
    folder = save_folder(tiny_decoder("llama"), work / "tiny-llama")
    data = work / "texts.txt"
    data.write_text("\n".join(word_texts(5, 12, seed=7)) + "\n")
    for target, precision, kv_cache in (("onnx", "fp32", "float"), ("onnx", "int4-weight", "int8"), ("tflite", "fp32", "float")):
        code = run(Options(str(folder), [target], [precision], work / "out", max_context=32, data=data, samples=3,
                           calibration_samples=2, kv_cache=kv_cache), echo=lambda *_: None)
        assert code == 0
    root = work / "out" / "tiny-llama"
    return {"onnx": root / "onnx" / "fp32", "onnx-int4": root / "onnx" / "int4-weight", "tflite": root / "tflite" / "fp32"}


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "tiny-llama" / bundle.parent.name / bundle.name
    shutil.copytree(bundle, dest)
    return dest


def edit_golden(bundle: Path, change, *, reseal: bool) -> None:
    """Apply `change` to generation.json; with `reseal`, record its new sha256 in the manifest (as if the host's
    artifact had decoded differently), else leave the manifest as written (a changed file)."""
    path = bundle / "generation.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))
    if reseal:
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["generation"]["sha256"] = sha256_path(path)
        (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_generation_json_holds_prompts_both_goldens_and_how_to_drive_the_artifact(bundles):
    for key, bundle in bundles.items():
        record = json.loads((bundle / "generation.json").read_text())
        report = json.loads((bundle / "report.json").read_text())
        manifest = json.loads((bundle / "manifest.json").read_text())
        assert manifest["generation"]["sha256"] == sha256_path(bundle / "generation.json")
        assert manifest["artifact"]["sha256"] == sha256_path(bundle / manifest["artifact"]["file"])
        assert record["format"] == "edgeq-generation" and record["max_context"] == 32 and record["new_tokens"] == 20
        assert record["eos_token_ids"] == [2]  # LlamaConfig's default
        assert len(record["prompts"]) == 3
        for prompt, validated in zip(record["prompts"], report["prompts"]):
            assert len(prompt["ids"]) == 12 and prompt["steps"] == validated["steps"] == 20
            assert prompt["artifact_tokens"] == validated["candidate_tokens"]  # reused, not decoded again
            assert prompt["fp32_tokens"] == validated["reference_tokens"]
            assert prompt["text"].startswith("w")
        assert record["io"]["cache"]["layers"] == 2 and record["io"]["cache"]["kv_heads"] == 2
    assert json.loads((bundles["onnx"] / "generation.json").read_text())["session"] == {"threads": 1}
    # the int8 cache is quantized inside the graph: the device carries int8 codes, nothing else to know
    assert json.loads((bundles["onnx-int4"] / "generation.json").read_text())["io"]["cache"]["dtype"] == "int8"
    assert json.loads((bundles["tflite"] / "generation.json").read_text())["io"]["signatures"]["prefill"] == 32


def test_device_runs_onnx_and_tflite_bundles_from_a_lab_archive_without_torch(bundles, tmp_path):
    from edgeq.device.archive import pack

    lab = tmp_path / "lab.zip"
    pack([bundles["onnx"], bundles["tflite"], bundles["onnx-int4"]], lab)
    packed = set(zipfile.ZipFile(lab).namelist())
    assert {"tiny-llama/onnx/int4-weight/generation.json", "tiny-llama/onnx/int4-weight/kv_scales.npz",
            "tiny-llama/onnx/fp32/genai_config.json", "tiny-llama/tflite/fp32/model.tflite"} <= packed
    out_json, out_xml = tmp_path / "result.json", tmp_path / "result.xml"
    result = subprocess.run([sys.executable, "-c", NO_TORCH, str(lab), "--json", str(out_json), "--junit", str(out_xml)],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TRIED []" in result.stdout, result.stdout
    assert result.stdout.count("equals the golden") == 9 and "3 bundle(s): 3 passed; exit 0" in result.stdout

    data = json.loads(out_json.read_text())
    assert data["verdict"] == "passed" and data["exit_code"] == 0
    entries = {entry["bundle"]: entry for entry in data["bundles"]}
    assert set(entries) == {"tiny-llama/onnx/fp32", "tiny-llama/tflite/fp32", "tiny-llama/onnx/int4-weight"}
    for name, entry in entries.items():
        generation = entry["generation"]
        assert entry["task"] == "text-generation" and entry["verdict"] == "passed"
        assert entry["budget"] == {"terms": "greedy_match>=1", "source": "default"}
        assert generation["metrics"]["greedy_match"] == 1.0 and all(p["equal"] for p in generation["prompts"])
        assert generation["speed"]["decode_tokens_per_s"] > 0
    assert entries["tiny-llama/onnx/fp32"]["generation"]["metrics"]["fp32_match"] == 1.0
    assert entries["tiny-llama/tflite/fp32"]["executor"].startswith(("ai-edge-litert", "tflite-runtime"))
    suites = ET.parse(out_xml).getroot()
    assert suites.get("tests") == "9" and suites.get("failures") == "0"
    assert [case.get("name") for case in suites.find("testsuite").iter("testcase")] == ["prompt 0", "prompt 1", "prompt 2"]


def test_a_changed_golden_is_refused(bundles, tmp_path, capsys):
    bundle = copy_bundle(bundles["onnx"], tmp_path)
    edit_golden(bundle, lambda r: r["prompts"][0]["artifact_tokens"].reverse(), reseal=False)
    assert device_main([str(bundle)]) == 3
    assert "generation.json: sha256" in capsys.readouterr().out


def test_leaving_the_golden_is_over_budget_and_a_looser_budget_holds(bundles, tmp_path, capsys):
    bundle = copy_bundle(bundles["tflite"], tmp_path)

    def last_token_differs(record):
        tokens = record["prompts"][1]["artifact_tokens"]
        tokens[-1] = (tokens[-1] + 1) % 256 if (tokens[-1] + 1) % 256 != 2 else 3  # never the EOS id

    edit_golden(bundle, last_token_differs, reseal=True)
    golden = json.loads((bundle / "generation.json").read_text())["prompts"][1]["artifact_tokens"]
    cut = golden.index(2) + 1 if 2 in golden[:-1] else len(golden)
    out_json, out_xml = tmp_path / "r.json", tmp_path / "r.xml"
    code = device_main([str(bundle), "--json", str(out_json), "--junit", str(out_xml)])
    printed = capsys.readouterr().out
    if cut < len(golden):
        pytest.skip("the golden ends at an EOS before its last token; the change is past what is compared")
    assert code == 6, printed
    assert f"prompt 1 (12 tokens): leaves the golden at token {len(golden) - 1} of {len(golden)}" in printed
    entry = json.loads(out_json.read_text())["bundles"][0]
    assert entry["verdict"] == "over_budget" and entry["violations"][0].startswith("greedy_match")
    assert entry["generation"]["prompts"][1]["first_divergence"]["step"] == len(golden) - 1
    failed = [case.get("name") for case in ET.parse(out_xml).getroot().iter("testcase") if case.find("failure") is not None]
    assert failed == ["prompt 1"]
    assert device_main([str(bundle), "--budget", "greedy_match>=0.9,fp32_match>=0.9"]) == 0


@pytest.mark.parametrize("budget, message", [("cosine>=0.9", "greedy_match>=R"), ("greedy_match>=1.5", "R from 0 to 1"),
                                             ("greedy_match<=0.5", "greedy_match>=R"), ("greedy_match>=1.2.3", "R from 0 to 1")])
def test_budget_refusals(bundles, budget, message, capsys):
    assert device_main([str(bundles["onnx"]), "--budget", budget]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(platform.system() == "Darwin", reason="Core ML prediction runs on macOS")
def test_core_ml_is_verified_but_not_run_off_macos(bundles, tmp_path, capsys):
    """A Core ML bundle's files are checked; its loop needs MLModel.predict: said, exit 0, verdict not_validated.
    (The tiny bundle's record is relabelled coreml: the runtime is never opened off macOS.)"""
    bundle = copy_bundle(bundles["onnx"], tmp_path)
    edit_golden(bundle, lambda r: r.update(runtime="coreml"), reseal=True)
    out_json = tmp_path / "r.json"
    assert device_main([str(bundle), "--json", str(out_json)]) == 0
    assert "not run here: Core ML prediction needs macOS" in capsys.readouterr().out
    entry = json.loads(out_json.read_text())["bundles"][0]
    assert entry["verdict"] == "not_validated" and entry["status"] == "not_executed"
