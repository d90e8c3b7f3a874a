"""Chunkwise prefill and decode step against the per-token reference loop: output and final state."""

import pytest
import torch
import torch.nn.functional as F

from tptt_runtime.ops import delta_product as dp
from tptt_runtime.ops import memory_inputs as mi


def random_inputs(seq_len, order, batch=2, kv_heads=2, groups=3, key_dim=8, value_dim=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * groups, seq_len, key_dim, generator=gen)
    k = F.normalize(torch.randn(batch, kv_heads, seq_len, order, key_dim, generator=gen), dim=-1)
    v = torch.randn(batch, kv_heads, seq_len, order, value_dim, generator=gen)
    beta = torch.rand(batch, kv_heads, seq_len, order, generator=gen)
    g = F.logsigmoid(torch.randn(batch, kv_heads, seq_len, generator=gen) + 2)
    state = torch.randn(batch, kv_heads, key_dim, value_dim, generator=gen)
    return q, k, v, beta, g, state


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("seq_len", [1, 2, 13, 31, 64, 97])
@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
@pytest.mark.parametrize("offset", [0, 5])
def test_chunk_equals_reference(order, seq_len, chunk_size, offset):
    q, k, v, beta, g, state = random_inputs(seq_len, order)
    ref_out, ref_state = dp.naive_recurrent(q, k, v, beta, g, state, True, offset=offset)
    out, final = dp.chunk(q, k, v, beta, g, state, True, chunk_size=chunk_size, offset=offset)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, ref_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("nonlinear_chunk", [4, 8])
@pytest.mark.parametrize("offset", [0, 3, 8])
@pytest.mark.parametrize("chunk_size", [4, 6, 64])
def test_chunk_with_nonlinearity_equals_reference(nonlinear_chunk, offset, chunk_size):
    q, k, v, beta, g, state = random_inputs(29, 2)
    ref_out, ref_state = dp.naive_recurrent(q, k, v, beta, g, state, True, nonlinear_chunk, offset)
    out, final = dp.chunk(q, k, v, beta, g, state, True, chunk_size, nonlinear_chunk, offset)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, ref_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("chunk_size,offset,nonlinear_chunk", [(1, 0, 0), (4, 5, 0), (16, 3, 8), (64, 0, 0)])
def test_write_norms_equal_reference(order, chunk_size, offset, nonlinear_chunk):
    """The exact-token cache's score, ||beta (v - k^T S)|| of each token's first step: the chunkwise form (rows
    of U) and decode steps give the loop's, with decay, a carried state and a nonlinearity."""
    q, k, v, beta, g, state = random_inputs(29, order)
    *_, ref = dp.naive_recurrent(q, k, v, beta, g, state, True, nonlinear_chunk, offset, output_write_norms=True)
    *_, norms = dp.chunk(q, k, v, beta, g, state, True, chunk_size, nonlinear_chunk, offset, output_write_norms=True)
    torch.testing.assert_close(norms, ref, atol=1e-5, rtol=1e-5)
    steps = []
    for t in range(29):
        piece = slice(t, t + 1)
        _, state, norm = dp.recurrent_step(q[:, :, piece], k[:, :, piece], v[:, :, piece], beta[:, :, piece],
                                           g[:, :, piece], state, torch.full((2,), offset + t), nonlinear_chunk,
                                           output_write_norms=True)
        steps.append(norm)
    torch.testing.assert_close(torch.cat(steps, dim=-1), ref, atol=1e-5, rtol=1e-5)
    _, _, _, _, _, state0 = random_inputs(29, order)  # the first token's write, by hand: beta (v - k^T g S0)
    decayed = state0 * g[:, :, 0].exp()[..., None, None]
    by_hand = beta[:, :, 0, 0, None] * (v[:, :, 0, 0] - (k[:, :, 0, 0, :, None] * decayed).sum(-2))
    torch.testing.assert_close(ref[:, :, 0], by_hand.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_nonlinearity_changes_the_state():
    """Guard against a nonlinearity that is silently never applied."""
    q, k, v, beta, g, state = random_inputs(16, 2)
    _, linear = dp.naive_recurrent(q, k, v, beta, g, state, True)
    _, nonlinear = dp.naive_recurrent(q, k, v, beta, g, state, True, nonlinear_chunk=8)
    assert (linear - nonlinear).abs().max() > 1e-3


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("nonlinear_chunk", [0, 4])
def test_steps_equal_reference(order, nonlinear_chunk):
    q, k, v, beta, g, state = random_inputs(11, order)
    ref_out, ref_state = dp.naive_recurrent(q, k, v, beta, g, state, True, nonlinear_chunk, offset=2)
    outs = []
    for t in range(11):
        o, state = dp.recurrent_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], beta[:, :, t:t + 1],
                                     g[:, :, t:t + 1], state, torch.full((2,), 2 + t), nonlinear_chunk)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, ref_state, atol=1e-5, rtol=1e-5)


def test_split_prefill_equals_whole():
    """Chunk over a prefix then the rest (carrying the state) equals one chunk over everything."""
    q, k, v, beta, g, _ = random_inputs(50, 2)
    whole, whole_state = dp.chunk(q, k, v, beta, g, None, True, 8, nonlinear_chunk=8)
    first, mid = dp.chunk(q[:, :, :19], k[:, :, :19], v[:, :, :19], beta[:, :, :19], g[:, :, :19], None, True, 8, 8)
    second, end = dp.chunk(q[:, :, 19:], k[:, :, 19:], v[:, :, 19:], beta[:, :, 19:], g[:, :, 19:], mid, True, 8, 8,
                           offset=19)
    torch.testing.assert_close(torch.cat([first, second], 2), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(end, whole_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("trick", ["derivative", "rotary", "combined"])
def test_virtual_tokens_split_equals_whole(trick):
    x = torch.randn(1, 2, 9, 6)
    whole = mi.expand_virtual(x, None, 2, trick)
    parts = torch.cat([mi.expand_virtual(x[:, :, :4], None, 2, trick),
                       mi.expand_virtual(x[:, :, 4:], x[:, :, 3:4], 2, trick)], dim=2)
    torch.testing.assert_close(parts, whole)
    assert whole.shape == (1, 2, 9, 2, 6)
    torch.testing.assert_close(whole[:, :, :, 0], x if trick != "combined" else 0.5 * (x + x))


def test_virtual_token_formulas():
    x = torch.randn(1, 1, 3, 4)
    deriv = mi.expand_virtual(x, None, 2, "derivative")
    torch.testing.assert_close(deriv[:, :, 1:, 1], x[:, :, 1:] - x[:, :, :-1])
    torch.testing.assert_close(deriv[:, :, 0, 1], x[:, :, 0])
    torch.testing.assert_close(mi.expand_virtual(x, None, 2, "rotary")[:, :, :, 1], -x, atol=1e-6, rtol=0)


def test_causal_mean_pool_split_equals_whole_and_reference():
    m = torch.randn(2, 3, 10)
    whole = mi.causal_mean_pool(m, torch.zeros(2, 3, 2), 0)
    ref = torch.stack([m[..., max(0, t - 2):t + 1].mean(-1) for t in range(10)], dim=-1)
    torch.testing.assert_close(whole, ref)
    first = mi.causal_mean_pool(m[..., :1], torch.zeros(2, 3, 2), 0)
    rest = mi.causal_mean_pool(m[..., 1:], torch.cat([torch.zeros(2, 3, 1), m[..., :1]], -1), torch.tensor([1, 1]))
    torch.testing.assert_close(torch.cat([first, rest], -1), whole)


def test_causal_mean_pool_one_token_at_a_time_equals_whole():
    """The decode shape (one value per row, rows at their own positions) against the whole-sequence pool."""
    m = torch.randn(2, 3, 10)
    whole = mi.causal_mean_pool(m, torch.zeros(2, 3, 2), 0)
    history, steps = torch.zeros(2, 3, 2), []
    for t in range(10):
        steps.append(mi.causal_mean_pool(m[..., t:t + 1], history, torch.tensor([t, t])))
        history = torch.cat([history, m[..., t:t + 1]], -1)[..., 1:]
    torch.testing.assert_close(torch.cat(steps, -1), whole)
