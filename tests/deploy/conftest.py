"""Deployment fixtures: the repository's deploy files, a live server with some real traffic, and a real
Prometheus (Debian's package, installed here when missing) scraping that server with docker/prometheus.yml.

Prometheus runs on a free loopback port with its TSDB in a temporary directory. The server and Prometheus live
for this package only: left running to the end (Prometheus scraping the in-process server every second), they
slowed every later test ~1.7x on 2 cores.
Tests that need it skip, saying why, only where the binary can neither be found nor installed.
"""

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests import redis_server
from tests.debian import find_or_install, located
from tests.server.conftest import free_port, live_server

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "tptt.json"


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def get_json(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def prom_query(api: str, expr: str) -> dict:
    """/api/v1/query for `expr`; the whole answer (status, data) is returned, errors included."""
    url = f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return get_json(url)
    except urllib.error.HTTPError as error:  # 400 / 422 carry a JSON body with status "error"
        return json.load(error)


def query_until_data(prometheus: str, expr: str, limit_s: float = 15.0) -> dict:
    """The answer to `expr`, asked again for a while when it is empty: on a loaded machine one scrape can miss
    its 1 s timeout, and Prometheus then marks every series stale until the next scrape succeeds."""
    deadline = time.monotonic() + limit_s
    while True:
        answer = prom_query(prometheus, expr)
        if answer["status"] != "success" or answer["data"]["result"] or time.monotonic() > deadline:
            return answer
        time.sleep(0.5)

@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    path = find_or_install("prometheus", "prometheus")
    if path is None:
        pytest.skip("Prometheus is not installed and `apt-get install prometheus` failed here (needs root and "
                    "Debian's package lists)")
    return path


@pytest.fixture(scope="session")
def promtool_bin(prometheus_bin) -> str:
    return located("promtool") or str(Path(prometheus_bin).with_name("promtool"))


def drive(base_url: str) -> None:
    """A little real traffic: a two-turn chat whose second, streamed turn resumes the first turn's snapshot."""
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                 {"role": "user", "content": "And another one."}]
    for _ in client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stream=True):
        pass


@pytest.fixture(scope="package")
def deploy_server(default_model):
    """Base URL of a live server, sharing its store through a real Redis (so the dashboard's store panels have
    data), that has already answered a few requests."""
    redis = redis_server.started()
    try:
        with live_server(default_model, redis_url=redis.url) as (base_url, _):
            drive(base_url)
            yield base_url
    finally:
        redis.stop()


def scrape_config(target: str) -> dict:
    """docker/prometheus.yml with its target replaced by `target` and a 1 s scrape interval."""
    config = load_yaml(DOCKER / "prometheus.yml")
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"] = [{"targets": [target]}]
    return config


def wait_for_scrapes(api: str, proc: subprocess.Popen, scrapes: int = 4, limit: float = 60) -> None:
    """Until Prometheus holds `scrapes` scrapes of tptt_ series, so every rate() has points to work on."""
    deadline = time.monotonic() + limit
    expr = "count_over_time(tptt_generation_tokens_total[5m])"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"prometheus exited with {proc.returncode}"
        try:
            result = prom_query(api, expr)["data"]["result"]
            if result and float(result[0]["value"][1]) >= scrapes:
                return
        except (OSError, KeyError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"Prometheus did not scrape tptt_ series {scrapes} times in {limit:.0f} s")


@pytest.fixture(scope="package")
def prometheus(prometheus_bin, deploy_server, tmp_path_factory):
    """Base URL of a real Prometheus that has scraped the live server a few times."""
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(urllib.parse.urlsplit(deploy_server).netloc)))
    port = free_port()
    proc = subprocess.Popen(
        [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=(work / "log").open("w"))
    api = f"http://127.0.0.1:{port}"
    try:
        wait_for_scrapes(api, proc)
        yield api
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
