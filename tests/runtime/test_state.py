"""SessionState: constant size, independent forks, versioned serialization tied to the model that made it."""

import pytest
import torch

from tests.conftest import tiny_model
from tptt_runtime import SessionState, TitansModel, TpttConfig
from tptt_runtime.state import FORMAT_VERSION


@pytest.fixture(scope="module")
def model():
    return TitansModel(tiny_model("llama"), TpttConfig(window=8, sinks=2, mag_weight=0.5))


def tokens(n, seed=0):
    return torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(seed))


def test_nbytes_does_not_grow(model):
    short, long = model.new_session(), model.new_session()
    model.prefill(short, tokens(100))
    model.prefill(long, tokens(20_000))
    assert long.num_tokens == 20_000
    assert short.nbytes == long.nbytes == model.new_session().nbytes > 0


def resident_bytes(state) -> int:
    """Bytes of every storage the state's tensors keep alive (views of bigger tensors count in full)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for layer in state.layers
                for t in layer.values()}
    return sum(storages.values())


def test_a_session_keeps_only_its_own_bytes_alive(model):
    state = model.new_session()
    model.prefill(state, tokens(3000))  # activations of a 2048-token piece: a view into them would pin MBs
    assert resident_bytes(state) == state.nbytes
    other = model.new_session()
    model.prefill(other, tokens(5))
    model.decode([state, other], [4, 5])
    assert resident_bytes(state) == state.nbytes


def test_fork_is_independent(model):
    state = model.new_session()
    model.prefill(state, tokens(12))
    fork = state.fork()
    a = model.step(state, 5)
    model.step(state, 6)
    b = model.step(fork, 5)
    torch.testing.assert_close(a, b)
    assert (state.num_tokens, fork.num_tokens) == (14, 13)


def test_bytes_round_trip_continues_identically(model):
    state = model.new_session()
    model.prefill(state, tokens(25))
    restored = SessionState.from_bytes(state.to_bytes(), expected_fingerprint=model.fingerprint)
    assert restored.num_tokens == 25 and restored.nbytes == state.nbytes
    torch.testing.assert_close(model.step(restored, 9), model.step(state, 9))


def test_state_of_another_model_is_refused(model):
    other = TitansModel(tiny_model("llama", seed=1), TpttConfig(window=8, sinks=2, mag_weight=0.5))
    blob = other.new_session().to_bytes()
    with pytest.raises(ValueError, match="made by model"):
        SessionState.from_bytes(blob, expected_fingerprint=model.fingerprint)
    with pytest.raises(ValueError, match="made by model"):
        model.prefill(SessionState.from_bytes(blob), tokens(3))


def test_same_weights_other_config_is_another_model(model):
    other = TitansModel(tiny_model("llama"), TpttConfig(window=9, sinks=2, mag_weight=0.5))
    assert other.fingerprint != model.fingerprint


def test_garbage_and_future_versions_are_clear_errors(model):
    with pytest.raises(ValueError, match="not a TPTT session state"):
        SessionState.from_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="not a TPTT session state"):
        SessionState.from_bytes(b"")
    current = f'"format_version":"{FORMAT_VERSION}"'.encode()
    for version in ("1", "9"):  # 1: before the exact-token cache, never misread as a state without one
        blob = model.new_session().to_bytes()
        assert current in blob
        with pytest.raises(ValueError, match=f"version {version} is not supported.*start a new session"):
            SessionState.from_bytes(blob.replace(current, f'"format_version":"{version}"'.encode()))


@pytest.mark.parametrize("cache_pool", [0, 2])
def test_a_cached_state_round_trips_and_never_grows(cache_pool):
    cached = TitansModel(tiny_model("llama"), TpttConfig(window=4, sinks=1, mag_weight=0.5, cache_tokens=3,
                                                         cache_pool=cache_pool))
    state = cached.new_session()
    assert ("win_left" in state.layers[0]) == (cache_pool > 0)
    empty = state.nbytes
    cached.prefill(state, tokens(40))
    assert state.nbytes == empty and (state.layers[0]["cache_pos"] >= 0).all()
    copy = SessionState.from_bytes(state.to_bytes(), cached.fingerprint)
    for mine, theirs in zip(state.layers, copy.layers):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[name], theirs[name]) for name in mine)
    torch.testing.assert_close(cached.step(copy, 5), cached.step(state, 5), atol=0, rtol=0)


def test_bad_token_ids_are_clear_errors(model):
    state = model.new_session()
    with pytest.raises(ValueError, match="token ids must be in"):
        model.prefill(state, [1, 97])
    with pytest.raises(ValueError, match="no tokens"):
        model.prefill(state, [])
    assert state.num_tokens == 0
