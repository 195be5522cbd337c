"""The FP32 PyTorch reference decoder as a StepRunner: the Hugging Face model with its own DynamicCache.

Every exported decoder is compared against this runner step by step (validate/generation.py), so it runs
the model exactly as transformers generates with it: one forward per prefill chunk or decoded token,
the cache carried between calls, positions counted here.
"""

from __future__ import annotations

import numpy as np

from edgeq.errors import UsageError
from edgeq.llm.steps import check_prefill_ids


class TorchStepRunner:
    """`hf_model` (a transformers CausalLM) in float32 eval mode, holding its KV cache; numpy in and out."""

    name = "pytorch"

    def __init__(self, hf_model, max_context: int):
        if max_context < 1:
            raise UsageError(f"max context {max_context}: a decoder needs at least one position")
        import torch

        # nn.Module.float: a model read from GGUF is flagged quantized and refuses its own .float()
        self.model = torch.nn.Module.float(hf_model).eval()
        self.max_context = int(max_context)
        self.reset()

    def reset(self) -> None:
        self._cache = None
        self._position = 0

    @property
    def position(self) -> int:
        return self._position

    def prefill(self, token_ids: np.ndarray) -> np.ndarray:
        ids = check_prefill_ids(token_ids, self._position, self.max_context)
        return self._forward(ids)

    def decode(self, token_id: int) -> np.ndarray:
        ids = check_prefill_ids(np.array([int(token_id)]), self._position, self.max_context)
        return self._forward(ids)[0]

    def _forward(self, ids: np.ndarray) -> np.ndarray:
        import torch
        from transformers import DynamicCache

        n = ids.size
        if self._cache is None:
            self._cache = DynamicCache()
        positions = torch.arange(self._position, self._position + n).unsqueeze(0)
        with torch.no_grad():
            out = self.model(input_ids=torch.from_numpy(ids).unsqueeze(0),
                             attention_mask=torch.ones(1, self._position + n, dtype=torch.long),
                             position_ids=positions, past_key_values=self._cache, use_cache=True)
        self._cache = out.past_key_values
        self._position += n
        return out.logits[0].float().numpy()
