"""Token outputs: outputs with a sequence axis, compared only where the attention mask marks a real token.

A text model computes a value at every position of its padded input, but padding positions are read by no
consumer (pooling, attention and token heads mask them) and drift freely under quantization: counted, they
swamp the figures of the real tokens (all-MiniLM-L6-v2's last_hidden_state at int8-dynamic: cosine 0.88 over
all 128 positions, 0.999 over the real ones). So drift of a token output is measured on the real positions.

Which outputs are token outputs is decided from shapes, per sample:
- the mask is the model input named `attention_mask` (MASK_INPUT), shaped like the text inputs, e.g.
  [batch, seq], holding 0 (padding) and 1 (a real token). A model without such an input has no token
  outputs: every output is compared at every position. A mask holding other values (an additive float mask of
  0 and -inf, where 0 means *real*) is not read as one, and nothing is masked.
- an output is a token output when its shape starts with the mask's whole shape and has at least one more
  axis: [batch, seq, hidden] (last_hidden_state), [batch, seq, classes] (token classification). An output of
  the mask's own rank ([batch, seq] start logits) is not: by shape it cannot be told from a pooled [batch,
  features] output whose feature count happens to equal the sequence length, and comparing a pooled output on
  a subset of its features would hide drift. Such outputs are compared at every position, as before.
- the decision must hold for every sample; outputs are masked with their own sample's mask.

Convert time records the decision in golden.npz (`token_mask/<output>` = the mask input's name, edgeq.bundle),
so a device re-checks exactly what convert checked with numpy alone. A golden file without these entries
(bundles written before them) is compared at every position, as its budget was held then.

numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MASK_INPUT = "attention_mask"


@dataclass(frozen=True)
class TokenMask:
    """The real positions of one token output: `real[i]` is sample i's boolean mask, shaped like the mask input."""

    input: str  # the model input the positions come from (MASK_INPUT)
    real: tuple[np.ndarray, ...]

    @property
    def positions(self) -> int:
        """Real positions over all samples (batch x seq positions marked 1)."""
        return int(sum(int(m.sum()) for m in self.real))

    @property
    def positions_total(self) -> int:
        return int(sum(m.size for m in self.real))

    def select(self, index: int, array: np.ndarray) -> np.ndarray:
        """Sample `index`'s values at its real positions: [real positions, *trailing axes]."""
        return np.asarray(array)[self.real[index]]


def binary_mask(value) -> np.ndarray | None:
    """`value` as a boolean mask (True: real token) when it holds only 0 and 1, else None."""
    array = np.asarray(value)
    if array.ndim == 0 or array.size == 0:
        return None
    if not np.isin(array, (0, 1)).all():
        return None  # an additive mask (0 / -inf) or an extended one: not positions to read
    return array != 0


def is_token_shape(shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> bool:
    """[batch, seq, ...] against a [batch, seq] mask: the mask's whole shape first, then at least one more axis."""
    return len(shape) > len(mask_shape) and tuple(shape[: len(mask_shape)]) == tuple(mask_shape)


def token_outputs(inputs: list[dict], references: list[dict], output_names: list[str]) -> dict[str, str]:
    """Output name -> the mask input, for every output that is a token output in every sample (see the module
    docstring); empty when the inputs have no binary `attention_mask`."""
    if not inputs or any(MASK_INPUT not in sample for sample in inputs):
        return {}
    masks = [binary_mask(sample[MASK_INPUT]) for sample in inputs]
    if any(mask is None for mask in masks):
        return {}
    found = {}
    for name in output_names:
        shapes = [np.shape(sample[name]) for sample in references if name in sample]
        if len(shapes) == len(masks) and all(is_token_shape(s, m.shape) for s, m in zip(shapes, masks)):
            found[name] = MASK_INPUT
    return found


def token_masks(inputs: list[dict], references: list[dict], output_names: list[str], recorded: dict[str, str] | None = None) -> dict[str, TokenMask]:
    """The TokenMask of each token output. `recorded` (from a golden file) names the token outputs and their mask
    input, as convert decided; None decides from the shapes (token_outputs). A recorded output whose shapes no
    longer fit its mask is refused (ValueError): the golden file and its inputs disagree."""
    chosen = token_outputs(inputs, references, output_names) if recorded is None else recorded
    result = {}
    for name, mask_input in chosen.items():
        if name not in output_names:
            continue
        real = []
        for index, (sample, reference) in enumerate(zip(inputs, references)):
            mask = binary_mask(sample[mask_input]) if mask_input in sample else None
            if mask is None or not is_token_shape(np.shape(reference[name]), mask.shape):
                raise ValueError(
                    f"output {name!r}, sample {index}: the golden file marks it a token output masked by "
                    f"{mask_input!r}, but that input is missing, not a 0/1 mask, or does not fit the output's shape"
                )
            real.append(mask)
        result[name] = TokenMask(mask_input, tuple(real))
    return result
