"""The Grafana dashboard: well-formed, wired to the provisioned datasource, covering what the issue asks for,
naming only metrics a live server exposes, and every query valid PromQL that a real Prometheus answers."""

import json
import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.conftest import DASHBOARD, DOCKER, load_yaml, prom_query, query_until_data

METRIC = re.compile(r"\btptt_[a-z0-9_]+")
RATE_INTERVAL = "30s"  # what Grafana's $__rate_interval becomes for a 1 s scrape interval and short ranges

REQUIRED = {  # panel topic -> metrics its queries must use
    "memory per token": {"tptt_memory_bytes_per_token_sum", "tptt_memory_bytes_per_token_count"},
    "state vs kv cache": {"tptt_session_state_bytes", "tptt_kv_cache_equivalent_bytes"},
    "resident sessions": {"tptt_sessions_resident", "tptt_snapshots_resident"},
    "ttft": {"tptt_time_to_first_token_seconds_bucket"},
    "itl": {"tptt_inter_token_latency_seconds_bucket"},
    "tokens/s": {"tptt_generation_tokens_total", "tptt_prompt_tokens_total"},
    "requests": {"tptt_num_requests_running", "tptt_num_requests_waiting"},
    "prefix hit rate": {"tptt_prefix_cache_hits_total", "tptt_prefix_cache_queries_total"},
    "hits by store tier": {"tptt_store_prefix_hits_total"},
    "shared store": {"tptt_store_redis_up", "tptt_store_redis_errors_total", "tptt_store_redis_skipped_total"},
}


def test_per_replica_panels_split_by_the_replica_label(dashboard):
    by_replica = [expr for expr in exprs(dashboard) if "by (replica)" in expr]
    assert {"tptt_generation_tokens_total", "tptt_num_requests_running"} <= \
        {name for expr in by_replica for name in METRIC.findall(expr)}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def targets(dashboard: dict) -> list[dict]:
    return [target for panel in dashboard["panels"] for target in panel["targets"]]


def exprs(dashboard: dict) -> list[str]:
    return [target["expr"] for target in targets(dashboard)]


def test_dashboard_is_a_provisionable_grafana_dashboard(dashboard):
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 39
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["type"] == "timeseries" and panel["title"] and panel["targets"]
        assert panel["fieldConfig"]["defaults"]["unit"]
        assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))


def test_panels_do_not_overlap(dashboard):
    cells = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & area, panel["title"]
        cells |= area


def test_every_query_uses_the_provisioned_datasource(dashboard):
    (source,) = load_yaml(DOCKER / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    expected = {"type": "prometheus", "uid": source["uid"]}
    assert all(panel["datasource"] == expected for panel in dashboard["panels"])
    assert all(target["datasource"] == expected for target in targets(dashboard))


def test_dashboard_covers_the_issue(dashboard):
    used = {name for expr in exprs(dashboard) for name in METRIC.findall(expr)}
    for topic, names in REQUIRED.items():
        assert names <= used, (topic, names - used)
    quantiles = " ".join(exprs(dashboard))
    for histogram in ("tptt_time_to_first_token_seconds", "tptt_inter_token_latency_seconds"):
        for q in ("0.5", "0.95", "0.99"):
            assert f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket" in quantiles


def test_every_metric_in_the_dashboard_is_served(dashboard, deploy_server):
    with urllib.request.urlopen(deploy_server + "/metrics", timeout=10) as response:
        text = response.read().decode()
    served = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
    used = {name for expr in exprs(dashboard) for name in METRIC.findall(expr)}
    assert used and used <= served, used - served


def test_every_query_is_valid_promql_with_data(dashboard, prometheus):
    for expr in exprs(dashboard):
        answer = query_until_data(prometheus, expr.replace("$__rate_interval", RATE_INTERVAL))
        assert answer["status"] == "success", (expr, answer)
        assert answer["data"]["result"], f"no data for {expr}"



def test_an_invalid_query_is_rejected(prometheus):
    """The check above can fail: Prometheus answers a broken expression with an error."""
    assert prom_query(prometheus, "sum(rate(tptt_generation_tokens_total[30s])")["status"] == "error"
