"""Keep the toolchains' chatter out of edgeq's terminal output (`--verbose` shows it all).

Much of it does not pass through Python: absl and oneDNN (C++ glog lines), TFLite's delegate INFO lines and
torchao's library-load failures write straight to file descriptor 2. So the run's stderr goes through a pipe
whose reader drops the lines known to be noise and forwards every other line unchanged: a message nobody
anticipated, a crash report or edgeq's own lines still reach the user.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings

# Lines the toolchains print on every run that say nothing about the user's model (seen with the versions in
# constraints.txt; `--verbose` shows them).
NOISE = tuple(
    re.compile(pattern)
    for pattern in (
        r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$",
        r"^[IWE]\d{4} [\d:.]+\s+\d+ [\w./-]+:\d+\] ",  # absl / glog lines (oneDNN notice, XLA, TF)
        r"^Failed to load .*torchao.*\.so",  # torchao's optional CUDA kernels on a CPU build
        r"^INFO: Created TensorFlow Lite .*delegate for CPU\.$",
        r"^INFO: Initialized TensorFlow Lite runtime\.$",
        r"^Could not find cuda drivers on your machine",
        r"^To enable the following instructions: .* in other operations, rebuild TensorFlow",
        r"^This TensorFlow binary is optimized to use available CPU instructions",
        # coremltools on import, off macOS and beside newer torch / scikit-learn than it lists
        r"^Failed to load _ML\w+: No module named 'coremltools\.libcoremlpython'$",
        r"^Torch version [\w.+]+ has not been tested with coremltools\.",
        r"^scikit-learn version [\w.+]+ is not supported\. ",
    )
)

# Python loggers of the toolchains: version nags and pass-by-pass chatter.
_LOGGERS = ("torch", "torch.onnx", "torch.export", "torch._dynamo", "torch.utils._pytree", "coremltools", "absl",
            "jax", "litert_torch", "onnxscript", "ai_edge_quantizer", "tensorflow", "transformers", "torchao")


def is_noise(line: str) -> bool:
    return any(pattern.search(line) for pattern in NOISE)


@contextlib.contextmanager
def toolchain_output(verbose: bool):
    """Within the block, drop the toolchains' noise from stderr (fd 2) and their Python warnings and logs;
    with `verbose`, change nothing."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if verbose:
        yield
        return
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export, coremltools and transformers warn on every run
        with _filtered_fd2():
            yield


@contextlib.contextmanager
def _filtered_fd2():
    try:
        sys.stderr.flush()
        original = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (a test runner's capture, say): nothing to filter
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    forwarder = threading.Thread(target=_forward, args=(read_end, original), daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last write end: the forwarder sees end of file
        forwarder.join(timeout=5)
        os.close(original)


def _forward(read_end: int, original: int) -> None:
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        pending = b""
        while chunk := pipe.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            _write(original, [line + b"\n" for line in lines])
        if pending:
            _write(original, [pending])


def _write(fd: int, lines: list[bytes]) -> None:
    kept = b"".join(line for line in lines if not is_noise(line.decode("utf-8", "replace").rstrip("\n")))
    if kept:
        with contextlib.suppress(OSError):
            os.write(fd, kept)
