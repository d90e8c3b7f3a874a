"""Windowed softmax attention against a per-query reference that ranks the visible tokens (StreamingLLM)."""

import math

import pytest
import torch

from tptt_runtime.ops import window_attention as wa


def rotary_table(size, dim, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)
    angles = torch.outer(torch.arange(size).float(), inv_freq)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def reference(q, k, v, window, sinks, scaling):
    """Query t sees sinks + its window; each visible token is rotated at its rank in that visible set."""
    batch, q_heads, seq_len, dim = q.shape
    groups = q_heads // k.shape[1]
    cos, sin = rotary_table(sinks + window + 1, dim)
    out = torch.zeros_like(q)
    for t in range(seq_len):
        visible = sorted(set(range(min(sinks, t + 1))) | set(range(max(sinks, t - window + 1), t + 1)))
        ranks = torch.arange(len(visible))
        keys = wa.apply_rotary(k[:, :, visible], wa.rotary_factors(ranks.expand(batch, -1), cos, sin))
        query = wa.apply_rotary(q[:, :, t:t + 1], wa.rotary_factors(ranks[-1:].expand(batch, -1), cos, sin))
        for h in range(q_heads):
            logits = query[:, h] @ keys[:, h // groups].transpose(-1, -2) * scaling
            out[:, h, t] = (logits.softmax(-1) @ v[:, h // groups, visible])[:, 0]
    return out


def decode(q, k, v, cache, positions, *, window, sinks, scaling, cos, sin):
    plan = wa.decode_plan(positions, window=window, sinks=sinks, cos=cos, sin=sin,
                          filling_sinks=bool((positions < sinks).any()))
    return wa.decode(q, k, v, cache, plan, scaling=scaling)


def random_qkv(batch=2, q_heads=4, kv_heads=2, seq_len=40, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, seq_len, dim, generator=gen)
    k = torch.randn(batch, kv_heads, seq_len, dim, generator=gen)
    v = torch.randn(batch, kv_heads, seq_len, dim, generator=gen)
    return q, k, v


@pytest.mark.parametrize("window,sinks", [(4, 0), (4, 2), (7, 3), (64, 4), (1, 1)])
@pytest.mark.parametrize("block", [1, 5, 256])
def test_prefill_matches_reference(window, sinks, block):
    q, k, v = random_qkv(seq_len=37)
    cos, sin = rotary_table(sinks + window + block, q.shape[-1])
    cache = wa.new_cache(2, 2, 8, window=window, sinks=sinks, dtype=torch.float32, device="cpu")
    out = wa.prefill(q, k, v, cache, 0, window=window, sinks=sinks, scaling=8 ** -0.5, cos=cos, sin=sin, block=block)
    torch.testing.assert_close(out, reference(q, k, v, window, sinks, 8 ** -0.5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,sinks", [(4, 0), (5, 2), (3, 2), (5, 6), (64, 4)])
@pytest.mark.parametrize("pieces", [(3, 1, 9, 2), ()])
def test_prefill_pieces_then_decode_match_whole(window, sinks, pieces):
    """Prefill in uneven pieces (or not at all), then decode one token at a time: same as the reference on the
    whole. Without a prefill the sinks are decoded too (their keys also land in ring slots that stay masked)."""
    q, k, v = random_qkv(seq_len=31)
    cos, sin = rotary_table(sinks + window + 256, q.shape[-1])
    cache = wa.new_cache(2, 2, 8, window=window, sinks=sinks, dtype=torch.float32, device="cpu")
    kw = dict(window=window, sinks=sinks, scaling=0.3, cos=cos, sin=sin)
    outs, start = [], 0
    for size in pieces:
        outs.append(wa.prefill(q[:, :, start:start + size], k[:, :, start:start + size], v[:, :, start:start + size],
                               cache, start, **kw))
        start += size
    for t in range(start, 31):
        outs.append(decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], cache, torch.full((2,), t), **kw))
    torch.testing.assert_close(torch.cat(outs, 2), reference(q, k, v, window, sinks, 0.3), atol=1e-5, rtol=1e-5)


def test_decode_rows_at_different_positions():
    """A batch whose rows sit at different positions equals each row decoded alone."""
    window, sinks = 4, 2
    q, k, v = random_qkv(batch=2, seq_len=12)
    cos, sin = rotary_table(sinks + window + 256, 8)
    kw = dict(window=window, sinks=sinks, scaling=0.3, cos=cos, sin=sin)
    lengths = [1, 9]  # row 0's new token is a sink, row 1's goes to the ring
    caches = []
    for row, n in enumerate(lengths):
        cache = wa.new_cache(1, 2, 8, window=window, sinks=sinks, dtype=torch.float32, device="cpu")
        wa.prefill(q[row:row + 1, :, :n], k[row:row + 1, :, :n], v[row:row + 1, :, :n], cache, 0, **kw)
        caches.append(cache)
    alone = [decode(q[r:r + 1, :, n:n + 1], k[r:r + 1, :, n:n + 1], v[r:r + 1, :, n:n + 1],
                    {name: t.clone() for name, t in caches[r].items()}, torch.tensor([n]), **kw)
             for r, n in enumerate(lengths)]
    batched = {name: torch.cat([c[name] for c in caches]) for name in caches[0]}
    idx = torch.tensor(lengths)
    qb = torch.stack([q[r, :, n] for r, n in enumerate(lengths)])[:, :, None]
    kb = torch.stack([k[r, :, n] for r, n in enumerate(lengths)])[:, :, None]
    vb = torch.stack([v[r, :, n] for r, n in enumerate(lengths)])[:, :, None]
    together = decode(qb, kb, vb, batched, idx, **kw)
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-6, rtol=1e-6)


def test_positions_stay_bounded_far_past_the_table():
    """Position 10^6 needs only a table of sinks + window + 1 rows: same output as a short sequence with the
    same visible tokens."""
    window, sinks = 3, 1
    q, k, v = random_qkv(batch=1, seq_len=5)
    cos, sin = rotary_table(sinks + window + 1, 8)
    kw = dict(window=window, sinks=sinks, scaling=0.3, cos=cos, sin=sin)
    far = wa.window_attention(q[:, :, -1:], torch.tensor([[10 ** 6]]), k[:, :, :1], v[:, :, :1], torch.tensor([[0]]),
                              k[:, :, 2:], v[:, :, 2:], torch.tensor([[10 ** 6 - 2, 10 ** 6 - 1, 10 ** 6]]), **kw)
    near = wa.window_attention(q[:, :, -1:], torch.tensor([[4]]), k[:, :, :1], v[:, :, :1], torch.tensor([[0]]),
                               k[:, :, 2:], v[:, :, 2:], torch.tensor([[2, 3, 4]]), **kw)
    torch.testing.assert_close(far, near)
    assert math.isfinite(far.abs().sum().item())


@pytest.mark.parametrize("sinks,cached,softcap", [(0, False, None), (2, False, None), (2, True, None), (2, True, 5.0)])
def test_attend_token_equals_attend(sinks, cached, softcap):
    """The decode form (reductions per part, one softmax across them) gives `attend`'s output for one query
    per row, rows at different positions, some cache slots hidden."""
    window, batch, kv_heads, dim = 6, 3, 2, 8
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(batch, 2 * kv_heads, 1, dim, generator=gen)
    sink_k, sink_v = (torch.randn(batch, kv_heads, sinks, dim, generator=gen) for _ in range(2))
    win_k, win_v = (torch.randn(batch, kv_heads, window, dim, generator=gen) for _ in range(2))
    cos, sin = rotary_table(sinks + window + 8, dim)
    positions = torch.tensor([1, 7, 30])  # still filling its sinks, a ring not yet full, far past the window
    count = positions + 1
    lay = wa.layout(positions[:, None], wa.sink_positions(count, sinks), wa.ring_positions(count, sinks, window),
                    window=window, sinks=sinks, cos=cos, sin=sin, cached=cached)
    cache = None
    if cached:
        seen = torch.rand(batch, kv_heads, 1, 5, generator=gen) > 0.4
        cache = (torch.randn(batch, kv_heads, 5, dim, generator=gen), torch.randn(batch, kv_heads, 5, dim, generator=gen),
                 seen)
    kw = dict(scaling=0.4, softcap=softcap)
    expected = wa.attend(q, sink_k, sink_v, win_k, win_v, lay, **kw, cache=cache)
    torch.testing.assert_close(wa.attend_token(q, sink_k, sink_v, win_k, win_v, lay, **kw, cache=cache), expected,
                               atol=1e-5, rtol=1e-5)
