"""A real Prometheus, configured from docker/prometheus.yml, scrapes a live server and serves its tptt_ series."""

import urllib.parse

from tests.deploy.conftest import get_json, query_until_data


def test_prometheus_has_the_servers_series(prometheus, deploy_server):
    names = get_json(f"{prometheus}/api/v1/label/__name__/values")["data"]
    assert {"tptt_session_state_bytes", "tptt_generation_tokens_total", "tptt_memory_bytes_per_token_bucket",
            "tptt_time_to_first_token_seconds_bucket"} <= set(names)
    series = get_json(f"{prometheus}/api/v1/series?" + urllib.parse.urlencode({"match[]": '{__name__=~"tptt_.+"}'}))
    assert series["status"] == "success" and series["data"]
    assert {s["job"] for s in series["data"]} == {"tptt-serve"}
    assert {s["instance"] for s in series["data"]} == {urllib.parse.urlsplit(deploy_server).netloc}


def test_scraped_values_reflect_the_traffic(prometheus):
    (up,) = query_until_data(prometheus, 'up{job="tptt-serve"}')["data"]["result"]
    assert up["value"][1] == "1"
    (tokens,) = query_until_data(prometheus, "tptt_generation_tokens_total")["data"]["result"]
    assert float(tokens["value"][1]) > 0
    (state,) = query_until_data(prometheus, "tptt_session_state_bytes")["data"]["result"]
    (kv,) = query_until_data(prometheus, "tptt_kv_cache_equivalent_bytes")["data"]["result"]
    assert float(state["value"][1]) > 0 and float(kv["value"][1]) > 0
    (hits,) = query_until_data(prometheus, "tptt_prefix_cache_hits_total")["data"]["result"]
    assert float(hits["value"][1]) > 0, "the second turns should have resumed a snapshot"
