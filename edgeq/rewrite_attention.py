"""nn.MultiheadAttention rebuilt from four nn.Linear layers (q_proj, k_proj, v_proj, out_proj), so a plan can
quantize its projections like any other linear layer.

nn.MultiheadAttention hands its packed `in_proj_weight` [3E, E] (or q/k/v_proj_weight) and `out_proj`'s weight
to F.multi_head_attention_forward: no converter sees a linear layer there, and out_proj's module is never
called. LinearAttention computes the same function (softmax(q k^T / sqrt(head_dim) + mask) v, then out_proj)
with the same numbers and the same call signature. The PyTorch fast paths of nn.TransformerEncoderLayer /
DecoderLayer / TransformerEncoder read `in_proj_weight` directly; they check `in_proj_bias` and
`_qkv_same_embed_dim` first, which this module sets to None / False, so those layers take their plain path
(the same math, without the fused kernel).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from edgeq.rewrite_recurrent import _linear


def attention_refusal(module: nn.MultiheadAttention) -> str | None:
    """Why `module` cannot be rebuilt exactly (its weights then stay float), or None."""
    if module.bias_k is not None:
        return "add_bias_kv=True (learned key/value bias rows) is not rebuilt"
    if module.add_zero_attn:
        return "add_zero_attn=True is not rebuilt"
    return None


class LinearAttention(nn.Module):
    """nn.MultiheadAttention (without add_bias_kv / add_zero_attn) as q_proj, k_proj, v_proj and out_proj."""

    in_proj_weight = None  # read by the fast-path checks of nn.Transformer* layers: None takes their plain path
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, module: nn.MultiheadAttention):
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first = module.embed_dim, module.num_heads, module.batch_first
        self.head_dim = module.head_dim
        E = module.embed_dim
        if module._qkv_same_embed_dim:
            weights = module.in_proj_weight.chunk(3, 0)
        else:
            weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        biases = module.in_proj_bias.chunk(3, 0) if module.in_proj_bias is not None else (None,) * 3
        self.q_proj, self.k_proj, self.v_proj = (_linear(w, b) for w, b in zip(weights, biases))
        self.out_proj = _linear(module.out_proj.weight, module.out_proj.bias)
        assert self.q_proj.out_features == E  # noqa: S101  (nn.MultiheadAttention's own invariant)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, target, source = query.shape[0], query.shape[1], key.shape[1]
        heads, width = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(batch, target, heads, width).transpose(1, 2)  # (N, H, L, D)
        k = self.k_proj(key).reshape(batch, source, heads, width).transpose(1, 2)
        v = self.v_proj(value).reshape(batch, source, heads, width).transpose(1, 2)
        scores = torch.matmul(q * (1.0 / math.sqrt(width)), k.transpose(-2, -1))  # (N, H, L, S)
        mask = _additive_mask(attn_mask, key_padding_mask, is_causal, target, source, batch, heads, q.dtype)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, -1)
        output = torch.matmul(weights, v).transpose(1, 2).reshape(batch, target, self.embed_dim)
        output = self.out_proj(output)
        if not batched:
            output = output.squeeze(0)
        elif not self.batch_first:
            output = output.transpose(0, 1)
        if not need_weights:
            return output, None
        weights = weights.mean(1) if average_attn_weights else weights
        return output, (weights if batched else weights.squeeze(0))


def _additive_mask(attn_mask, key_padding_mask, is_causal, target, source, batch, heads, dtype):
    """attn_mask ((L, S) or (N*H, L, S)) and key_padding_mask ((N, S)) as one float mask to add to the
    (N, H, L, S) scores: True (masked) and -inf entries become -inf, as F.multi_head_attention_forward does."""
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(target, source, dtype=torch.bool).triu(1)
    mask = None
    if attn_mask is not None:
        mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=dtype, check_other=False)
        mask = mask.reshape(batch, heads, target, source) if mask.dim() == 3 else mask
    if key_padding_mask is not None:
        padding = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask", other_type=None, other_name="", target_type=dtype, check_other=False)
        padding = padding.reshape(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    return mask
