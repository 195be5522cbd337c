"""Bundles on disk: `out/<model>/<target>/<precision>/` written atomically.

Everything is written into a hidden staging folder beside the destination, then moved into place with
renames, so an interrupted or failed run never leaves a half bundle and never touches the previous one.
A bundle that fails its budget or validation is published beside the good one as `<precision>.rejected`,
so the canonical path only ever holds a bundle that passed.

One run at a time writes into a model folder `out/<model>/`: the run holds an exclusive lock on
`out/<model>/.edgeq.lock` (flock: the kernel drops it when the process ends, SIGKILL included, so a lock is
never stale) and a second run into the same folder is refused. Under the lock, what a killed run left there
(staging folders, a bundle moved aside mid-publish, half-written reports) is cleaned up or put back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from edgeq import interrupt
from edgeq.errors import UsageError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs into the same folder are not kept apart there
    fcntl = None

REJECTED_SUFFIX = ".rejected"
LOCK_NAME = ".edgeq.lock"
# What an interrupted or killed run can leave beside a bundle `<name>` (see staging, publish, write_atomic).
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>staging|old)-[A-Za-z0-9_]+")
_PARTIAL_FILE = re.compile(r"\..+\.partial")
_held: dict[Path, tuple[int, bool]] = {}  # model folder (absolute) -> (lock file descriptor, folder made by us)


def bundle_path(out: Path, model: str, target: str, precision: str) -> Path:
    return Path(out) / model / target / precision


def claim_output(model_dir: Path) -> None:
    """Hold `out/<model>/` for this process until it ends (or release_outputs): refuse when another run
    holds it, then clean up what killed runs left there. Called again for a folder already held: no-op."""
    model_dir = Path(model_dir)
    key = Path(os.path.abspath(model_dir))
    if key in _held or fcntl is None:
        return
    created = not key.exists()
    while True:
        try:
            key.mkdir(parents=True, exist_ok=True)
            handle = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:  # a file where the model's folder goes, a read-only place
            raise UsageError(f"cannot write bundles in {model_dir} ({exc.strerror}); give another --out or --name") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(handle)
            raise UsageError(
                f"another edgeq run (pid {holder}) is writing {model_dir}; wait for it to finish, or give another --out"
                " (or --name)"
            ) from None
        # The holder before us removes the lock file when it lets go (release_outputs): if it did so between
        # our open and our flock, we hold a lock on a file nobody else will open. Take the one in place.
        try:
            current = os.stat(key / LOCK_NAME).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle).st_ino:
            break
        os.close(handle)
    os.ftruncate(handle, 0)
    os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)  # for the message a second run prints
    _held[key] = (handle, created)
    remove_leftovers(key)


@contextmanager
def claimed(model_dir: Path):
    """Hold `out/<model>/` for the block (claim_output), and let go after it unless it was held before."""
    key = Path(os.path.abspath(model_dir))
    held_before = key in _held
    claim_output(model_dir)
    try:
        yield
    finally:
        if not held_before:
            _release(key)


def release_outputs() -> None:
    """Let other runs write where this process wrote."""
    for key in list(_held):
        _release(key)


def _release(key: Path) -> None:
    """Remove the lock file while still holding it (so no run waits on a file that is gone), then drop the
    lock; a model folder this run made and left empty (a run that failed before publishing) goes too."""
    entry = _held.pop(key, None)
    if entry is None:
        return
    handle, created = entry
    with suppress(OSError):
        (key / LOCK_NAME).unlink()
    os.close(handle)
    if created:
        with suppress(OSError):
            key.rmdir()  # only if empty


def remove_leftovers(model_dir: Path) -> list[Path]:
    """Clean what a killed run left in `model_dir` and its target folders: staging folders, half-written
    reports, and bundles moved aside by a publish cut between its two renames (put back when nothing took
    their place, else removed). Call only while holding the folder (claim_output). Returns what it touched."""
    touched = []
    for folder in [model_dir, *(p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith("."))]:
        for path in sorted(folder.iterdir()):
            match = _LEFTOVER.fullmatch(path.name)
            if match and path.is_dir():
                moved_aside = path / "bundle"
                dest = folder / match["name"]
                if match["kind"] == "old" and moved_aside.is_dir() and not dest.exists():
                    os.rename(moved_aside, dest)  # killed between publish's renames: the previous bundle returns
                shutil.rmtree(path, ignore_errors=True)
                touched.append(path)
            elif _PARTIAL_FILE.fullmatch(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                touched.append(path)
    return touched


@contextmanager
def staging(dest: Path):
    """A fresh hidden folder on the same filesystem as `dest` (`out/<model>/<target>/<precision>`); removed
    if the block raises. Claims `out/<model>/` first (claim_output), so stale leftovers go before it's made."""
    claim_output(dest.parent.parent)
    interrupt.checkpoint()  # a Ctrl-C a toolchain swallowed stops the run here, before new work
    dest.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=dest.parent))
    interrupt.note_writing(dest)
    os.chmod(folder, 0o777 & ~_umask())  # mkdtemp makes it private; a published bundle is an ordinary folder
    try:
        yield folder
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            interrupt.seen()  # cleaning up now: a second Ctrl-C must not cut the removal short
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(staged: Path, dest: Path) -> Path:
    """Move a complete staged bundle to `dest`, replacing what was there only once the new one is whole.
    Never after an interrupt, and never split by one (a signal during the renames waits for them)."""
    interrupt.checkpoint()
    with interrupt.deferred():
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.rename(dest, old / "bundle")
        try:
            os.rename(staged, dest)
        except BaseException:
            if old is not None:
                os.rename(old / "bundle", dest)  # put the previous bundle back
                old.rmdir()
            raise
        interrupt.note_published(dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # a kill here leaves `.old-*`: the next run removes it
    return dest


def write_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` through a hidden temp file in the same folder and a rename: readers see the
    old file or the new one, never half of one (reports, device results, a bundle's updated report.json)."""
    path = Path(path)
    interrupt.checkpoint()  # nothing is written after an interrupt, even one a toolchain swallowed
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    interrupt.note_writing(path, "file")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes it private; these are ordinary files
        with interrupt.deferred():
            os.replace(temp, path)
            interrupt.note_published(path)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            interrupt.seen()
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


TOKEN_MASK_PREFIX = "token_mask/"  # golden.npz: token_mask/<output> = the input whose 0/1 values mark its real positions


def write_golden(path: Path, inputs: list[dict], outputs: list[dict]) -> None:
    """golden.npz: `input/<name>` and `output/<name>` arrays with a leading sample axis (FP32 PyTorch outputs),
    and `token_mask/<output>` (a string: the mask input's name) for each token output, so a device compares
    those on the real positions as convert did (edgeq.validate.token_mask), with numpy alone."""
    from edgeq.validate.token_mask import token_outputs

    arrays = {}
    for name in inputs[0]:
        arrays[f"input/{name}"] = np.stack([sample[name] for sample in inputs])
    for name in outputs[0]:
        arrays[f"output/{name}"] = np.stack([sample[name] for sample in outputs]).astype(np.float32)
    for name, mask_input in token_outputs(inputs, outputs, list(outputs[0])).items():
        arrays[f"{TOKEN_MASK_PREFIX}{name}"] = np.array(mask_input)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def read_golden(path: Path) -> tuple[list[dict], list[dict]]:
    """The samples of a golden.npz as (inputs, outputs), one dict per sample."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    inputs = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("input/")}
    outputs = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("output/")}
    count = len(next(iter(inputs.values())))
    return (
        [{n: a[i] for n, a in inputs.items()} for i in range(count)],
        [{n: a[i] for n, a in outputs.items()} for i in range(count)],
    )


def read_golden_token_outputs(path: Path) -> dict[str, str]:
    """The token outputs a golden.npz records (output -> mask input). A golden file written before edgeq
    recorded them has none: its outputs are compared at every position, as its budget was held then."""
    with np.load(path, allow_pickle=False) as archive:
        return {k.removeprefix(TOKEN_MASK_PREFIX): str(archive[k]) for k in archive.files if k.startswith(TOKEN_MASK_PREFIX)}


def size_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
