"""`python -m edgeq.device` and `edgeq bundle` in the dev environment, on real ONNX and TFLite bundles."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile

import pytest
from click.testing import CliRunner

from edgeq.cli import main as edgeq_main
from edgeq.device.archive import INDEX
from edgeq.device.cli import main as device_main
from edgeq.hashing import sha256_file
from tests.device.conftest import flip_byte, run_device


def edgeq(*args):
    return CliRunner().invoke(edgeq_main, [str(a) for a in args])


def test_device_run_writes_json_and_junit_and_imports_only_numpy_and_the_runtime(bundles, tmp_path):
    code = (
        "import sys, json; from edgeq.device.cli import main; code = main(sys.argv[1:]);"
        "heavy = {'torch', 'rich', 'click', 'transformers', 'tensorflow', 'onnx', 'coremltools', 'litert_torch'};"
        "print('HEAVY', json.dumps(sorted(heavy & {m.split('.')[0] for m in sys.modules}))); sys.exit(code)"
    )
    out_json, out_xml = tmp_path / "result.json", tmp_path / "result.xml"
    args = [bundles["onnx"], "--json", out_json, "--junit", out_xml, "--runs", "12", "--warmup", "2"]
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "HEAVY []" in result.stdout
    assert "p50" in result.stdout and "p99" in result.stdout and "peak RSS" in result.stdout

    data = json.loads(out_json.read_text())
    manifest = json.loads((bundles["onnx"] / "manifest.json").read_text())
    assert data["verdict"] == "passed" and data["exit_code"] == 0 and data["host"]["description"]
    (entry,) = data["bundles"]
    assert entry["bundle"] == "tiny_mlp/onnx/fp32" and entry["verdict"] == "passed" and entry["violations"] == []
    assert entry["artifact"] == {"file": "model.onnx", "sha256": manifest["artifact"]["sha256"], "verified": True}
    assert entry["runtime"]["name"] == "onnx" and entry["runtime"]["package"] == "onnxruntime" and entry["runtime"]["version"]
    assert entry["executor"].startswith("onnxruntime")
    assert entry["budget"] == {"terms": "cosine>=0.9999", "source": "manifest"}
    assert [d["name"] for d in entry["drift"]] == manifest["signature"]["outputs"] and entry["drift"][0]["cosine"] > 0.9999
    latency = entry["latency"]
    assert latency["runs"] == 12 and latency["warmup"] == 2 and 0 < latency["p50_ms"] <= latency["p90_ms"] <= latency["p99_ms"]
    memory = entry["memory"]
    assert memory["peak_rss_bytes"] > 10e6 and memory["rss_increase_bytes"] is not None and memory["rss_increase_bytes"] >= 0

    suites = ET.parse(out_xml).getroot()
    assert suites.get("tests") == "1" and suites.get("failures") == "0" and suites.get("errors") == "0"
    suite = suites.find("testsuite")
    assert suite.get("name") == "tiny_mlp/onnx/fp32"
    properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert properties["artifact_sha256"] == manifest["artifact"]["sha256"] and float(properties["latency_p99_ms"]) > 0


def test_tflite_bundle_passes(bundles, tmp_path):
    result = run_device(bundles["tflite"], "--junit", tmp_path / "r.xml", "--runs", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tiny_mlp/tflite/fp32: PASSED" in result.stdout
    assert ET.parse(tmp_path / "r.xml").getroot().find("testsuite/testcase") is not None


@pytest.mark.parametrize("victim", ["model.onnx", "golden.npz"])
def test_a_changed_byte_is_refused_with_exit_3_naming_the_file(bundle_copy, tmp_path, capsys, victim):
    bundle = bundle_copy("onnx")
    flip_byte(bundle / victim)
    code = device_main([str(bundle), "--junit", str(tmp_path / "r.xml"), "--json", str(tmp_path / "r.json")])
    output = capsys.readouterr().out
    assert code == 3
    assert f"{bundle / victim}: sha256" in output and "does not match the manifest" in output
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert suite.get("errors") == "1" and victim in suite.find("testcase/error").get("message")
    entry = json.loads((tmp_path / "r.json").read_text())["bundles"][0]
    assert entry["verdict"] == "refused" and entry["artifact"]["verified"] is False and victim in entry["reason"]


def test_over_budget_exits_6_with_a_junit_failure(bundles, tmp_path):
    result = run_device(bundles["tflite"], "--budget", "sqnr_db>=500", "--junit", tmp_path / "r.xml", "--json", tmp_path / "r.json", "--no-latency")
    assert result.returncode == 6, result.stdout + result.stderr
    assert "over budget: output" in result.stdout
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert suite.get("failures") == "1"
    assert "sqnr_db" in suite.find("testcase/failure").get("message")
    entry = json.loads((tmp_path / "r.json").read_text())["bundles"][0]
    assert entry["verdict"] == "over_budget" and entry["budget"] == {"terms": "sqnr_db>=500", "source": "--budget"}
    assert entry["latency"] is None and entry["violations"]


def test_a_malformed_budget_is_a_usage_error(bundles, capsys):
    assert device_main([str(bundles["onnx"]), "--budget", "cosine=1"]) == 2
    assert "--budget" in capsys.readouterr().err


def test_bundle_archive_round_trip(bundles, tmp_path):
    lab = tmp_path / "lab.zip"
    packed = edgeq("bundle", bundles["onnx"], bundles["tflite"], "-o", lab)
    assert packed.exit_code == 0, packed.output
    with zipfile.ZipFile(lab) as archive:
        index = json.loads(archive.read(INDEX))
        names = set(archive.namelist())
        assert [b["name"] for b in index["bundles"]] == ["tiny_mlp/onnx/fp32", "tiny_mlp/tflite/fp32"]
        for bundle, folder in zip(index["bundles"], (bundles["onnx"], bundles["tflite"])):
            files = {f["path"]: f["sha256"] for f in bundle["files"]}
            assert {"manifest.json", "golden.npz", bundle["artifact"]["file"]} <= set(files)
            for path, digest in files.items():
                assert f"{bundle['path']}/{path}" in names and sha256_file(folder / path) == digest
    again = tmp_path / "again.zip"
    assert edgeq("bundle", bundles["onnx"], bundles["tflite"], "-o", again).exit_code == 0
    assert again.read_bytes() == lab.read_bytes()  # same bundles, same archive bytes

    result = run_device(lab, "--junit", tmp_path / "r.xml", "--json", tmp_path / "r.json", "--runs", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    suites = ET.parse(tmp_path / "r.xml").getroot()
    assert [s.get("name") for s in suites.findall("testsuite")] == ["tiny_mlp/onnx/fp32", "tiny_mlp/tflite/fp32"]
    assert suites.get("tests") == "2" and suites.get("failures") == "0"
    data = json.loads((tmp_path / "r.json").read_text())
    assert [b["runtime"]["name"] for b in data["bundles"]] == ["onnx", "tflite"]
    assert data["bundles"][0]["path"] == f"{lab}:tiny_mlp/onnx/fp32"

    extracted = tmp_path / "extracted"
    zipfile.ZipFile(lab).extractall(extracted)
    assert run_device(extracted, "--no-latency").returncode == 0  # an archive someone already unzipped


def test_bundle_refuses_bad_folders_and_keeps_the_previous_archive(bundles, bundle_copy, tmp_path):
    lab = tmp_path / "lab.zip"
    assert edgeq("bundle", bundles["onnx"], "-o", lab).exit_code == 0
    good = lab.read_bytes()

    tampered = bundle_copy("onnx")
    flip_byte(tampered / "model.onnx")
    result = edgeq("bundle", tampered, "-o", lab)
    assert result.exit_code == 3 and f"{tampered / 'model.onnx'}: sha256" in result.output

    not_a_bundle = tmp_path / "empty"
    not_a_bundle.mkdir()
    result = edgeq("bundle", not_a_bundle, "-o", lab)
    assert result.exit_code == 3 and "not a bundle (no manifest.json)" in result.output

    rejected = bundle_copy("tflite", "fp32.rejected")
    result = edgeq("bundle", rejected, "-o", lab)
    assert result.exit_code == 3 and "--allow-rejected" in result.output
    assert lab.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["lab.zip"]

    allowed = edgeq("bundle", rejected, "-o", lab, "--allow-rejected")
    assert allowed.exit_code == 0, allowed.output
    index = json.loads(zipfile.ZipFile(lab).read(INDEX))
    assert index["bundles"][0]["name"] == "tiny_mlp/tflite/fp32.rejected" and index["bundles"][0]["rejected"] is True


def _archive_with(path, members: dict[str, bytes], index: dict | None = None):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        if index is not None:
            archive.writestr(INDEX, json.dumps(index))


def test_path_traversal_archives_are_refused(bundles, tmp_path, capsys):
    lab = tmp_path / "lab.zip"
    assert edgeq("bundle", bundles["onnx"], "-o", lab).exit_code == 0
    index = json.loads(zipfile.ZipFile(lab).read(INDEX))
    with zipfile.ZipFile(lab) as archive:
        members = {name: archive.read(name) for name in archive.namelist() if name != INDEX}

    # a member that climbs out of the extraction folder
    evil = tmp_path / "evil.zip"
    _archive_with(evil, {**members, "../../escaped.txt": b"owned"}, index)
    assert device_main([str(evil), "--junit", str(tmp_path / "r.xml"), "--json", str(tmp_path / "r.json")]) == 3
    assert "'../../escaped.txt'" in capsys.readouterr().err and not (tmp_path / "escaped.txt").exists()
    error = ET.parse(tmp_path / "r.xml").getroot().find("testsuite/testcase/error")  # the lab's CI sees why
    assert "path traversal" in error.get("message")
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["verdict"] == "refused" and result["exit_code"] == 3 and "escaped.txt" in result["error"]

    # an index that points a bundle outside, with the member to match
    escaping = json.loads(json.dumps(index))
    escaping["bundles"][0]["path"] = "../outside"
    moved = {name.replace("tiny_mlp/onnx/fp32", "../outside"): data for name, data in members.items()}
    _archive_with(tmp_path / "evil2.zip", moved, escaping)
    assert device_main([str(tmp_path / "evil2.zip")]) == 3
    assert "path traversal" in capsys.readouterr().err

    # an absolute member name
    _archive_with(tmp_path / "evil3.zip", {**members, "/tmp/edgeq-absolute.txt": b"x"}, index)
    assert device_main([str(tmp_path / "evil3.zip")]) == 3
    assert "/tmp/edgeq-absolute.txt" in capsys.readouterr().err

    # bytes changed inside the archive, index left as it was
    changed = dict(members)
    changed["tiny_mlp/onnx/fp32/model.onnx"] = members["tiny_mlp/onnx/fp32/model.onnx"][:-1] + b"\0"
    _archive_with(tmp_path / "changed.zip", changed, index)
    assert device_main([str(tmp_path / "changed.zip")]) == 3
    assert "tiny_mlp/onnx/fp32/model.onnx: sha256" in capsys.readouterr().err

    # not a zip at all
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    assert device_main([str(tmp_path / "junk.zip")]) == 3


def test_validate_and_the_device_share_one_check(bundle_copy):
    bundle = bundle_copy("onnx")
    assert edgeq("validate", bundle).exit_code == 0
    flip_byte(bundle / "golden.npz")
    result = edgeq("validate", bundle)
    assert result.exit_code == 3 and "golden.npz" in result.output


def test_a_folder_artifact_packs_and_unpacks(tmp_path):
    """An .mlpackage is a folder: its manifest sha256 covers its files (edgeq.hashing.sha256_path), and the
    archive checks the packed bytes against it. Names that sort differently as text and as paths included."""
    from edgeq.device.archive import pack, unpack
    from edgeq.hashing import sha256_path

    bundle = tmp_path / "m" / "coreml" / "fp16"
    package = bundle / "model.mlpackage"
    for name, data in {"Manifest.json": b"{}", "Data/a/b.bin": b"1", "Data/a-c.bin": b"2", "Data/weights/w.bin": b"w" * 5000}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_bytes(data)
    (bundle / "golden.npz").write_bytes(b"golden")
    manifest = {
        "model": {"name": "m"}, "target": {"id": "coreml", "runtime": "coreml"}, "precision": "fp16",
        "artifact": {"file": "model.mlpackage", "sha256": sha256_path(package)},
        "golden": {"file": "golden.npz", "sha256": sha256_path(bundle / "golden.npz")},
        "signature": {"outputs": ["y"]}, "budget": {"terms": "", "verdict": "not_validated"},
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    index = pack([bundle], tmp_path / "lab.zip")
    assert {f["path"] for f in index["bundles"][0]["files"]} >= {"model.mlpackage/Data/a/b.bin", "model.mlpackage/Data/a-c.bin"}
    (tmp_path / "out").mkdir()
    (extracted,) = unpack(tmp_path / "lab.zip", tmp_path / "out")
    assert sha256_path(extracted / "model.mlpackage") == manifest["artifact"]["sha256"]
