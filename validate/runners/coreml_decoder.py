"""A stateful Core ML decoder (.mlpackage, edgeq/llm/coreml_decoder.py) as a StepRunner (edgeq/llm/steps.py).

The program takes `input_ids` int32 [1, n], `cache_position` int32 [n] and an additive `causal_mask` float32
[1, 1, n, max_context], returns `logits` [1, n, vocab], and keeps its KV cache in two Core ML states
(`k_cache`, `v_cache`). Any n from 1 to max_context runs in one call, so a prompt is one prefill.

Where it runs:
- Linux (and anywhere without Core ML prediction): edgeq's MIL reference executor (numpy,
  `edgeq.validate.mil`) runs the artifact's ML program and holds the two states between calls, zero-filled at
  reset as `MLModel.make_state()` allocates them. `name` is "coreml-mil-executor": a reference for the
  program's semantics, not Apple's runtime.
- macOS 15+: `MLModel.make_state()` and `MLModel.predict(inputs, state=state)` (coremltools 8+). Written for
  completeness, never run in edgeq's CI or on this Linux machine: it is untested.

Imports numpy and coremltools only (no torch).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np

from edgeq.validate.runners.base import RunnerError

MASKED = np.float32(-1e30)  # a hidden cache row: exp() underflows to exactly 0 (and fp16 rounds it to -inf)
METADATA_KEY = "edgeq.decoder"


class CoreMLDecoderRunner:
    """StepRunner over one stateful decoder .mlpackage: Core ML on macOS, edgeq's MIL executor elsewhere."""

    def __init__(self, path: Path, max_context: int, executor: str = "auto"):
        import coremltools as ct

        if executor not in ("auto", "reference", "coreml"):
            raise RunnerError(f"executor {executor!r} is not one of auto, reference, coreml")
        try:
            spec = ct.utils.load_spec(str(path))
        except Exception as exc:
            raise RunnerError(f"coremltools could not read {path}: {exc}") from exc
        raw = spec.description.metadata.userDefined.get(METADATA_KEY)
        if not raw:
            raise RunnerError(f"{path} is not an edgeq stateful decoder (no {METADATA_KEY!r} record in its metadata)")
        record = json.loads(raw)
        if int(record["max_context"]) != int(max_context):
            raise RunnerError(f"{path} was exported for a maximum context of {record['max_context']}, not {max_context}")
        self.max_context = int(max_context)
        on_macos = platform.system() == "Darwin"
        self.model = self.program = None
        if executor == "reference" or (executor == "auto" and not on_macos):
            from edgeq.validate.mil import MILError, MILExecutor

            try:
                self.program = MILExecutor(path)
            except MILError as exc:
                raise RunnerError(f"edgeq's MIL reference executor cannot run {path.name}: {exc}") from exc
            missing = set(record["states"]) - set(self.program.states)
            if missing:
                raise RunnerError(f"{path}: the ML program has no state {sorted(missing)}")
            self.name = "coreml-mil-executor"
            why = "asked for" if on_macos else f"Core ML prediction exists only on macOS; this is {platform.system()}"
            self.executor = f"{self.program.label}; {_precision(self.program)}; states held in numpy ({why})"
        elif on_macos:  # untested here: needs macOS 15 (MLState)
            try:
                self.model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)
            except Exception as exc:
                raise RunnerError(f"Core ML could not load {path}: {exc}") from exc
            self.name = "coreml"
            self.executor = f"Core ML via coremltools {ct.__version__} (CPU_ONLY, MLState)"
        else:
            raise RunnerError(f"Core ML prediction (MLModel.predict with MLState) runs only on macOS 15+; this is "
                              f"{platform.system()} (executor='coreml' was asked for; 'auto' uses edgeq's MIL executor)")
        self.reset()

    def reset(self) -> None:
        self.position = 0
        if self.program is not None:
            self.program.reset_states()
        else:
            self.state = self.model.make_state()  # zero-filled state buffers

    def prefill(self, token_ids: np.ndarray) -> np.ndarray:
        from edgeq.llm.steps import check_prefill_ids

        return self._step(check_prefill_ids(token_ids, self.position, self.max_context))

    def decode(self, token_id: int) -> np.ndarray:
        from edgeq.llm.steps import check_prefill_ids

        return self._step(check_prefill_ids(np.asarray([token_id]), self.position, self.max_context))[0]

    def _step(self, ids: np.ndarray) -> np.ndarray:
        feeds = step_inputs(ids, self.position, self.max_context)
        try:
            if self.program is not None:
                logits = self.program.run(feeds)["logits"]
            else:
                logits = self.model.predict(feeds, state=self.state)["logits"]
        except Exception as exc:
            raise RunnerError(f"{self.name} failed to run the decoder at position {self.position}: {exc}") from exc
        self.position += ids.size
        return np.asarray(logits[0], dtype=np.float32)


def _precision(program) -> str:
    """What is fp16 in the program: an fp32 artifact's only fp16 values are its states and their casts."""
    fp16 = {op.type for op in program.function.ops for _, vtype in op.outputs if vtype.dtype == "float16"}
    if fp16 <= {"read_state", "cast", "coreml_update_state"}:
        return "fp32 compute, KV cache stored in fp16 states (Core ML states are fp16)"
    return "fp16 compute" + (" (norm statistics fp32)" if any(
        op.type == "reduce_mean" and op.outputs[0][1].dtype == "float32" for op in program.function.ops) else "")


def step_inputs(ids: np.ndarray, position: int, max_context: int) -> dict[str, np.ndarray]:
    """The program's inputs for tokens `ids` at `position`: row i (position + i) sees cache rows 0 ..= position + i."""
    n = ids.size
    positions = np.arange(position, position + n, dtype=np.int32)
    mask = np.where(np.arange(max_context)[None, :] <= positions[:, None], np.float32(0), MASKED).astype(np.float32)
    return {"input_ids": ids.astype(np.int32)[None], "cache_position": positions, "causal_mask": mask[None, None]}


def open_decoder_runner(path: Path, max_context: int, executor: str = "auto") -> CoreMLDecoderRunner:
    return CoreMLDecoderRunner(Path(path), max_context, executor)
