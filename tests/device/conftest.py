"""Fixtures for device-lab tests: bundles made once per session with `edgeq convert`, the edgeq wheel built
once per session, and fresh virtual environments with nothing but numpy and one runtime."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCE_PARTS = ("pyproject.toml", "README.md", "edgeq", "converters", "targets", "calibration", "validate")


def run_device(*args, python: str | Path = sys.executable, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m edgeq.device ARGS` in a child process, as a device lab runs it."""
    return subprocess.run(
        [str(python), "-m", "edgeq.device", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[min(offset, len(data) - 1)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """tiny_mlp FP32 bundles for ONNX and TFLite, written by `edgeq convert` (skipped without the toolchains)."""
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime", "litert_torch", "ai_edge_litert") if importlib.util.find_spec(m) is None]
    if missing:
        message = f"not installed: {', '.join(missing)} (pip install 'edgeq[all]')"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI installs every extra and runs the device tests")
        pytest.skip(message)
    from click.testing import CliRunner

    from edgeq.cli import main

    out = tmp_path_factory.mktemp("device-bundles")
    result = CliRunner().invoke(
        main, ["convert", "edgeq.examples:tiny_mlp", "-t", "onnx,tflite", "--out", str(out), "--samples", "4"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return {target: out / "tiny_mlp" / target / "fp32" for target in ("onnx", "tflite")}


@pytest.fixture
def bundle_copy(bundles, tmp_path):
    """A private copy of one bundle, to tamper with or reject."""

    def copy(target: str, name: str = "fp32") -> Path:
        dest = tmp_path / "copies" / "tiny_mlp" / target / name
        shutil.copytree(bundles[target], dest)
        return dest

    return copy


# -- fresh virtual environments --------------------------------------------------------------------------


def _index_url() -> str:
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


@pytest.fixture(scope="session")
def registry():
    """The package registry must answer. Without it the fresh-venv tests skip, except under CI, where they fail."""
    url = f"{_index_url()}/tflite-runtime/"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=20):
            pass
    except OSError as exc:
        message = f"package registry unreachable ({url}: {exc})"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run the fresh-venv device tests")
        pytest.skip(message)


def _pip(*args, python: Path | None = None) -> None:
    """This interpreter's pip, installing into `python`'s environment (pip --python): the fresh venvs need no
    pip of their own, and all share pip's one cache."""
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    if python is not None:
        command += ["--python", str(python)]
    result = subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"pip {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="session")
def edgeq_wheel(tmp_path_factory, registry) -> Path:
    """edgeq's wheel, built once per session from a copy of the source (the work tree gets no build/)."""
    work = tmp_path_factory.mktemp("edgeq-wheel")
    source = work / "src"
    source.mkdir()
    for part in SOURCE_PARTS:
        origin = REPO / part
        if origin.is_dir():
            shutil.copytree(origin, source / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(origin, source / part)
    flags = ["--no-build-isolation"] if _setuptools_major() >= 69 else []  # pyproject asks setuptools>=69
    _pip("wheel", "--no-deps", *flags, "--wheel-dir", work / "dist", source)
    (wheel,) = (work / "dist").glob("edgeq-*.whl")
    return wheel


def _setuptools_major() -> int:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 0


@pytest.fixture(scope="session")
def fresh_venv(tmp_path_factory, edgeq_wheel):
    """Make a venv with edgeq (non-editable, --no-deps) and `requirements` only; returns its python.
    Prints how long each part took."""

    def make(label: str, *requirements: str, constraints: bool = False) -> Path:
        folder = tmp_path_factory.mktemp(f"venv-{label}")
        timings = {}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
        python = folder / "bin" / "python"
        timings["venv"] = time.perf_counter() - start
        start = time.perf_counter()
        _pip("install", *(["-c", REPO / "constraints.txt"] if constraints else []), *requirements, python=python)
        timings["runtime"] = time.perf_counter() - start
        start = time.perf_counter()
        _pip("install", "--no-deps", edgeq_wheel, python=python)
        timings["edgeq"] = time.perf_counter() - start
        told = ", ".join(f"{part} {seconds:.1f} s" for part, seconds in timings.items())
        print(f"\nfresh venv {label} ({' '.join(requirements)}): {told}; total {sum(timings.values()):.1f} s")
        return python

    return make
