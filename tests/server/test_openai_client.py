"""The official openai client against a live server: chat and completions, streaming and not, n, stop, seeds,
logprobs, multi-turn state reuse (through the metrics), disconnects and concurrent clients."""

import concurrent.futures as futures
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import counting_prompts
from tests.server.conftest import MODEL

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def metric(base_url, name, labels=None):
    for family in text_string_to_metric_families(httpx.get(base_url + "/metrics").text):
        for sample in family.samples:
            if sample.name == name and (labels is None or all(sample.labels.get(k) == v for k, v in labels.items())):
                return sample.value
    raise KeyError(name)


def greedy_reference(model, ids, max_tokens):
    state, out = model.new_session(), []
    logits = model.prefill(state, ids)
    for _ in range(max_tokens):
        out.append(int(logits.argmax()))
        if out[-1] == model.tokenizer.eos_token_id:
            break
        logits = model.step(state, out[-1])
    return out


def test_chat_greedy_equals_the_runtime(client, default_model):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20)
    ids = default_model.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)["input_ids"]
    expected = greedy_reference(default_model, ids, 20)
    assert reply.choices[0].message.content == default_model.tokenizer.decode(expected, skip_special_tokens=True)
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == len(expected)
    assert reply.choices[0].finish_reason == "stop"


def test_chat_stream_equals_non_stream_and_reports_usage(client):
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_completions_stream_and_not(client):
    plain = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True))
    assert streamed == plain.choices[0].text and plain.usage.completion_tokens == 10
    assert plain.choices[0].finish_reason == "length"


def test_n_choices_seeds_and_reproducibility(client):
    def ask(seed):
        reply = client.chat.completions.create(model=MODEL, messages=QUESTION, n=3, seed=seed, max_tokens=12,
                                               temperature=1.0)
        assert sorted(c.index for c in reply.choices) == [0, 1, 2]
        return [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)]

    first = ask(7)
    assert ask(7) == first
    assert ask(8) != first
    assert len(set(first)) > 1  # choices are independent samples


def test_stop_strings(client):
    plain = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    word = plain.choices[0].text.split(",")[2]
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[word])
    assert stopped.choices[0].text == plain.choices[0].text[:plain.choices[0].text.index(word)]
    assert stopped.choices[0].finish_reason == "stop"


def test_chat_logprobs(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=6,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and 3 <= len(entry.top_logprobs) <= 4
        assert entry.logprob == max(t.logprob for t in entry.top_logprobs)  # greedy: the chosen one is the best


def test_completion_echo_scores_the_prompt(client, default_model):
    ids = default_model.tokenizer("The capital of France is Paris")["input_ids"]
    reply = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.token_logprobs) == len(ids) + 1 and logprobs.token_logprobs[0] is None
    reference = default_model.forward_full(ids).log_softmax(-1)
    for position in range(1, len(ids)):
        assert logprobs.token_logprobs[position] == pytest.approx(reference[position - 1, ids[position]].item(),
                                                                 abs=2e-3)
    assert reply.choices[0].text.startswith("The capital of France is Paris")


def test_three_turn_chat_prefills_only_new_tokens(client, base_url, default_model):
    messages = [{"role": "user", "content": "My name is Ada. What is the capital of France?"}]
    for turn, follow_up in enumerate(["And of Italy?", "What is my name?", None]):
        before = metric(base_url, "tptt_prompt_tokens_computed_total")
        reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=20)
        computed = metric(base_url, "tptt_prompt_tokens_computed_total") - before
        usage = reply.usage
        assert computed == usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens
        if turn > 0:
            new_message = len(default_model.tokenizer(messages[-1]["content"])["input_ids"])
            assert computed <= new_message + 12, (turn, computed, usage)  # + template tokens only
        if follow_up is None:
            break
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": follow_up}]


def test_disconnect_mid_stream_frees_the_request(base_url, client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", base_url + "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]
            assert any(line.startswith("data:") for line in received)
            assert metric(base_url, "tptt_num_requests_running") == 1
    deadline = time.monotonic() + 20
    while metric(base_url, "tptt_num_requests_running") != 0:
        assert time.monotonic() < deadline, "the aborted request still runs"
        time.sleep(0.1)
    assert metric(base_url, "tptt_request_success_total", {"finished_reason": "abort"}) >= 1
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=5)
    assert reply.choices[0].message.content


def test_sixteen_concurrent_streams_equal_served_alone(client):
    prompts = [f"Write a word that rhymes with number {i}." for i in range(16)]

    def stream(i):
        chunks = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompts[i]}], seed=i, temperature=0.8,
            max_tokens=10, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    alone = [stream(i) for i in range(16)]
    with futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(stream, range(16)))
    assert together == alone
    assert len(set(alone)) > 8


def test_sixteen_greedy_streams_joining_mid_decode_and_some_aborted_each_equal_the_model_alone(start_server,
                                                                                               default_model):
    """The engine's 16-request invariant through HTTP: 16 greedy completion streams with different prompt lengths
    on 12 slots; eight start at once, eight more once those decode, and two of the first eight are still decoding
    when the last of the second wave has joined; every fourth stream is dropped by its client. Each stream that
    finishes has exactly TitansModel's own greedy text and token count."""
    prompts = counting_prompts(default_model.tokenizer, 16)
    max_tokens = [6 + i % 5 for i in range(16)]
    first_chunk = [threading.Event() for _ in range(16)]

    def stream(i, client):
        if i >= 8:
            assert all(event.wait(30) for event in first_chunk[:8]), "the first wave did not start"
        dropped = i % 4 == 0
        chunks = client.completions.create(
            model=MODEL, prompt=prompts[i], temperature=0, max_tokens=2000 if dropped else max_tokens[i],
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": dropped})
        text, usage = [], None
        for chunk in chunks:
            text += [c.text for c in chunk.choices]
            usage = chunk.usage or usage
            first_chunk[i].set()
            if dropped and len(text) >= 2 and (i >= 8 or all(e.is_set() for e in first_chunk[8:])):
                chunks.close()
                return None
        return "".join(text), usage.completion_tokens

    def poll(url, name, labels, value):
        deadline = time.monotonic() + 20
        while metric(url, name, labels) != value:
            assert time.monotonic() < deadline, f"{name} {labels} is {metric(url, name, labels)}, not {value}"
            time.sleep(0.1)

    with start_server(max_num_seqs=12, prefix_reuse=False) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        with futures.ThreadPoolExecutor(16) as pool:
            served = list(pool.map(lambda i: stream(i, client), range(16)))
        poll(url, "tptt_request_success_total", {"finished_reason": "abort"}, 4)
        poll(url, "tptt_num_requests_running", None, 0)
    for i in range(16):
        if i % 4 == 0:
            assert served[i] is None
            continue
        expected = greedy_reference(default_model, prompts[i], max_tokens[i])
        assert served[i] == (default_model.tokenizer.decode(expected, skip_special_tokens=True), len(expected)), i


def test_metrics_parse_and_carry_every_name(base_url):
    names = {s.name for f in text_string_to_metric_families(httpx.get(base_url + "/metrics").text)
             for s in f.samples}
    required = ["tptt_num_requests_running", "tptt_num_requests_waiting", "tptt_prompt_tokens_total",
                "tptt_generation_tokens_total", "tptt_time_to_first_token_seconds_bucket",
                "tptt_inter_token_latency_seconds_bucket", "tptt_e2e_request_latency_seconds_bucket",
                "tptt_request_queue_time_seconds_bucket", "tptt_prefix_cache_queries_total",
                "tptt_prefix_cache_hits_total", "tptt_request_success_total", "tptt_session_state_bytes",
                "tptt_memory_bytes_per_token_bucket", "tptt_kv_cache_equivalent_bytes", "tptt_sessions_resident",
                "tptt_sessions_on_disk"]
    assert not [n for n in required if n not in names]
    assert metric(base_url, "tptt_session_state_bytes") > 0
    assert metric(base_url, "tptt_kv_cache_equivalent_bytes") > 0


def test_every_finish_reason_series_exists_at_zero_from_start_up(start_server):
    with start_server() as (url, _):
        text = httpx.get(url + "/metrics").text
    for reason in ("stop", "length", "abort", "error"):
        assert f'tptt_request_success_total{{finished_reason="{reason}"}} 0.0' in text
