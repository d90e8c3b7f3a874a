"""SessionStore: state snapshots keyed by the token ids they have consumed, plus named sessions.

Prefix reuse: after every prompt and every completion the engine puts a snapshot (a forked SessionState, the
logits after its last token, and the ids it consumed). A new request resumes from the longest snapshot whose ids
are a prefix of its prompt, so a second chat turn prefills only its new message, whatever client sent it.

Invariants:
- Snapshots belong to a namespace (the API key's owner id); a lookup never crosses namespaces.
- A snapshot's key is sha256(namespace, ids); the only index is key -> Snapshot plus, per namespace, the set of
  stored lengths, so a lookup hashes the prompt's prefixes at those lengths, longest first, and checks ids.
- Resident snapshots stay under `max_bytes` (LRU). Evicted ones are written to `disk_dir` (when set) and read back
  on use; files are written atomically (temp file + rename) with a sha256 of their tensors, re-indexed at start,
  and a file that fails its checksum is reported, renamed `*.corrupt` and never loaded.
- Named sessions (id, owner, conversation) pin their snapshots: they are written to disk when the session is
  saved (write-through), may leave memory, and are never deleted while a session holds them. Session records
  are small JSON files beside the snapshots. `flush()` (at shutdown) writes every other resident snapshot.

- With `remote` (a RedisTier, `--redis-url`), every new snapshot and every session record is also written there,
  a prefix lookup also asks Redis for a longer snapshot than the local tiers hold, and a session record read
  from Redis wins over the local one: several processes then serve one set of conversations
  (engine/redis_tier.py says what is stored and what happens when Redis is down).

Thread safety: one lock around every public method (the engine thread and HTTP handlers both call in).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..state import SessionState
from .redis_tier import RedisTier

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    key: str
    namespace: str
    ids: np.ndarray                   # int32 [num_tokens] consumed by the state
    state: SessionState | None        # None while the snapshot lives on disk only
    logits: torch.Tensor | None       # float32 [vocab] after the last id (None if not kept)
    nbytes: int
    on_disk: bool = False
    pins: int = 0                     # named sessions holding it


@dataclass
class Session:
    """A named conversation. `messages` (chat) or `token_ids` (completions) is what was said so far;
    `snapshots` are the keys of the states that let it resume without recomputation."""
    session_id: str
    owner: str
    created: int
    updated: int
    kind: str = "chat"                           # "chat" | "completion"
    messages: list[dict] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0
    snapshots: list[str] = field(default_factory=list)


def snapshot_nbytes(state: SessionState, logits: torch.Tensor | None) -> int:
    """What a snapshot costs the resident budget: its state and its logits."""
    return state.nbytes + (logits.numel() * logits.element_size() if logits is not None else 0)


def snapshot_key(namespace: str, ids: np.ndarray) -> str:
    return hashlib.sha256(namespace.encode() + b"\0" + ids.astype(np.int32).tobytes()).hexdigest()


class SessionStore:
    def __init__(self, fingerprint: str, max_bytes: int, disk_dir: str | Path | None = None,
                 max_disk_bytes: int | None = None, remote: RedisTier | None = None):
        self.fingerprint = fingerprint
        self.remote = remote
        self.hits: Counter = Counter()                          # prefix hits by tier: ram, disk, redis
        self.max_bytes = max_bytes
        self.max_disk_bytes = max_disk_bytes
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self.snapshots: dict[str, Snapshot] = {}
        self.resident: OrderedDict[str, None] = OrderedDict()   # LRU order of snapshots in memory
        self.lengths: dict[str, Counter] = {}                   # namespace -> stored lengths
        self.sessions: dict[tuple[str, str], Session] = {}
        self.unshared: set[tuple[str, str]] = set()             # sessions saved while Redis was down
        self.resident_bytes = 0
        self.lock = threading.RLock()
        if self.disk_dir:
            (self.disk_dir / "snapshots").mkdir(parents=True, exist_ok=True)
            (self.disk_dir / "sessions").mkdir(parents=True, exist_ok=True)
            self._index_disk()

    # ------------------------------------------------------------------------------------- snapshots
    def put(self, namespace: str, ids, state: SessionState, logits: torch.Tensor | None) -> str:
        """Store `state` (owned by the store from now on) as the snapshot of `ids`; returns its key."""
        ids = np.asarray(ids, dtype=np.int32)
        key = snapshot_key(namespace, ids)
        with self.lock:
            old = self.snapshots.get(key)
            if old is not None and old.state is not None:
                self.resident.move_to_end(key)
                return key
            snapshot = Snapshot(key, namespace, ids, state, logits, snapshot_nbytes(state, logits),
                                on_disk=old.on_disk if old else False, pins=old.pins if old else 0)
            self._add(snapshot)
            self._make_resident(snapshot)
            if self.remote is not None:
                self._share_snapshot(key)
            return key

    def longest_prefix(self, namespace: str, ids, max_len: int | None = None, copy=SessionState.fork
                       ) -> tuple[object, torch.Tensor | None, int] | None:
        """`copy` of the longest stored state whose ids prefix `ids` (at most `max_len` of them), with its logits
        and its length; None when nothing matches. Looks in RAM and on disk, then in Redis for a longer one
        (another process may have served the conversation's last turn). `copy(state)` runs under the store's
        lock and must not keep `state`: by default a private fork; the engine copies it straight into a slot
        of its state pool (StatePool.acquire)."""
        ids = np.asarray(ids, dtype=np.int32)
        limit = len(ids) if max_len is None else min(max_len, len(ids))
        with self.lock:
            local = self._longest_local(namespace, ids, limit)
            shared = self._longest_shared(namespace, ids, limit, local[2] if local else 0) if self.remote else None
            hit = shared or local
            return None if hit is None else (copy(hit[0]), *hit[1:])

    def _longest_local(self, namespace: str, ids: np.ndarray, limit: int):
        for length in sorted(self.lengths.get(namespace, ()), reverse=True):
            if length > limit:
                continue
            snapshot = self.snapshots.get(snapshot_key(namespace, ids[:length]))
            if snapshot is None or not np.array_equal(snapshot.ids, ids[:length]):
                continue
            tier = "ram" if snapshot.state is not None else "disk"
            state = self._load(snapshot)
            if state is None:
                continue
            self.hits[tier] += 1
            return state, snapshot.logits, length
        return None

    def _longest_shared(self, namespace: str, ids: np.ndarray, limit: int, floor: int):
        """The longest snapshot in Redis longer than `floor`, made resident here; entries that are corrupt, of
        another model or of other ids are skipped (and deleted there), never loaded."""
        for length in self.remote.lengths(namespace):
            if not floor < length <= limit:
                continue
            key = snapshot_key(namespace, ids[:length])
            if key in self.snapshots:
                continue
            entry = self.remote.get_snapshot(key)
            if entry is None:
                continue
            try:
                state, logits, stored_ids = decode_snapshot(*entry, self.fingerprint)
                if (entry[1].get("namespace") != namespace or entry[1].get("prefix_hash") != key
                        or not np.array_equal(stored_ids, ids[:length])):
                    raise ValueError("the entry holds another conversation's state")
            except Exception as error:  # noqa: BLE001 - whatever is wrong with an entry, it is not loaded
                self.remote.skip(key, error)
                continue
            snapshot = Snapshot(key, namespace, stored_ids, state, logits, snapshot_nbytes(state, logits))
            self._add(snapshot)
            self._make_resident(snapshot)
            self.hits["redis"] += 1
            return state, logits, length
        return None

    def get(self, key: str) -> Snapshot | None:
        with self.lock:
            return self.snapshots.get(key)

    # -------------------------------------------------------------------------------------- sessions
    def get_session(self, owner: str, session_id: str) -> Session | None:
        """The session's record. With Redis, its copy there wins (another process may have served the last turn
        or deleted the session); the local copy answers while Redis cannot, and a record saved while Redis
        was down is written there on the next read."""
        record = self.remote.get_session(owner, session_id) if self.remote else None
        with self.lock:
            if record is not None:
                self._replace_session(Session(**record))
            elif self.remote is not None and self.remote.up:
                self._reconcile_missing(owner, session_id)
            return self.sessions.get((owner, session_id))

    def list_sessions(self, owner: str) -> list[Session]:
        records = self.remote.list_sessions(owner) if self.remote else None
        with self.lock:
            if records is not None:
                for record in records:
                    self._replace_session(Session(**record))
                shared = {record["session_id"] for record in records}
                for (o, session_id) in list(self.sessions):
                    if o == owner and session_id not in shared:
                        self._reconcile_missing(owner, session_id)
            return sorted((s for (o, _), s in self.sessions.items() if o == owner), key=lambda s: s.created)

    def save_session(self, session: Session) -> None:
        """Create or update a session record; pins its snapshots and unpins the ones it no longer holds. With
        Redis, the record is written there once its snapshots are, so any process can resume the session."""
        with self.lock:
            for key in session.snapshots:
                self._persist(key)
            self._replace_session(session)
            self._write_session(session)
        if self.remote is not None:
            self._share_session(session)

    def _share_session(self, session: Session) -> None:
        self.remote.wait_written(session.snapshots)
        shared = self.remote.put_session(asdict(session))
        with self.lock:
            (self.unshared.discard if shared else self.unshared.add)((session.owner, session.session_id))

    def _share_snapshot(self, key: str) -> None:
        """Queue a Redis write of a stored snapshot (read back from disk if it left memory)."""
        snapshot = self.snapshots.get(key)
        state = self._load(snapshot) if snapshot is not None else None
        if state is None:
            return
        frozen = Snapshot(key, snapshot.namespace, snapshot.ids, state, snapshot.logits, snapshot.nbytes)
        self.remote.put_snapshot(key, snapshot.namespace, len(snapshot.ids), lambda: encode_snapshot(frozen))

    def _reconcile_missing(self, owner: str, session_id: str) -> None:
        """Redis answered and has no such session: a local record saved while Redis was down is written there
        now; any other local record was deleted by another process, so it goes here too."""
        session = self.sessions.get((owner, session_id))
        if session is None:
            return
        if (owner, session_id) in self.unshared:
            for key in session.snapshots:
                self._share_snapshot(key)
            self._share_session(session)
        else:
            self._drop_session(owner, session_id)

    def delete_session(self, owner: str, session_id: str) -> bool:
        existed = self.remote is not None and self.remote.delete_session(owner, session_id)
        with self.lock:
            self.unshared.discard((owner, session_id))
            return self._drop_session(owner, session_id) or existed

    def _drop_session(self, owner: str, session_id: str) -> bool:
        session = self.sessions.pop((owner, session_id), None)
        if session is None:
            return False
        for key in session.snapshots:
            self._pin(key, -1)
        if self.disk_dir:
            self._session_path(session).unlink(missing_ok=True)
        return True

    def _replace_session(self, session: Session) -> None:
        """Make `session` the local record of its (owner, id): pin its snapshots, unpin the old record's."""
        old = self.sessions.get((session.owner, session.session_id))
        for key in session.snapshots:
            self._pin(key, +1)
        for key in old.snapshots if old else ():
            self._pin(key, -1)
        self.sessions[(session.owner, session.session_id)] = session

    def wait_shared(self, keys) -> None:
        """With Redis: return once the queued writes of these snapshots are done (at most a few seconds)."""
        if self.remote is not None:
            self.remote.wait_written(keys)

    def flush(self) -> None:
        """Write every resident snapshot that is not on disk yet (at shutdown: a restart finds them all), and
        finish the queued Redis writes."""
        with self.lock:
            for key in list(self.resident):
                self._persist(key)
        if self.remote is not None:
            self.remote.drain()

    # ------------------------------------------------------------------------------------------- stats
    def stats(self) -> dict[str, int]:
        with self.lock:
            resident = [self.snapshots[k] for k in self.resident]
            return {
                "snapshots_resident": len(resident),
                "snapshots_on_disk": sum(s.on_disk for s in self.snapshots.values()),
                "resident_bytes": self.resident_bytes,
                "budget_bytes": self.max_bytes,
                "resident_tokens": sum(len(s.ids) for s in resident),
                "sessions": len(self.sessions),
                "sessions_resident": (resident_sessions := sum(
                    bool(s.snapshots) and all(k in self.resident for k in s.snapshots)
                    for s in self.sessions.values())),
                "sessions_on_disk": len(self.sessions) - resident_sessions,
                **{f"hits_{tier}": self.hits[tier] for tier in ("ram", "disk", "redis")},
                **(self.remote.stats() if self.remote else {}),
            }

    def is_resident(self, key: str) -> bool:
        with self.lock:
            return key in self.resident

    # ------------------------------------------------------------------------------------ internals
    def _add(self, snapshot: Snapshot) -> None:
        if snapshot.key not in self.snapshots:
            self.lengths.setdefault(snapshot.namespace, Counter())[len(snapshot.ids)] += 1
        self.snapshots[snapshot.key] = snapshot

    def _remove(self, snapshot: Snapshot) -> None:
        self.snapshots.pop(snapshot.key, None)
        counter = self.lengths[snapshot.namespace]
        counter[len(snapshot.ids)] -= 1
        if counter[len(snapshot.ids)] <= 0:
            del counter[len(snapshot.ids)]
        if snapshot.on_disk:
            self._snapshot_path(snapshot.key).unlink(missing_ok=True)

    def _make_resident(self, snapshot: Snapshot) -> None:
        self.resident[snapshot.key] = None
        self.resident_bytes += snapshot.nbytes
        while self.resident_bytes > self.max_bytes and len(self.resident) > 1:
            self._evict(self.snapshots[next(iter(self.resident))])

    def _evict(self, snapshot: Snapshot) -> None:
        """Move the least recently used snapshot out of memory: to disk when there is one, else away."""
        del self.resident[snapshot.key]
        self.resident_bytes -= snapshot.nbytes
        if self.disk_dir and not snapshot.on_disk:
            self._write_snapshot(snapshot)
        snapshot.state, snapshot.logits = None, None
        if not snapshot.on_disk:
            self._remove(snapshot)
        self._trim_disk()

    def _load(self, snapshot: Snapshot) -> SessionState | None:
        if snapshot.state is None:
            loaded = self._read_snapshot(snapshot.key)
            if loaded is None:
                self._remove(snapshot)
                return None
            snapshot.state, snapshot.logits = loaded
            self._make_resident(snapshot)
        else:
            self.resident.move_to_end(snapshot.key)
        return snapshot.state

    def _pin(self, key: str, delta: int) -> None:
        snapshot = self.snapshots.get(key)
        if snapshot is not None:
            snapshot.pins = max(0, snapshot.pins + delta)

    # ----------------------------------------------------------------------------------------- disk
    def _persist(self, key: str) -> None:
        snapshot = self.snapshots.get(key)
        if self.disk_dir and snapshot is not None and snapshot.state is not None and not snapshot.on_disk:
            self._write_snapshot(snapshot)

    def _snapshot_path(self, key: str) -> Path:
        return self.disk_dir / "snapshots" / f"{key}.safetensors"

    def _session_path(self, session: Session) -> Path:
        name = hashlib.sha256(f"{session.owner}\0{session.session_id}".encode()).hexdigest()
        return self.disk_dir / "sessions" / f"{name}.json"

    def _write_snapshot(self, snapshot: Snapshot) -> None:
        tensors, metadata = encode_snapshot(snapshot)
        atomic_write(self._snapshot_path(snapshot.key), lambda tmp: save_file(tensors, tmp, metadata=metadata))
        snapshot.on_disk = True

    def _read_snapshot(self, key: str) -> tuple[SessionState, torch.Tensor | None] | None:
        path = self._snapshot_path(key)
        try:
            with safe_open(path, "pt") as f:
                metadata = f.metadata()
            state, logits, _ = decode_snapshot(load_file(path), metadata, self.fingerprint)
        except Exception as error:  # any unreadable file is reported and set aside, never loaded
            self._quarantine(path, error)
            return None
        return state, logits

    def _index_disk(self) -> None:
        """Rebuild the index from the files a previous run left (restart survival); delete the temp files of
        writes a crash interrupted (they were never renamed, so nothing refers to them)."""
        for path in self.disk_dir.glob("*/.*.tmp"):
            path.unlink(missing_ok=True)
        for path in sorted(self.disk_dir.glob("snapshots/*.safetensors")):
            try:
                with safe_open(path, "pt") as f:
                    metadata = f.metadata() or {}
                    ids = f.get_tensor("token_ids").numpy().astype(np.int32)
                if metadata.get("fingerprint") != self.fingerprint:
                    continue  # made by another model: kept on disk, invisible to this one
                key = snapshot_key(metadata["namespace"], ids)
                if key != path.stem:
                    raise ValueError("file name does not match its contents")
            except Exception as error:
                self._quarantine(path, error)
                continue
            self._add(Snapshot(key, metadata["namespace"], ids, None, None, path.stat().st_size, on_disk=True))
        for path in sorted(self.disk_dir.glob("sessions/*.json")):
            try:
                session = Session(**json.loads(path.read_text()))
            except Exception as error:
                self._quarantine(path, error)
                continue
            self.sessions[(session.owner, session.session_id)] = session
            for key in session.snapshots:
                self._pin(key, +1)

    def _write_session(self, session: Session) -> None:
        if self.disk_dir:
            data = json.dumps(asdict(session)).encode()
            atomic_write(self._session_path(session), lambda tmp: Path(tmp).write_bytes(data))

    def _trim_disk(self) -> None:
        """Delete the oldest unpinned snapshot files beyond `max_disk_bytes`."""
        if not self.disk_dir or self.max_disk_bytes is None:
            return
        on_disk = [s for s in self.snapshots.values() if s.on_disk and s.state is None]
        total = sum(s.nbytes for s in self.snapshots.values() if s.on_disk)
        for snapshot in sorted(on_disk, key=lambda s: self._snapshot_path(s.key).stat().st_mtime):
            if total <= self.max_disk_bytes:
                break
            if snapshot.pins == 0:
                total -= snapshot.nbytes
                self._remove(snapshot)

    def _quarantine(self, path: Path, error: Exception) -> None:
        log.warning("session store: %s is unreadable (%s); renamed to %s.corrupt", path.name, error, path.name)
        try:
            os.replace(path, path.with_name(path.name + ".corrupt"))
        except OSError:
            pass


def encode_snapshot(snapshot: Snapshot) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A snapshot as safetensors tensors + metadata: the state (format version, fingerprint, token count), the ids,
    the logits, the namespace, the prefix hash (the snapshot's key) and a checksum over every tensor. The disk and
    Redis tiers store exactly this."""
    tensors, metadata = snapshot.state.to_tensors()
    tensors = {f"state.{name}": t.cpu() for name, t in tensors.items()}
    tensors["token_ids"] = torch.from_numpy(snapshot.ids.copy())
    if snapshot.logits is not None:
        tensors["logits"] = snapshot.logits.float().cpu()
    metadata.update(namespace=snapshot.namespace, prefix_hash=snapshot.key, checksum=checksum(tensors))
    return tensors, metadata


def decode_snapshot(tensors: dict[str, torch.Tensor], metadata: dict[str, str], fingerprint: str
                    ) -> tuple[SessionState, torch.Tensor | None, np.ndarray]:
    """Inverse of encode_snapshot: (state, logits, ids). Raises ValueError on a checksum mismatch and on a state of
    another format version or model, so no caller can load either."""
    if checksum(tensors) != metadata.get("checksum"):
        raise ValueError("checksum mismatch")
    state_tensors = {k.removeprefix("state."): t for k, t in tensors.items() if k.startswith("state.")}
    state = SessionState.from_tensors(state_tensors, metadata, fingerprint)
    return state, tensors.get("logits"), tensors["token_ids"].numpy().astype(np.int32)


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy())  # the buffer itself, no copy
    return digest.hexdigest()


def atomic_write(path: Path, write) -> None:
    """Write through `write(tmp_path)` then rename: readers (and crashes) only ever see whole files."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
