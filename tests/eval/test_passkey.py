"""Passkey generator and scorer."""

import pytest

from tptt_runtime.eval.passkey import passkey_found, passkey_prompt


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model.tokenizer


@pytest.mark.parametrize("length", [256, 1000, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_has_the_length_the_key_and_the_depth(tokenizer, length, depth):
    ids, key = passkey_prompt(tokenizer, length, depth, seed=3)
    text = tokenizer.decode(ids)
    assert abs(len(ids) - length) <= 2
    assert text.count(key) == 2 and text.rstrip().endswith("The pass key is")
    where = text.index(key) / len(text)
    assert abs(where - depth) < 0.15 + 100 / length


def test_keys_differ_by_seed_and_are_reproducible(tokenizer):
    assert passkey_prompt(tokenizer, 300, 0.5, seed=1) == passkey_prompt(tokenizer, 300, 0.5, seed=1)
    assert passkey_prompt(tokenizer, 300, 0.5, seed=1)[1] != passkey_prompt(tokenizer, 300, 0.5, seed=2)[1]


def test_scorer():
    assert passkey_found(" 71432. Remember", "71432")
    assert passkey_found(" 71,432", "71432")
    assert passkey_found(" 7 1 4 3 2", "71432")
    assert not passkey_found(" 71433", "71432")
    assert not passkey_found("", "71432")


def test_bad_depth_is_refused(tokenizer):
    with pytest.raises(ValueError):
        passkey_prompt(tokenizer, 300, 1.5, seed=0)
