"""Will a conversion's data fit in memory? Checked before any sample is loaded, so a request that cannot fit
ends with a UsageError naming the option to lower, not with the kernel's OOM killer.

What a conversion holds grows with two options, and only through the data (calibration itself streams: its
observers keep fixed-size histograms and running maxima, see calibration/observers.py):
  --samples N               each validation sample's inputs, its FP32 PyTorch outputs (the reference), the
                            FP32 artifact's outputs and the artifact's own outputs, all held until the bundle
                            is written, plus golden.npz's stacked copy of inputs and reference outputs
  --calibration-samples M   each calibration sample's inputs, loaded up front with the validation ones
and, whatever the options, about two more copies of the model's weights while it is converted (the export
and the runtime session; the loaded model is already in memory). The estimate is a floor: a request it
refuses cannot fit; one it lets through may still need more (activations of one forward pass, the toolchain's
own copies).

What is available is the least of: MemAvailable in /proc/meminfo, the cgroup's memory limit less its usage,
RLIMIT_AS less this process's virtual size, and EDGEQ_MEMORY_LIMIT (bytes, or with K/M/G suffix: memory
edgeq's process may use in all) less this process's resident size.
"""

from __future__ import annotations

import math
import os
import re
import resource
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.errors import UsageError

MEMORY_LIMIT_VARIABLE = "EDGEQ_MEMORY_LIMIT"
# Outputs held per validation sample: the PyTorch reference, the FP32 artifact's, the artifact's, golden's stack.
_OUTPUT_COPIES = 4
# Inputs held per validation sample: the sample, golden's stack.
_VALIDATION_INPUT_COPIES = 2
_MODEL_COPIES = 2  # the exported graph and the runtime session, besides the loaded module
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a huge page-rounded number


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes a conversion will hold: per validation sample, per calibration sample, and whatever the counts."""

    per_validation: int
    per_calibration: int
    fixed: int

    def total(self, validation: int, calibration: int) -> int:
        return self.fixed + validation * self.per_validation + calibration * self.per_calibration


def tensor_bytes(shape, dtype) -> int:
    return math.prod(int(d) for d in shape) * np.dtype(dtype).itemsize


def estimate_need(input_bytes: int, output_bytes: int, model_bytes: int) -> MemoryNeed:
    """The need for samples of `input_bytes` inputs and `output_bytes` outputs each, and a model whose
    parameters and buffers take `model_bytes` (see the module docstring for what is counted)."""
    return MemoryNeed(
        per_validation=_VALIDATION_INPUT_COPIES * input_bytes + _OUTPUT_COPIES * output_bytes,
        per_calibration=input_bytes,
        fixed=_MODEL_COPIES * model_bytes,
    )


def model_need(model) -> MemoryNeed:
    """The need of a LoadedModel: input bytes from its declared inputs, output bytes from one forward pass on
    its example inputs (outputs have no declared shapes), model bytes from its parameters and buffers."""
    import torch

    input_bytes = sum(tensor_bytes(spec.shape, spec.dtype) for spec in model.inputs)
    try:
        with torch.no_grad():
            outputs = model.module(*model.example_inputs)
    except Exception:  # noqa: BLE001 - loading ran this forward already; if it fails now, the reference pass says why
        outputs = ()
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    # Outputs are kept as float32 whatever torch returned (calibration.collect.run_module).
    output_bytes = sum(out.numel() * 4 for out in outputs if isinstance(out, torch.Tensor))
    tensors = [*model.module.parameters(), *model.module.buffers()]
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    return estimate_need(input_bytes, output_bytes, model_bytes)


def available_memory() -> tuple[int, str]:
    """(bytes this process can still allocate, where that figure comes from): the tightest of the limits in
    the module docstring; (2**60, "no limit found") when none can be read."""
    found = [(_NO_LIMIT, "no limit found")]
    meminfo = _read_meminfo()
    if "MemAvailable" in meminfo:
        found.append((meminfo["MemAvailable"], "MemAvailable in /proc/meminfo"))
    for limit_file, usage_file in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit, usage = _read_int(Path("/sys/fs/cgroup") / limit_file), _read_int(Path("/sys/fs/cgroup") / usage_file)
        if limit is not None and limit < _NO_LIMIT and usage is not None:
            found.append((limit - usage, f"the cgroup's memory limit ({_size(limit)}) less its usage"))
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    status = _read_status()
    if soft != resource.RLIM_INFINITY and "VmSize" in status:
        found.append((soft - status["VmSize"], f"RLIMIT_AS ({_size(soft)}) less this process's virtual size"))
    text = os.environ.get(MEMORY_LIMIT_VARIABLE)
    if text is not None:
        limit = parse_size(text, MEMORY_LIMIT_VARIABLE)
        found.append((limit - status.get("VmRSS", 0), f"{MEMORY_LIMIT_VARIABLE}={text} less this process's resident size"))
    return min(found, key=lambda item: item[0])


def check_fits(need: MemoryNeed, validation: int, calibration: int, available: tuple[int, str] | None = None) -> None:
    """Raise UsageError when `validation` + `calibration` samples clearly cannot fit in `available`
    (default: available_memory()), naming the option to lower and a count that would fit."""
    room, source = available if available is not None else available_memory()
    total = need.total(validation, calibration)
    if total <= room:
        return
    held = (
        f"{validation} validation sample(s) x {_size(need.per_validation)} and {calibration} calibration sample(s) x "
        f"{_size(need.per_calibration)}, plus {_size(need.fixed)} of model copies"
    )
    problem = f"this conversion would hold about {_size(total)} ({held}), but {_size(max(room, 0))} is available ({source})"
    fits_calibration = (room - need.total(validation, 0)) // need.per_calibration if need.per_calibration else -1
    fits_validation = (room - need.total(0, calibration)) // need.per_validation if need.per_validation else -1
    if calibration and fits_calibration >= 1:
        raise UsageError(f"{problem}; lower --calibration-samples to at most {fits_calibration}")
    if fits_validation >= 1:
        raise UsageError(f"{problem}; lower --samples to at most {fits_validation}")
    fits_both = (room - need.total(1, 0)) // need.per_calibration if need.per_calibration else -1
    if fits_both >= 0:
        raise UsageError(f"{problem}; lower --samples to 1 and --calibration-samples to at most {fits_both}")
    raise UsageError(
        f"{problem}; even one sample does not fit: free memory, run on a machine with more, "
        f"or raise {MEMORY_LIMIT_VARIABLE} if it is set"
    )


def check_request(model, validation: int, calibration: int) -> None:
    """check_fits for a LoadedModel: the pipeline's call before it loads any sample."""
    check_fits(model_need(model), validation, calibration)


def parse_size(text: str, where: str) -> int:
    """Bytes from '2147483648', '512M', '2G', '1.5GiB' (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not match:
        raise UsageError(f"{where}={text!r}: expected a size in bytes, or with a K, M, G or T suffix (e.g. 4G)")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def _size(count: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(count) >= factor:
            return f"{count / factor:.1f} {unit}"
    return f"{count} B"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _read_kib_table(path: str) -> dict[str, int]:
    """`Key: N kB` lines as bytes."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return {}
    table = {}
    for line in lines:
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            table[key] = int(parts[0]) * 1024
    return table


def _read_meminfo() -> dict[str, int]:
    return _read_kib_table("/proc/meminfo")


def _read_status() -> dict[str, int]:
    return _read_kib_table("/proc/self/status")
