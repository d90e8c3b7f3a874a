"""Overload and memory budget at CI scale: 64 concurrent clients (`tptt-bench load`'s driver) against a server
with a small queue and a small snapshot budget. Only 200 and 429 may come back, every 429 carries Retry-After
(the driver honours it), resident snapshots never exceed the budget (read from /metrics while the load runs),
and afterwards the queue is empty and the server serves."""

import asyncio

import httpx
import pytest

from tests.server.conftest import live_server
from tptt_runtime.bench.load import drive

from .conftest import wait_until_idle


@pytest.fixture(scope="module")
def loaded(default_model, tmp_path_factory):
    state_bytes = default_model.new_session().nbytes
    budget = 3 * state_bytes + (1 << 20)  # three snapshots (+ their logits)
    settings = dict(max_num_seqs=8, max_waiting=8, max_tokens_limit=8, store_bytes=budget,
                    store_dir=str(tmp_path_factory.mktemp("spill")))
    with live_server(default_model, **settings) as (url, app):
        result = asyncio.run(drive(url, clients=64, duration_s=15, max_tokens=4))
        yield url, app, result, budget


def test_only_200_and_429_under_64_clients(loaded):
    _, _, result, _ = loaded
    assert result["errors"] == 0, result["by_status"]
    assert set(result["by_status"]) <= {"200", "429"}
    assert result["by_status"].get("200", 0) >= 8
    assert result["by_status"].get("429", 0) >= 1, "64 clients against a queue of 8 must be refused sometimes"
    assert result["latency_s"]["p99"] is not None and result["latency_s"]["p99"] >= result["latency_s"]["p50"]
    assert result["peak_waiting"] <= 8


def test_resident_snapshots_stay_under_the_budget(loaded):
    url, app, result, budget = loaded
    assert len(result["metrics"]) >= 5 and result["peak_snapshot_bytes"] > 0
    assert result["peak_snapshot_bytes"] <= budget
    stats = app.state.ctx.engine.engine.stats()
    assert stats["resident_bytes"] <= budget and stats["snapshots_on_disk"] > 0  # the LRU spilled to disk


def test_queue_drains_and_the_server_serves_afterwards(loaded):
    url, app, _, _ = loaded
    wait_until_idle(app)
    reply = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert reply.status_code == 200


def test_the_driver_refuses_other_hosts():
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(drive("http://example.com", clients=1, duration_s=1, max_tokens=1))
