"""SessionStore: longest-prefix lookup, namespaces, LRU byte budget, disk spill, restart, corruption, sessions."""

import os

import torch

from tptt_runtime.engine.store import Session, SessionStore
from tptt_runtime.state import SessionState

FINGERPRINT = "f" * 64


def state(tokens: int, fill: float = 0.0) -> SessionState:
    layers = [{"memory": torch.full((1, 2, 4, 4), fill), "win_k": torch.full((1, 2, 3, 4), fill)}]
    return SessionState(layers, FINGERPRINT, tokens)


def put(store, ids, namespace="a", fill=None):
    return store.put(namespace, ids, state(len(ids), float(len(ids)) if fill is None else fill),
                     torch.arange(5.0) + len(ids))


def test_longest_prefix_wins_and_copies_are_private():
    store = SessionStore(FINGERPRINT, max_bytes=1 << 20)
    put(store, [1, 2])
    put(store, [1, 2, 3, 4])
    put(store, [1, 9, 9, 9, 9])
    found, logits, length = store.longest_prefix("a", [1, 2, 3, 4, 5, 6])
    assert length == 4 and found.num_tokens == 4 and logits[0] == 4
    found.layers[0]["memory"] += 100  # the stored snapshot must not change
    again, _, _ = store.longest_prefix("a", [1, 2, 3, 4, 5])
    assert again.layers[0]["memory"].max() == 4
    assert store.longest_prefix("a", [1, 2, 3])[2] == 2
    assert store.longest_prefix("a", [1, 2, 3, 4], max_len=3)[2] == 2
    assert store.longest_prefix("a", [7, 1, 2]) is None


def test_longest_prefix_hands_only_the_winner_to_copy():
    """The engine copies a hit straight into its state pool: `copy` sees the longest match once, and its result
    is what longest_prefix returns."""
    store = SessionStore(FINGERPRINT, max_bytes=1 << 20)
    put(store, [1, 2])
    put(store, [1, 2, 3, 4])
    seen = []
    found, logits, length = store.longest_prefix("a", [1, 2, 3, 4, 5], copy=lambda s: seen.append(s) or "slot 7")
    assert (found, length, logits[0]) == ("slot 7", 4, 4) and [s.num_tokens for s in seen] == [4]
    assert store.longest_prefix("a", [9], copy=seen.append) is None and len(seen) == 1


def test_namespaces_never_share():
    store = SessionStore(FINGERPRINT, max_bytes=1 << 20)
    put(store, [1, 2, 3], namespace="alice")
    assert store.longest_prefix("bob", [1, 2, 3, 4]) is None
    assert store.longest_prefix("alice", [1, 2, 3, 4]) is not None


def test_lru_stays_under_budget_without_disk():
    one = state(1).nbytes
    store = SessionStore(FINGERPRINT, max_bytes=3 * one)
    for i in range(6):
        put(store, [i, i])
    assert store.stats()["resident_bytes"] <= 3 * one
    assert store.longest_prefix("a", [0, 0, 1]) is None        # evicted and gone
    assert store.longest_prefix("a", [5, 5, 1]) is not None


def test_spill_to_disk_and_survive_a_restart(tmp_path):
    one = state(1).nbytes
    store = SessionStore(FINGERPRINT, max_bytes=2 * one, disk_dir=tmp_path)
    for i in range(5):
        put(store, [i, i, i])
    assert store.stats()["snapshots_on_disk"] >= 3
    found, logits, length = store.longest_prefix("a", [0, 0, 0, 7])   # read back from disk
    assert length == 3 and found.layers[0]["memory"].max() == 3 and logits[0] == 3
    store.save_session(Session("s1", "a", 1, 1, messages=[{"role": "user", "content": "hi"}],
                               snapshots=[store.put("a", [4, 4, 4], state(3), None)]))
    # a new store on the same directory (a restart) sees every snapshot that reached the disk and the session
    for key in list(store.resident):
        store._evict(store.snapshots[key])
    restarted = SessionStore(FINGERPRINT, max_bytes=2 * one, disk_dir=tmp_path)
    for i in range(5):
        assert restarted.longest_prefix("a", [i, i, i, 9])[2] == 3
    assert restarted.get_session("a", "s1").messages == [{"role": "user", "content": "hi"}]
    assert restarted.get_session("b", "s1") is None


def test_corrupted_file_is_reported_and_never_loaded(tmp_path, caplog):
    one = state(1).nbytes
    store = SessionStore(FINGERPRINT, max_bytes=one, disk_dir=tmp_path)
    put(store, [1, 1])
    put(store, [2, 2])  # evicts [1, 1] to disk
    path = next((tmp_path / "snapshots").glob("*.safetensors"))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits in the tensor payload: only the checksum can tell
    path.write_bytes(bytes(data))
    assert store.longest_prefix("a", [1, 1, 5]) is None
    assert "unreadable" in caplog.text
    assert path.with_name(path.name + ".corrupt").exists()


def test_truncated_file_is_skipped_at_start(tmp_path):
    (tmp_path / "snapshots").mkdir(parents=True)
    (tmp_path / "snapshots" / ("0" * 64 + ".safetensors")).write_bytes(b"\x10\x00garbage")
    store = SessionStore(FINGERPRINT, max_bytes=1 << 20, disk_dir=tmp_path)
    assert store.stats()["snapshots_on_disk"] == 0
    assert not any(p.suffix == ".safetensors" for p in (tmp_path / "snapshots").iterdir())


def test_pinned_snapshots_survive_the_disk_cap(tmp_path):
    one = state(1).nbytes
    store = SessionStore(FINGERPRINT, max_bytes=one, disk_dir=tmp_path, max_disk_bytes=one)
    key = put(store, [1, 1])
    store.save_session(Session("keep", "a", 1, 1, snapshots=[key]))
    for i in range(2, 6):
        put(store, [i, i])
    assert store.longest_prefix("a", [1, 1, 2]) is not None
    assert store.delete_session("a", "keep") and store.get_session("a", "keep") is None


def test_no_temporary_files_are_left(tmp_path):
    store = SessionStore(FINGERPRINT, max_bytes=1, disk_dir=tmp_path)
    for i in range(3):
        put(store, [i])
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert all(os.path.getsize(p) > 0 for p in (tmp_path / "snapshots").iterdir())
