"""Prometheus metrics (prefix `tptt_`): vLLM-like request metrics plus what a constant-size state makes visible.

Gauges are read from the engine's stats at scrape time (a custom collector); counters and histograms are
observed on the engine thread for every output, so aborted requests count too. Each app has its own registry, so several servers can live in
one process (tests).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tptt_runtime.engine.request import FinishReason

FINISH_REASONS = (FinishReason.STOP, FinishReason.LENGTH, FinishReason.ABORT, FinishReason.ERROR)

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   20.0, 40.0, 80.0, 160.0)
BYTES_PER_TOKEN_BUCKETS = tuple(2.0 ** e for e in range(4, 28, 2))  # 16 B .. 64 MiB per token

GAUGES = {  # metric -> (engine stats key, help)
    "tptt_num_requests_running": ("num_running", "Requests in the running batch"),
    "tptt_num_requests_waiting": ("num_waiting", "Requests waiting to be scheduled"),
    "tptt_session_state_bytes": ("session_state_bytes", "Bytes of resident session states (running + snapshots)"),
    "tptt_kv_cache_equivalent_bytes": ("kv_cache_equivalent_bytes",
                                       "Bytes a full KV cache would need for the same resident contexts"),
    "tptt_snapshot_resident_bytes": ("resident_bytes", "Bytes of state snapshots in memory (LRU under the budget)"),
    "tptt_snapshot_budget_bytes": ("budget_bytes", "Budget for resident snapshots (--store-bytes)"),
    "tptt_snapshots_resident": ("snapshots_resident", "State snapshots in memory"),
    "tptt_snapshots_on_disk": ("snapshots_on_disk", "State snapshots on disk"),
    "tptt_sessions_resident": ("sessions_resident", "Named sessions whose states are in memory"),
    "tptt_sessions_on_disk": ("sessions_on_disk", "Named sessions whose states are on disk only"),
}

REDIS_COUNTERS = {
    "errors": "Redis calls that failed (each marks the shared store down for a moment)",
    "skipped": "Redis entries skipped and deleted: corrupt, or made by another model or format",
    "writes": "Snapshots written to Redis",
}


class EngineGauges:
    """Collector that turns the engine's latest stats into gauges at scrape time."""

    def __init__(self, stats):
        self.stats = stats

    def collect(self):
        stats = self.stats()
        for name, (key, help_text) in GAUGES.items():
            yield GaugeMetricFamily(name, help_text, value=stats[key])
        hits = CounterMetricFamily("tptt_store_prefix_hits", "Prompts resumed from a stored snapshot, by the tier "
                                   "it came from (ram, disk, redis)", labels=["tier"])
        for tier in ("ram", "disk", "redis"):
            hits.add_metric([tier], stats[f"hits_{tier}"])
        yield hits
        if "redis_up" in stats:  # only with --redis-url
            yield GaugeMetricFamily("tptt_store_redis_up", "1 while the shared Redis store answers, 0 while it is "
                                    "down (serving goes on from RAM and disk)", value=stats["redis_up"])
            for name, help_text in REDIS_COUNTERS.items():
                yield CounterMetricFamily(f"tptt_store_redis_{name}", help_text, value=stats[f"redis_{name}"])


class Metrics:
    def __init__(self, stats):
        self.registry = CollectorRegistry()
        self.registry.register(EngineGauges(stats))
        r = self.registry
        self.prompt_tokens = Counter("tptt_prompt_tokens", "Prompt tokens received", registry=r)
        self.prompt_tokens_computed = Counter(
            "tptt_prompt_tokens_computed", "Prompt tokens prefilled (not resumed from a snapshot)", registry=r)
        self.generation_tokens = Counter("tptt_generation_tokens", "Tokens generated", registry=r)
        self.prefix_cache_queries = Counter(
            "tptt_prefix_cache_queries", "Prompt tokens looked up in the state snapshot store", registry=r)
        self.prefix_cache_hits = Counter(
            "tptt_prefix_cache_hits", "Prompt tokens resumed from a stored state snapshot", registry=r)
        self.request_success = Counter(
            "tptt_request_success", "Finished requests by reason", ["finished_reason"], registry=r)
        for reason in FINISH_REASONS:  # every series exists from start-up, at 0 (Prometheus' instrumentation guide)
            self.request_success.labels(finished_reason=reason)
        self.ttft = Histogram("tptt_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("tptt_inter_token_latency_seconds", "Time between output tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("tptt_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("tptt_request_queue_time_seconds", "Arrival to scheduling",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.bytes_per_token = Histogram(
            "tptt_memory_bytes_per_token", "Session state bytes / context tokens, per finished request",
            buckets=BYTES_PER_TOKEN_BUCKETS, registry=r)
        self.last_token_time: dict[str, float] = {}


    def observe(self, output) -> None:
        """Called by the engine thread for every output of every request (aborted ones included)."""
        now = time.monotonic()
        if output.token_ids:
            self.generation_tokens.inc(len(output.token_ids))
            last = self.last_token_time.get(output.request_id)
            if last is None:
                self.ttft.observe(now - output.arrival_time)
            else:
                self.itl.observe(now - last)
            self.last_token_time[output.request_id] = now
        if output.finish_reason is not None:
            self.last_token_time.pop(output.request_id, None)
            self._observe_finish(output, now)

    def _observe_finish(self, output, now: float) -> None:
        self.request_success.labels(finished_reason=output.finish_reason).inc()
        self.prompt_tokens.inc(output.num_prompt_tokens)
        if output.scheduled_time is not None:
            self.prompt_tokens_computed.inc(output.num_prompt_tokens - output.num_cached_tokens)
            self.prefix_cache_queries.inc(output.num_prompt_tokens)
            self.prefix_cache_hits.inc(output.num_cached_tokens)
            self.queue_time.observe(output.scheduled_time - output.arrival_time)
        self.e2e.observe(now - output.arrival_time)
        context = output.num_prompt_tokens + output.num_output_tokens
        if output.state_bytes and context:
            self.bytes_per_token.observe(output.state_bytes / context)
