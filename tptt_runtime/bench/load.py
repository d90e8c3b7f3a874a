"""`tptt-bench load`: a bounded load test, `clients` concurrent clients for `duration` seconds, loopback only.

Every client loops until the deadline: one chat request at a time (every other client streams), a fresh prompt
each time; a 429 is honoured by sleeping its Retry-After (at most 1 s). Meanwhile /metrics is scraped every
second: resident snapshot bytes (must stay under the store budget), running and waiting requests.

Reported: requests, responses by status ("0" = transport error, "stream_error" = an error event inside a 200
stream), p50 / p99 end-to-end latency of the successful ones and time to first token of the streamed ones,
generated tokens/s, peak resident snapshot bytes against the budget, and (`run`) the server's peak RSS. No
Hugging Face baseline runs here: generate is not a server, and the question is what breaks, not how fast.
`drive` refuses any host but loopback: this measures our server, it is not a tool to aim at others.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from . import report
from .serving import served

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_BACKOFF_S = 1.0
# idle connections are dropped by the client before uvicorn's 5 s keep-alive closes them: with both at 5 s (httpx's
# default) a request can go out on a connection the server is closing, a transport error that is no server fault
KEEPALIVE_EXPIRY_S = 2.0
TOPICS = ["lighthouses", "bread", "rivers", "chess", "volcanoes", "bees", "trains", "the moon", "glass", "maps"]
WATCHED = {"tptt_snapshot_resident_bytes": "snapshot_bytes", "tptt_num_requests_running": "running",
           "tptt_num_requests_waiting": "waiting"}


@dataclass
class Sample:
    """One request as its client saw it."""
    started_s: float            # since the run began
    status: str                 # HTTP status, "0" (transport error) or "stream_error"
    latency_s: float
    ttft_s: float | None        # streamed requests only
    tokens: int


async def chat(client: httpx.AsyncClient, prompt: str, max_tokens: int, stream: bool):
    """One chat request: (status, time to first token, completion tokens, Retry-After seconds or None)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0.8}
    if not stream:
        response = await client.post("/v1/chat/completions", json=body)
        tokens = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
        return str(response.status_code), None, tokens, retry_after(response)
    body.update(stream=True, stream_options={"include_usage": True})
    start = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return str(response.status_code), None, 0, retry_after(response)
        status, ttft, tokens = "200", None, 0
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                status = "stream_error"
            if ttft is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        return status, ttft, tokens, None


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    return float(value) if value and response.status_code == 429 else None


async def client_loop(client, index: int, t0: float, deadline: float, max_tokens: int, samples: list[Sample]):
    k = 0
    while time.perf_counter() < deadline:
        prompt = f"In two sentences, tell me something about {TOPICS[(index + k) % len(TOPICS)]}. (#{index}.{k})"
        start = time.perf_counter()
        try:
            status, ttft, tokens, wait = await chat(client, prompt, max_tokens, stream=index % 2 == 1)
        except httpx.TransportError:
            status, ttft, tokens, wait = "0", None, 0, None
        samples.append(Sample(start - t0, status, time.perf_counter() - start, ttft, tokens))
        k += 1
        if wait is not None:
            await asyncio.sleep(min(wait, MAX_BACKOFF_S))


async def watch_metrics(client, t0: float, deadline: float, series: list[dict]) -> None:
    while time.perf_counter() < deadline:
        try:
            text = (await client.get("/metrics")).text
            values = {WATCHED[s.name]: s.value for family in text_string_to_metric_families(text)
                      for s in family.samples if s.name in WATCHED}
            series.append({"t_s": time.perf_counter() - t0, **values})
        except httpx.TransportError:
            pass
        await asyncio.sleep(1.0)


async def drive(url: str, clients: int, duration_s: float, max_tokens: int, api_key: str | None = None,
                progress: bool = False) -> dict:
    """Run the load against `url` (loopback only) and return the summary (see `summarize`)."""
    if urlparse(url).hostname not in LOOPBACK:
        raise ValueError(f"the load test only targets loopback servers, not {url}")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1,
                          keepalive_expiry=KEEPALIVE_EXPIRY_S)
    samples: list[Sample] = []
    series: list[dict] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=300) as client:
        t0 = time.perf_counter()
        deadline = t0 + duration_s
        tasks = [client_loop(client, i, t0, deadline, max_tokens, samples) for i in range(clients)]
        tasks.append(watch_metrics(client, t0, deadline, series))
        if progress:
            tasks.append(tick(duration_s))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    return summarize(samples, series, clients, elapsed)


async def tick(duration_s: float) -> None:
    for _ in tqdm(range(int(duration_s)), desc="tptt-bench load", unit="s"):
        await asyncio.sleep(1.0)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)),
            "max": float(max(values))}


def summarize(samples: list[Sample], series: list[dict], clients: int, elapsed_s: float) -> dict:
    ok = [s for s in samples if s.status == "200"]
    by_status = Counter(s.status for s in samples)
    return {
        "clients": clients, "elapsed_s": elapsed_s, "requests": len(samples), "by_status": dict(by_status),
        "errors": sum(n for status, n in by_status.items() if status not in ("200", "429")),
        "latency_s": percentiles([s.latency_s for s in ok]),
        "ttft_s": percentiles([s.ttft_s for s in ok if s.ttft_s is not None]),
        "generated_tokens_per_s": sum(s.tokens for s in ok) / elapsed_s,
        "peak_snapshot_bytes": max((p.get("snapshot_bytes", 0) for p in series), default=0),
        "peak_running": max((p.get("running", 0) for p in series), default=0),
        "peak_waiting": max((p.get("waiting", 0) for p in series), default=0),
        "samples": [asdict(s) for s in samples], "metrics": series,
    }


def peak_rss_bytes(pid: int) -> int:
    """The process's high-water resident set size (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run(clients: int, duration_s: float, max_tokens: int, store_bytes: int, max_waiting: int,
        out_dir: Path) -> dict:
    flags = ("--store-bytes", str(store_bytes), "--max-waiting", str(max_waiting))
    with served(*flags) as server:
        results = asyncio.run(drive(server.url, clients, duration_s, max_tokens, progress=True))
        results["server_peak_rss_bytes"] = peak_rss_bytes(server.process.pid)
        results["serves_afterwards"] = httpx.post(
            server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=300).status_code == 200
    results.update(store_bytes=store_bytes, max_waiting=max_waiting, max_tokens=max_tokens)
    report.write(out_dir, "load", results, figure(results), table(results))
    return results


def table(results: dict) -> str:
    lat, ttft = results["latency_s"], results["ttft_s"]
    return "\n".join([
        f"clients {results['clients']}, {results['elapsed_s']:.0f} s, {results['requests']} requests, "
        f"by status {results['by_status']}, errors (not 200/429): {results['errors']}",
        f"latency (s)   p50 {seconds(lat['p50'])}   p99 {seconds(lat['p99'])}   max {seconds(lat['max'])}",
        f"TTFT (s)      p50 {seconds(ttft['p50'])}   p99 {seconds(ttft['p99'])}",
        f"generated tokens/s {results['generated_tokens_per_s']:.1f}",
        f"peak resident snapshots {results['peak_snapshot_bytes'] / 2**20:.1f} MiB of a "
        f"{results['store_bytes'] / 2**20:.1f} MiB budget; server peak RSS "
        f"{results['server_peak_rss_bytes'] / 2**20:.0f} MiB; serves afterwards: {results['serves_afterwards']}"])


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def figure(results: dict):
    fig, (left, right) = report.subplots(1, 2, figsize=(11, 4))
    for status in sorted(results["by_status"]):
        points = [s for s in results["samples"] if s["status"] == status]
        left.scatter([s["started_s"] for s in points], [s["latency_s"] for s in points], s=6, label=status)
    left.set_xlabel("time (s)")
    left.set_ylabel("request latency (s)")
    left.legend(title="status")
    metrics = results["metrics"]
    right.plot([m["t_s"] for m in metrics], [m.get("snapshot_bytes", 0) / 2**20 for m in metrics],
               label="resident snapshots")
    right.axhline(results["store_bytes"] / 2**20, color="C3", linestyle="--", label="budget (--store-bytes)")
    right.set_xlabel("time (s)")
    right.set_ylabel("MiB")
    right.legend()
    return fig
