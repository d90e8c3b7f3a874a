"""The exact-token cache: a fixed number of past tokens per kv head, kept because the memory wrote them hardest.

Pure tensor functions; nothing here knows about layers or sessions. A token becomes a candidate when it
leaves the window; each kv head holds the `size` best candidates seen so far, best meaning a higher score,
a later position breaking ties (`beats`). The score is fixed when the token is written (docs/math.md,
section 3b: the memory's write strength times its prediction error), so the set a query at position t sees
is the top `size` of the tokens evicted before it, whatever split of the sequence into forwards led there.

With a pool radius r > 0, a token is offered with its pooled score instead: the best score of the tokens
within r of it (positions >= sinks), so a statement's tokens around a high-scoring one enter together. It is
still fixed before the token leaves the window (r < window): the best score over itself and the r tokens
before it (`left_max`) is kept when a token is written, and the pooled score of t is the larger of t's and
t + r's (`pool_sequence`).

Tensors of one layer (in the same dict as the window ring of ops/window_attention.py):
    cache_k, cache_v: [B, Hkv, size, D]  keys (before rotary) and values of the held tokens, in no order
    cache_score:      [B, Hkv, size]     float32 score each held token was offered with, -inf in an empty slot
    cache_pos:        [B, Hkv, size]     int64 absolute position of each held token, -1 in an empty slot
    win_score:        [B, Hkv, window]   float32 score of the token in each window ring slot
    win_left:         [B, Hkv, window]   (pool r > 0) float32 best score over that token and the r before it
"""

from __future__ import annotations

import torch

EMPTY_POSITION = -1
HELD = ("cache_k", "cache_v", "cache_score", "cache_pos")  # the held tokens' tensors, in the order functions take


def new_tensors(batch, kv_heads, head_dim, *, window, size, dtype, device, pool: int = 0) -> dict[str, torch.Tensor]:
    """An empty cache of `size` slots per kv head and the ring's scores."""
    held = (batch, kv_heads, size)
    tensors = {"cache_k": torch.zeros(*held, head_dim, dtype=dtype, device=device),
               "cache_v": torch.zeros(*held, head_dim, dtype=dtype, device=device),
               "cache_score": torch.full(held, -torch.inf, dtype=torch.float32, device=device),
               "cache_pos": torch.full(held, EMPTY_POSITION, dtype=torch.long, device=device),
               "win_score": torch.zeros(batch, kv_heads, window, dtype=torch.float32, device=device)}
    if pool:
        tensors["win_left"] = torch.zeros(batch, kv_heads, window, dtype=torch.float32, device=device)
    return tensors


def left_max(before: torch.Tensor, score: torch.Tensor, pool: int) -> torch.Tensor:
    """[B, Hkv, T]: each new token's best score over itself and the `pool` tokens before it. score: the new
    tokens' [B, Hkv, T]; before: the `pool` scores that precede them [B, Hkv, pool], -inf for no token."""
    return torch.cat([before, score], dim=-1).unfold(-1, pool + 1, 1).amax(-1)


def with_ahead(left: torch.Tensor, pool: int) -> torch.Tensor:
    """[B, Hkv, T]: the pooled score of each token from the left maxima `left` [B, Hkv, T] of consecutive
    positions, the larger of its own and the one `pool` later (-inf past the end: not final there)."""
    none = left.new_full((*left.shape[:-1], pool), -torch.inf)
    return torch.maximum(left, torch.cat([left[..., pool:], none], dim=-1)[..., :left.shape[-1]])


def pool_sequence(score: torch.Tensor, *, pool: int, sinks: int) -> torch.Tensor:
    """[B, Hkv, T]: the score each token of a sequence from its first token is offered to the cache with, the
    best of score[max(sinks, t - pool) .. t + pool] (`score` itself when pool is 0). Final for every token
    at least `pool` before the end, which includes every token evicted within the sequence."""
    if not pool:
        return score
    none = score.new_full((*score.shape[:-1], pool), -torch.inf)
    left = left_max(none, score.clone().index_fill_(-1, torch.arange(min(sinks, score.shape[-1]),
                                                                     device=score.device), -torch.inf), pool)
    return with_ahead(left, pool)


def beats(score_a, pos_a, score_b, pos_b) -> torch.Tensor:
    """Whether token a ranks above token b: a higher score, or the same score and a later position."""
    return (score_a > score_b) | ((score_a == score_b) & (pos_a > pos_b))


def visible(score: torch.Tensor, pos: torch.Tensor, order: torch.Tensor, query_pos: torch.Tensor, *, window: int,
            size: int):
    """Which candidates each query sees [B, Hkv, Tq, M]: those evicted before it (position <= t - window)
    that are among the `size` best of all candidates evicted by then.

    score, pos: [B, Hkv, M] candidates (the held tokens and the ones evicted since; empty slots have position
    -1); order: their indices in `best` order, `best(score, pos, M)` (a prefill block keeps the first `size` of
    the same order); query_pos: [Tq]. Exact as long as the candidates include every token held before the first
    query: a token dropped earlier is beaten by all of those, so it could never outrank a candidate. A
    candidate's rank among those a query has evicted is a running count over the candidates in `best` order."""
    evicted = (pos >= 0).unsqueeze(-2) & (pos.unsqueeze(-2) <= query_pos[:, None] - window)  # [B, Hkv, Tq, M]
    order = order.unsqueeze(-2).expand_as(evicted)
    in_order = evicted.gather(-1, order)
    better = in_order.cumsum(-1) - in_order.long()  # evicted candidates ahead of each one in `best` order
    return evicted.scatter(-1, order, in_order & (better < size))


def weakest(score: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The held token every other one beats (the lowest score, then the earliest position) per row and kv head
    of score, pos [B, Hkv, M]: its score, position and slot, each [B, Hkv, 1]."""
    low = score.min(dim=-1, keepdim=True).values
    slot = torch.where(score == low, pos, torch.iinfo(pos.dtype).max).argmin(dim=-1, keepdim=True)
    return low, pos.gather(-1, slot), slot


def contenders(held_score, held_pos, score, pos) -> torch.Tensor | None:
    """Indices [B, Hkv, n'] (best first) of the new candidates score, pos [B, Hkv, n] that may ever enter a
    cache now holding held_score, held_pos [B, Hkv, size]: those that beat its weakest token, in the row and
    kv head with the most of them (the others' extra indices are harmless losers). The rest can never be
    seen: every held token beats them and is a candidate for as long as they are. None when all may enter."""
    low, low_pos, _ = weakest(held_score, held_pos)
    count = int(beats(score, pos, low, low_pos).sum(-1).max())
    return None if count == score.shape[-1] else best(score, pos, count)


def best(score: torch.Tensor, pos: torch.Tensor, size: int) -> torch.Tensor:
    """Indices [B, Hkv, size] of the `size` best of M candidates (score, pos [B, Hkv, M]), best first, empty
    slots last."""
    by_position = pos.argsort(dim=-1, descending=True, stable=True)
    by_score = score.gather(-1, by_position).argsort(dim=-1, descending=True, stable=True)
    return by_position.gather(-1, by_score)[..., :size]


def keep_best(k, v, score, pos, order: torch.Tensor, size: int):
    """The `size` best of M candidates (k, v [B, Hkv, M, D], score, pos [B, Hkv, M]; all evicted), best
    first, empty slots last; order: the candidates' indices in `best` order. Returns (k, v, score, pos) with
    `size` slots."""
    order = order[..., :size]
    rows = order.unsqueeze(-1).expand(*order.shape, k.shape[-1])
    return k.gather(2, rows), v.gather(2, rows), score.gather(-1, order), pos.gather(-1, order)


def held_over_time(score: torch.Tensor, *, window: int, sinks: int, size: int, block: int = 128) -> torch.Tensor:
    """[B, Hkv, T, T]: whether the query at t sees token j in the cache, for a sequence from its first token
    with scores [B, Hkv, T] (what a prefill computes block by block, as one mask; training's attention
    transfer takes these tokens out of what the memory must recall). Exact for any `block`."""
    batch, heads, seq_len = score.shape
    held_score = score.new_full((batch, heads, size), -torch.inf)
    held_pos = torch.full((batch, heads, size), EMPTY_POSITION, dtype=torch.long, device=score.device)
    seen_at = torch.zeros(batch, heads, seq_len, seq_len, dtype=torch.int8, device=score.device)
    for a in range(0, seq_len, block):
        b = min(seq_len, a + block)
        evicted = torch.arange(max(sinks, a - window), max(sinks, b - window), device=score.device)
        cand_score = torch.cat([held_score, score[..., evicted]], dim=-1)
        cand_pos = torch.cat([held_pos, evicted.expand(batch, heads, -1)], dim=-1)
        order = best(cand_score, cand_pos, cand_score.shape[-1])
        seen = visible(cand_score, cand_pos, order, torch.arange(a, b, device=score.device), window=window,
                       size=size)
        index = cand_pos.clamp(min=0).unsqueeze(-2).expand_as(seen)  # empty slots add 0 at position 0
        seen_at[:, :, a:b].scatter_add_(-1, index, seen.to(torch.int8))
        kept = order[..., :size]
        held_score, held_pos = cand_score.gather(-1, kept), cand_pos.gather(-1, kept)
    return seen_at > 0


def insert(cache: dict[str, torch.Tensor], key, value, score, position, offered) -> None:
    """Offer one evicted token per row to the cache (updated in place): it takes the weakest held token's
    slot when it beats that token. key, value: [B, Hkv, D]; score: [B, Hkv]; position, offered: [B] (rows
    where `offered` is false evict nothing). Writes one slot per row and kv head: the held keys and values
    are not read."""
    held_score, held_pos = cache["cache_score"], cache["cache_pos"]
    weakest_score, weakest_pos, slot = weakest(held_score, held_pos)  # [B, Hkv, 1]
    enters = offered[:, None, None] & beats(score.unsqueeze(-1), position[:, None, None], weakest_score,
                                            weakest_pos)  # [B, Hkv, 1]
    rows = torch.arange(slot.shape[0], device=slot.device)[:, None]
    heads = torch.arange(slot.shape[1], device=slot.device)[None, :]
    at, enters = (rows, heads, slot[..., 0]), enters[..., 0]  # one slot per row and kv head
    cache["cache_k"][at] = torch.where(enters[..., None], key, cache["cache_k"][at])
    cache["cache_v"][at] = torch.where(enters[..., None], value, cache["cache_v"][at])
    held_score[at] = torch.where(enters, score, held_score[at])
    held_pos[at] = torch.where(enters, position[:, None], held_pos[at])
