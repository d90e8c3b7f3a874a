"""RULER through lm-evaluation-harness (eval/ruler.py): lm-eval's samples reach our models and come back scored as
suite records; a model that reads the needle scores every sample, one that does not scores none."""

import re

import pytest

from tptt_runtime.eval import ruler
from tptt_runtime.loading import base_directory


class Oracle:
    """Answers by reading the prompt: the value of the needle whose key the question asks for."""
    name = "oracle"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def greedy(self, ids, n):
        text = self.tokenizer.decode(ids)
        key = re.findall(r"for (\S+) mentioned in the provided text", text)[-1]
        value = re.search(rf"for {re.escape(key)} is: (\S+)\.", text).group(1)
        return self.tokenizer(f" {value}.")["input_ids"][:n]


class Guess(Oracle):
    name = "guess"

    def greedy(self, ids, n):
        return self.tokenizer(" 1234567.")["input_ids"][:n]


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model.tokenizer


@pytest.mark.parametrize("model, hits", [(Oracle, 3), (Guess, 0)])
def test_lm_eval_samples_reach_the_model_and_come_back_scored(tokenizer, monkeypatch, tmp_path, model, hits):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    records = ruler.evaluate(ruler.GreedyLM(model(tokenizer), tokenizer), model.name, str(base_directory("default")),
                             ["niah_single_1"], 512, 3, 16)
    assert len(records) == 3 and sum(r["hit"] for r in records) == hits
    assert all(r["context"] == 512 and 256 < r["prompt_tokens"] <= 512 and r["model"] == model.name for r in records)
    assert all(len(r["answer"]) == 1 and r["answer"][0].isdigit() for r in records)


def test_generation_ends_at_a_stop_id_as_the_server_does(tokenizer):
    class Talker(Oracle):
        def greedy(self, ids, n):
            return tokenizer(" 42")["input_ids"] + [tokenizer.eos_token_id] + tokenizer(" and more")["input_ids"]

    lm = ruler.GreedyLM(Talker(tokenizer), tokenizer, stop_ids=[tokenizer.eos_token_id])
    assert lm._continue("question", {"max_gen_toks": 8, "until": []}) == " 42"
    assert lm._continue("question", {"max_gen_toks": 8, "until": ["2"]}) == " 4"


def test_a_run_of_some_models_measures_those_alone(tokenizer, default_model, monkeypatch, tmp_path):
    """`--suite-models base window-only`: both in process, no server started for the converted model, the
    result names the models it measured (so `--suite-merge` can join it with a run of the others)."""
    from tptt_runtime.bench import serving
    from tptt_runtime.eval import run as eval_run

    base, window_only, converted = Oracle(tokenizer), Guess(tokenizer), Oracle(tokenizer)
    for model, name in ((base, "base"), (window_only, "window-only"), (converted, "converted")):
        model.name, model.max_len = name, None
    asked = []

    def load_models(adapter, names):
        asked.append(list(names))
        return default_model, [model for model in (base, window_only, converted) if model.name in names]

    monkeypatch.setattr(eval_run, "load_models", load_models)

    def no_server(*args, **kwargs):
        raise AssertionError("a server was started for a run without the converted model")

    monkeypatch.setattr(serving, "served", no_server)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    results = ruler.run("default", [512], 2, ["niah_single_1"], 16, tmp_path, models=["window-only", "base"])
    assert asked == [["window-only", "base"]] and results["models"] == ["base", "window-only"]
    hits = {name: [r["hit"] for r in results["trials_run"] if r["model"] == name]
            for name in ("base", "window-only")}
    assert hits == {"base": [True, True], "window-only": [False, False]}
    assert {r["model"] for r in results["trials_run"]} == {"base", "window-only"}
    assert (tmp_path / "ruler.json").exists()
