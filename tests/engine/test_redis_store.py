"""The session store's Redis tier, against a real redis-server: two stores (two server processes) share one set of
snapshots and sessions; namespaces stay apart; corrupt and foreign entries are skipped; an outage degrades."""

import time

import numpy as np
import pytest
import torch
from safetensors.torch import save

from tests.engine.test_store import FINGERPRINT, put, state
from tests.redis_server import redis_server  # noqa: F401 - fixture
from tptt_runtime.engine.redis_tier import RedisTier
from tptt_runtime.engine.store import Session, SessionStore, Snapshot, encode_snapshot, snapshot_key
from tptt_runtime.state import SessionState


def shared_store(url: str, retry_s: float = 2.0) -> SessionStore:
    return SessionStore(FINGERPRINT, max_bytes=1 << 20, remote=RedisTier(url, FINGERPRINT, retry_s=retry_s))


@pytest.fixture
def stores(redis_server):  # noqa: F811
    a, b = shared_store(redis_server.url), shared_store(redis_server.url)
    yield a, b
    for store in (a, b):
        store.remote.close()


def test_a_snapshot_written_by_one_store_resumes_in_another(stores):
    a, b = stores
    put(a, [1, 2, 3, 4])
    assert a.remote.drain()
    found, logits, length = b.longest_prefix("a", [1, 2, 3, 4, 5])
    assert length == 4 and torch.equal(logits, torch.arange(5.0) + 4)
    assert torch.equal(found.layers[0]["memory"], state(4, 4.0).layers[0]["memory"])
    assert b.stats()["hits_redis"] == 1
    b.longest_prefix("a", [1, 2, 3, 4, 5])  # now resident in b
    assert (b.stats()["hits_redis"], b.stats()["hits_ram"]) == (1, 1)


def test_redis_wins_only_when_longer_than_the_local_tiers(stores):
    a, b = stores
    put(b, [1, 2])
    put(a, [1, 2, 3, 4])
    put(a, [1])
    a.remote.drain()
    assert b.longest_prefix("a", [1, 2, 3, 4, 5])[2] == 4
    assert b.longest_prefix("a", [1, 2, 9])[2] == 2      # local [1, 2] beats Redis's [1]
    assert b.longest_prefix("a", [1, 2, 3, 4], max_len=3)[2] == 2


def test_namespaces_and_sessions_never_cross_owners(stores):
    a, b = stores
    key = put(a, [5, 6, 7], namespace="alice")
    a.save_session(Session("chat", "alice", 1, 1, token_ids=[5, 6, 7], num_tokens=3, snapshots=[key]))
    assert b.longest_prefix("bob", [5, 6, 7, 8]) is None
    assert b.get_session("bob", "chat") is None and b.list_sessions("bob") == []
    assert b.delete_session("bob", "chat") is False
    assert [s.session_id for s in b.list_sessions("alice")] == ["chat"]
    assert b.longest_prefix("alice", [5, 6, 7, 8])[2] == 3


def test_a_saved_session_is_resumable_elsewhere_at_once_and_the_latest_record_wins(stores):
    a, b = stores
    key = put(a, [1, 2, 3])
    a.save_session(Session("s", "a", 1, 1, token_ids=[1, 2, 3], num_tokens=3, snapshots=[key]))
    # no drain: save_session returns only once the session's snapshots are in Redis
    session = b.get_session("a", "s")
    assert session.num_tokens == 3 and b.longest_prefix("a", [1, 2, 3, 4])[2] == 3
    key = put(b, [1, 2, 3, 4, 5])
    b.save_session(Session("s", "a", 1, 2, token_ids=[1, 2, 3, 4, 5], num_tokens=5, snapshots=[key]))
    assert a.get_session("a", "s").num_tokens == 5
    assert a.longest_prefix("a", [1, 2, 3, 4, 5, 6])[2] == 5
    assert b.delete_session("a", "s") and a.get_session("a", "s") is None


def plant(store: SessionStore, namespace: str, ids: list[int], value: bytes) -> str:
    """Put `value` in Redis where the snapshot of `ids` would live."""
    key = snapshot_key(namespace, np.asarray(ids, dtype=np.int32))
    tier = store.remote
    tier.client.set(tier.prefix + "snap:" + key, value)
    tier.client.sadd(tier._lengths_key(namespace), len(ids))
    return key


def encoded(ids: list[int], fingerprint: str = FINGERPRINT, namespace: str = "a") -> bytes:
    ids = np.asarray(ids, dtype=np.int32)
    snapshot = Snapshot(snapshot_key(namespace, ids), namespace, ids,
                        SessionState(state(len(ids)).layers, fingerprint, len(ids)), None, 0)
    tensors, metadata = encode_snapshot(snapshot)
    return save(tensors, metadata=metadata)


def flipped_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


@pytest.mark.parametrize("case", ["garbage", "checksum", "foreign model", "other ids"])
def test_corrupt_or_foreign_entries_are_skipped_reported_and_deleted(stores, case):
    a, b = stores
    put(b, [1, 2])
    value = {"garbage": b"not a snapshot",
             "checksum": flipped_last_byte(encoded([1, 2, 3, 4])),
             "foreign model": encoded([1, 2, 3, 4], fingerprint="e" * 64),
             "other ids": encoded([1, 2, 3, 9])}[case]
    key = plant(b, "a", [1, 2, 3, 4], value)
    assert b.longest_prefix("a", [1, 2, 3, 4, 5])[2] == 2   # falls back to the local snapshot
    assert b.stats()["redis_skipped"] == 1
    assert b.remote.client.get(b.remote.prefix + "snap:" + key) is None


def test_a_genuine_planted_entry_loads(stores):
    """The planting above is faithful: an uncorrupted entry planted the same way is found."""
    _, b = stores
    plant(b, "a", [1, 2, 3, 4], encoded([1, 2, 3, 4]))
    assert b.longest_prefix("a", [1, 2, 3, 4, 5])[2] == 4


def test_an_outage_degrades_serving_goes_on_and_writes_resume(redis_server):  # noqa: F811
    a, b = shared_store(redis_server.url, retry_s=0.2), shared_store(redis_server.url, retry_s=0.2)
    put(a, [1, 2])
    a.remote.drain()
    redis_server.stop()
    started = time.monotonic()
    put(a, [3, 4])                                              # queued write fails, quietly
    key = put(a, [3, 4, 5])
    a.save_session(Session("s", "a", 1, 1, token_ids=[3, 4, 5], num_tokens=3, snapshots=[key]))
    assert a.longest_prefix("a", [3, 4, 5, 6])[2] == 3          # the local tiers still answer
    assert a.get_session("a", "s").num_tokens == 3
    assert a.stats()["redis_up"] == 0 and a.stats()["redis_errors"] >= 1
    assert time.monotonic() - started < 10                      # no call hangs on the dead server
    redis_server.start()
    time.sleep(0.3)
    assert a.stats()["redis_up"] == 1
    put(a, [7, 8, 9])
    a.remote.drain()
    assert b.longest_prefix("a", [7, 8, 9, 1])[2] == 3          # writes reach Redis again
    assert b.get_session("a", "s") is None                      # saved during the outage: not shared yet,
    assert a.get_session("a", "s").num_tokens == 3              # until its owner reads it back
    assert b.get_session("a", "s").num_tokens == 3 and b.longest_prefix("a", [3, 4, 5, 6])[2] == 3
    for store in (a, b):
        store.remote.close()


def test_writes_beyond_the_queue_bound_are_dropped_and_counted(redis_server):  # noqa: F811
    store = SessionStore(FINGERPRINT, max_bytes=1 << 20, remote=RedisTier(redis_server.url, FINGERPRINT, max_queued=0))
    put(store, [1, 2, 3])
    store.remote.drain()
    assert store.stats()["redis_dropped"] == 1 and store.stats()["redis_writes"] == 0
    assert store.longest_prefix("a", [1, 2, 3, 4])[2] == 3  # the local tiers keep it
    store.remote.close()
