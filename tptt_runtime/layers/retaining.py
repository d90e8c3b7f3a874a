"""RetainingHead: the exact-token cache's learned part of the score (cache_score "retain", docs/math.md 3b).

Per kv head, a two-layer MLP reads one token's own projections, the queries of the head's group, its key and
its value (all before rotary), and gives a logit: how likely the token belongs to a stated fact that a later
question may need (the idea of Locret's retaining heads, arXiv 2410.01805). The cache's score is the log of the
memory's write norm plus this logit times the config's retain_weight. It is a function of the token alone, fixed
when the token is written, so the cache's selection stays independent of how a sequence is split. Zero weights
(a fresh head) add nothing: the ranking is the write score's. Fitted by train/retain.py; serving only evaluates it.
"""

from __future__ import annotations

import torch
from torch import nn

HIDDEN = 64  # hidden units per kv head
WRITE_FLOOR = 1e-8  # write norms below this count as this before the log


def head_features(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, T, D], k, v [B, Hkv, T, D] -> [B, Hkv, T, (G + 2) D] float32: for each token and kv head, the
    queries of its G = Hq / Hkv query heads, its key and its value, side by side."""
    batch, kv_heads, length, dim = k.shape
    group = q.shape[1] // kv_heads
    queries = q.reshape(batch, kv_heads, group, length, dim).transpose(2, 3).reshape(batch, kv_heads, length, -1)
    return torch.cat([queries, k, v], dim=-1).float()


class RetainingHead(nn.Module):
    """features [B, Hkv, T, F] (head_features) -> logit [B, Hkv, T], one MLP per kv head; starts at 0 everywhere."""

    def __init__(self, kv_heads: int, features: int, like: nn.Linear):
        super().__init__()
        device = like.weight.device
        self.w1 = nn.Parameter(torch.zeros(kv_heads, features, HIDDEN, device=device))
        self.b1 = nn.Parameter(torch.zeros(kv_heads, HIDDEN, device=device))
        self.w2 = nn.Parameter(torch.zeros(kv_heads, HIDDEN, device=device))
        self.b2 = nn.Parameter(torch.zeros(kv_heads, device=device))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """In float32 whatever the weights' dtype (a model served in bfloat16 casts them too)."""
        hidden = torch.relu(torch.einsum("bhtf,hfk->bhtk", features, self.w1.float()) + self.b1.float()[:, None])
        return torch.einsum("bhtk,hk->bht", hidden, self.w2.float()) + self.b2.float()[:, None]

    def score(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, write_norms: torch.Tensor,
              weight: float = 1.0) -> torch.Tensor:
        """The cache score [B, Hkv, T] of new tokens: log of their write norms [B, Hkv, T] plus `weight` times
        the logit."""
        return write_norms.clamp(min=WRITE_FLOOR).log() + weight * self(head_features(q, k, v))
