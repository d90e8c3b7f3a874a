"""Incremental detokenization on the real tokenizer: never a broken character, stop strings never leak; the
caller-side OutputProcessor cuts tokens at a stop string, asks the engine to stop once and drops its overrun."""

import pytest

from tptt_runtime.engine import Request, RequestOutput, SamplingParams
from tptt_runtime.engine.detokenizer import OutputProcessor, TextStream

TEXTS = ["Hello, world! Ça va? 你好，世界 🤖🚀 naïve café — done.", "  leading spaces\n\tand tabs ", "日本語のテキスト🎌"]


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model.tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_text_with_no_broken_characters(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    stream = TextStream(tokenizer, [], [])
    deltas = [stream.push(t)[0] for t in ids] + [stream.finish()]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_the_text_really_splits_characters_across_tokens(tokenizer):
    ids = tokenizer(TEXTS[0])["input_ids"]
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)


@pytest.mark.parametrize("stop", ["世界", "wor", "! Ç", "done.", "🚀"])
def test_stop_string_cuts_exactly_and_never_leaks(tokenizer, stop):
    text = TEXTS[0]
    ids = tokenizer(text)["input_ids"]
    stream = TextStream(tokenizer, [], [stop, "never-there"])
    released = ""
    for token in ids:
        delta, stopped = stream.push(token)
        released += delta
        assert stop not in released
        if stopped:
            break
    assert stopped
    assert released == text[:text.index(stop)]


def test_holdback_is_released_at_the_end(tokenizer):
    ids = tokenizer("abc xyz")["input_ids"]
    stream = TextStream(tokenizer, [], ["xyzq"])
    released = "".join(stream.push(t)[0] for t in ids)
    assert released != "abc xyz"           # the tail could still start the stop string
    assert released + stream.finish() == "abc xyz"


def engine_outputs(ids, finish_reason, eos=None):
    """What the engine emits for `ids`, one token per step (the last step also carries `eos`, if given)."""
    steps = [[t] for t in ids] + ([[eos]] if eos is not None else [])
    return [RequestOutput("r", step, "", [], finish_reason=finish_reason if i == len(steps) - 1 else None,
                          num_output_tokens=i + 1) for i, step in enumerate(steps)]


def test_a_stop_string_cuts_the_tokens_stops_the_engine_once_and_drops_its_overrun(tokenizer):
    text = "one two three four five six"
    ids = tokenizer(text)["input_ids"]
    processor = OutputProcessor(tokenizer, Request("r", [1, 2], SamplingParams(stop=["three"])))
    results = [processor.process(o) for o in engine_outputs(ids, "length")]
    kept = [output for output, _ in results if output is not None]
    assert sum(stop for _, stop in results) == 1
    stop_index = [stop for _, stop in results].index(True)
    assert "".join(o.text for o in kept) == text[:text.index("three")]
    assert [t for o in kept for t in o.token_ids] == ids[:stop_index + 1]
    assert kept[-1].finish_reason == "stop" and kept[-1].num_output_tokens == stop_index + 1
    assert len(kept) == stop_index + 2  # the outputs up to the stop, then the engine's final one


def test_a_stop_string_on_the_engines_last_token_needs_no_engine_stop(tokenizer):
    ids = tokenizer("alpha beta")["input_ids"]
    processor = OutputProcessor(tokenizer, Request("r", [1], SamplingParams(stop=["beta"])))
    results = [processor.process(o) for o in engine_outputs(ids, "length")]
    assert not any(stop for _, stop in results)
    assert results[-1][0].finish_reason == "stop" and "".join(o.text for o, _ in results) == "alpha "


def test_text_held_back_for_a_stop_string_is_released_when_eos_ends_the_request(tokenizer):
    text = "the end of it"
    ids = tokenizer(text)["input_ids"]
    processor = OutputProcessor(tokenizer, Request("r", [1], SamplingParams(stop=["never there"])))
    outputs = [processor.process(o)[0] for o in engine_outputs(ids, "stop", eos=tokenizer.eos_token_id)]
    assert "".join(o.text for o in outputs) == text
    assert outputs[-1].token_ids == [tokenizer.eos_token_id] and outputs[-1].finish_reason == "stop"
