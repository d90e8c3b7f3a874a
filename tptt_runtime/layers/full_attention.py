"""Full causal softmax attention over a LiZA layer's own q, k, v and its exact split at the window.

The reference that training (train/transfer.py: attention transfer) and the recall probes (eval/recall.py)
compare the memory with; serving never runs it (it is quadratic in the sequence and holds [T, T] scores).
"""

from __future__ import annotations

import math

import torch

from ..ops import window_attention as window_ops
from .liza import LiZAttention, rotary_table


def split_attention(q, k, v, layer: LiZAttention, cached: torch.Tensor | None = None):
    """Full causal softmax attention (absolute rotary positions) and its split at the window: the output over
    all keys, the output over keys beyond the window and sinks (and not `cached` [B, Hkv, T, T] for the query:
    held by the exact-token cache) alone, and the share of the softmax mass they hold (0 where there are none)."""
    batch, q_heads, seq_len, dim = q.shape
    probs = causal_probs(q, k, layer)  # [B, Hkv, G, T, T]
    position = torch.arange(seq_len, device=q.device)
    far = (position[None, :] <= position[:, None] - layer.config.window) & (position[None, :] >= layer.config.sinks)
    if cached is not None:
        far = far & ~cached.unsqueeze(2)  # [B, Hkv, 1, T, T]
    far_probs = probs.masked_fill(~far, 0.0)
    o_full = window_ops.grouped_values(probs, v).reshape(batch, q_heads, seq_len, dim)
    o_far = window_ops.grouped_values(far_probs, v).reshape(batch, q_heads, seq_len, dim)
    lam = far_probs.sum(-1).reshape(batch, q_heads, seq_len)  # 0 where no key is far
    return o_full, o_far / lam.clamp(min=torch.finfo(lam.dtype).tiny)[..., None], lam


def causal_probs(q, k, layer: LiZAttention) -> torch.Tensor:
    """Full causal softmax weights [B, Hkv, G, T, T] of q [B, Hq, T, D] over k [B, Hkv, T, D] (before rotary:
    absolute rotary positions 0 .. T-1 are applied here), with the layer's scaling and softcap."""
    seq_len, groups = q.shape[2], q.shape[1] // k.shape[1]
    cos, sin = rotary_table(layer._rotary[0], layer.layer_type, seq_len, q)
    factors = window_ops.rotary_factors(torch.arange(seq_len, device=q.device)[None], cos, sin)
    q, k = window_ops.apply_rotary(q, factors), window_ops.apply_rotary(k, factors)
    logits = window_ops.grouped_scores(q, k, groups) * layer.scaling  # [B, Hkv, G, T, T]
    if layer.softcap:
        logits = torch.tanh(logits / layer.softcap) * layer.softcap
    position = torch.arange(seq_len, device=q.device)
    return logits.masked_fill(position[None, :] > position[:, None], -math.inf).softmax(-1)
