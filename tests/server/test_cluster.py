"""Cluster mode for real: `tptt-serve --replicas 2` on a local Ray instance with a real Redis. Conversations stick
to a replica, answer as one process does, and survive `kill -9` of the replica serving them; every replica's
metrics reach the one /metrics with a replica label. Plus the routing key and the metrics merge, without Ray."""

import contextlib
import os
import signal
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.cluster import cluster_health, merged_metrics, routing_key
from server.settings import Settings
from tests.redis_server import module_redis_server  # noqa: F401 - fixture
from tests.server.conftest import MODEL
from tptt_runtime.bench.serving import launch

GREEDY = {"model": MODEL, "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def cluster(module_redis_server):  # noqa: F811
    # float32 as the in-process `base_url` server that its answers are compared with
    server = launch("--replicas", "2", "--redis-url", module_redis_server.url, "--threads", "1", "--dtype", "float32")
    wait_for_replicas(server.url, 2)
    yield server.url
    server.stop()


def wait_for_replicas(url: str, count: int, timeout: float = 120) -> None:
    """Until the router sends requests to `count` replicas. /health answers as soon as one serves; until the
    other has started, the router's hash ring holds only the first, and a conversation begun then moves when
    the ring grows (its state follows through Redis, but a test of stickiness must start from the full ring).
    Requests under many session ids land on every replica of the ring."""
    deadline, seen, key = time.monotonic() + timeout, set(), 0
    while time.monotonic() < deadline:
        key += 1
        response = httpx.get(url + "/v1/models", headers={"X-Session-ID": f"probe-{key}"}, timeout=30)
        seen.add(response.headers.get("x-tptt-replica"))
        if len(seen - {None}) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"requests reached {len(seen - {None})} replicas, not {count}, within {timeout} s")


def post_chat(url: str, messages: list[dict], **extra) -> httpx.Response:
    response = httpx.post(url + "/v1/chat/completions", json={**GREEDY, "messages": messages, **extra}, timeout=300)
    assert response.status_code == 200, response.text
    return response


def conversation(url: str, questions: list[str], session_id: str | None = None) -> list[httpx.Response]:
    """Turns of a chat: resent in full (unnamed), or only the new message (named session)."""
    messages, responses = [], []
    for question in questions:
        messages.append({"role": "user", "content": question})
        extra = {"session_id": session_id} if session_id else {}
        response = post_chat(url, messages[-1:] if session_id else messages, **extra)
        messages.append({"role": "assistant", "content": response.json()["choices"][0]["message"]["content"]})
        responses.append(response)
    return responses


def replica(response: httpx.Response) -> tuple[str, int]:
    name, pid = response.headers["x-tptt-replica"].split(" pid=")
    return name, int(pid)


def texts(responses) -> list[str]:
    return [r.json()["choices"][0]["message"]["content"] for r in responses]


def test_an_unnamed_chat_sticks_to_a_replica_and_answers_as_one_process(cluster, base_url):
    questions = ["Name a fruit.", "Name a colour."]
    clustered = conversation(cluster, questions)
    assert replica(clustered[0]) == replica(clustered[1])
    assert clustered[1].json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert texts(clustered) == texts(conversation(base_url, questions))


def test_every_replica_reports_metrics_with_its_label(cluster):
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(cluster + "/metrics").text)}
    replicas = {sample.labels["replica"] for sample in families["tptt_num_requests_running"].samples}
    assert len(replicas) == 2
    assert all("replica" in s.labels for s in families["tptt_request_success"].samples)


def test_health_counts_the_replicas_and_reports_a_replicas_own(cluster):
    health = httpx.get(cluster + "/health", timeout=30)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "decode": "eager", "dtype": "float32", "store": "ok", "replicas": 2,
                             "expected_replicas": 2}


def test_health_says_starting_until_every_replica_has_been_up_then_degraded():
    replica = {"status": "ok", "decode": "eager"}
    assert cluster_health(replica, 1, 2, was_ready=False) == (503, {**replica, "status": "starting", "replicas": 1,
                                                                    "expected_replicas": 2})
    assert cluster_health(replica, 2, 2, was_ready=True)[0] == 200
    assert cluster_health(replica, 1, 2, was_ready=True) == (200, {**replica, "status": "degraded", "replicas": 1,
                                                                   "expected_replicas": 2})
    assert cluster_health(replica, None, 2, was_ready=False) == (200, {**replica, "replicas": None,
                                                                       "expected_replicas": 2})


def test_a_named_session_survives_kill_9_of_its_replica(cluster, base_url):
    questions = ["My dog is called Rex.", "What is my dog called?", "Say it again."]
    first = conversation(cluster, questions[:2], session_id="kill-test")
    assert replica(first[0]) == replica(first[1])
    name, pid = replica(first[1])
    os.kill(pid, signal.SIGKILL)
    (third,) = conversation(cluster, questions[2:], session_id="kill-test")
    assert replica(third)[0] != name
    turn_two = first[1].json()["usage"]
    assert third.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= turn_two["total_tokens"] - 1
    session = httpx.get(cluster + "/v1/sessions/kill-test").json()
    assert session["num_messages"] == 6
    assert texts(first) + texts([third]) == texts(conversation(base_url, questions, session_id="kill-same"))


def test_cluster_mode_needs_redis_and_one_kind_of_replica_count():
    with pytest.raises(ValueError, match="--redis-url"):
        Settings.from_args(["--replicas", "2"], environ={})
    with pytest.raises(ValueError, match="either"):
        Settings.from_args(["--replicas", "2", "--max-replicas", "3", "--redis-url", "redis://x"], environ={})
    assert Settings.from_args(["--max-replicas", "3", "--redis-url", "redis://x"], environ={}).cluster


def test_routing_key_follows_the_conversation_and_the_api_key():
    turn = lambda *messages: f'{{"messages": [{", ".join(messages)}]}}'.encode()  # noqa: E731
    first, reply, second = '{"role": "user", "content": "hi"}', '{"role": "assistant", "content": "yo"}', \
        '{"role": "user", "content": "more"}'
    alice = {"authorization": "Bearer a"}
    assert routing_key("/v1/chat/completions", alice, turn(first)) == \
        routing_key("/v1/chat/completions", alice, turn(first, reply, second))
    assert routing_key("/v1/chat/completions", alice, turn(first)) != \
        routing_key("/v1/chat/completions", {"authorization": "Bearer b"}, turn(first))
    named = routing_key("/v1/chat/completions", alice, b'{"session_id": "s", "messages": []}')
    assert named == routing_key("/v1/chat/completions", {**alice, "x-session-id": "s"}, b'{"messages": []}')
    assert routing_key("/x", alice, b"not json") == routing_key("/x", alice, b"")


def test_merged_metrics_label_every_sample_and_keep_one_header_per_family():
    page = ('# HELP tptt_a Things.\n# TYPE tptt_a gauge\ntptt_a 1.0\n'
            '# HELP tptt_b_total Events.\n# TYPE tptt_b_total counter\ntptt_b_total{reason="x"} 2.0\n')
    merged = merged_metrics({"r1": page, "r2": page.replace("1.0", "3.0")})
    assert merged.count("# HELP tptt_a ") == 1
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    assert sorted((s.labels["replica"], s.value) for s in families["tptt_a"].samples) == [("r1", 1.0), ("r2", 3.0)]
    assert {s.labels["reason"] for s in families["tptt_b"].samples} == {"x"}


def test_autoscaling_adds_a_replica_under_load(module_redis_server):  # noqa: F811
    """--min-replicas 1 --max-replicas 2: with more requests in flight than a replica's target (max_num_seqs // 2),
    Ray Serve starts a second replica and the hash ring sends conversations to it."""
    server = launch("--min-replicas", "1", "--max-replicas", "2", "--max-num-seqs", "2", "--redis-url",
                    module_redis_server.url, "--threads", "1")
    seen: set[str] = set()
    stop = threading.Event()

    def client(i: int) -> None:
        turn = 0
        while not stop.is_set():
            body = {**GREEDY, "max_tokens": 24, "messages": [{"role": "user", "content": f"Story {i}.{turn}."}]}
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
                if response.status_code == 200:
                    seen.add(replica(response)[0])
            turn += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 240
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=150)
        server.stop()
    assert len(seen) == 2, f"one replica served everything: {seen}"
