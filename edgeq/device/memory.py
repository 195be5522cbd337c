"""Peak memory of this process while it validates a bundle. Standard library only.

`resource.getrusage` gives the process's peak resident set size since it started (ru_maxrss: KiB on Linux,
bytes on macOS). On Linux, /proc also gives the current RSS and lets a process reset its own peak
(`/proc/self/clear_refs`), so the peak and the increase over one bundle's run are that run's alone.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

try:
    import resource
except ImportError:  # Windows: no getrusage
    resource = None


def peak_rss_bytes() -> int | None:
    """The process's peak RSS since it started, in bytes (getrusage)."""
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _proc_status_bytes(field: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS: now, VmHWM: peak since the last reset), in bytes."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@dataclass
class MemoryUse:
    peak_rss_bytes: int | None = None  # process peak since start (getrusage)
    rss_before_bytes: int | None = None  # RSS when the run started (Linux)
    run_peak_rss_bytes: int | None = None  # peak RSS during the run only (Linux, after resetting VmHWM)
    rss_increase_bytes: int | None = None  # the run's peak minus the RSS before it

    def to_json(self) -> dict:
        return dict(self.__dict__)


class MemoryWatch:
    """`with MemoryWatch() as watch: ...` then `watch.use`: peak RSS and the increase over the block."""

    def __enter__(self) -> MemoryWatch:
        self.use = MemoryUse(rss_before_bytes=_proc_status_bytes("VmRSS"))
        self._reset = self.use.rss_before_bytes is not None and _reset_peak()
        return self

    def __exit__(self, *exc) -> None:
        use = self.use
        use.peak_rss_bytes = peak_rss_bytes()
        if self._reset:
            use.run_peak_rss_bytes = _proc_status_bytes("VmHWM")
        peak = use.run_peak_rss_bytes if use.run_peak_rss_bytes is not None else use.peak_rss_bytes
        if peak is not None and use.rss_before_bytes is not None:
            use.rss_increase_bytes = max(0, peak - use.rss_before_bytes)


def megabytes(count: int | None) -> str:
    return "-" if count is None else f"{count / 1e6:.1f} MB"

