"""A `.tflite` decoder with "prefill" and "decode" signatures as a StepRunner (edgeq/llm/steps.py).

The artifact (edgeq/llm/tflite_decoder.py) lays its KV cache out as litert-torch's generative API
(`litert_torch.generative.export_hf`, what LiteRT-LM runs) does: per layer `kv_cache_k_{i}` [1, kv_heads, S, head_dim]
and `kv_cache_v_{i}` [1, kv_heads, head_dim, S] (values transposed, sequence last), S the fixed maximum
context. Both signatures take `tokens` int32 [1, T], `input_pos` int32 [T], an additive float `mask`
[1, 1, T, S] and every cache tensor, and return the updated caches and `logits` [1, T, vocab]. The caches
are carried here in numpy from one call's outputs to the next call's inputs.

The prefill signature has one fixed length T: a shorter prompt is padded (the padded rows write cache rows
past the prompt that the mask hides and the next call overwrites), a longer one runs in chunks, and where a
chunk would run past S (LiteRT's DYNAMIC_UPDATE_SLICE clamps its start so the slice fits, writing the wrong
rows) the rest runs through "decode" one token at a time.

Imports numpy and the LiteRT interpreter only (runs on a device image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.validate.runners.base import RunnerError
from edgeq.validate.runners.tflite_kv_carry import CACHE_PREFIX, open_carry

PREFILL, DECODE = "prefill", "decode"
MASKED = np.float32(-1e30)  # additive mask of a hidden position: exp() underflows to exactly 0 after softmax


class TFLiteDecoderRunner:
    """StepRunner over one decoder `.tflite` in LiteRT (default CPU delegate: XNNPACK)."""

    name = "litert"

    def __init__(self, path: Path, max_context: int, threads: int | None = None):
        from edgeq.validate.runners.litert import load_interpreter_class

        interpreter_class, version = load_interpreter_class()
        try:
            self.interpreter = interpreter_class(model_path=str(path), num_threads=threads)
            signatures = self.interpreter.get_signature_list()
            missing = {PREFILL, DECODE} - set(signatures)
            if missing:
                raise RunnerError(f"{path} has signatures {sorted(signatures)}; an edgeq decoder has 'prefill' and 'decode'")
            details = self.interpreter.get_signature_runner(DECODE).get_input_details()
            self.cache_names = sorted(n for n in details if n.startswith(CACHE_PREFIX))
            context = int(details["mask"]["shape"][-1])
            if context != max_context:
                raise RunnerError(f"{path} was exported for a maximum context of {context}, not {max_context}")
            self.prefill_length = int(self.interpreter.get_signature_runner(PREFILL).get_input_details()["tokens"]["shape"][1])
            self._carry = open_carry(self.interpreter, [PREFILL, DECODE], self.cache_names)
        except RunnerError:
            raise
        except Exception as exc:
            raise RunnerError(f"LiteRT could not load {path}: {exc}") from exc
        self.max_context = max_context
        self.cache_dtype = self._carry.cache_dtype
        self.executor = f"{version} (CPU, default delegate, signatures prefill[{self.prefill_length}] and decode)"
        self.reset()

    def reset(self) -> None:
        self.position = 0
        self._carry.reset()

    def prefill(self, token_ids: np.ndarray) -> np.ndarray:
        from edgeq.llm.steps import check_prefill_ids

        ids = check_prefill_ids(token_ids, self.position, self.max_context)
        rows, start = [], 0
        length = self.prefill_length
        while start < ids.size and self.position + length <= self.max_context:
            count = min(length, ids.size - start)
            rows.append(self._step(PREFILL, ids[start:start + count], length))
            start += count
        rows += [self._step(DECODE, ids[i:i + 1], 1) for i in range(start, ids.size)]
        return np.concatenate(rows, axis=0)

    def decode(self, token_id: int) -> np.ndarray:
        from edgeq.llm.steps import check_prefill_ids

        ids = check_prefill_ids(np.asarray([token_id]), self.position, self.max_context)
        return self._step(DECODE, ids, 1)[0]

    def _step(self, signature: str, ids: np.ndarray, length: int) -> np.ndarray:
        """Run `ids` (n <= length) at the current position through a signature of `length` rows; the n rows' logits."""
        count = ids.size
        tokens = np.zeros((1, length), np.int32)
        tokens[0, :count] = ids
        positions = np.arange(self.position, self.position + length, dtype=np.int32)
        # Row t sees cache rows 0 .. position + t (causal); padded rows see as much as the last real one.
        visible = np.minimum(positions, self.position + count - 1)
        mask = np.where(np.arange(self.max_context)[None, :] <= visible[:, None], np.float32(0), MASKED)
        feeds = {"tokens": tokens, "input_pos": positions, "mask": mask[None, None].astype(np.float32)}
        try:
            result = self._carry.run(signature, feeds, self.position, length, ("logits",))
        except Exception as exc:
            raise RunnerError(f"LiteRT failed to run the decoder at position {self.position}: {exc}") from exc
        self.position += count
        return np.array(result["logits"][0, :count], dtype=np.float32)


def open_decoder_runner(path: Path, max_context: int, threads: int | None = None) -> TFLiteDecoderRunner:
    return TFLiteDecoderRunner(Path(path), max_context, threads)
