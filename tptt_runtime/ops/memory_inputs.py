"""What the DeltaProduct memory reads from the shared projections: feature maps, virtual tokens and gates.

Pure tensor functions. Each takes the carry it needs from earlier tokens explicitly (the previous token's
key/value, the last `gate_pool - 1` gate inputs), so a sequence split into pieces gives the same result as the
whole sequence. Equations: docs/math.md, section 2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import as_float32


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """q and k of the memory: L2 norm of SiLU, per head. x: [..., D]."""
    return F.normalize(F.silu(as_float32(x)), p=2, dim=-1, eps=1e-6)


def _rotate_pairs(x: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate channel pairs (0, 1), (2, 3), ... by `angle`; an odd last channel is left as is."""
    if angle == 0.0:
        return x
    paired = x.shape[-1] // 2 * 2
    even, odd = x[..., 0:paired:2], x[..., 1:paired:2]
    cos, sin = math.cos(angle), math.sin(angle)
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
    return torch.cat([rotated, x[..., paired:]], dim=-1)


def expand_virtual(x: torch.Tensor, previous: torch.Tensor | None, order: int, trick: str) -> torch.Tensor:
    """Make `order` virtual tokens per token. x: [B, H, T, D]; previous: [B, H, 1, D], the token before x[:, :, 0]
    (None or zeros at the start of a sequence). Returns [B, H, T, order, D].

    derivative: (x_t, x_t - x_{t-1});  rotary: (R(2 pi j / n) x_t)_j;  combined: their mean.
    """
    if order == 1:
        return x.unsqueeze(3)
    if trick == "derivative":
        return _derivative(x, previous, order)
    if trick == "rotary":
        return _rotary(x, order)
    if trick == "combined":
        return 0.5 * (_derivative(x, previous, order) + _rotary(x, order))
    raise ValueError(f"unknown virtual-token trick {trick!r}")


def _derivative(x, previous, order):
    if previous is None:
        previous = torch.zeros_like(x[:, :, :1])
    shifted = previous if x.shape[2] == 1 else torch.cat([previous, x[:, :, :-1]], dim=2)
    return torch.stack([x, x - shifted][:order], dim=3)


def _rotary(x, order):
    return torch.stack([_rotate_pairs(x, 2 * math.pi * j / order) for j in range(order)], dim=3)


def causal_mean_pool(m: torch.Tensor, history: torch.Tensor, seen) -> torch.Tensor:
    """Mean of m over the last `pool` tokens available (fewer at the start of a sequence).

    m: [B, H, T] one value per token; history: [B, H, pool - 1], the values of the tokens before m (oldest
    first, only the last min(seen, pool - 1) are real); seen: tokens before m[:, :, 0], an int or a [B] tensor.
    """
    pool = history.shape[-1] + 1
    if m.shape[-1] == 1 and torch.is_tensor(seen):  # decode: history slots not real yet hold zeros (states
        count = seen.clamp(max=pool - 1).to(m.dtype).reshape(-1, 1, 1) + 1  # start zeroed, real values shift in)
        return (history.sum(-1, keepdim=True) + m) / count
    extended = torch.cat([history, m], dim=-1)  # [B, H, pool - 1 + T]
    seen = torch.as_tensor(seen, device=m.device).reshape(-1, 1, 1)
    first_real = pool - 1 - seen.clamp(max=pool - 1)  # [B or 1, 1, 1]
    real = torch.arange(extended.shape[-1], device=m.device) >= first_real
    sums = (extended * real).unfold(-1, pool, 1).sum(-1)  # [B, H, T]
    counts = real.to(m.dtype).unfold(-1, pool, 1).sum(-1)
    return sums / counts


def gates(pooled_k: torch.Tensor | None, pooled_v: torch.Tensor | None, beta_gate: str, alpha_gate: str,
          log_decay: torch.Tensor | float = 0.0):
    """beta (write strength) and g (log decay, None for no decay) from the pooled gate inputs, each [B, H, T]
    (pooled_v may be None when neither gate reads v). Alpha gates c and learned take the decay as it is given:
    `log_decay`, a float or one value per head [H] (0 = no decay)."""
    pooled = {"k": pooled_k, "v": pooled_v}
    if beta_gate == "c":
        beta = torch.full_like(pooled_k, 0.5)
    elif beta_gate == "kv":
        beta = torch.sigmoid(pooled_k) * torch.sigmoid(pooled_v)
    else:
        beta = torch.sigmoid(pooled[beta_gate])
    if alpha_gate in ("c", "learned"):
        return beta, _given_decay(log_decay, beta)
    if alpha_gate == "kv":
        return beta, F.logsigmoid(pooled_k) + F.logsigmoid(pooled_v)
    return beta, F.logsigmoid(pooled[alpha_gate])


def _given_decay(log_decay: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | None:
    """log_decay (a float or [H]) as g [B, H, T] like `like`; None when it is the float 0 (no decay)."""
    if not torch.is_tensor(log_decay):
        return None if log_decay == 0.0 else torch.full_like(like, log_decay)
    return as_float32(log_decay)[None, :, None].expand_as(like)
