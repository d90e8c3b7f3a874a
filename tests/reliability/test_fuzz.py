"""Every endpoint fuzzed from the server's own OpenAPI schema (schemathesis): no input may produce a 5xx, every
refusal is an OpenAI error object, and the server still serves afterwards. Limits are small so that generated
bodies stay cheap to serve (a body of 10^4 one-token prompts is refused by the queue bound, not computed)."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from tests.server.conftest import live_server


@pytest.fixture(scope="module")
def fuzz_server(default_model):
    with live_server(default_model, max_tokens_limit=16, max_prompt_tokens=64, max_num_batched_tokens=64,
                     max_num_seqs=4, max_waiting=8, store_bytes=64 << 20, max_body_bytes=1 << 16) as (url, _):
        yield url


def test_no_input_gets_a_server_error(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:
        fuzz(operation, fuzz_server)


def fuzz(operation, base_url):
    # no shrinking: a failure is reported as generated (its curl command), at once, instead of replayed at length
    @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.generate])
    @given(case=operation.as_strategy())
    def check(case):
        response = case.call(base_url=base_url, timeout=120)
        assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert error["message"] and error["type"]

    check()


def test_server_still_serves_after_the_fuzzing(fuzz_server):
    reply = httpx.post(fuzz_server + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
