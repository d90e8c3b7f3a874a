"""The exact-token cache against a per-query reference: query t sees the sinks, the `size` best (score,
position) of the tokens evicted before it (each kv head its own), and its window; cache keys at distance
`window`, sinks at min(t, sinks + window) - i, window keys at their true distance."""

import itertools

import pytest
import torch

from tests.ops.test_window_attention import random_qkv, rotary_table
from tptt_runtime.ops import exact_cache
from tptt_runtime.ops import window_attention as wa


def random_scores(batch=2, kv_heads=2, seq_len=40, seed=0, ties=False):
    gen = torch.Generator().manual_seed(seed + 100)
    if ties:  # few distinct values: the position must break ties the same way on every path
        return torch.randint(0, 3, (batch, kv_heads, seq_len), generator=gen).float()
    return torch.rand(batch, kv_heads, seq_len, generator=gen)


def pooled_by_hand(scores, pool, sinks):
    """Each token's best score within `pool` positions on either side, tokens below `sinks` left out."""
    out = scores.clone()
    for t in range(sinks, scores.shape[-1]):
        out[..., t] = scores[..., max(sinks, t - pool):t + pool + 1].amax(-1)
    return out


def best_evicted(scores, t, window, sinks, size):
    """Positions held for a query at t, per (row, kv head): the reference top-`size` by (score, position)."""
    held = {}
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            evicted = range(sinks, t - window + 1)
            ranked = sorted(evicted, key=lambda p: (scores[b, h, p].item(), p), reverse=True)
            held[b, h] = sorted(ranked[:size])
    return held


def reference(q, k, v, scores, window, sinks, size, scaling):
    batch, q_heads, seq_len, dim = q.shape
    groups = q_heads // k.shape[1]
    cos, sin = rotary_table(sinks + window + 2, dim)

    def rotated(x, distance):
        return wa.apply_rotary(x, wa.rotary_factors(torch.tensor([[distance]]), cos, sin))[0, 0, 0]

    out = torch.zeros_like(q)
    for t in range(seq_len):
        held = best_evicted(scores, t, window, sinks, size)
        query_at = min(t, sinks + window)
        for b in range(batch):
            for h in range(q_heads):
                kv = h // groups
                keys = [(i, query_at - i) for i in range(min(sinks, t + 1))]
                keys += [(p, window) for p in held[b, kv]]
                keys += [(j, t - j) for j in range(max(sinks, t - window + 1), t + 1)]
                logits = torch.stack([rotated(q[b, h, t][None, None, None], d) @ k[b, kv, j] * scaling
                                      for j, d in keys])  # rotary: only the distance d matters
                out[b, h, t] = logits.softmax(0) @ v[b, kv, [j for j, _ in keys]]
    return out


def new_cache(batch, window, sinks, size, pool=0):
    cache = wa.new_cache(batch, 2, 8, window=window, sinks=sinks, dtype=torch.float32, device="cpu")
    return cache | exact_cache.new_tensors(batch, 2, 8, window=window, size=size, dtype=torch.float32, device="cpu",
                                           pool=pool)


def decode(q, k, v, cache, positions, score, *, window, sinks, scaling, cos, sin, pool=0):
    plan = wa.decode_plan(positions, window=window, sinks=sinks, cos=cos, sin=sin,
                          filling_sinks=bool((positions < sinks).any()), cached=True, pool=pool)
    return wa.decode(q, k, v, cache, plan, scaling=scaling, score=score)


@pytest.mark.parametrize("window,sinks,size,pool", [(4, 2, 3, 0), (3, 0, 1, 0), (5, 1, 100, 0), (2, 3, 6, 0),
                                                    (4, 2, 3, 2), (3, 0, 1, 1), (5, 1, 2, 4)])
@pytest.mark.parametrize("block", [1, 5, 256])
@pytest.mark.parametrize("ties", [False, True])
def test_prefill_matches_reference(window, sinks, size, pool, block, ties):
    q, k, v = random_qkv(seq_len=29)
    scores = random_scores(seq_len=29, ties=ties)
    cos, sin = rotary_table(sinks + window + block + 1, 8)
    cache = new_cache(2, window, sinks, size, pool)
    out = wa.prefill(q, k, v, cache, 0, window=window, sinks=sinks, scaling=0.3, cos=cos, sin=sin, block=block,
                     scores=scores, pool=pool)
    expected = reference(q, k, v, pooled_by_hand(scores, pool, sinks), window, sinks, size, 0.3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,sinks,size,pool", [(4, 2, 3, 0), (3, 0, 2, 0), (5, 1, 100, 0), (4, 2, 3, 1),
                                                    (5, 1, 2, 3), (3, 0, 2, 2)])
@pytest.mark.parametrize("pieces", [(3, 1, 9, 2), (), (17,)])
def test_prefill_pieces_then_decode_match_whole(window, sinks, size, pool, pieces):
    q, k, v = random_qkv(seq_len=31)
    scores = random_scores(seq_len=31, ties=True)
    cos, sin = rotary_table(sinks + window + 256, 8)
    cache = new_cache(2, window, sinks, size, pool)
    kw = dict(window=window, sinks=sinks, scaling=0.3, cos=cos, sin=sin, pool=pool)
    outs, start = [], 0
    for n in pieces:
        piece = slice(start, start + n)
        outs.append(wa.prefill(q[:, :, piece], k[:, :, piece], v[:, :, piece], cache, start, scores=scores[:, :, piece],
                               **kw))
        start += n
    for t in range(start, 31):
        step = slice(t, t + 1)
        outs.append(decode(q[:, :, step], k[:, :, step], v[:, :, step], cache, torch.full((2,), t),
                           scores[:, :, step], **kw))
    expected = reference(q, k, v, pooled_by_hand(scores, pool, sinks), window, sinks, size, 0.3)
    torch.testing.assert_close(torch.cat(outs, 2), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pieces", [(40,), (1,) * 40, (7, 20, 13), (2, 1, 30, 1, 1, 5)])
@pytest.mark.parametrize("pool", [0, 1, 3])
def test_the_held_tokens_are_the_best_scored_whatever_the_split(pieces, pool):
    """With a pool, the best by pooled score, and each slot holds the token's own key and value."""
    window, sinks, size = 4, 2, 5
    q, k, v = random_qkv(seq_len=40)
    scores = random_scores(seq_len=40, ties=pool == 0)
    cos, sin = rotary_table(sinks + window + 256, 8)
    cache = new_cache(2, window, sinks, size, pool)
    kw = dict(window=window, sinks=sinks, scaling=0.3, cos=cos, sin=sin, pool=pool)
    start = 0
    for n in pieces:
        piece = slice(start, start + n)
        if n == 1 and start > 0:
            decode(q[:, :, piece], k[:, :, piece], v[:, :, piece], cache, torch.full((2,), start),
                   scores[:, :, piece], **kw)
        else:
            wa.prefill(q[:, :, piece], k[:, :, piece], v[:, :, piece], cache, start, scores=scores[:, :, piece], **kw)
        start += n
    offered = pooled_by_hand(scores, pool, sinks)
    expected = best_evicted(offered, 39, window, sinks, size)
    for (b, h), positions in expected.items():
        held = sorted(cache["cache_pos"][b, h].tolist())
        assert held == positions
        for slot, p in enumerate(cache["cache_pos"][b, h].tolist()):  # each slot holds that token's own k, v, score
            assert torch.equal(cache["cache_k"][b, h, slot], k[b, h, p])
            assert torch.equal(cache["cache_v"][b, h, slot], v[b, h, p])
            assert cache["cache_score"][b, h, slot] == offered[b, h, p]


def test_an_empty_cache_fills_before_it_replaces_and_keeps_its_size():
    window, sinks, size = 2, 1, 8
    q, k, v = random_qkv(seq_len=6)
    cos, sin = rotary_table(sinks + window + 256, 8)
    cache = new_cache(2, window, sinks, size)
    wa.prefill(q, k, v, cache, 0, window=window, sinks=sinks, scaling=0.3, cos=cos, sin=sin,
               scores=random_scores(seq_len=6))
    held = cache["cache_pos"][0, 0]
    assert sorted(held[held >= 0].tolist()) == [1, 2, 3]  # evicted so far: 1 .. 6 - 1 - window
    assert (cache["cache_score"][0, 0][held < 0] == -torch.inf).all()
    assert cache["cache_k"].shape == (2, 2, size, 8)


def test_decode_rows_at_different_positions_equal_each_alone():
    window, sinks, size = 3, 1, 2
    q, k, v = random_qkv(seq_len=14)
    scores = random_scores(seq_len=14)
    cos, sin = rotary_table(sinks + window + 256, 8)
    kw = dict(window=window, sinks=sinks, scaling=0.3, cos=cos, sin=sin)
    lengths = [2, 11]
    caches = []
    for row, n in enumerate(lengths):
        cache = new_cache(1, window, sinks, size)
        wa.prefill(q[row:row + 1, :, :n], k[row:row + 1, :, :n], v[row:row + 1, :, :n], cache, 0,
                   scores=scores[row:row + 1, :, :n], **kw)
        caches.append(cache)

    def token(tensor, row, n):
        return tensor[row:row + 1, :, n:n + 1]

    alone = [decode(token(q, r, n), token(k, r, n), token(v, r, n), {name: t.clone() for name, t in caches[r].items()},
                    torch.tensor([n]), token(scores, r, n), **kw) for r, n in enumerate(lengths)]
    batched = {name: torch.cat([c[name] for c in caches]) for name in caches[0]}
    together = decode(*(torch.cat([token(x, r, n) for r, n in enumerate(lengths)]) for x in (q, k, v)), batched,
                      torch.tensor(lengths), torch.cat([token(scores, r, n) for r, n in enumerate(lengths)]), **kw)
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-6, rtol=1e-6)


def test_visible_and_keep_best_agree_with_sorting():
    gen = torch.Generator().manual_seed(3)
    score = torch.randint(0, 4, (1, 1, 12), generator=gen).float()
    pos = torch.randperm(12, generator=gen)[None, None] + 5
    order = exact_cache.best(score, pos, 12)
    seen = exact_cache.visible(score, pos, order, torch.tensor([100]), window=4, size=5)[0, 0, 0]
    ranked = sorted(range(12), key=lambda i: (score[0, 0, i].item(), pos[0, 0, i].item()), reverse=True)
    assert set(torch.nonzero(seen).flatten().tolist()) == set(ranked[:5])
    _, _, best_score, best_pos = exact_cache.keep_best(torch.zeros(1, 1, 12, 2), torch.zeros(1, 1, 12, 2), score, pos,
                                                       order, size=5)
    assert best_pos[0, 0].tolist() == [pos[0, 0, i].item() for i in ranked[:5]]


@pytest.mark.parametrize("size", [1, 4, 9, 30])
def test_visible_is_each_querys_top_size_of_what_it_has_evicted(size):
    """Many queries, tied scores, empty slots: each query sees exactly the `size` best (score, then later
    position) of the candidates with positions <= t - window, by a sort per query."""
    gen = torch.Generator().manual_seed(size)
    score = torch.randint(0, 5, (2, 3, 20), generator=gen).float()
    pos = torch.stack([torch.randperm(40, generator=gen)[:20] for _ in range(6)]).reshape(2, 3, 20)
    empty = torch.rand(2, 3, 20, generator=gen) < 0.2
    score, pos = score.masked_fill(empty, -torch.inf), pos.masked_fill(empty, exact_cache.EMPTY_POSITION)
    queries = torch.arange(0, 50, 3)
    seen = exact_cache.visible(score, pos, exact_cache.best(score, pos, 20), queries, window=6, size=size)
    for b, h, qi in itertools.product(range(2), range(3), range(len(queries))):
        evicted = [j for j in range(20) if 0 <= pos[b, h, j] <= queries[qi] - 6]
        ranked = sorted(evicted, key=lambda j: (score[b, h, j].item(), pos[b, h, j].item()), reverse=True)
        assert set(torch.nonzero(seen[b, h, qi]).flatten().tolist()) == set(ranked[:size])


@pytest.mark.parametrize("pool", [0, 2])
def test_pool_sequence_is_the_best_score_within_pool_tokens(pool):
    scores = random_scores(seq_len=30)
    pooled = exact_cache.pool_sequence(scores, pool=pool, sinks=3)
    torch.testing.assert_close(pooled[..., 3:], pooled_by_hand(scores, pool, 3)[..., 3:], atol=0, rtol=0)


@pytest.mark.parametrize("block", [1, 3, 64])
def test_held_over_time_is_each_querys_best(block):
    scores = random_scores(seq_len=30, ties=True)
    window, sinks, size = 4, 2, 3
    held = exact_cache.held_over_time(scores, window=window, sinks=sinks, size=size, block=block)
    for t in range(30):
        expected = best_evicted(scores, t, window, sinks, size)
        for (b, h), positions in expected.items():
            assert torch.nonzero(held[b, h, t]).flatten().tolist() == positions
