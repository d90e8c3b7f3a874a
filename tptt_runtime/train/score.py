"""Fitting the exact-token cache's learned score (cache_score "learned", docs/math.md 3b): each layer's scorer
reads a token's key and should say how much full softmax attention will need that token from beyond the
window, the tokens the cache exists to keep. Through the layers' documented hook (layers/liza.py, LayerHook);
nothing of it is in serving.

    loss = score_loss(model, ids, readers)   # mean over layers; only the scorers get gradients
"""

from __future__ import annotations

import torch

from ..layers.full_attention import causal_probs, far_reads
from ..layers.liza import LayerHook, LiZAttention
from ..ops import as_float32

READ_FLOOR = 1e-6  # reads below this count as this: targets are logs of max(read, floor)


def score_loss(model, ids: torch.Tensor, readers: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over layers of the scorers' losses for ids [B, T]; `readers` [B, T] (bool): the queries whose needs
    define the target (a retrieval document's answer positions), None: every query. The forward itself builds
    no graph. A batch with nothing to fit (no reader far enough after a token) gives a zero loss."""
    if not model.config.learns_cache_score:
        raise ValueError("no layer has a learned cache score (cache_score \"learned\" with cache_tokens > 0)")
    with model.hooked(ScoreFit(readers)) as hook, torch.no_grad():
        model.hf(input_ids=ids, use_cache=False, logits_to_keep=1)
    if not hook.losses:
        return torch.zeros((), device=ids.device, requires_grad=True)
    return torch.stack(hook.losses).mean()


class ScoreFit(LayerHook):
    """Each layer's scorer loss goes to `losses`; the layer then runs as it would (its cache ranked by the
    scorer as it stands)."""

    def __init__(self, readers: torch.Tensor | None = None):
        self.readers, self.losses = readers, []

    def prefill(self, layer: LiZAttention, hidden_states, q, k, v) -> None:
        """Squared error of the scorer's score against the target over the tokens that can enter the cache
        (sinks and later) and have a reader at least `window` after them, both centred per sequence and kv
        head (only a score's order ranks tokens: its offset is free, the bias gets no gradient). The target:
        without readers, log of the largest far read (far_reads); with readers, how much more than a typical
        query the readers read the token, log(max read by a reader) - log(mean read by any query): a token
        every query reads (punctuation acting as an attention sink) is not one a later question needs."""
        cfg, seq_len = layer.config, q.shape[2]
        if layer.cache_scorer is None or seq_len <= cfg.sinks + cfg.window:
            return None
        position = torch.arange(seq_len, device=q.device)
        probs = causal_probs(q, k, layer)  # [B, Hkv, G, T, T], once for both reads below
        if self.readers is None:
            target = far_reads(probs, cfg.window).clamp(min=READ_FLOOR).log()
            last_reader = torch.full((q.shape[0],), seq_len - 1, device=q.device)
        else:
            readers = self.readers.to(q.device)
            specific = far_reads(probs, cfg.window, readers).clamp(min=READ_FLOOR).log()
            typical = far_reads(probs, cfg.window, reduce="mean").clamp(min=READ_FLOOR).log()
            target = specific - typical
            last_reader = torch.where(readers, position, -1).amax(-1)  # [B]; -1: no reader
        eligible = ((position >= cfg.sinks) & (position[None] <= last_reader[:, None] - cfg.window))[:, None]
        if not eligible.any():
            return None
        eligible = eligible.expand_as(target)
        with torch.enable_grad():
            score = layer.cache_scorer(as_float32(k.detach()))
            error = _centred(score, eligible) - _centred(target, eligible)
            self.losses.append(error.pow(2).masked_select(eligible).mean())
        return None


def _centred(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, H, T] minus its mean over the positions of `mask` per row and head."""
    mean = (x * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return x - mean
