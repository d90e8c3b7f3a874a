"""Bad input by hand, beyond the schema fuzzing and tests/server/test_http.py: invalid UTF-8, a 10 MB body,
prompts over the limit, absurd counts, deep nesting. Every one is a 4xx OpenAI error object; the server serves
afterwards. And the logs: no prompt text unless --log-prompts."""

import logging

import httpx
import pytest

from tests.server.conftest import assert_error, chat_body, live_server

MARKER = "zebra-quartz-4417"


@pytest.fixture(scope="module")
def strict_server(default_model):
    """Default settings except a small prompt limit (so that 'over the limit' is cheap to send)."""
    with live_server(default_model, max_prompt_tokens=64) as (url, _):
        yield url


def post_raw(url, path, content: bytes):
    return httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=120)


def test_invalid_utf8_is_400(strict_server):
    assert_error(post_raw(strict_server, "/v1/chat/completions",
                          b'{"messages": [{"role": "user", "content": "\xff\xfe bad"}]}'), 400)
    assert_error(post_raw(strict_server, "/v1/completions", b'{"prompt": "\xc3\x28"}'), 400)


def test_ten_megabyte_body_is_413_with_default_settings(strict_server):
    body = b'{"prompt": "' + b"a" * (10 * 10**6) + b'"}'
    assert_error(post_raw(strict_server, "/v1/completions", body), 413)


def test_deeply_nested_json_is_400(strict_server):
    assert_error(post_raw(strict_server, "/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
                 400)


def test_prompts_over_the_limit_are_400(strict_server):
    long_text = "word " * 200
    response = httpx.post(strict_server + "/v1/chat/completions", json=chat_body(long_text), timeout=60)
    assert_error(response, 400)
    assert "64" in response.json()["error"]["message"]
    assert_error(httpx.post(strict_server + "/v1/completions", json={"prompt": long_text}, timeout=60), 400)
    assert_error(httpx.post(strict_server + "/v1/completions", json={"prompt": [1] * 65}, timeout=60), 400)


@pytest.mark.parametrize("extra", [{"n": 10**6}, {"n": -1}, {"top_logprobs": 10**4, "logprobs": True},
                                   {"stop": ["x"] * 10**4}, {"seed": 2**80}, {"max_tokens": "many"},
                                   {"logit_bias": {"5": 10**9}}, {"top_p": 0}, {"min_p": 2}])
def test_absurd_sampling_values_are_400(strict_server, extra):
    assert_error(httpx.post(strict_server + "/v1/chat/completions", json=chat_body("hi", **extra), timeout=60), 400)


def test_unknown_content_part_is_400(strict_server):
    body = {"messages": [{"role": "user", "content": [{"type": "hologram", "data": "x"}]}]}
    assert_error(httpx.post(strict_server + "/v1/chat/completions", json=body, timeout=60), 400)


def test_still_serves_after_bad_input(strict_server):
    reply = httpx.post(strict_server + "/v1/chat/completions", json=chat_body("Say hi."), timeout=60)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] is not None


def requests_with_marker(url):
    httpx.post(url + "/v1/chat/completions", json=chat_body(f"Remember {MARKER}."), timeout=60).raise_for_status()
    httpx.post(url + "/v1/completions", json={"prompt": f"Code {MARKER}", "max_tokens": 2, "stream": True},
               timeout=60).raise_for_status()
    httpx.post(url + "/v1/chat/completions", json=chat_body(f"{MARKER}", temperature=99), timeout=60)  # a 400


@pytest.mark.parametrize("log_prompts", [False, True])
def test_prompt_text_reaches_the_logs_only_when_asked(default_model, caplog, log_prompts):
    caplog.set_level(logging.DEBUG)
    with live_server(default_model, log_prompts=log_prompts) as (url, _):
        requests_with_marker(url)
    assert "tokens in" in caplog.text  # requests are logged ...
    assert (MARKER in caplog.text) == log_prompts  # ... their text only with --log-prompts
