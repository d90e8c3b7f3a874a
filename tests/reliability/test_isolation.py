"""Key isolation beyond reading: another key can neither delete, fork nor continue a session, nor resume from
the state snapshots of a conversation it did not have (its prompt is computed from scratch)."""

import httpx

from tests.server.conftest import live_server

A, B, C = ({"Authorization": f"Bearer key-{k}"} for k in "abc")
PROMPT = "The secret ingredient of the soup is saffron. " * 8


def completion(url, headers, **extra):
    return httpx.post(url + "/v1/completions", headers=headers, timeout=120,
                      json={"prompt": PROMPT, "max_tokens": 2, **extra})


def test_other_keys_cannot_touch_or_reuse(default_model):
    with live_server(default_model, api_key=["key-a", "key-b", "key-c"]) as (url, _):
        assert completion(url, A, session_id="soup").status_code == 200
        assert httpx.delete(url + "/v1/sessions/soup", headers=B).status_code == 404
        assert httpx.post(url + "/v1/sessions/soup/fork", headers=B, json={}).status_code == 404
        # B's "soup" is a different, new session: it starts from nothing
        fresh = completion(url, B, session_id="soup").json()["usage"]
        assert fresh["prompt_tokens_details"]["cached_tokens"] == 0
        # the same prompt again: A resumes from its own snapshot; C, which never sent it, computes it all
        assert completion(url, A).json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert completion(url, C).json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert httpx.get(url + "/v1/sessions/soup", headers=A).json()["num_tokens"] > 0
