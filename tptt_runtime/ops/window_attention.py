"""Softmax attention over `sinks` first tokens + the `window` most recent tokens, with positions inside the cache.

Pure tensor functions; nothing here knows about layers or sessions. A query at absolute position t sees
the sinks {0 .. sinks-1} and the window {max(sinks, t - window + 1) .. t}. Rotary positions are assigned
inside that visible set (StreamingLLM): a window key j sits at distance t - j from the query, sink i at
distance min(t, sinks + window - 1) - i. No distance ever exceeds sinks + window - 1, so a context of any
length only uses positions the base model was trained on, and rotary angles stay small (exact in fp32).

The cache of one layer is a dict of fixed-size tensors (its size never depends on the context length):
    sink_k, sink_v: [B, Hkv, sinks, D]   the first tokens
    win_k, win_v:   [B, Hkv, window, D]  a ring: position p (>= sinks) lives in slot (p - sinks) % window
Keys are stored before rotary; positions of the slots are derived from the token count.
"""

from __future__ import annotations

import math

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half convention). x: [B, H, N, D]; positions: [B, N]; cos, sin: [P, D]."""
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # [B, 1, N, D]
    return x * c + rotate_half(x) * s


def sink_positions(num_tokens: torch.Tensor, sinks: int) -> torch.Tensor:
    """Position held by each sink slot once `num_tokens` [B] tokens are cached; -1 where still empty."""
    slots = torch.arange(sinks, device=num_tokens.device)
    return torch.where(slots < num_tokens[:, None], slots, -1)


def ring_positions(num_tokens: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Position held by each window slot once `num_tokens` [B] tokens are cached; -1 where still empty."""
    last = num_tokens[:, None] - 1
    slots = torch.arange(window, device=num_tokens.device)
    position = last - torch.remainder(last - sinks - slots, window)
    return torch.where(position >= sinks, position, -1)


def window_attention(q, q_pos, sink_k, sink_v, sink_pos, win_k, win_v, win_pos, *, window, sinks, scaling, cos,
                     sin, softcap=None):
    """Attention of queries over explicit sink keys and window keys, each with absolute positions.

    q: [B, Hq, Tq, D] before rotary, q_pos: [B, Tq] consecutive positions;
    sink_k, sink_v: [B, Hkv, S, D], sink_pos: [B, S];  win_k, win_v: [B, Hkv, N, D], win_pos: [B, N]
    (-1 marks an empty slot; keys outside the query's window are masked, so extra keys are harmless).
    cos, sin: [P, D] with P >= max(sinks + window, window + Tq). Returns [B, Hq, Tq, D].
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads = win_k.shape[1]
    groups = q_heads // kv_heads
    # window part: shift positions so the first query sits at window - 1 (all positions >= 0, < window + Tq)
    base = q_pos[:, :1] - window + 1
    q_win = rope(q, q_pos - base, cos, sin)
    k_win = rope(win_k, (win_pos - base).clamp(min=0), cos, sin)
    scores = [_grouped_scores(q_win, k_win, groups)]
    key_pos = win_pos[:, None, :]
    query_pos = q_pos[:, :, None]
    masks = [(key_pos >= sinks) & (key_pos <= query_pos) & (key_pos > query_pos - window)]  # [B, Tq, N]
    values = [win_v]
    if sinks:
        q_sink = rope(q, q_pos.clamp(max=sinks + window - 1), cos, sin)
        k_sink = rope(sink_k, sink_pos.clamp(min=0), cos, sin)
        scores.insert(0, _grouped_scores(q_sink, k_sink, groups))
        sink_key_pos = sink_pos[:, None, :]
        masks.insert(0, (sink_key_pos >= 0) & (sink_key_pos <= query_pos))
        values.insert(0, sink_v)
    logits = torch.cat(scores, dim=-1) * scaling  # [B, Hkv, G, Tq, S + N]
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    mask = torch.cat(masks, dim=-1)[:, None, None]
    probs = logits.masked_fill(~mask, -math.inf).softmax(dim=-1)
    out = probs @ torch.cat(values, dim=2).unsqueeze(2)  # [B, Hkv, G, Tq, D]
    return out.reshape(batch, q_heads, q_len, head_dim)


def _grouped_scores(q: torch.Tensor, k: torch.Tensor, groups: int) -> torch.Tensor:
    """q: [B, Hkv * G, Tq, D], k: [B, Hkv, N, D] -> [B, Hkv, G, Tq, N] (query head h reads kv head h // G)."""
    batch, q_heads, q_len, head_dim = q.shape
    q = q.reshape(batch, q_heads // groups, groups, q_len, head_dim)
    return q @ k.unsqueeze(2).transpose(-1, -2)


def new_cache(batch, kv_heads, head_dim, *, window, sinks, dtype, device) -> dict[str, torch.Tensor]:
    shape = {"sink": (batch, kv_heads, sinks, head_dim), "win": (batch, kv_heads, window, head_dim)}
    return {f"{part}_{kind}": torch.zeros(shape[part], dtype=dtype, device=device)
            for part in ("sink", "win") for kind in ("k", "v")}


def prefill(q, k, v, cache, start: int, *, window, sinks, scaling, cos, sin, softcap=None, block=256):
    """Attend a chunk of T new tokens at positions start .. start+T-1 (same start for every row), then store
    them in `cache` (updated in place). q: [B, Hq, T, D]; k, v: [B, Hkv, T, D]. Queries go in blocks of
    `block`, so memory is O(block * (window + block)) whatever T is."""
    batch, _, seq_len, _ = q.shape
    positions = torch.arange(start, start + seq_len, device=q.device)
    new_sinks = max(0, min(sinks - start, seq_len))
    if new_sinks:
        cache["sink_k"][:, :, start:start + new_sinks] = k[:, :, :new_sinks]
        cache["sink_v"][:, :, start:start + new_sinks] = v[:, :, :new_sinks]
    end = torch.full((batch,), start + seq_len, device=q.device)
    sink_pos = sink_positions(end, sinks)
    ring_pos = ring_positions(end - seq_len, sinks, window)
    out = torch.empty_like(q)
    for a in range(0, seq_len, block):
        b = min(seq_len, a + block)
        lo = max(0, a - window + 1)
        win_k = torch.cat([cache["win_k"], k[:, :, lo:b]], dim=2)
        win_v = torch.cat([cache["win_v"], v[:, :, lo:b]], dim=2)
        win_pos = torch.cat([ring_pos, positions[lo:b].expand(batch, -1)], dim=1)
        out[:, :, a:b] = window_attention(
            q[:, :, a:b], positions[a:b].expand(batch, -1), cache["sink_k"], cache["sink_v"], sink_pos, win_k,
            win_v, win_pos, window=window, sinks=sinks, scaling=scaling, cos=cos, sin=sin, softcap=softcap)
    end_pos = start + seq_len
    keep = torch.arange(min(max(start, sinks, end_pos - window), end_pos), end_pos, device=q.device)
    slots = torch.remainder(keep - sinks, window)
    cache["win_k"][:, :, slots] = k[:, :, keep - start]
    cache["win_v"][:, :, slots] = v[:, :, keep - start]
    return out


def decode(q, k, v, cache, positions, *, window, sinks, scaling, cos, sin, softcap=None):
    """One new token per row at `positions` [B] (rows may differ): store it in `cache`, then attend.
    q: [B, Hq, 1, D]; k, v: [B, Hkv, 1, D]."""
    rows = torch.arange(q.shape[0], device=q.device)
    key, value = k[:, :, 0], v[:, :, 0]  # [B, Hkv, D]
    if sinks:
        in_sinks = (positions < sinks)[:, None, None]
        slot = positions.clamp(max=sinks - 1)
        cache["sink_k"][rows, :, slot] = torch.where(in_sinks, key, cache["sink_k"][rows, :, slot])
        cache["sink_v"][rows, :, slot] = torch.where(in_sinks, value, cache["sink_v"][rows, :, slot])
    in_ring = (positions >= sinks)[:, None, None]
    slot = torch.remainder(positions - sinks, window)
    cache["win_k"][rows, :, slot] = torch.where(in_ring, key, cache["win_k"][rows, :, slot])
    cache["win_v"][rows, :, slot] = torch.where(in_ring, value, cache["win_v"][rows, :, slot])
    count = positions + 1
    return window_attention(
        q, positions[:, None], cache["sink_k"], cache["sink_v"], sink_positions(count, sinks), cache["win_k"],
        cache["win_v"], ring_positions(count, sinks, window), window=window, sinks=sinks, scaling=scaling, cos=cos,
        sin=sin, softcap=softcap)
