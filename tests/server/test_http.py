"""Raw HTTP: OpenAI error objects for bad input, auth and key isolation, overload, tokenizer endpoints in vLLM's
shapes, the sessions API, and sessions that survive a restart."""

import concurrent.futures as futures

import httpx
import pytest

from tests.server.conftest import MODEL, assert_error, chat_body

CHAT = "/v1/chat/completions"


def post(base_url, path, body=None, **kwargs):
    return httpx.post(base_url + path, json=body, timeout=120, **kwargs)


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    (chat_body(max_tokens=-1), "max_tokens"),
    (chat_body(max_tokens=10**9), "max_tokens"),
    (chat_body(n=0), "n"),
    (chat_body(temperature=5), "temperature"),
    (chat_body(top_k=-7), "top_k"),
    (chat_body(temperature="hot"), "temperature"),
    (chat_body(logit_bias={"99999999": 1}), None),
    (chat_body(stop_token_ids=[10**8]), None),
    ({"model": MODEL}, "messages"),
])
def test_bad_chat_bodies_are_400(base_url, body, param):
    response = post(base_url, CHAT, body)
    assert_error(response, 400)
    if param:
        assert response.json()["error"]["param"] == param


def test_malformed_json_and_bad_prompts(base_url):
    assert_error(httpx.post(base_url + CHAT, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert_error(post(base_url, "/v1/completions", {"model": MODEL, "prompt": [10**9]}), 400)
    assert_error(post(base_url, "/v1/completions", {"model": MODEL, "prompt": ""}), 400)
    assert_error(post(base_url, "/v1/completions", {"model": MODEL, "prompt": "x", "suffix": "y"}), 400)


def test_oversized_bodies_are_413_and_the_server_goes_on(start_server):
    with start_server(max_body_bytes=1000) as (url, _):
        response = post(url, "/v1/completions", {"model": MODEL, "prompt": "x" * 5000})
        assert_error(response, 413)
        pieces = [b'{"model": "' + MODEL.encode() + b'", "prompt": "', b"y" * 3000, b'"}']
        chunked = httpx.post(url + "/v1/completions", content=iter(pieces),  # no Content-Length: chunked
                             headers={"content-type": "application/json"})
        assert_error(chunked, 413)
        assert post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_unknown_model_and_unknown_session_are_404(base_url):
    response = post(base_url, CHAT, chat_body() | {"model": "gpt-9"})
    assert_error(response, 404)
    assert response.json()["error"]["code"] == "model_not_found"
    assert_error(httpx.get(base_url + "/v1/sessions/nope"), 404)


def test_models_and_health(base_url):
    assert httpx.get(base_url + "/health").json() == {"status": "ok", "decode": "eager", "dtype": "float32"}
    assert [m["id"] for m in httpx.get(base_url + "/v1/models").json()["data"]] == [MODEL]


def test_tokenizer_endpoints_in_vllm_shapes(base_url, default_model):
    tokenized = post(base_url, "/tokenize", {"prompt": "Hello world", "add_special_tokens": False}).json()
    assert tokenized["tokens"] == default_model.tokenizer("Hello world")["input_ids"]
    assert tokenized["count"] == len(tokenized["tokens"]) and tokenized["max_model_len"] > 0
    assert post(base_url, "/detokenize", {"tokens": tokenized["tokens"]}).json() == {"prompt": "Hello world"}
    chat = post(base_url, "/tokenize", {"messages": [{"role": "user", "content": "hi"}],
                                        "return_token_strs": True}).json()
    assert chat["tokens"] == list(default_model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True)["input_ids"])
    assert len(chat["token_strs"]) == chat["count"]
    info = httpx.get(base_url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and info["chat_template"]
    eos = post(base_url, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"]
    assert eos == [default_model.tokenizer.eos_token_id]
    assert_error(post(base_url, "/detokenize", {"tokens": [10**9]}), 400)


def test_sessions_api(base_url):
    first = post(base_url, CHAT, chat_body("My name is Ada. Say hi.", session_id="conv-1", temperature=0,
                                           max_tokens=16)).json()
    second = post(base_url, CHAT, chat_body("What is my name?", temperature=0, max_tokens=16),
                  headers={"X-Session-ID": "conv-1"}).json()
    # the second turn sent only its new message: the server prepended the history and resumed the state
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"]
    session = httpx.get(base_url + "/v1/sessions/conv-1").json()
    assert session["num_messages"] == 4 and session["state_bytes"] > 0
    assert session["num_tokens"] == second["usage"]["total_tokens"]
    assert session["kv_cache_equivalent_bytes"] == session["num_tokens"] * 46080  # 30 layers, 3 kv heads, 64, fp32
    fork = post(base_url, "/v1/sessions/conv-1/fork", {"session_id": "conv-2"}).json()
    assert fork["id"] == "conv-2" and fork["num_messages"] == 4
    assert {s["id"] for s in httpx.get(base_url + "/v1/sessions").json()["data"]} >= {"conv-1", "conv-2"}
    assert httpx.delete(base_url + "/v1/sessions/conv-1").json()["deleted"] is True
    assert_error(httpx.get(base_url + "/v1/sessions/conv-1"), 404)
    assert httpx.get(base_url + "/v1/sessions/conv-2").status_code == 200
    assert_error(post(base_url, CHAT, chat_body(session_id="conv-2", n=2)), 400)


def test_one_turn_at_a_time_per_session(base_url):
    body = chat_body("Tell me a story.", session_id="busy", max_tokens=60, ignore_eos=True)
    with futures.ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda _: post(base_url, CHAT, body), range(2)))
    assert sorted(r.status_code for r in responses) == [200, 409]
    assert_error(next(r for r in responses if r.status_code == 409), 409)
    assert httpx.get(base_url + "/v1/sessions/busy").json()["num_messages"] == 2


def test_api_keys_and_session_isolation(start_server):
    with start_server(api_key=["key-a", "key-b"]) as (url, _):
        assert_error(post(url, CHAT, chat_body()), 401)
        assert_error(post(url, CHAT, chat_body(), headers={"Authorization": "Bearer wrong"}), 401)
        a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
        assert post(url, CHAT, chat_body(session_id="mine"), headers=a).status_code == 200
        assert httpx.get(url + "/v1/sessions/mine", headers=a).status_code == 200
        assert_error(httpx.get(url + "/v1/sessions/mine", headers=b), 404)
        assert httpx.get(url + "/v1/sessions", headers=b).json()["data"] == []
        assert httpx.get(url + "/health").status_code == 200  # probes need no key
        assert httpx.get(url + "/metrics").status_code == 200


def test_overload_is_429_with_retry_after(start_server):
    with start_server(max_num_seqs=1, max_waiting=1) as (url, _):
        body = chat_body("Tell me a story.", max_tokens=40, ignore_eos=True)
        with futures.ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: post(url, CHAT, body), range(6)))
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
        refused = next(r for r in responses if r.status_code == 429)
        assert_error(refused, 429)
        assert refused.headers["retry-after"]
        assert post(url, CHAT, chat_body()).status_code == 200


def test_sessions_survive_a_restart(start_server, tmp_path):
    with start_server(store_dir=str(tmp_path)) as (url, _):
        first = post(url, CHAT, chat_body("Remember the number 42.", session_id="s", temperature=0)).json()
    with start_server(store_dir=str(tmp_path)) as (url, _):
        assert httpx.get(url + "/v1/sessions/s").json()["num_messages"] == 2
        second = post(url, CHAT, chat_body("Which number?", session_id="s", temperature=0)).json()
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"]
