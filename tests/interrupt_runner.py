"""`edgeq` for tests/test_interrupt.py, with markers a test can send a signal on.

    python -m tests.interrupt_runner convert ...   (the same arguments as `edgeq`)

Each stage of a conversion prints `edgeq-test: <stage> begins` to stderr as it starts and
`edgeq-test: <stage> ends` when it returns: loading, calibration, converting, validation. With
EDGEQ_TEST_PAUSE=<stage> the run waits at that stage's start (before the real work) until the file named by
EDGEQ_TEST_GO exists, or a signal ends it. Nothing else changes: the real loaders, toolchains and runtimes run.
The stage functions are found by the names below; rename them here when the pipeline renames them.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

PAUSE_LIMIT_S = 120  # a forgotten pause ends the run rather than hang the suite


def _marked(stage: str, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        _say(f"{stage} begins")
        if os.environ.get("EDGEQ_TEST_PAUSE") == stage:
            _pause()
        result = function(*args, **kwargs)
        _say(f"{stage} ends")
        return result

    return wrapper


def _say(text: str) -> None:
    sys.stderr.write(f"edgeq-test: {text}\n")
    sys.stderr.flush()


def _pause() -> None:
    go = os.environ.get("EDGEQ_TEST_GO")
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while time.monotonic() < deadline and not (go and Path(go).exists()):
        time.sleep(0.05)


def _install() -> None:
    import edgeq.load
    import edgeq.pipeline

    edgeq.load.load_model = _marked("loading", edgeq.load.load_model)
    edgeq.pipeline.quantization_plan = _marked("calibration", edgeq.pipeline.quantization_plan)
    edgeq.pipeline.run_artifact = _marked("validation", edgeq.pipeline.run_artifact)
    get_converter = edgeq.pipeline.get_converter

    def marked_converter(runtime):
        converter = get_converter(runtime)
        converter.convert = _marked("converting", converter.convert)
        return converter

    edgeq.pipeline.get_converter = marked_converter


if __name__ == "__main__":
    _install()
    from edgeq.cli import main

    main(sys.argv[1:], prog_name="edgeq")
