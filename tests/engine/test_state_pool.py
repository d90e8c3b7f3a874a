"""StatePool: slots allocated once, forwards over slot rows (a packed prefill over any slots, decode over the
front rows) equal forwards over SessionStates (same bytes), slots are reused and the pool never grows."""

import pytest
import torch

from tests.conftest import tiny_model
from tptt_runtime.config import TpttConfig
from tptt_runtime.engine.state_pool import PoolFull, StatePool
from tptt_runtime.model import PrefillPiece, TitansModel


@pytest.fixture(scope="module")
def model():
    return TitansModel(tiny_model("llama"), TpttConfig(window=4, sinks=1, mag_weight=0.5, cache_tokens=3))


def ids(n, seed):
    return torch.randint(0, 90, (n,), generator=torch.Generator().manual_seed(seed))


def same(a, b, atol: float = 0.0) -> bool:
    """Same tensors (dtype, shape, every bit unless `atol`) and metadata (safetensors orders metadata keys at
    random, so serialized bytes are not compared)."""
    (ta, ma), (tb, mb) = a.to_tensors(), b.to_tensors()
    return ma == mb and ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape
        and (torch.equal(ta[k], tb[k]) or torch.allclose(ta[k], tb[k], atol=atol, rtol=0)) for k in ta)


def storages(pool):
    return [t.untyped_storage().data_ptr() for layer in pool.layers for t in layer.values()]


def test_a_new_slot_holds_a_new_session_and_a_loaded_one_its_state(model):
    pool = StatePool(model, 3)
    state = model.new_session()
    model.prefill(state, ids(9, 0))
    loaded, blank = pool.acquire(state), pool.acquire()
    assert same(pool.snapshot(loaded, 9), state)
    assert same(pool.snapshot(blank, 0), model.new_session())
    assert pool.slot_nbytes == state.nbytes and pool.num_free == 1


def test_prefill_and_decode_over_slots_equal_the_session_path_byte_for_byte(model):
    """Three sessions at different positions: a packed prefill of two (non-consecutive slots), then decode steps
    over the front rows in two orders (slots swapped there first); every slot ends with the state and the
    logits of the same tokens fed through SessionStates: bit for bit for the session prefilled alone, within
    float rounding of a larger batch's matmuls for the others."""
    pool = StatePool(model, 4)
    streams = [ids(14, seed) for seed in range(3)]
    states = [model.new_session() for _ in streams]
    slot_of = [pool.acquire() for _ in streams]
    pool.acquire()  # slot 3 taken: a pool that is not just these sessions
    packed = model.prefill_packed([PrefillPiece(pool.rows(slot_of[0]), 0, streams[0][None, :6]),
                                   PrefillPiece(pool.rows(slot_of[2]), 0, streams[2][None, :5])])
    model.prefill_packed([PrefillPiece(pool.rows(slot_of[1]), 0, streams[1][None, :9])])
    for state, stream, n in zip(states, streams, (6, 9, 5)):
        reference = model.prefill(state, stream[:n])
    torch.testing.assert_close(packed[1][0, -1], reference, atol=1e-5, rtol=0)
    assert same(pool.snapshot(slot_of[1], 9), states[1])
    for order in ([2, 0, 1], [0, 1, 2]):
        for row, i in enumerate(order):  # session i to slot `row`, as the engine moves decoding requests
            other = slot_of.index(row)
            pool.swap(row, slot_of[i])
            slot_of[other], slot_of[i] = slot_of[i], row
        positions = [states[i].num_tokens for i in order]
        next_ids = torch.stack([streams[i][positions[j]] for j, i in enumerate(order)])
        logits = model.decode_rows(pool.rows(0, 3), next_ids, positions)
        expected = model.decode([states[i] for i in order], [int(streams[i][states[i].num_tokens]) for i in order])
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    for slot, state in zip(slot_of, states):
        assert same(pool.snapshot(slot, state.num_tokens), state, atol=1e-5)


def test_swap_exchanges_rows_and_keeps_track_of_free_slots(model):
    pool = StatePool(model, 3)
    state = model.new_session()
    model.prefill(state, ids(7, 1))
    slot = pool.acquire(state)
    assert slot == 0
    pool.swap(0, 2)  # into a free slot: 2 is now taken, 0 free
    assert same(pool.snapshot(2, 7), state)
    assert pool.acquire() == 0 and pool.num_free == 1
    assert same(pool.snapshot(0, 0), model.new_session())


def test_slots_are_reused_and_the_pool_never_grows(model):
    pool = StatePool(model, 2)
    before = storages(pool)
    for round_ in range(5):
        a, b = pool.acquire(), pool.acquire()
        assert {a, b} == {0, 1}
        with pytest.raises(PoolFull):
            pool.acquire()
        model.decode_rows(pool.rows(0, 2), ids(2, round_), [0, 0])
        pool.release(a)
        pool.release(b)
    assert storages(pool) == before
    with pytest.raises(ValueError, match="not in use"):
        pool.release(0)
