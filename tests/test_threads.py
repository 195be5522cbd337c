"""edgeq's own computing runs on one thread unless EDGEQ_THREADS says otherwise (edgeq/threads.py)."""

from __future__ import annotations

import pytest
import torch

from edgeq.errors import UsageError
from edgeq.threads import ENV, limited_threads, work_threads


def test_one_thread_by_default_and_the_setting_restored(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    before = torch.get_num_threads()
    with limited_threads() as count:
        assert count == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_edgeq_threads_is_read_and_a_bad_value_is_refused(monkeypatch):
    monkeypatch.setenv(ENV, "3")
    assert work_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(UsageError, match=ENV):
            work_threads()


def test_the_cli_says_what_is_wrong_with_edgeq_threads(monkeypatch, tmp_path):
    from tests.test_cli import run

    monkeypatch.setenv(ENV, "many")
    result = run("convert", "edgeq.examples:tiny_mlp", "-t", "onnx", "--out", str(tmp_path), "--samples", "2")
    assert result.exit_code == 2 and "EDGEQ_THREADS='many'" in result.output, result.output
