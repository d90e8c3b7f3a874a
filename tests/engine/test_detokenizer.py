"""Incremental detokenization on the real tokenizer: never a broken character, stop strings never leak."""

import pytest

from tptt_runtime.engine.detokenizer import TextStream

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
