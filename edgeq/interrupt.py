"""Ctrl-C and SIGTERM stop a run: exit 128 + signal (130 for Ctrl-C), one line, no traceback, nothing published.

edgeq owns this because the toolchains lose Python's KeyboardInterrupt (measured on tiny_convnet, see
tests/test_interrupt.py):

- jax, which litert_torch imports for TFLite, registers a garbage-collector callback (`gc.callbacks`, its
  `_xla_gc_callback`). When Python runs the SIGINT handler inside that callback, CPython reports the
  KeyboardInterrupt as "unraisable" ("Exception ignored in ... KeyboardInterrupt") and drops it: the
  conversion goes on, publishes and exits 0. Any `__del__` or weakref callback in torch does the same.
- coremltools imports its optional dependencies (TensorFlow, scikit-learn, xgboost, ...) under bare
  `except:`: an interrupt during that import is taken as "not installed" and the conversion goes on, or a
  half-imported module fails later with an unrelated traceback (exit 1).

So the handler records the signal before it raises; a dropped interrupt is delivered again (at once when
CPython reports it as unraisable, else after a short wait); `checkpoint()` raises for a recorded one, and the
publish step calls it, so a run that was interrupted never replaces a bundle; `deferred()` holds signals back
while a bundle's two renames happen, so a publish is never split half-way.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REDELIVER_AFTER_S = 1.0  # a KeyboardInterrupt that edgeq's own code has not seen by then was dropped


@dataclass
class _Run:
    signum: int | None = None  # the first stop signal received
    seen: bool = False  # edgeq's own code holds the KeyboardInterrupt (cleanup under way): don't raise again
    deferring: int = 0  # depth of deferred() sections: a signal there is acted on at their end
    writing: tuple[Path, str] | None = None  # what is being written and what it is (bundle, file), for the message
    unchanged: str | None = None  # what the command writes, named when nothing was written yet
    published: list[Path] = field(default_factory=list)  # bundles and files this run put in place, for the message


_run = _Run()
_guarded = False  # interrupt_guard is active: edgeq's handler is installed and redelivers
_wake = threading.Event()  # tells the redelivery thread that an interrupt was dropped just now


def interrupted() -> bool:
    """A stop signal arrived during this run (dropped by a toolchain or not)."""
    return _run.signum is not None


def checkpoint() -> None:
    """Raise KeyboardInterrupt if a stop signal arrived, even one a toolchain swallowed: called before
    anything is published, so an interrupted run never replaces a bundle."""
    _reinstall()
    if interrupted():
        raise KeyboardInterrupt


def seen() -> None:
    """edgeq's own code caught the KeyboardInterrupt and is cleaning up: no more deliveries."""
    if interrupted():
        _run.seen = True


def note_writing(dest: Path, kind: str = "bundle") -> None:
    """For the message: `dest` (a bundle, a file) is being written."""
    if _guarded:
        _run.writing = (Path(dest), kind)


def note_published(dest: Path) -> None:
    """For the message: `dest` is in place, whole."""
    if _guarded:
        _run.writing = None
        _run.published.append(Path(dest))


@contextmanager
def deferred():
    """Signals that arrive inside are acted on when it ends: for steps that must not be split (the two
    renames of a publish). Works with or without interrupt_guard; outside the main thread it only nests."""
    temporary = threading.current_thread() is threading.main_thread() and not _handling()
    previous = {s: signal.signal(s, _on_signal) for s in STOP_SIGNALS} if temporary else {}
    _run.deferring += 1
    try:
        yield
    finally:
        _run.deferring -= 1
        for number, handler in previous.items():
            signal.signal(number, handler)
    if not _run.deferring and interrupted() and not _run.seen:
        if temporary:  # no guard: hand the signal back to whoever handles it outside
            signum, _run.signum = _run.signum, None
            signal.raise_signal(signum)
        else:
            raise KeyboardInterrupt


@contextmanager
def interrupt_guard(unchanged: str | None = None):
    """Around a whole command: SIGINT/SIGTERM end it with one line and exit 130/143 (no traceback, no
    "Aborted!"); whatever the block raised after a signal (a toolchain's secondary error, an exit code
    from a run that went on) is reported as the interruption it is. Enter it in the main thread, before
    anything heavy is imported. Also releases the output folders the run claimed (edgeq.bundle).
    `unchanged` names what the command writes (e.g. "lab.zip"), for the message when nothing was written yet.

    An interrupted process ends with os._exit once edgeq's own cleanup (staging folders, temp files) has
    run: the toolchains' exit handlers (jax, TensorFlow) are what can crash after an interrupt.
    """
    global _run, _guarded
    _run, _guarded = _Run(unchanged=unchanged), True
    previous_handlers = {s: signal.signal(s, _on_signal) for s in STOP_SIGNALS}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _unraisable_hook(previous_hook)
    try:
        yield
    except BaseException:
        if not interrupted():
            raise
        seen()
    finally:
        _run.deferring += 1  # from here on a signal is only recorded
        _guarded = False
        if interrupted():
            # The block may have ended without seeing the interrupt (a toolchain turned it into a failure that
            # the run reported): stop redelivering, and keep edgeq's handler (a seen run's only records) until
            # os._exit. Python's own handler back in place would let a late redelivery raise in the cleanup
            # below, where click reports it as "Aborted!" with exit 1.
            _run.seen = True
        else:
            for number, handler in previous_handlers.items():
                signal.signal(number, handler)
        sys.unraisablehook = previous_hook
        from edgeq.bundle import release_outputs

        release_outputs()
        _run.deferring -= 1
    if interrupted():
        _exit_interrupted()


def message() -> str:
    """One line: what stopped the run and what it left (nothing half-written, previous bundles kept)."""
    what = "interrupted (Ctrl-C)" if _run.signum == signal.SIGINT else f"stopped by {signal.Signals(_run.signum).name}"
    if _run.writing is not None:
        path, kind = _run.writing
        parts = [f"the previous {kind} at {path} is untouched (nothing half-written left)"]
    elif _run.published:
        parts = ["nothing half-written left"]
    elif _run.unchanged:
        parts = [f"{_run.unchanged} is unchanged (nothing half-written left)"]
    else:
        parts = ["no bundle was being written; previous bundles are untouched"]
    if _run.published:
        parts.append("published before the interrupt: " + ", ".join(str(p) for p in _run.published))
    return f"{what}: " + "; ".join(parts)


def _exit_interrupted() -> None:
    import gc

    import click

    gc.collect()  # finalizers that remove the toolchains' temp files run now; os._exit skips exit handlers
    click.echo(message(), err=True)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(128 + _run.signum)


def _handling() -> bool:
    return signal.getsignal(signal.SIGINT) is _on_signal


def _reinstall() -> None:
    """Put edgeq's handler back if a toolchain replaced it (none does today; cheap to keep true)."""
    if _guarded and threading.current_thread() is threading.main_thread():
        for number in STOP_SIGNALS:
            if signal.getsignal(number) is not _on_signal:
                signal.signal(number, _on_signal)


def _on_signal(signum, _frame) -> None:
    if _run.signum is None:
        _run.signum = signum
        if _guarded:
            threading.Thread(target=_redeliver, args=(_run,), name="edgeq-interrupt", daemon=True).start()
    if _run.deferring or _run.seen:
        return  # a publish finishes its renames, or cleanup is under way: act on it later, or not again
    raise KeyboardInterrupt


def _redeliver(run: _Run) -> None:
    """Send the signal again while edgeq's code has not seen the KeyboardInterrupt: a toolchain dropped it."""
    while run is _run and not run.seen:
        if _wake.wait(REDELIVER_AFTER_S):
            _wake.clear()
            time.sleep(0.05)  # let the gc callback or finalizer that dropped it return first
        if run is _run and not run.seen and not run.deferring:
            os.kill(os.getpid(), run.signum)


def _unraisable_hook(previous):
    def hook(unraisable) -> None:
        if issubclass(unraisable.exc_type, KeyboardInterrupt) and interrupted():
            _wake.set()  # dropped inside a gc callback or finalizer: deliver it again, outside of it
            return
        previous(unraisable)

    return hook


__all__ = ["checkpoint", "deferred", "interrupt_guard", "interrupted", "message", "note_published", "note_writing", "seen"]
