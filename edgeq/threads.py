"""How many CPU threads edgeq's own computing uses during `edgeq convert`: PyTorch (reference outputs,
calibration passes, SmoothQuant, bias correction, the sensitivity sweep, GPTQ/AWQ on the CPU) and numpy's BLAS
(the MIL reference executor, observers).

One thread by default, for two reasons:
- Reruns give the same bytes on any machine. A GEMM's blocking, and so its float rounding, can follow the thread
  count; calibration numbers made with the machine's core count would differ between a laptop and a CI runner.
- Batch-1 passes over a small model gain little from a second thread and lose a lot when the cores are shared:
  all-MiniLM-L6-v2, one forward at sequence 128 on this 2-core machine with other jobs running took 0.05 s of CPU
  (0.10 s wall) on one thread and 0.39 to 0.54 s of CPU (0.67 to 0.98 s wall) on two, the OpenMP workers spinning
  while they wait for a core; numpy's OpenBLAS did the same in the MIL executor (0.9 s -> 0.24 s of CPU per run).

EDGEQ_THREADS=N gives edgeq N threads instead (a dedicated many-core machine converting a large model on the CPU).
The runtimes' own sessions are not governed by this: their threads are the profile's (validate/latency.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

ENV = "EDGEQ_THREADS"
DEFAULT_THREADS = 1


def work_threads() -> int:
    """EDGEQ_THREADS when set to a positive integer, else DEFAULT_THREADS."""
    from edgeq.errors import UsageError

    text = os.environ.get(ENV, "").strip()
    if not text:
        return DEFAULT_THREADS
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise UsageError(f"{ENV}={text!r}: expected a positive number of threads, e.g. {ENV}=4")
    return count


@contextlib.contextmanager
def limited_threads(count: int | None = None) -> Iterator[int]:
    """Run the block with PyTorch's intra-op threads and numpy's BLAS threads set to `count` (default:
    work_threads()); both are restored afterwards. BLAS is limited through threadpoolctl where it is installed."""
    import torch

    count = work_threads() if count is None else count
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    blas = contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits

        blas = threadpool_limits(limits=count, user_api="blas")
    except ImportError:
        pass
    try:
        with blas:
            yield count
    finally:
        torch.set_num_threads(saved)
