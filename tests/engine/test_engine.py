"""LLMEngine on the real default model: greedy == TitansModel, batching does not change outputs, prefix reuse
prefills only new tokens, prompt logprobs == forward_full, aborts free their slot."""

import time

import pytest
import torch

from tptt_runtime.engine import EngineConfig, LLMEngine, Request, SamplingParams
from tests.conftest import counting_prompts
from tests.engine.arrivals import serve_staggered
from tptt_runtime.engine.detokenizer import OutputProcessor
from tptt_runtime.model import DecodeRows


def chat_ids(model, *turns):
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return list(model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])


def run_all(engine, requests):
    outputs = {r.request_id: [] for r in requests}
    for request in requests:
        engine.add_request(request)
    while engine.has_work():
        for output in engine.step():
            outputs[output.request_id].append(output)
    return outputs


def tokens(outputs):
    return [t for o in outputs for t in o.token_ids]


def reference_greedy(model, ids, n, piece=None):
    """TitansModel's greedy tokens: the prompt prefilled whole, or in pieces of `piece` tokens."""
    state, out = model.new_session(), []
    piece = piece or len(ids)
    for start in range(0, len(ids), piece):
        logits = model.prefill(state, ids[start:start + piece])
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = model.step(state, out[-1])
    return out


def test_greedy_matches_the_model_token_for_token(default_model):
    ids = chat_ids(default_model, "Write one sentence about the sea.")
    engine = LLMEngine(default_model, EngineConfig(max_num_batched_tokens=16))  # chunked prefill: 16 per step
    out = run_all(engine, [Request("r", ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))])
    assert tokens(out["r"]) == reference_greedy(default_model, ids, 12)
    assert out["r"][-1].finish_reason == "length"


def test_concurrent_requests_equal_requests_served_alone(default_model):
    prompts = [chat_ids(default_model, q) for q in ("Name a fruit.", "Count to five.", "Say hi.", "What is 2+2?")]
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=10) for i in range(4)]
    alone = [tokens(run_all(LLMEngine(default_model, EngineConfig(prefix_reuse=False)),
                            [Request(f"a{i}", p, s)])[f"a{i}"]) for i, (p, s) in enumerate(zip(prompts, params))]
    together = run_all(LLMEngine(default_model, EngineConfig(prefix_reuse=False)),
                       [Request(f"t{i}", p, s) for i, (p, s) in enumerate(zip(prompts, params))])
    assert [tokens(together[f"t{i}"]) for i in range(4)] == alone


def test_second_turn_prefills_only_the_new_message(default_model):
    engine = LLMEngine(default_model)
    first = chat_ids(default_model, "What is the capital of France?")
    out = run_all(engine, [Request("t1", first, SamplingParams(temperature=0, max_tokens=30))])["t1"]
    reply = default_model.tokenizer.decode(tokens(out), skip_special_tokens=True)
    second = chat_ids(default_model, "What is the capital of France?", reply, "And of Spain?")
    final = run_all(engine, [Request("t2", second, SamplingParams(temperature=0, max_tokens=5))])["t2"][-1]
    new_tokens = len(second) - final.num_cached_tokens
    assert final.num_cached_tokens >= len(first) + len(tokens(out)) - 1
    template_tokens = 12  # <|im_end|> (sampled, never fed), newlines, role headers
    assert new_tokens <= len(default_model.tokenizer("And of Spain?")["input_ids"]) + template_tokens
    # and resuming changes nothing: same tokens as a cold engine
    cold = run_all(LLMEngine(default_model, EngineConfig(prefix_reuse=False)),
                   [Request("c", second, SamplingParams(temperature=0, max_tokens=5))])["c"]
    assert tokens(cold) == tokens(run_all(engine, [Request("t3", second, SamplingParams(temperature=0,
                                                                                      max_tokens=5))])["t3"])


def test_prompt_logprobs_equal_forward_full(default_model):
    ids = default_model.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]
    engine = LLMEngine(default_model, EngineConfig(max_num_batched_tokens=4))
    out = run_all(engine, [Request("p", ids, SamplingParams(max_tokens=0, prompt_logprobs=2))])["p"]
    entries = out[-1].prompt_logprobs
    reference = default_model.forward_full(ids).log_softmax(-1)
    assert entries[0] is None and len(entries) == len(ids)
    for position, entry in enumerate(entries[1:], start=1):
        assert entry.token_id == ids[position]
        assert entry.logprob == pytest.approx(reference[position - 1, ids[position]].item(), abs=2e-3)


def test_abort_frees_the_slot_and_the_engine_goes_on(default_model):
    engine = LLMEngine(default_model)
    ids = chat_ids(default_model, "Tell me a long story.")
    engine.add_request(Request("long", ids, SamplingParams(max_tokens=200, seed=1)))
    engine.step()
    engine.step()
    engine.abort("long")
    finals = [o for o in engine.step() if o.finish_reason]
    assert [o.finish_reason for o in finals] == ["abort"]
    assert engine.stats()["num_running"] == 0 and not engine.has_work()
    out = run_all(engine, [Request("next", ids, SamplingParams(temperature=0, max_tokens=3))])["next"]
    assert out[-1].finish_reason == "length"


def test_stop_strings_and_stop_tokens(default_model):
    """Stop token ids end a request in the engine; a stop string ends its text on the caller's side, which then
    stops it in the engine: the state it consumed is stored, so the next turn resumes from it."""
    ids = chat_ids(default_model, "What is the capital of France?")
    greedy = reference_greedy(default_model, ids, 8)
    text = default_model.tokenizer.decode(greedy, skip_special_tokens=True)
    engine = LLMEngine(default_model)
    stop_word = text.split()[2]
    requests = [Request("s", ids, SamplingParams(temperature=0, max_tokens=8, stop=[stop_word])),
                Request("t", ids, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[greedy[3]]))]
    processors = {r.request_id: OutputProcessor(engine.tokenizer, r) for r in requests}
    out = {r.request_id: [] for r in requests}
    for request in requests:
        engine.add_request(request)
    while engine.has_work():
        for raw in engine.step():
            output, stop_engine = processors[raw.request_id].process(raw)
            if stop_engine:
                engine.abort(raw.request_id, "stop")
            if output is not None:
                out[raw.request_id].append(output)
    assert "".join(o.text for o in out["s"]) == text[:text.index(stop_word)]
    assert out["s"][-1].finish_reason == "stop"
    assert tokens(out["s"]) == greedy[:len(tokens(out["s"]))] and len(tokens(out["s"])) < 8
    assert len(out["s"][-1].snapshot_keys) == 2  # after the prompt, and where the stop string stopped it
    assert tokens(out["t"]) == greedy[:4] and out["t"][-1].finish_reason == "stop"


def test_invalid_requests_are_refused(default_model):
    engine = LLMEngine(default_model, EngineConfig(max_prompt_tokens=8))
    with pytest.raises(ValueError, match="at most 8"):
        engine.add_request(Request("a", list(range(9)), SamplingParams()))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request(Request("b", [default_model.vocab_size], SamplingParams()))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(Request("c", [], SamplingParams()))
    assert torch.is_tensor(default_model.forward_full([1, 2]))


def test_a_request_whose_sampling_fails_is_failed_alone(default_model, monkeypatch):
    """An error while sampling one request finishes that request with an error; the engine does not retry the
    same failing step forever, and the other request completes."""
    import tptt_runtime.engine.engine as engine_module

    real_sample = engine_module.sample_batch

    def sample_batch(logits, params, *args):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_sample(logits, params, *args)

    monkeypatch.setattr(engine_module, "sample_batch", sample_batch)
    engine = LLMEngine(default_model)
    ids = chat_ids(default_model, "Hello!")
    outputs = run_all(engine, [Request("bad", ids, SamplingParams(max_tokens=3, seed=666)),
                               Request("good", ids, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))])
    assert outputs["bad"][-1].finish_reason == "error" and "probability" in outputs["bad"][-1].error
    assert outputs["good"][-1].finish_reason == "length" and len(tokens(outputs["good"])) == 3
    assert not engine.has_work()


def test_a_request_whose_bookkeeping_after_a_packed_prefill_fails_is_failed_alone(default_model, monkeypatch):
    """Prefilled in the same forward as another request, one request's snapshot fails: it ends with an error,
    the other is served as alone."""
    engine = LLMEngine(default_model)
    real_snapshot = engine._snapshot

    def snapshot(request, *args):
        if request.request_id == "bad":
            raise OSError("disk full")
        return real_snapshot(request, *args)

    monkeypatch.setattr(engine, "_snapshot", snapshot)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    prompts = {"bad": chat_ids(default_model, "Hello!"), "good": chat_ids(default_model, "Name a colour.")}
    outputs = run_all(engine, [Request(rid, ids, params) for rid, ids in prompts.items()])
    assert outputs["bad"][-1].finish_reason == "error" and "disk full" in outputs["bad"][-1].error
    assert tokens(outputs["good"]) == reference_greedy(default_model, prompts["good"], 3)
    assert engine.pool.num_free == engine.pool.num_slots and not engine.has_work()


def test_simultaneous_prompts_of_different_lengths_prefill_in_one_forward_and_equal_requests_served_alone(
        default_model, monkeypatch):
    texts = ["The sea is calm and blue today,", "My favourite fruit is the mango because",
             "Counting slowly: one, two, three,", "The capital of Italy is a city called"]
    prompts = [default_model.tokenizer(t)["input_ids"][:5 + i] for i, t in enumerate(texts)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = [tokens(run_all(LLMEngine(default_model, EngineConfig(prefix_reuse=False)),
                            [Request(f"a{i}", p, params)])[f"a{i}"]) for i, p in enumerate(prompts)]
    packs = []
    prefill_packed = default_model.prefill_packed
    monkeypatch.setattr(default_model, "prefill_packed",
                        lambda pieces: packs.append([tuple(p.ids.shape) for p in pieces]) or prefill_packed(pieces))
    together = run_all(LLMEngine(default_model, EngineConfig(prefix_reuse=False)),
                       [Request(f"t{i}", p, params) for i, p in enumerate(prompts)])
    assert packs == [[(1, 5), (1, 6), (1, 7), (1, 8)]]
    assert [tokens(together[f"t{i}"]) for i in range(4)] == alone


@pytest.mark.parametrize("mixed_steps", [True, False])
def test_a_prompt_joining_while_others_decode_rides_in_one_forward_with_their_rows(default_model, monkeypatch,
                                                                                  mixed_steps):
    """mixed_steps: the step that prefills a joining prompt carries the decoding requests' rows in the same
    packed forward (no decode forward of its own); either way each request gets TitansModel's own greedy tokens."""
    prompts = [default_model.tokenizer(t)["input_ids"] for t in
               ("The sea is calm and blue today,", "My favourite fruit is the mango because",
                "Counting slowly: one, two, three,")]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    requests = [Request(f"r{i}", p, params) for i, p in enumerate(prompts)]
    engine = LLMEngine(default_model, EngineConfig(prefix_reuse=False, mixed_steps=mixed_steps))
    forwards = []
    prefill_packed, decode_rows = default_model.prefill_packed, default_model.decode_rows
    monkeypatch.setattr(default_model, "prefill_packed", lambda pieces: forwards.append(
        ["decode" if isinstance(p, DecodeRows) else "prefill" for p in pieces]) or prefill_packed(pieces))
    monkeypatch.setattr(default_model, "decode_rows", lambda *args: forwards.append(["decode"]) or decode_rows(*args))
    outputs = serve_staggered(engine, requests, first=2, join_step=3)
    monkeypatch.undo()
    for request, prompt in zip(requests, prompts):
        assert tokens(outputs[request.request_id]) == reference_greedy(default_model, prompt, 6)
    joining = [["prefill", "decode"]] if mixed_steps else [["prefill"], ["decode"]]
    expected = [["prefill", "prefill"], ["decode"]] + joining
    assert forwards[:len(expected)] == expected and all(f == ["decode"] for f in forwards[len(expected):]), forwards


def test_a_failed_move_of_slots_fails_that_steps_requests_and_the_engine_goes_on(default_model, monkeypatch):
    """When the decoding set changes, its slots move to the front of the pool; a move that fails (out of memory)
    fails the step's requests with an error output instead of escaping the step, and frees their slots."""
    engine = LLMEngine(default_model, EngineConfig(prefix_reuse=False))
    prompts = [default_model.tokenizer(t)["input_ids"] for t in ("The sea is", "My favourite fruit is the")]
    requests = [Request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=2 + 4 * i, ignore_eos=True))
                for i, p in enumerate(prompts)]

    def swap(a, b):
        raise torch.OutOfMemoryError("no memory to swap")

    monkeypatch.setattr(engine.pool, "swap", swap)  # r0 finishes after 2 tokens; r1 must then move to row 0
    outputs = run_all(engine, requests)
    assert tokens(outputs["r0"]) == reference_greedy(default_model, prompts[0], 2)
    assert outputs["r1"][-1].finish_reason == "error" and "no memory to swap" in outputs["r1"][-1].error
    assert engine.pool.num_free == engine.pool.num_slots and not engine.has_work()


def test_a_finished_request_frees_its_slot_for_the_next_and_the_pool_never_grows(default_model):
    engine = LLMEngine(default_model, EngineConfig(max_num_seqs=2, prefix_reuse=False))
    before = [t.untyped_storage().data_ptr() for layer in engine.pool.layers for t in layer.values()]
    prompts = [default_model.tokenizer(f"Item number {i} on the list is")["input_ids"] for i in range(5)]
    out = run_all(engine, [Request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=3 + i, ignore_eos=True))
                           for i, p in enumerate(prompts)])
    assert all(len(tokens(out[f"r{i}"])) == 3 + i for i in range(5))
    assert engine.pool.num_free == 2 and engine.load()["running_state_bytes"] == 0
    assert [t.untyped_storage().data_ptr() for layer in engine.pool.layers for t in layer.values()] == before


def test_sixteen_requests_joining_mid_decode_and_some_aborted_each_equal_the_model_alone(default_model):
    """16 greedy requests with different prompt lengths on 8 slots: half arrive while others decode, every
    fourth is aborted mid-way; each one that finishes has exactly TitansModel's own greedy tokens (slots are
    reused and swapped to the front as the decoding set changes)."""
    prompts = counting_prompts(default_model.tokenizer, 16)
    requests = [Request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=4 + i % 5, ignore_eos=True))
                for i, p in enumerate(prompts)]
    engine = LLMEngine(default_model, EngineConfig(max_num_seqs=8, max_num_batched_tokens=24, prefix_reuse=False))
    outputs = serve_staggered(engine, requests, first=8, abort=requests[::4])
    for i, request in enumerate(requests):
        final = outputs[request.request_id][-1]
        if i % 4 == 0:
            assert final.finish_reason in ("abort", "length")
            continue
        assert final.finish_reason == "length"
        assert tokens(outputs[request.request_id]) == reference_greedy(default_model, prompts[i], 4 + i % 5)
    assert engine.pool.num_free == 8


def test_compiling_in_the_background_swaps_a_compiled_twin_in_while_serving_eagerly(default_model):
    """`--compile`: requests are served eagerly at once; the compiled copy replaces the model between two steps
    when it is ready, and then serves the same greedy tokens as the eager model."""
    import asyncio

    import torch._dynamo

    from tests.conftest import tiny_model
    from tptt_runtime import TitansModel, TpttConfig
    from tptt_runtime.engine import AsyncEngine

    torch._dynamo.reset()
    model = TitansModel(tiny_model("llama"), TpttConfig(window=4, sinks=2, mag_weight=0.3))
    model.tokenizer = default_model.tokenizer  # token ids below the tiny vocabulary decode to text
    engine = AsyncEngine(LLMEngine(model, EngineConfig(prefix_reuse=False)))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = [5, 17, 42, 8, 61, 3, 29]

    async def generate(name):
        return [t for output in [o async for o in engine.submit(Request(name, prompt, params))]
                for t in output.token_ids]

    engine.start()
    try:
        compiling = engine.compile_in_background()
        eager = asyncio.run(generate("while-compiling"))
        compiling.join(timeout=600)
        deadline = time.monotonic() + 30
        while engine.decode_mode != "compiled" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.decode_mode == "compiled"
        assert engine.engine.model is not model and engine.engine.model.is_compiled
        compiled = asyncio.run(generate("compiled"))
    finally:
        engine.stop()
    assert eager == compiled == reference_greedy(model, prompt, 12)


def test_bfloat16_weights_serve_from_a_pool_with_float32_memory():
    """What `--dtype auto` serves on a CPU with native bfloat16: the pool's window tensors in bfloat16, the
    DeltaProduct memory in float32, and a request's greedy tokens those of TitansModel in bfloat16."""
    import tptt_runtime as tr

    model = tr.load("default", dtype=torch.bfloat16)
    ids = chat_ids(model, "Write one sentence about the sea.")
    engine = LLMEngine(model, EngineConfig(max_num_seqs=2, max_num_batched_tokens=16))
    layer = engine.pool.layers[0]
    assert layer["win_k"].dtype == torch.bfloat16 and layer["memory"].dtype == torch.float32
    out = run_all(engine, [Request("r", ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))])
    assert tokens(out["r"]) == reference_greedy(model, ids, 12, piece=16)  # bfloat16 rounds by the split too


def test_the_engine_thread_runs_torch_with_the_threads_it_was_given(default_model):
    """`tptt-serve` keeps its main thread single-threaded and gives the intra-op threads to the engine thread
    (one OpenMP team in the process): the loop sets them on its own thread, the caller's stay as they are."""
    import asyncio

    from tests.conftest import tiny_model
    from tptt_runtime import TitansModel, TpttConfig
    from tptt_runtime.engine import AsyncEngine

    model = TitansModel(tiny_model("llama"), TpttConfig(window=4, sinks=2))
    model.tokenizer = default_model.tokenizer
    caller_threads, seen = torch.get_num_threads(), []
    wanted = 1 if caller_threads > 1 else 2
    engine = AsyncEngine(LLMEngine(model, EngineConfig(prefix_reuse=False)),
                         observers=[lambda output: seen.append(torch.get_num_threads())], threads=wanted)

    async def generate():
        return [o async for o in engine.submit(Request("t", [5, 17, 42], SamplingParams(max_tokens=3)))]

    engine.start()
    try:
        asyncio.run(generate())
    finally:
        engine.stop()
    assert seen and set(seen) == {wanted}
    assert torch.get_num_threads() == caller_threads
