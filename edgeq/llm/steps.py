"""The one contract between a decoder exported to a runtime and the generation metrics.

Every runtime (PyTorch reference, ONNX Runtime, LiteRT, Core ML through the MIL executor) exposes its
decoder as a `StepRunner`: it owns its KV cache, takes token ids as numpy and returns float32 logits as
numpy, so validate/generation.py and device bundles compare any two of them without torch.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class StepRunner(Protocol):
    """One decoder in one runtime, holding its own KV cache. numpy in, numpy out; torch-free for runtimes."""

    name: str            # e.g. "onnxruntime", "litert", "coreml-mil-executor", "pytorch"
    max_context: int

    def reset(self) -> None:
        """Empty the cache; the next token is at position 0."""
        ...

    def prefill(self, token_ids: np.ndarray) -> np.ndarray:
        """int64 [n] (1 <= n, pos + n <= max_context) -> float32 logits [n, vocab] for these n positions.

        The cache advances by n. A runtime with a fixed prefill length pads internally and returns only
        the n real rows.
        """
        ...

    def decode(self, token_id: int) -> np.ndarray:
        """One token -> float32 logits [vocab]; the cache advances by one."""
        ...


def check_prefill_ids(token_ids: np.ndarray, position: int, max_context: int) -> np.ndarray:
    """Validate and normalise a prefill argument to int64 [n]; raise UsageError when it cannot fit.

    Shared by the runners so they refuse the same inputs with the same message.
    """
    from edgeq.errors import UsageError

    ids = np.asarray(token_ids)
    if ids.ndim != 1 or ids.size < 1:
        raise UsageError(f"prefill takes a 1-D array of at least one token id, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise UsageError(f"prefill takes integer token ids, got dtype {ids.dtype}")
    if position + ids.size > max_context:
        raise UsageError(
            f"{ids.size} tokens at position {position} exceed the maximum context {max_context}; "
            "reset() the runner or export with a larger --max-context")
    return ids.astype(np.int64)
