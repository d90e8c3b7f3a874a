"""`tptt-bench cluster`: what it costs to move a conversation between server processes through a shared Redis.

Starts a redis-server (Debian's package) on loopback and three `python -m server` processes: A and B share the
Redis (`--redis-url`); C runs without prefix reuse, so it prefills every prompt cold, which is what a KV-cache
server pays when a routing miss sends a conversation to a replica without its cache. For each of `--trials`
pairs of three-turn chats (user turns of `--turn-tokens`, replies of up to `--reply-tokens`), turns 1-2 go to A,
then turn 3 goes to A (same replica) in one chat and to B (moved: B resumes from Redis) in the other; C answers
both turn-3 prompts cold. Medians of the time to first token and their ratios are the result.

The move itself is timed here too: a default-model snapshot (the state, its ids and logits) read from Redis and
restored into a SessionState, p50 / p95 over `--moves` reads (what B does before it prefills turn 3's new tokens).

Cluster mode (`--replicas`, Ray Serve), one thread per engine: aggregate decode tokens/s of `--clients` streams
with 1 and with 2 replicas, and one stream's decode tokens/s and time to first token through Ray vs a plain
`tptt-serve --threads 1` (the overhead of the Front hop and the handle). On a 2-core machine two replicas share
the cores with Ray's own processes: the scaling figure says what this machine allows, not what a GPU host does.
Table on stdout, JSON + PNG in --out.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import report
from .server import concurrent_decode, filler, stream_chat
from .serving import free_port, served


def start_redis(binary: str, port: int) -> subprocess.Popen:
    """A throwaway redis-server on 127.0.0.1:`port` (nothing saved to disk), returned once it answers a ping."""
    import redis

    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return process
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.05)


def redis_server() -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        raise SystemExit("tptt-bench cluster needs redis-server (Debian: apt-get install redis-server)")
    port = free_port()
    return start_redis(binary, port), f"redis://127.0.0.1:{port}/0"


def chat_to_turn_three(first: str, tokenizer, turn_tokens: int, reply_tokens: int, seed: int) -> list[dict]:
    """Turns 1 and 2 on `first`; returns turn 3's messages (a third long user turn)."""
    messages = []
    for turn in range(3):
        text = f"Document {seed}.{turn}:\n" + filler(tokenizer, turn_tokens, seed + turn)  # distinct per chat
        messages.append({"role": "user", "content": text + "\nContinue."})
        if turn < 2:
            reply = stream_chat(first, messages, reply_tokens)
            messages.append({"role": "assistant", "content": reply["text"]})
    return messages


def session_moves(url: str, moves: int) -> dict:
    """p50 / p95 milliseconds of reading a default-model snapshot from Redis and restoring it."""
    import tptt_runtime as tr

    from ..engine.redis_tier import RedisTier
    from ..engine.store import Snapshot, decode_snapshot, encode_snapshot, snapshot_key

    model = tr.load("default")
    ids = np.arange(100, 612, dtype=np.int32)
    state = model.new_session()
    logits = model.prefill(state, ids.tolist())
    key = snapshot_key("bench", ids)
    tier = RedisTier(url, model.fingerprint)
    snapshot = Snapshot(key, "bench", ids, state, logits.float().flatten(), state.nbytes)
    tier.put_snapshot(key, "bench", len(ids), lambda: encode_snapshot(snapshot))
    tier.drain()
    times = []
    for _ in range(moves):
        start = time.perf_counter()
        tensors, metadata = tier.get_snapshot(key)
        restored, _, _ = decode_snapshot(tensors, metadata, model.fingerprint)
        times.append(time.perf_counter() - start)
    tier.close()
    return {"state_bytes": restored.nbytes, "p50_ms": 1000 * statistics.median(times),
            "p95_ms": 1000 * float(np.percentile(times, 95)), "moves": moves}


def median_ttft(url: str, repeats: int = 5) -> float:
    return statistics.median(stream_chat(url, [{"role": "user", "content": f"Say hello {i}."}], 2)["ttft_s"]
                             for i in range(repeats))


def ray_scaling(url: str, clients: int, decode_tokens: int) -> dict:
    """Decode tokens/s with 1 and 2 Ray Serve replicas vs a plain server, one engine thread each."""
    rows = {}
    with served("--threads", "1") as plain:
        stream_chat(plain.url, [{"role": "user", "content": "Hi"}], 4)
        rows["plain_1_stream"] = concurrent_decode(plain.url, 1, decode_tokens)
        rows["plain_ttft_s"] = median_ttft(plain.url)
    for replicas in (1, 2):
        with served("--replicas", str(replicas), "--redis-url", url, "--threads", "1") as cluster:
            stream_chat(cluster.url, [{"role": "user", "content": "Hi"}], 4)
            if replicas == 1:
                rows["ray1_1_stream"] = concurrent_decode(cluster.url, 1, decode_tokens)
                rows["ray1_ttft_s"] = median_ttft(cluster.url)
            rows[f"ray{replicas}_{clients}_streams"] = concurrent_decode(cluster.url, clients, decode_tokens)
    rows["scaling_2_over_1"] = rows[f"ray2_{clients}_streams"] / rows[f"ray1_{clients}_streams"]
    rows["ray_over_plain_decode"] = rows["ray1_1_stream"] / rows["plain_1_stream"]
    rows["ray_over_plain_ttft"] = rows["ray1_ttft_s"] / rows["plain_ttft_s"]
    return rows


def run(turn_tokens: int, reply_tokens: int, trials: int, moves: int, out_dir: Path, clients: int = 8,
        decode_tokens: int = 32, with_ray: bool = True) -> dict:
    from transformers import AutoTokenizer

    from ..loading import base_directory

    tokenizer = AutoTokenizer.from_pretrained(base_directory("default"))
    redis, url = redis_server()
    rows = {"same": [], "moved": [], "cold": []}
    cached = {"same": [], "moved": []}
    progress = tqdm(total=2 * trials + 2, desc="tptt-bench cluster")
    try:
        with served("--redis-url", url) as a, served("--redis-url", url) as b, served("--no-prefix-reuse") as c:
            for server in (a, b, c):
                stream_chat(server.url, [{"role": "user", "content": "Hi"}], 4)  # warm-up
            for trial in range(trials):
                for name, last in (("same", a), ("moved", b)):
                    messages = chat_to_turn_three(a.url, tokenizer, turn_tokens, reply_tokens,
                                                  seed=10 * trial + (name == "moved") * 5 + 1)
                    warm = stream_chat(last.url, messages, 8)
                    rows[name].append(warm["ttft_s"])
                    cached[name].append(warm["cached_tokens"])
                    rows["cold"].append(stream_chat(c.url, messages, 8)["ttft_s"])
                    progress.update()
        moves_result = session_moves(url, moves)
        progress.update()
        ray_rows = ray_scaling(url, clients, decode_tokens) if with_ray else None
        progress.update()
    finally:
        progress.close()
        redis.kill()
        redis.wait()
    medians = {name: statistics.median(times) for name, times in rows.items()}
    results = {"turn_tokens": turn_tokens, "reply_tokens": reply_tokens, "trials": trials,
               "turn3_ttft_s": {**medians, "all": rows},
               "cached_tokens": cached,
               "moved_over_same": medians["moved"] / medians["same"],
               "moved_over_cold": medians["moved"] / medians["cold"],
               "session_move": moves_result, "clients": clients, "ray": ray_rows}
    report.write(out_dir, "cluster", results, figure(results), table(results))
    return results


def table(results: dict) -> str:
    t, move = results["turn3_ttft_s"], results["session_move"]
    return "\n".join([
        f"3-turn chats, user turns of {results['turn_tokens']} tokens, {results['trials']} trials (medians)",
        "turn-3 time to first token (s)   same replica   moved (Redis)   cold prefill",
        f"                                 {t['same']:12.3f}   {t['moved']:13.3f}   {t['cold']:12.3f}",
        f"moved / same {results['moved_over_same']:.2f}x   moved / cold {results['moved_over_cold']:.3f}x   "
        f"cached tokens same {results['cached_tokens']['same']} moved {results['cached_tokens']['moved']}",
        f"session move (Redis GET + restore of a {move['state_bytes'] / 1e6:.2f} MB state): "
        f"p50 {move['p50_ms']:.1f} ms, p95 {move['p95_ms']:.1f} ms over {move['moves']}",
        *ray_table(results)])


def ray_table(results: dict) -> list[str]:
    ray, n = results.get("ray"), results.get("clients")
    if not ray:
        return []
    return [f"decode tokens/s, 1 engine thread each   1 stream   {n} streams",
            f"  plain tptt-serve                     {ray['plain_1_stream']:8.1f}",
            f"  Ray Serve, 1 replica                 {ray['ray1_1_stream']:8.1f}   {ray[f'ray1_{n}_streams']:9.1f}",
            f"  Ray Serve, 2 replicas                           {ray[f'ray2_{n}_streams']:9.1f}",
            f"2 replicas / 1: {ray['scaling_2_over_1']:.2f}x   Ray / plain, one stream: decode "
            f"{ray['ray_over_plain_decode']:.2f}x, time to first token {ray['ray_over_plain_ttft']:.2f}x"]


def figure(results: dict):
    fig, (left, right, third) = report.subplots(1, 3, figsize=(15, 4))
    t = results["turn3_ttft_s"]
    names = ["same", "moved", "cold"]
    left.bar(["same replica", "moved (Redis)", "cold prefill"], [t[n] for n in names],
             color=["tab:green", "tab:blue", "tab:red"])
    for i, name in enumerate(names):
        left.scatter([i] * len(t["all"][name]), t["all"][name], color="black", s=8, zorder=3)
    left.set_ylabel("turn-3 time to first token (s)")
    left.set_title(f"user turns of {results['turn_tokens']} tokens")
    move = results["session_move"]
    right.bar(["p50", "p95"], [move["p50_ms"], move["p95_ms"]], color="tab:blue")
    right.set_ylabel("ms")
    right.set_title(f"session move: Redis GET + restore ({move['state_bytes'] / 1e6:.1f} MB)")
    ray, n = results.get("ray"), results.get("clients")
    if ray:
        third.bar(["plain, 1 stream", "Ray 1 replica, 1 stream", f"Ray 1 replica, {n}", f"Ray 2 replicas, {n}"],
                  [ray["plain_1_stream"], ray["ray1_1_stream"], ray[f"ray1_{n}_streams"], ray[f"ray2_{n}_streams"]],
                  color=["tab:gray", "tab:blue", "tab:blue", "tab:green"])
        third.set_ylabel("decode tokens/s")
        third.set_title("cluster mode, one engine thread per replica")
        third.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    return fig
