"""Two servers sharing one real Redis (`--redis-url`): a conversation moves between them at the cost of one fetch,
API keys stay apart, and an outage of Redis degrades /health and a metric without failing a request."""

import time

import httpx
import openai
import pytest

from tests.redis_server import redis_server  # noqa: F401 - fixture
from tests.server.conftest import MODEL

GREEDY = {"max_tokens": 6, "temperature": 0}


def chat(base_url: str, messages: list[dict], api_key: str = "unused", **extra):
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=300)
    return client.chat.completions.create(model=MODEL, messages=messages, **GREEDY, extra_body=extra or None)


def three_turns(first: str, second: str, third: str) -> list[tuple[dict, object]]:
    """(reply, usage) of a three-turn chat resent in full each turn, turn i on server `(first, second, third)[i]`."""
    messages, replies = [], []
    for base_url, question in zip((first, second, third), ("Name a fruit.", "Name a colour.", "Name a city.")):
        messages.append({"role": "user", "content": question})
        reply = chat(base_url, messages)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        replies.append(reply)
    return replies


def test_turn_three_on_another_server_resumes_from_redis(start_server, redis_server):  # noqa: F811
    with start_server(redis_url=redis_server.url) as (a, _), start_server(redis_url=redis_server.url) as (b, _), \
            start_server() as (single, _):
        moved = three_turns(a, a, b)
        alone = three_turns(single, single, single)
        assert [r.choices[0].message.content for r in moved] == [r.choices[0].message.content for r in alone]
        cached = [r.usage.prompt_tokens_details.cached_tokens for r in (moved[2], alone[2])]
        assert cached[0] == cached[1] > moved[1].usage.prompt_tokens  # turn 3 prefilled only its new tokens
        metrics = httpx.get(b + "/metrics").text
        assert 'tptt_store_prefix_hits_total{tier="redis"} 1.0' in metrics


def test_a_named_session_continues_on_another_server(start_server, redis_server):  # noqa: F811
    with start_server(redis_url=redis_server.url) as (a, _), start_server(redis_url=redis_server.url) as (b, _), \
            start_server() as (single, _):
        replies, cached = {}, {}
        for name, servers in (("moved", (a, b)), ("alone", (single, single))):
            first = chat(servers[0], [{"role": "user", "content": "My cat is called Tom."}], session_id="pets")
            second = chat(servers[1], [{"role": "user", "content": "What is my cat called?"}], session_id="pets")
            replies[name] = [first.choices[0].message.content, second.choices[0].message.content]
            cached[name] = second.usage.prompt_tokens_details.cached_tokens
        assert replies["moved"] == replies["alone"]
        # all of turn 1 but the last sampled token (never fed through the model) resumed, as on one server
        assert cached["moved"] == cached["alone"] >= first.usage.total_tokens - 1
        assert httpx.get(f"{b}/v1/sessions/pets").json()["num_messages"] == 4


def test_api_keys_cannot_see_each_others_sessions_through_redis(start_server, redis_server):  # noqa: F811
    keys = ["alice-key", "bob-key"]
    with start_server(redis_url=redis_server.url, api_key=keys) as (a, _), \
            start_server(redis_url=redis_server.url, api_key=keys) as (b, _):
        chat(a, [{"role": "user", "content": "Remember the number 7."}], api_key="alice-key", session_id="secret")
        as_bob = {"Authorization": "Bearer bob-key"}
        assert httpx.get(f"{b}/v1/sessions/secret", headers=as_bob).status_code == 404
        assert httpx.get(f"{b}/v1/sessions", headers=as_bob).json()["data"] == []
        assert httpx.delete(f"{b}/v1/sessions/secret", headers=as_bob).status_code == 404
        as_alice = {"Authorization": "Bearer alice-key"}
        assert [s["id"] for s in httpx.get(f"{b}/v1/sessions", headers=as_alice).json()["data"]] == ["secret"]


def test_redis_down_degrades_health_and_metrics_but_requests_succeed(start_server, redis_server):  # noqa: F811
    with start_server(redis_url=redis_server.url) as (url, _):
        assert httpx.get(url + "/health").json() == {"status": "ok", "decode": "eager", "dtype": "float32",
                                                     "store": "ok"}
        redis_server.stop()
        started = time.monotonic()
        for turn in range(2):
            reply = chat(url, [{"role": "user", "content": "Say hi."}], session_id="outage")
            assert reply.choices[0].message.content
        assert time.monotonic() - started < 120
        assert httpx.get(url + "/health").json()["store"] == "degraded"
        assert "tptt_store_redis_up 0.0" in httpx.get(url + "/metrics").text
        redis_server.start()
        deadline = time.monotonic() + 15
        while httpx.get(url + "/health").json()["store"] != "ok":
            assert time.monotonic() < deadline, "the store did not come back with Redis"
            time.sleep(0.5)
        chat(url, [{"role": "user", "content": "Say bye."}], session_id="outage")
        assert "tptt_store_redis_up 1.0" in httpx.get(url + "/metrics").text


@pytest.mark.parametrize("setting", ["--redis-url", "TPTT_REDIS_URL"])
def test_the_setting_reaches_the_engine(setting):
    from server.settings import Settings

    url = "redis://127.0.0.1:1/0"
    settings = (Settings.from_args([setting, url], environ={}) if setting.startswith("--")
                else Settings.from_args([], environ={setting: url}))
    assert settings.engine_config().redis_url == url

