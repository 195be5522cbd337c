"""Shared test helpers: optional runtimes and data sets, which skip a test locally and fail it under CI=true.

CI installs every extra and has ../shared/data beside the checkout, so nothing may skip there: a skip under
`CI=true` (a `requires(...)` marker, `pytest.importorskip`, `pytest.skip`, a module that skips at import) is
reported as a failure that says why. Locally the same tests skip and say which package or file is missing.
A test that may legitimately skip on CI says so with `@pytest.mark.ci_may_skip(reason)`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # data sets CI provides beside the checkout (STS-B: stsb/)
STSB = SHARED_DATA / "stsb"


def on_ci() -> bool:
    """CI=true (or 1/yes): every runtime, package and data set must be present, and skips are failures."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def requires(*modules: str):
    """Skip unless every module imports (fails under CI=true, which installs all extras).

    A `skipif` marker whose first argument says whether something is missing (tests read `mark.args[0]`).
    """
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)} (pip install 'edgeq[all]')")


def requires_data(*paths: Path):
    """Skip unless every file or folder exists (fails under CI=true, which has ../shared/data)."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    return pytest.mark.skipif(bool(missing), reason=f"missing data: {', '.join(missing)}")


ONNX = requires("onnx", "onnxscript", "onnxruntime")
TFLITE = requires("litert_torch", "ai_edge_litert", "ai_edge_quantizer")
COREML = requires("coremltools")


def pytest_configure(config):
    config.addinivalue_line("markers", "ci_may_skip(reason): this test may skip under CI=true (say why)")


def _ci_failure(longrepr) -> str:
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return (
        f"skipped under CI=true, where every runtime, package and data set must be present: {reason}\n"
        "(locally this test skips; on CI install edgeq[all,dev] and put the data in ../shared/data)"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and on_ci() and not hasattr(report, "wasxfail") and item.get_closest_marker("ci_may_skip") is None:
        report.outcome = "failed"
        report.longrepr = _ci_failure(report.longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module that skips as a whole (`pytest.importorskip` at import) fails under CI=true too."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and on_ci():
        report.outcome = "failed"
        report.longrepr = _ci_failure(report.longrepr)


def pytest_runtest_setup(item):
    """Under CI=true, a test module that names data in ../shared/data (a module-level Path, such as the MiniLM
    tests' STS-B files) fails when that data is missing, instead of quietly using edgeq's built-in sentences."""
    module = getattr(item, "module", None)
    if not on_ci() or module is None:
        return
    missing = sorted(
        str(value) for value in vars(module).values()
        if isinstance(value, Path) and value.is_relative_to(SHARED_DATA) and not value.exists()
    )
    if missing:
        pytest.fail(f"CI=true, but the data this test module reads is missing: {', '.join(missing)}")


def pytest_collection_modifyitems(config, items):
    """With pytest-xdist (`-n 2 --dist loadgroup`, the README's test command), the tests that share a module-
    or session-scoped fixture of this suite run on one worker, so an expensive fixture (a MiniLM conversion, a
    bundle built once per module) is still built once; every other test goes to whichever worker is free."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        for name, definitions in (info.name2fixturedefs.items() if info is not None else ()):
            definition = definitions[-1]
            if definition.scope in ("module", "package", "session") and definition.baseid:  # plugins' have none
                item.add_marker(pytest.mark.xdist_group(f"{definition.baseid}::{name}"))
                break
