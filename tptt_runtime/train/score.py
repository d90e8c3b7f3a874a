"""Fitting the exact-token cache's learned score (cache_score "learned", docs/math.md 3b): each layer's scorer
reads a token's key and should say how much full softmax attention will read that token from beyond the
window, the tokens the cache exists to keep. Through the layers' documented hook (layers/liza.py, LayerHook);
nothing of it is in serving.

    loss = score_loss(model, ids)   # mean over layers; only the scorers get gradients
"""

from __future__ import annotations

import torch

from ..layers.full_attention import far_reads
from ..layers.liza import LayerHook, LiZAttention
from ..ops import as_float32

READ_FLOOR = 1e-6  # far reads below this count as this: the target is log(max(read, floor))


def score_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the scorers' losses for ids [B, T]; the forward itself builds no graph."""
    hook = ScoreFit()
    model.context.hook = hook
    try:
        with torch.no_grad():
            model.hf(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        model.context.hook = None
    if not hook.losses:
        raise ValueError("no layer has a learned cache score (cache_score \"learned\" with cache_tokens > 0), "
                         f"or the sequence ({ids.shape[1]} tokens) has no token read from beyond the window")
    return torch.stack(hook.losses).mean()


class ScoreFit(LayerHook):
    """Each layer's scorer loss goes to `losses`; the layer then runs as it would (its cache ranked by the
    scorer as it stands)."""

    def __init__(self):
        self.losses = []

    def prefill(self, layer: LiZAttention, hidden_states, q, k, v) -> None:
        """Squared error of the scorer's score against log(far read) (layers/full_attention.py, far_reads) over
        the tokens that can enter the cache and are read from beyond the window in this sequence (positions
        sinks .. T - window - 1), both centred per sequence and kv head: only a score's order ranks tokens, so
        its offset is free (the bias gets no gradient) and the weights learn which keys are read more."""
        cfg, seq_len = layer.config, q.shape[2]
        if layer.cache_scorer is None or seq_len <= cfg.sinks + cfg.window:
            return None
        target = far_reads(q, k, layer)[..., cfg.sinks:seq_len - cfg.window].clamp(min=READ_FLOOR).log()
        with torch.enable_grad():
            score = layer.cache_scorer(as_float32(k.detach()))[..., cfg.sinks:seq_len - cfg.window]
            error = (score - score.mean(-1, keepdim=True)) - (target - target.mean(-1, keepdim=True))
            self.losses.append(error.pow(2).mean())
        return None
