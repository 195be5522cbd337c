"""Under CI=true nothing skips silently: a missing runtime, package or data set fails the test (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO

PROBES = '''
import pytest
from pathlib import Path
from tests.conftest import SHARED_DATA, requires, requires_data


@requires("no_such_module_edgeq")
def test_marker():
    pass


def test_importorskip():
    pytest.importorskip("no_such_module_edgeq")


@requires_data(SHARED_DATA / "no-such-data-set")
def test_data_marker():
    pass


@pytest.mark.ci_may_skip("a documented exception")
def test_allowed():
    pytest.skip("allowed to skip")
'''
DATA_MODULE = '''
from tests.conftest import SHARED_DATA

STSB_LIKE = SHARED_DATA / "no-such-data-set" / "file.csv"


def test_reads_shared_data_or_falls_back():
    pass  # like tests/test_minilm.py: built-in sentences when the module's data file is missing
'''
WHOLE_MODULE = '''
import pytest
pytest.importorskip("no_such_module_edgeq")

def test_never_collected():
    pass
'''


def _run(tmp_path, files: dict[str, str], ci: bool):
    for name, source in files.items():
        (tmp_path / name).write_text(textwrap.dedent(source))
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": "true"} if ci else {})
    env["PYTHONPATH"] = str(REPO)
    command = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-rA", "-q", *files]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_skips_locally_and_fails_under_ci(tmp_path):
    files = {"test_probes.py": PROBES, "test_data.py": DATA_MODULE}
    local = _run(tmp_path, files, ci=False)
    assert local.returncode == 0 and "1 passed, 4 skipped" in local.stdout, local.stdout + local.stderr

    ci = _run(tmp_path, files, ci=True)
    assert ci.returncode == 1, ci.stdout + ci.stderr
    summary = [line for line in ci.stdout.splitlines() if line.startswith(("ERROR ", "FAILED ", "PASSED ", "SKIPPED "))]
    for name in ("test_marker", "test_importorskip", "test_data_marker", "test_reads_shared_data_or_falls_back"):
        assert any(line.startswith(("ERROR", "FAILED")) and f"::{name} " in line for line in summary), (name, summary)
    assert "not installed: no_such_module_edgeq" in ci.stdout and "missing data:" in ci.stdout
    assert "the data this test module reads is missing" in ci.stdout and "no-such-data-set/file.csv" in ci.stdout
    assert any(line.startswith("SKIPPED") for line in summary)  # the one marked ci_may_skip


def test_a_module_that_skips_at_import_fails_under_ci(tmp_path):
    ci = _run(tmp_path, {"test_whole_module.py": WHOLE_MODULE}, ci=True)
    assert ci.returncode not in (0, 5), ci.stdout  # 5: nothing collected, which a skipped module gives locally
    assert "skipped under CI=true" in ci.stdout and "no_such_module_edgeq" in ci.stdout, ci.stdout
