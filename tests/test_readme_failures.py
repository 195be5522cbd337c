"""The README's "Exit codes and failure modes" section matches the code and the suite: every exit code the
code can return is in its table with nothing extra, and every test file it cites exists."""

from __future__ import annotations

import re
import signal
from pathlib import Path

from edgeq import errors
from edgeq.validate.verdict import Verdict

ROOT = Path(__file__).parent.parent


def _section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Exit codes and failure modes")
    return text[start:text.index("\n## ", start + 1)]


def test_exit_code_table_lists_every_code_the_code_returns():
    table = re.findall(r"^\| (\d+) \|", _section(), flags=re.M)
    error_codes = {cls.exit_code for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.EdgeqError)}
    verdict_codes = {verdict.exit_code for verdict in Verdict}
    interrupted = {128 + signal.SIGINT}  # edgeq.interrupt exits 128 + signal; SIGTERM's 143 is named in the same row
    assert sorted(map(int, table)) == sorted(error_codes | verdict_codes | interrupted)
    assert "143" in _section()


def test_failure_table_cites_existing_tests():
    cited = set(re.findall(r"tests/[\w/]+\.py", _section()))
    assert len(cited) >= 8
    missing = [path for path in sorted(cited) if not (ROOT / path).is_file()]
    assert missing == []
