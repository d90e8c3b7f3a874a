"""kill -9 during writes: a process saving sessions in a loop is killed at random moments, repeatedly; a store
opened on what it left finds every session whose save returned, whole, and no partial file is ever loaded. And
the real server: two turns of a named session, kill -9, restart, and the third turn resumes from the stored state
(only the new message is prefilled)."""

import random
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import torch

from tptt_runtime.bench.serving import launch
from tptt_runtime.engine.store import SessionStore

FINGERPRINT = "f" * 64
WRITER = textwrap.dedent('''
    import sys, time, torch
    from tptt_runtime.engine import store as store_module
    from tptt_runtime.engine.store import Session, SessionStore
    from tptt_runtime.state import SessionState
    directory, round_, slow_disk = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "slow"
    if slow_disk:  # the file is written, then "writing" is announced and the rename waits: a kill lands inside
        save_file = store_module.save_file
        def slow_save(tensors, path, metadata=None):
            save_file(tensors, path, metadata=metadata)
            print("writing", flush=True)
            time.sleep(0.2)
        store_module.save_file = slow_save
    store = SessionStore("f" * 64, max_bytes=1, disk_dir=directory)
    print("ready", flush=True)
    for i in range(10**6):
        state = SessionState([{"memory": torch.full((64, 128, 128), float(i))}], "f" * 64, 3)
        key = store.put("a", [round_, i, 7], state, torch.full((8,), float(i)))
        store.save_session(Session(f"r{round_}-{i}", "a", 1, 1, messages=[{"role": "user", "content": str(i)}],
                                   snapshots=[key]))
        print(i, flush=True)  # the save returned: this session must survive anything from now on
''')


def run_and_kill(directory, round_: int, seconds: float, slow_disk: bool) -> int:
    """Start the writer and kill -9 it `seconds` after it is ready (with a slow disk: at the first write after
    that, mid-write). Returns the last session it reported saved (-1: none)."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(directory), str(round_),
                               "slow" if slow_disk else "fast"], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    kill_at, saved = time.monotonic() + seconds, -1
    if slow_disk:
        for line in writer.stdout:
            if line.strip() == "writing" and time.monotonic() > kill_at:
                break
            saved = int(line) if line.strip().isdigit() else saved
    else:
        time.sleep(seconds)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    lines = [int(line) for line in writer.stdout.read().split() if line.isdigit()]
    return max([saved, *lines])


def test_kill_9_during_writes_leaves_only_whole_snapshots(tmp_path):
    rng = random.Random(0)
    saved, killed_mid_write = {}, 0
    for r in range(4):
        saved[r] = run_and_kill(tmp_path, r, rng.uniform(0.3, 1.0), slow_disk=r % 2 == 1)
        killed_mid_write += any(tmp_path.rglob(".*.tmp"))  # (the next writer's store deletes them at start)
    assert min(saved.values()) >= 0, saved  # every round saved something before its kill
    assert killed_mid_write >= 2, "the slow-disk rounds are killed mid-write: their temp files must be there"
    store = SessionStore(FINGERPRINT, max_bytes=1 << 30, disk_dir=tmp_path)
    assert not list(tmp_path.rglob("*.corrupt")), "a kill -9 must never leave a partial file under a real name"
    assert not list(tmp_path.rglob("*.tmp")), "interrupted writes are cleaned up at start"
    for r, last in saved.items():
        for i in range(last + 1):
            session = store.get_session("a", f"r{r}-{i}")
            assert session is not None and session.messages[0]["content"] == str(i)
            state, logits, length = store.longest_prefix("a", [r, i, 7, 99])
            assert length == 3 and torch.all(state.layers[0]["memory"] == i) and torch.all(logits == i)


def test_server_sessions_resume_after_kill_9(tmp_path):
    flags = ("--store-dir", str(tmp_path), "--max-tokens-limit", "8")
    server = launch(*flags)
    messages = ["My name is Ada and I live in Lyon.", "I keep three cats."]
    try:
        for content in messages:
            reply = httpx.post(server.url + "/v1/chat/completions", timeout=300, json={
                "messages": [{"role": "user", "content": content}], "session_id": "trip", "temperature": 0})
            assert reply.status_code == 200, reply.text
    finally:
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    server = launch(*flags)
    try:
        session = httpx.get(server.url + "/v1/sessions/trip", timeout=30).json()
        assert session["num_messages"] == 4 and session["num_tokens"] > 0
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=300, json={
            "messages": [{"role": "user", "content": "What is my name?"}], "session_id": "trip", "temperature": 0})
        assert reply.status_code == 200, reply.text
        usage = reply.json()["usage"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        assert cached >= session["num_tokens"] - 1  # resumed from the state the second turn left
        assert usage["prompt_tokens"] - cached < 30  # only the new message was prefilled
    finally:
        server.stop()
