"""Softmax attention over `sinks` first tokens + the `window` most recent tokens, with positions inside the cache.

Pure tensor functions; nothing here knows about layers or sessions. A query at absolute position t sees
the sinks {0 .. sinks-1} and the window {max(sinks, t - window + 1) .. t}. Rotary positions are assigned
inside that visible set (StreamingLLM): a window key j sits at distance t - j from the query, sink i at
distance min(t, sinks + window - 1) - i. No distance ever exceeds sinks + window - 1, so a context of any
length only uses positions the base model was trained on, and rotary angles stay small (exact in fp32).

With an exact-token cache (`cache_size` > 0, ops/exact_cache.py) the query also sees the best `cache_size`
tokens per kv head that left the window before it, all placed at one position between the sinks and the
window: distance `window` from the query, and the sinks one further (min(t, sinks + window) - i). Before the
first eviction nothing changes, and the largest distance is sinks + window.

The cache of one layer is a dict of fixed-size tensors (its size never depends on the context length):
    sink_k, sink_v: [B, Hkv, sinks, D]   the first tokens
    win_k, win_v:   [B, Hkv, window, D]  a ring: position p (>= sinks) lives in slot (p - sinks) % window
    (with cache_size > 0, also ops/exact_cache.py's tensors)
Keys are stored before rotary; positions of the slots are derived from the token count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import exact_cache, store


def rotary_factors(positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [B, 1, N, D] at `positions` [B, N] from tables [P, D]: rotate-half rotary is then
    x * cos + roll(x, D / 2) * signed_sin, the sign of the first half folded into the factor once per layout."""
    half = sin.shape[-1] // 2
    s = sin[positions]
    return cos[positions].unsqueeze(1), torch.cat([-s[..., :half], s[..., half:]], dim=-1).unsqueeze(1)


def apply_rotary(x: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary embedding (rotate-half convention) of x [B, H, N, D] with factors from `rotary_factors`."""
    c, signed_s = factors
    return x * c + x.roll(x.shape[-1] // 2, dims=-1) * signed_s


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


@dataclass
class Layout:
    """Where the queries and keys of one attention call sit: the visibility mask and the rotary factors. It
    depends on positions only, so every layer of one forward shares it (layers differ in q, k, v alone)."""
    q_win: tuple[torch.Tensor, torch.Tensor]         # rotary of the queries against window keys [B, 1, Tq, D]
    k_win: tuple[torch.Tensor, torch.Tensor]         # rotary of the window keys [B, 1, N, D]
    q_sink: tuple[torch.Tensor, torch.Tensor] | None  # the same against sink keys (None without sinks)
    k_sink: tuple[torch.Tensor, torch.Tensor] | None
    mask: torch.Tensor                                # [B, 1, 1, Tq, S + N]: which keys each query sees
    q_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # [1, 1, 1, D] rotary of every query against
                                                              # cache keys (distance `window`); None: no cache


def layout(q_pos, sink_pos, win_pos, *, window, sinks, cos, sin, cached: bool = False) -> Layout:
    """q_pos: [B, Tq] consecutive positions; sink_pos: [B, S], win_pos: [B, N] (-1 marks an empty slot; keys
    outside the query's window are masked, so extra keys are harmless). cos, sin: [P, D] with
    P >= max(sinks + window + 1, window + Tq). `cached`: an exact-token cache sits between sinks and window."""
    # window part: shift positions so the first query sits at window - 1 (all positions >= 0, < window + Tq)
    base = q_pos[:, :1] - window + 1
    key_pos, query_pos = win_pos[:, None, :], q_pos[:, :, None]
    mask = (key_pos >= sinks) & (key_pos <= query_pos) & (key_pos > query_pos - window)  # [B, Tq, N]
    q_sink = k_sink = None
    if sinks:
        q_sink = rotary_factors(q_pos.clamp(max=sinks + window - 1 + int(cached)), cos, sin)
        k_sink = rotary_factors(sink_pos.clamp(min=0), cos, sin)
        sink_key_pos = sink_pos[:, None, :]
        mask = torch.cat([(sink_key_pos >= 0) & (sink_key_pos <= query_pos), mask], dim=-1)
    q_cache = rotary_factors(torch.full((1, 1), window, device=q_pos.device), cos, sin) if cached else None
    return Layout(rotary_factors(q_pos - base, cos, sin), rotary_factors((win_pos - base).clamp(min=0), cos, sin),
                  q_sink, k_sink, mask[:, None, None], q_cache)


def attend(q, sink_k, sink_v, win_k, win_v, lay: Layout, *, scaling, softcap=None, cache=None) -> torch.Tensor:
    """Attention of q [B, Hq, Tq, D] (before rotary) over sink keys [B, Hkv, S, D], cache keys and window keys
    [B, Hkv, N, D] placed by `lay`. `cache`: (k, v [B, Hkv, M, D], seen [B, Hkv, Tq, M]: which of them each
    query sees), all at distance `window` (lay.q_cache), or None. Returns [B, Hq, Tq, D]."""
    batch, q_heads, q_len, head_dim = q.shape
    groups, num_sinks = q_heads // win_k.shape[1], sink_k.shape[2] if lay.q_sink is not None else 0
    parts = []  # (scores [B, Hkv, G, Tq, keys], values [B, Hkv, keys, D], mask [B, 1 or Hkv, 1, Tq, keys])
    if lay.q_sink is not None:
        parts.append((grouped_scores(apply_rotary(q, lay.q_sink), apply_rotary(sink_k, lay.k_sink), groups), sink_v,
                      lay.mask[..., :num_sinks]))
    if cache is not None:
        cache_k, cache_v, seen = cache
        parts.append((grouped_scores(apply_rotary(q, lay.q_cache), cache_k, groups), cache_v, seen.unsqueeze(2)))
    parts.append((grouped_scores(apply_rotary(q, lay.q_win), apply_rotary(win_k, lay.k_win), groups), win_v,
                  lay.mask[..., num_sinks:]))
    scores, values, masks = zip(*parts)
    heads = max(m.shape[1] for m in masks)
    mask = torch.cat([m.expand(-1, heads, -1, -1, -1) for m in masks], dim=-1)
    logits = torch.cat(scores, dim=-1) * scaling  # [B, Hkv, G, Tq, S + M + N]
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    probs = logits.masked_fill(~mask, -math.inf).softmax(dim=-1)
    return grouped_values(probs, torch.cat(values, dim=2)).reshape(batch, q_heads, q_len, head_dim)


def attend_token(q, sink_k, sink_v, win_k, win_v, lay: Layout, *, scaling, softcap=None, cache=None) -> torch.Tensor:
    """`attend` for one query per row (a decode step, Tq = 1), in the form that reads each cached key and value
    once: a part's scores are products summed over the channels, the rotary of the keys applied inside them
    half by half (no rotated copy of the window, no rolled index), its values one matmul with the part's
    probabilities (no concatenated copy of all values), and one softmax spans the parts. Same arguments
    and result as `attend`."""
    batch, q_heads, _, head_dim = q.shape
    kv_heads = win_k.shape[1]
    groups = q_heads // kv_heads

    def logits(q_halves, k_halves):  # [B, Hkv, G, N]
        scores = sum((qh.reshape(batch, kv_heads, groups, 1, -1) * kh.unsqueeze(2)).sum(-1)
                     for qh, kh in zip(q_halves, k_halves)) * scaling
        return torch.tanh(scores / softcap) * softcap if softcap else scores

    num_sinks = sink_k.shape[2] if lay.q_sink is not None else 0
    mask = lay.mask[:, :, :, 0]  # [B, 1, 1, S + N]
    parts = []  # (logits [B, Hkv, G, keys], values [B, Hkv, keys, D], mask [B, 1 or Hkv, 1, keys])
    if lay.q_sink is not None:
        parts.append((logits(_rotary_halves(q, lay.q_sink), _rotary_halves(sink_k, lay.k_sink)), sink_v,
                      mask[..., :num_sinks]))
    if cache is not None:
        cache_k, cache_v, seen = cache
        parts.append((logits(_rotary_halves(q, lay.q_cache), cache_k.chunk(2, dim=-1)), cache_v, seen))
    parts.append((logits(_rotary_halves(q, lay.q_win), _rotary_halves(win_k, lay.k_win)), win_v,
                  mask[..., num_sinks:]))
    masked = [scores.masked_fill(~seen, -math.inf) for scores, _, seen in parts]
    top = torch.stack([scores.amax(-1) for scores in masked]).amax(0).unsqueeze(-1)  # [B, Hkv, G, 1]
    weights = [(scores - top).exp() for scores in masked]
    total = sum(w.sum(-1, keepdim=True) for w in weights)
    out = sum(w @ values for w, (_, values, _) in zip(weights, parts)) / total  # [B, Hkv, G, D]
    return out.reshape(batch, q_heads, 1, head_dim)


def _rotary_halves(x: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rotary(x, factors)` as its two halves of the channels, each from slices of x (no roll)."""
    c, signed_s = factors
    first, second = x.chunk(2, dim=-1)
    half = first.shape[-1]
    return (first * c[..., :half] + second * signed_s[..., :half],
            second * c[..., half:] + first * signed_s[..., half:])


def window_attention(q, q_pos, sink_k, sink_v, sink_pos, win_k, win_v, win_pos, *, window, sinks, scaling, cos,
                     sin, softcap=None, cache=None):
    """Attention of queries over explicit sink keys, cache keys (`attend`'s `cache`) and window keys, each
    with absolute positions (`layout` and `attend` in one call)."""
    lay = layout(q_pos, sink_pos, win_pos, window=window, sinks=sinks, cos=cos, sin=sin, cached=cache is not None)
    return attend(q, sink_k, sink_v, win_k, win_v, lay, scaling=scaling, softcap=softcap, cache=cache)


def grouped_scores(q: torch.Tensor, k: torch.Tensor, groups: int) -> torch.Tensor:
    """q: [B, Hkv * G, Tq, D], k: [B, Hkv, N, D] -> [B, Hkv, G, Tq, N] (query head h reads kv head h // G). The
    G query heads of a kv head are stacked as rows of one matmul: no broadcast copy of k."""
    batch, q_heads, q_len, head_dim = q.shape
    rows = q.reshape(batch, q_heads // groups, groups * q_len, head_dim)
    return (rows @ k.transpose(-1, -2)).reshape(batch, q_heads // groups, groups, q_len, k.shape[2])


def grouped_values(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs: [B, Hkv, G, Tq, N], v: [B, Hkv, N, D] -> [B, Hkv, G * Tq, D], the G heads again as rows."""
    batch, kv_heads, groups, q_len, keys = probs.shape
    return probs.reshape(batch, kv_heads, groups * q_len, keys) @ v


def new_cache(batch, kv_heads, head_dim, *, window, sinks, dtype, device) -> dict[str, torch.Tensor]:
    shape = {"sink": (batch, kv_heads, sinks, head_dim), "win": (batch, kv_heads, window, head_dim)}
    return {f"{part}_{kind}": torch.zeros(shape[part], dtype=dtype, device=device)
            for part in ("sink", "win") for kind in ("k", "v")}


def prefill(q, k, v, cache, start: int, *, window, sinks, scaling, cos, sin, softcap=None, block=256, scores=None,
            pool: int = 0):
    """Attend a chunk of T new tokens at positions start .. start+T-1 (same start for every row), then store
    them in `cache` (updated in place). q: [B, Hq, T, D]; k, v: [B, Hkv, T, D]. Queries go in blocks of
    `block`, so memory is O(block * (window + block + cache size)) whatever T is. With an exact-token cache in
    `cache`, `scores` [B, Hkv, T] are the new tokens' cache scores (ops/exact_cache.py, offered max-pooled over
    `pool` tokens either side): each block's queries see the held tokens and those evicted since, each query
    exactly the best it would hold at its position, and the cache then keeps the best of them for the next
    block."""
    batch, _, seq_len, _ = q.shape
    positions = torch.arange(start, start + seq_len, device=q.device)
    new_sinks = max(0, min(sinks - start, seq_len))
    if new_sinks:
        cache["sink_k"][:, :, start:start + new_sinks] = k[:, :, :new_sinks]
        cache["sink_v"][:, :, start:start + new_sinks] = v[:, :, :new_sinks]
    end = torch.full((batch,), start + seq_len, device=q.device)
    sink_pos = sink_positions(end, sinks)
    ring_pos = ring_positions(end - seq_len, sinks, window)
    cached = "cache_k" in cache
    held = tuple(cache[name] for name in exact_cache.HELD) if cached else None
    if cached:  # a selection, not differentiable
        scores = scores.detach()
        offered, left = _offered_scores(cache, scores, start, window=window, sinks=sinks, pool=pool)
    out = torch.empty_like(q)
    for a in range(0, seq_len, block):
        b = min(seq_len, a + block)
        lo = max(0, a - window + 1)
        win_k, win_v, win_pos = k[:, :, lo:b], v[:, :, lo:b], positions[lo:b].expand(batch, -1)
        if a < window - 1:  # some query of the block still sees tokens of earlier chunks, from the ring
            win_k = torch.cat([cache["win_k"], win_k], dim=2)
            win_v = torch.cat([cache["win_v"], win_v], dim=2)
            win_pos = torch.cat([ring_pos, win_pos], dim=1)
        seen_cache = None
        if cached:
            candidates = _candidates(held, cache, k, v, offered, start, start + a, start + b, window=window,
                                     sinks=sinks)
            order = exact_cache.best(candidates[2], candidates[3], candidates[2].shape[-1])
            seen = exact_cache.visible(candidates[2], candidates[3], order, positions[a:b], window=window,
                                       size=held[0].shape[2])
            seen_cache = (candidates[0], candidates[1], seen)
            if candidates[0].shape[2] > held[0].shape[2]:
                held = exact_cache.keep_best(*candidates, order, size=held[0].shape[2])
        out[:, :, a:b] = window_attention(
            q[:, :, a:b], positions[a:b].expand(batch, -1), cache["sink_k"], cache["sink_v"], sink_pos, win_k,
            win_v, win_pos, window=window, sinks=sinks, scaling=scaling, cos=cos, sin=sin, softcap=softcap,
            cache=seen_cache)
    end_pos = start + seq_len
    keep = torch.arange(min(max(start, sinks, end_pos - window), end_pos), end_pos, device=q.device)
    slots = torch.remainder(keep - sinks, window)
    cache["win_k"][:, :, slots] = k[:, :, keep - start]
    cache["win_v"][:, :, slots] = v[:, :, keep - start]
    if cached:
        cache["win_score"][:, :, slots] = scores[:, :, keep - start]
        if pool:
            cache["win_left"][:, :, slots] = left[:, :, keep - start]
        for name, value in zip(exact_cache.HELD, held):
            if value is not cache[name]:
                store(cache, name, value)
    return out


def _offered_scores(cache, scores, start: int, *, window: int, sinks: int, pool: int):
    """The score each token at positions start - window .. start + T - 1 is (or will be) offered to the exact-
    token cache with [B, Hkv, window + T] (final for those evicted within this chunk; meaningless below
    `sinks`), and with `pool`, the new tokens' left maxima [B, Hkv, T] (exact_cache.left_max) for the ring."""
    before = torch.arange(start - window, start, device=scores.device)
    slots = torch.remainder(before - sinks, window)
    if not pool:
        return torch.cat([cache["win_score"][:, :, slots], scores], dim=-1), None
    raw_before = cache["win_score"][:, :, slots[window - pool:]].masked_fill(before[window - pool:] < sinks, -torch.inf)
    new = torch.arange(start, start + scores.shape[-1], device=scores.device)
    left = exact_cache.left_max(raw_before, scores.masked_fill(new < sinks, -torch.inf), pool)
    return exact_cache.with_ahead(torch.cat([cache["win_left"][:, :, slots], left], dim=-1), pool), left


def _candidates(held, cache, k, v, offered, start: int, first: int, last: int, *, window: int, sinks: int):
    """The held tokens (k, v, score, pos, each [B, Hkv, M, ...]) followed by those that queries first ..
    last - 1 evict and that may enter the cache (exact_cache.contenders): positions max(sinks, first - window)
    .. last - 1 - window, their keys and values read from the ring where they precede this chunk (`start`),
    else from the chunk's own k, v; their scores from `offered` (`_offered_scores`)."""
    lo, hi = max(sinks, first - window), last - window
    if lo >= hi:
        return held
    positions = torch.arange(lo, hi, device=k.device)
    score = offered[:, :, positions - start + window]
    pos = positions.expand(*held[3].shape[:2], -1)
    parts = []
    if lo < start:
        slots = torch.remainder(torch.arange(lo, min(hi, start), device=k.device) - sinks, window)
        parts.append((cache["win_k"][:, :, slots], cache["win_v"][:, :, slots]))
    if hi > start:
        here = slice(max(lo, start) - start, hi - start)
        parts.append((k[:, :, here], v[:, :, here]))
    keys, values = (torch.cat(tensors, dim=2) if len(tensors) > 1 else tensors[0] for tensors in zip(*parts))
    chosen = exact_cache.contenders(held[2], held[3], score, pos)
    if chosen is not None:
        rows = chosen.unsqueeze(-1).expand(*chosen.shape, keys.shape[-1])
        keys, values, score, pos = keys.gather(2, rows), values.gather(2, rows), score.gather(-1, chosen), \
            pos.gather(-1, chosen)
    return (torch.cat([held[0], keys], dim=2), torch.cat([held[1], values], dim=2),
            torch.cat([held[2], score], dim=-1), torch.cat([held[3], pos], dim=-1))


@dataclass
class DecodePlan:
    """Cache slots and layout of one decode step (one new token per row), shared by every layer."""
    positions: torch.Tensor        # [B] absolute position of each row's new token
    rows: torch.Tensor             # [B]
    ring_slot: torch.Tensor        # [B] window slot of each row's new token
    sink_slot: torch.Tensor        # [B] sink slot of the rows still filling their sinks (clamped)
    in_sinks: torch.Tensor | None  # [B, 1, 1] rows whose new token is a sink; None when no row's is
    layout: Layout
    evicted: torch.Tensor          # [B] position of the token each row's new token pushes out of the window
    evicting: torch.Tensor         # [B] whether that is a real token (>= sinks), offered to the exact-token cache
    pool: PoolPlan | None = None   # with a pooled cache score


@dataclass
class PoolPlan:
    """Ring slots a decode step reads for the exact-token cache's pooled score (ops/exact_cache.py)."""
    ahead_slot: torch.Tensor     # [B] slot of the token `pool` after the evicted one
    before_slots: torch.Tensor   # [B, pool] slots of the `pool` tokens before the new one
    before_real: torch.Tensor    # [B, 1, pool] whether each of those is a token >= sinks


def decode_plan(positions, *, window, sinks, cos, sin, filling_sinks: bool, cached: bool = False,
                pool: int = 0) -> DecodePlan:
    """`positions` [B]: the absolute position of each row's new token. `filling_sinks`: whether any of them is
    below `sinks`, known on the host (no device sync; the sink slots are written only then). `cached`: the
    layers have an exact-token cache, its score max-pooled over `pool` tokens either side."""
    count = positions + 1
    in_sinks = (positions < sinks)[:, None, None] if filling_sinks else None
    lay = layout(positions[:, None], sink_positions(count, sinks), ring_positions(count, sinks, window),
                 window=window, sinks=sinks, cos=cos, sin=sin, cached=cached)
    evicted = positions - window
    pooling = None
    if cached and pool:
        before = positions[:, None] - torch.arange(1, pool + 1, device=positions.device)
        pooling = PoolPlan(torch.remainder(evicted + pool - sinks, window), torch.remainder(before - sinks, window),
                           (before >= sinks)[:, None])
    return DecodePlan(positions, torch.arange(positions.shape[0], device=positions.device),
                      torch.remainder(positions - sinks, window), positions.clamp(max=max(sinks - 1, 0)), in_sinks,
                      lay, evicted, evicted >= sinks, pooling)


def decode(q, k, v, cache, plan: DecodePlan, *, scaling, softcap=None, score=None):
    """One new token per row, placed by `plan` (`decode_plan`; rows may sit at different positions): store it
    in `cache`, then attend. q: [B, Hq, 1, D]; k, v: [B, Hkv, 1, D]. With an exact-token cache, the token
    that leaves the window is offered to it first, and `score` [B, Hkv, 1] is the new token's.

    The new key always goes to its ring slot, even for a position that is a sink: that slot then holds a
    position below `sinks` until the ring reaches it, and `ring_positions` marks such slots empty."""
    rows, key, value = plan.rows, k[:, :, 0], v[:, :, 0]  # [B, Hkv, D]
    if plan.in_sinks is not None:
        slot = plan.sink_slot
        cache["sink_k"][rows, :, slot] = torch.where(plan.in_sinks, key, cache["sink_k"][rows, :, slot])
        cache["sink_v"][rows, :, slot] = torch.where(plan.in_sinks, value, cache["sink_v"][rows, :, slot])
    held = None
    if "cache_k" in cache:
        slot, pooling = plan.ring_slot, plan.pool
        offered = (cache["win_score"][rows, :, slot] if pooling is None  # [B, Hkv]: the evicted token's
                   else torch.maximum(cache["win_left"][rows, :, slot], cache["win_left"][rows, :, pooling.ahead_slot]))
        exact_cache.insert(cache, cache["win_k"][rows, :, slot], cache["win_v"][rows, :, slot], offered,
                           plan.evicted, plan.evicting)
        cache["win_score"][rows, :, slot] = score[:, :, 0]
        if pooling is not None:
            before = cache["win_score"][rows[:, None], :, pooling.before_slots].transpose(1, 2)  # [B, Hkv, pool]
            cache["win_left"][rows, :, slot] = exact_cache.left_max(
                before.masked_fill(~pooling.before_real, -torch.inf), score, before.shape[-1])[:, :, 0]
        held = (cache["cache_k"], cache["cache_v"], (cache["cache_pos"] >= 0).unsqueeze(2))
    cache["win_k"][rows, :, plan.ring_slot] = key
    cache["win_v"][rows, :, plan.ring_slot] = value
    return attend_token(q, cache["sink_k"], cache["sink_v"], cache["win_k"], cache["win_v"], plan.layout,
                        scaling=scaling, softcap=softcap, cache=held)
