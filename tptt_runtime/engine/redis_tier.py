"""RedisTier: the session store's shared tier, so that any server process resumes any conversation.

The store keeps RAM first and its disk second; this tier sits behind both and is shared by every process pointed
at the same Redis (`--redis-url`). What it holds, all under `tptt:<model fingerprint[:16]>:`:

    snap:<key>               one snapshot: the bytes of store.encode_snapshot (safetensors; its metadata carries the
                             state format version, the model fingerprint, the namespace, the token count and a
                             checksum of every tensor), written with one SET, so no reader sees half an entry
    lengths:<namespace hash> the token counts of a namespace's snapshots (the prefix lookup hashes these lengths)
    session:<owner+id hash>  a named session's record (JSON)
    sessions:<owner hash>    the ids of an owner's sessions

Every key has a TTL (refreshed when written). Keys and lookups are per namespace (the API key's owner), as in
the local tiers, so one key's sessions are invisible to another. An entry that fails its checksum or was made by
another model or format is skipped, counted and deleted, never loaded.

Snapshot writes go through one background thread (the engine thread never waits on Redis); a named session's
record is written only after its snapshots are (`wait_written`), so an acknowledged turn can be resumed anywhere.
Failure: any Redis error marks the tier down (`up` False: /health and the `tptt_store_redis_up` metric say so),
the call answers as a miss, and the tier tries again after `retry_s`; requests never fail because of Redis.
Writes dropped while it was down are not replayed: the next turn of a conversation writes its state again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections import Counter

import redis
from safetensors.torch import save

from ..state import parse_safetensors

log = logging.getLogger(__name__)


def digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


class RedisTier:
    def __init__(self, url: str, fingerprint: str, ttl_s: int = 7 * 86400, retry_s: float = 2.0,
                 timeout_s: float = 2.0, max_queued: int = 64):
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.url = url
        self.prefix = f"tptt:{fingerprint[:16]}:"
        self.ttl_s, self.retry_s, self.max_queued = ttl_s, retry_s, max_queued
        self.up = True
        self.retry_at = 0.0
        self.counts: Counter = Counter()          # hits, misses, errors, skipped (corrupt / foreign), writes, dropped
        self.pending: dict[str, int] = {}         # snapshot key -> queued writes not finished yet
        self.written = threading.Condition()
        self.queue: queue.Queue = queue.Queue()
        self.writer = threading.Thread(target=self._write_loop, name="redis-writer", daemon=True)
        self.writer.start()
        self._call(lambda r: r.ping())

    # ------------------------------------------------------------------------------------- snapshots
    def put_snapshot(self, key: str, namespace: str, length: int, encode) -> None:
        """Queue a snapshot write; `encode()` (run on the writer thread) returns (tensors, metadata). Dropped (and
        counted) while Redis is known to be down or `max_queued` writes already wait: the queue holds states."""
        if (not self.up and time.monotonic() < self.retry_at) or self.queue.qsize() >= self.max_queued:
            self.counts["dropped"] += 1
            return
        with self.written:
            self.pending[key] = self.pending.get(key, 0) + 1
        self.queue.put((key, namespace, length, encode))

    def lengths(self, namespace: str) -> list[int]:
        members = self._call(lambda r: r.smembers(self._lengths_key(namespace)), set())
        return sorted((int(m) for m in members), reverse=True)

    def get_snapshot(self, key: str) -> tuple[dict, dict] | None:
        """(tensors, metadata) of a stored snapshot, or None (missing, unreadable, Redis down)."""
        data = self._call(lambda r: r.get(self.prefix + "snap:" + key), None)
        if data is None:
            self.counts["misses"] += 1
            return None
        try:
            metadata, tensors = parse_safetensors(data)
        except ValueError as error:
            self.skip(key, error)
            return None
        self.counts["hits"] += 1
        return tensors, metadata

    def skip(self, key: str, error: Exception) -> None:
        """Report an entry that must not be loaded (corrupt, another model's) and delete it."""
        log.warning("redis store: snapshot %s… skipped and deleted: %s", key[:12], error)
        self.counts["skipped"] += 1
        self._call(lambda r: r.delete(self.prefix + "snap:" + key))

    def wait_written(self, keys, timeout_s: float = 10.0) -> bool:
        """Block until the queued writes of `keys` are done (or failed); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self.written:
            while any(self.pending.get(k) for k in keys):
                if not self.written.wait(max(0.0, deadline - time.monotonic())):
                    return False
        return True

    # -------------------------------------------------------------------------------------- sessions
    def put_session(self, record: dict) -> bool:
        """Write a session record; False when Redis cannot take it now."""
        owner, session_id = record["owner"], record["session_id"]

        def write(r):
            pipe = r.pipeline(transaction=True)
            pipe.set(self._session_key(owner, session_id), json.dumps(record), ex=self.ttl_s)
            pipe.sadd(self._sessions_key(owner), session_id)
            pipe.expire(self._sessions_key(owner), self.ttl_s)
            pipe.execute()
            return True
        return self._call(write, False)

    def get_session(self, owner: str, session_id: str) -> dict | None:
        data = self._call(lambda r: r.get(self._session_key(owner, session_id)), None)
        return self._record(data, owner)

    def list_sessions(self, owner: str) -> list[dict] | None:
        """Every session record of `owner`, or None when Redis cannot answer."""
        ids = self._call(lambda r: r.smembers(self._sessions_key(owner)), None)
        if ids is None:
            return None
        keys = [self._session_key(owner, i.decode()) for i in sorted(ids)]
        values = self._call(lambda r: r.mget(keys), []) if keys else []
        return [record for value in values if (record := self._record(value, owner)) is not None]

    def delete_session(self, owner: str, session_id: str) -> bool:
        """Delete a session record; True when Redis held one."""
        def delete(r):
            pipe = r.pipeline(transaction=True)
            pipe.delete(self._session_key(owner, session_id))
            pipe.srem(self._sessions_key(owner), session_id)
            return pipe.execute()[0] > 0
        return self._call(delete, False)

    def _record(self, data: bytes | None, owner: str) -> dict | None:
        if data is None:
            return None
        try:
            record = json.loads(data)
            if record["owner"] != owner:
                raise ValueError("record of another owner")
        except (ValueError, KeyError, TypeError) as error:
            log.warning("redis store: a session record of %s was skipped: %s", owner[:12], error)
            self.counts["skipped"] += 1
            return None
        return record

    # ------------------------------------------------------------------------------------------ state
    def stats(self) -> dict[str, int]:
        if not self.up and time.monotonic() >= self.retry_at:
            self._call(lambda r: r.ping())
        return {"redis_up": int(self.up), "redis_hits": self.counts["hits"], "redis_misses": self.counts["misses"],
                "redis_errors": self.counts["errors"], "redis_skipped": self.counts["skipped"],
                "redis_writes": self.counts["writes"], "redis_dropped": self.counts["dropped"]}

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Wait for every queued write (at shutdown)."""
        with self.written:
            return self.written.wait_for(lambda: not self.pending, timeout_s)

    def close(self) -> None:
        self.queue.put(None)
        self.writer.join(timeout=10)
        self.client.close()

    # ------------------------------------------------------------------------------------- internals
    def _lengths_key(self, namespace: str) -> str:
        return self.prefix + "lengths:" + digest(namespace)

    def _session_key(self, owner: str, session_id: str) -> str:
        return self.prefix + "session:" + digest(owner, session_id)

    def _sessions_key(self, owner: str) -> str:
        return self.prefix + "sessions:" + digest(owner)

    def _call(self, operation, default=None):
        """`operation(client)`, or `default` when Redis is down (then no call until `retry_s` has passed)."""
        if not self.up and time.monotonic() < self.retry_at:
            return default
        try:
            result = operation(self.client)
        except redis.RedisError as error:
            self.counts["errors"] += 1
            if self.up:
                log.warning("redis store at %s unreachable (%s); serving from the local tiers", self.url, error)
            self.up, self.retry_at = False, time.monotonic() + self.retry_s
            return default
        if not self.up:
            log.info("redis store at %s is back", self.url)
        self.up = True
        return result

    def _write_loop(self) -> None:
        while (item := self.queue.get()) is not None:
            key, namespace, length, encode = item
            try:
                tensors, metadata = encode()
                data = save(tensors, metadata=metadata)
                if self._call(lambda r: self._write_snapshot(r, key, namespace, length, data), False):
                    self.counts["writes"] += 1
            except Exception:  # noqa: BLE001 - a failed write must not stop the writer; it is logged
                log.exception("redis store: writing snapshot %s… failed", key[:12])
            finally:
                with self.written:
                    self.pending[key] -= 1
                    if not self.pending[key]:
                        del self.pending[key]
                    self.written.notify_all()

    def _write_snapshot(self, r, key: str, namespace: str, length: int, data: bytes) -> bool:
        pipe = r.pipeline(transaction=True)
        pipe.set(self.prefix + "snap:" + key, data, ex=self.ttl_s)
        pipe.sadd(self._lengths_key(namespace), length)
        pipe.expire(self._lengths_key(namespace), self.ttl_s)
        pipe.execute()
        return True
