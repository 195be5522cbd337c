"""Run a decoder .onnx (edgeq/llm/onnx_decoder.py layout) step by step in onnxruntime: a torch-free StepRunner.

The cache lives here as numpy: each call feeds the previous call's presents as the past and keeps the new
presents (past + sequence long), as onnxruntime-genai does without a shared past/present buffer. The cache's
dtype is the graph's: float32, or int8 codes for an int8-cache decoder (edgeq/llm/kv_cache.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from edgeq.llm.steps import check_prefill_ids

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_CACHE_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}


class OnnxDecoderRunner:
    name = "onnxruntime"

    def __init__(self, path: Path, max_context: int, *, threads: int = 1, optimization: str = "all"):
        import onnxruntime as ort

        from edgeq.validate.runners.base import RunnerError

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise RunnerError(f"{path}: onnxruntime cannot load the decoder: {exc}") from exc
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = {"input_ids", "attention_mask", "position_ids"} - set(inputs)
        self.past_names = sorted((n for n in inputs if _PAST.match(n)),
                                 key=lambda n: (int(_PAST.match(n)[1]), _PAST.match(n)[2] != "key"))
        if missing or not self.past_names:
            raise RunnerError(f"{path}: not a decoder with a KV cache (inputs {sorted(inputs)})")
        past = inputs[self.past_names[0]]
        if past.type not in _CACHE_DTYPES:
            raise RunnerError(f"{path}: KV cache of {past.type}; this runner carries {', '.join(_CACHE_DTYPES)}")
        self.cache_dtype = np.dtype(_CACHE_DTYPES[past.type])
        shape = past.shape  # [batch, kv_heads, past_sequence, head_dim]
        self._empty = np.zeros((1, int(shape[1]), 0, int(shape[3])), self.cache_dtype)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.max_context = int(max_context)
        self.path = Path(path)
        self.reset()

    def reset(self) -> None:
        self._past = [self._empty] * len(self.past_names)
        self._position = 0

    @property
    def position(self) -> int:
        return self._position

    def prefill(self, token_ids: np.ndarray) -> np.ndarray:
        ids = check_prefill_ids(token_ids, self._position, self.max_context)
        return self._run(ids)

    def decode(self, token_id: int) -> np.ndarray:
        ids = check_prefill_ids(np.array([int(token_id)]), self._position, self.max_context)
        return self._run(ids)[0]

    def _run(self, ids: np.ndarray) -> np.ndarray:
        n = ids.size
        feed = {"input_ids": ids[None], "attention_mask": np.ones((1, self._position + n), np.int64),
                "position_ids": np.arange(self._position, self._position + n, dtype=np.int64)[None]}
        feed.update(zip(self.past_names, self._past))
        outputs = dict(zip(self.output_names, self.session.run(None, feed)))
        self._past = [outputs[name.replace("past_key_values.", "present.")] for name in self.past_names]
        self._position += n
        return np.asarray(outputs["logits"][0], dtype=np.float32)
