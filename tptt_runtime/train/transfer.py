"""Attention transfer (training, stage 1): every LiZA layer's memory against full softmax attention over the
same q, k, v, through the layers' documented hook (layers/liza.py, LayerHook); nothing of it is in serving.

    loss = transfer_loss(model, ids, weights)   # mean over layers; only the memory's own parameters get grads
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layers.full_attention import split_attention
from ..layers.liza import QUERY_BLOCK, LayerHook, LiZAttention, merge_heads
from ..ops import exact_cache


def transfer_loss(model, ids: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over layers of their attention-transfer losses for ids [B, T] (`weights` [B, T]: each position's
    weight, None = all alike); the forward itself builds no graph."""
    with model.hooked(AttentionTransfer(weights)) as hook, torch.no_grad():
        model.hf(input_ids=ids, use_cache=False, logits_to_keep=1)
    return torch.stack(hook.losses).mean()


class AttentionTransfer(LayerHook):
    """Each layer's loss goes to `losses`; the layer passes full attention's output on in place of its own."""

    def __init__(self, weights: torch.Tensor | None = None):
        self.weights, self.losses = weights, []

    def prefill(self, layer: LiZAttention, hidden_states, q, k, v) -> torch.Tensor:
        """Appends how far the layer's memory is from what full softmax attention needs of it to `losses`,
        and returns full attention's output (what the layer then passes on: every layer learns on the inputs
        full attention gives it, as in LoLCATs). Full attention
        splits exactly into
            o_full = (1 - lam) o_window + lam o_far,  lam = softmax mass beyond the window and sinks,
        (with an exact-token cache, the tokens it holds for each query are not far: the softmax branch sees
        them), so the memory read should point where o_far points (MSE of per-head unit-RMS vectors, weighted by lam;
        with a learned read_scale the scaled read should also have o_far's size: squared log of their ratio)
        and a learned gate should say lam (cross-entropy against it), each position also weighted by
        `weights` when given. Inputs are detached: only the memory's
        parameters (feature map, gate, read scale) get gradients, whatever the surrounding forward does."""
        with torch.enable_grad():
            q, k, v, hidden_states = (t.detach() for t in (q, k, v, hidden_states))
            memory, write_norms = layer.memory_branch(q, k, v, layer.new_state(q.shape[0], q.dtype, q.device), 0)
            scores, cfg = layer.cache_scores(q, k, v, write_norms), layer.config
            cached = None if scores is None else exact_cache.held_over_time(
                exact_cache.pool_sequence(scores.detach(), pool=cfg.cache_pool, sinks=cfg.sinks), window=cfg.window,
                sinks=cfg.sinks, size=cfg.cache_tokens, block=QUERY_BLOCK)
            o_full, o_far, lam = split_attention(q, k, v, layer, cached)  # [B, Hq, T, D] x2, [B, Hq, T]
            scaled = layer.read_scale is not None
            error = read_error(layer.sized_read(memory, o_far) if scaled else memory, o_far, scaled)
            positions = self.weights
            positions = torch.ones_like(lam) if positions is None else positions[:, None, :].expand_as(lam)
            loss = (error * lam * positions).sum() / (lam * positions).sum().clamp(min=1e-6)
            if layer.mag_gate is not None:
                logits = layer.mag_gate(hidden_states).transpose(1, 2)  # [B, Hq, T]
                gate_error = F.binary_cross_entropy_with_logits(logits, lam, reduction="none")
                loss = loss + (gate_error * positions).sum() / positions.sum()
        self.losses.append(loss)
        return layer.o_proj(merge_heads(o_full.detach().to(hidden_states.dtype)))


def read_error(read: torch.Tensor, o_far: torch.Tensor, scaled: bool) -> torch.Tensor:
    """[B, Hq, T] how far a memory read is from o_far: the squared error of their directions (both at unit
    RMS; 2 = orthogonal) and, when `scaled` (the read's size is meant to be o_far's), the squared log of their
    size ratio. Not the MSE of the read itself: that would shrink every read by its cosine to o_far and leave
    the memory too quiet where it does find the key."""
    dim = (read.shape[-1],)
    direction = (F.rms_norm(read, dim, eps=1e-6) - F.rms_norm(o_far, dim, eps=1e-6)).pow(2).mean(-1)
    if not scaled:
        return direction
    return direction + (_log_rms(read) - _log_rms(o_far)).pow(2)


def _log_rms(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x.pow(2).mean(-1).add(1e-12).log()
