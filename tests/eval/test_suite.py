"""The needle suite's runner (eval/suite.py): Wilson intervals against values computed by hand, scoring with
oracle models, and a run end to end on tiny random models (base, window-only, converted) with a character
tokenizer, through the table, JSON and PNG."""

import json

import pytest
import torch

from tptt_runtime.eval import needles, suite
from tptt_runtime.eval.run import main

Z = 1.959963984540054


class CharTokenizer:
    """One token per character, ids 3..96 (0-2 special), so the prompts fit the tiny models' 97-token vocab."""
    chars = "\n" + "".join(chr(c) for c in range(32, 127) if chr(c) not in "`~")
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + self.chars.find(c) if c in self.chars else 3 + self.chars.index("?")
                              for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.chars[i - 3] for i in ids if i >= 3)

    def apply_chat_template(self, messages, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt
                                                                            else "")
        return {"input_ids": self(text)["input_ids"]}


class Echo:
    """A model that 'continues' with the whole prompt: every answer is in it."""
    name, max_len = "echo", None

    def greedy(self, ids, n):
        return ids


class Mute:
    name, max_len = "mute", 500

    def greedy(self, ids, n):
        return []


@pytest.mark.parametrize("hits, trials, low, high", [
    (0, 20, 0.0, Z * Z / (20 + Z * Z)),  # the upper bound at 0 successes has this closed form
    (0, 3, 0.0, Z * Z / (3 + Z * Z)),    # the lower bound exactly 0 (centre - half rounds to 5.6e-17 here)
    (3, 3, 3 / (3 + Z * Z), 1.0),
    (20, 20, 20 / (20 + Z * Z), 1.0),
    (10, 20, 0.2992980, 0.7007020),
    (1, 20, 0.0088814, 0.2361312),
])
def test_wilson_against_known_values(hits, trials, low, high):
    lo, hi = suite.wilson(hits, trials)
    assert lo == pytest.approx(low, abs=1e-6) and hi == pytest.approx(high, abs=1e-6)
    assert (lo == 0.0) == (hits == 0) and (hi == 1.0) == (hits == trials)  # exactly, not up to rounding


@pytest.mark.parametrize("hits, trials", [(3, 20), (7, 11), (1, 3), (49, 50)])
def test_wilson_bounds_are_where_the_score_test_just_rejects(hits, trials):
    """The interval's ends are the p with (p_hat - p)^2 = z^2 p (1 - p) / n."""
    p_hat = hits / trials
    for p in suite.wilson(hits, trials):
        assert (p_hat - p) ** 2 == pytest.approx(Z * Z * p * (1 - p) / trials, abs=1e-12)
    assert suite.wilson(0, 0) == (0.0, 1.0)


def test_context_tokens():
    assert [suite.context_tokens(t) for t in ("4096", "4k", "64K", "1000")] == [4096, 4096, 65536, 1000]


def test_scoring_with_oracle_models():
    tokenizer = CharTokenizer()
    records = suite.evaluate([Echo(), Mute()], tokenizer, [450, 600], trials=4, tasks=["passkey", "docqa"],
                             formats=["raw"], new_tokens=8, seed=1)
    summary = suite.summarize(records)
    echo = summary["accuracy"]["passkey"]["raw"]["echo"]["450"]
    assert echo == {"hits": 4, "trials": 4, "accuracy": 1.0, "ci95": list(suite.wilson(4, 4))}
    assert summary["accuracy"]["docqa"]["raw"]["mute"]["450"]["accuracy"] == 0.0
    assert "600" not in summary["pooled"]["mute"]  # beyond its max_len: not run
    assert summary["pooled"]["echo"]["600"]["trials"] == 8
    assert {r["prompt_tokens"] for r in records} <= set(range(448, 453)) | set(range(598, 603))


def test_a_multikey_miss_that_gives_another_key_is_recorded_as_such():
    records = suite.evaluate([Echo(), Mute()], CharTokenizer(), [450], trials=3, tasks=["multikey", "passkey"],
                             formats=["raw"], new_tokens=8, seed=1)
    by = {(r["model"], r["task"]): r for r in records}
    echo = by["echo", "multikey"]  # the whole prompt: the asked key and the three others
    assert len(echo["others"]) == needles.MULTIKEY_KEYS - 1 and echo["answer"] not in echo["others"]
    assert not echo["hit"] and echo["names_another"]
    assert not by["mute", "multikey"]["names_another"]
    assert by["echo", "passkey"]["hit"] and by["echo", "passkey"]["others"] == []
    assert not by["echo", "passkey"]["names_another"]


def test_end_to_end_on_tiny_models(tiny_models, tmp_path):
    tokenizer = CharTokenizer()
    results = suite.measure(tiny_models, tokenizer, [450, 520], trials=1, tasks=list(needles.TASKS),
                            formats=list(needles.FORMATS), new_tokens=4, seed=0)
    suite.write(tmp_path, results)
    saved = json.loads((tmp_path / "suite.json").read_text())
    assert (tmp_path / "suite.png").stat().st_size > 1000
    assert saved["models"] == ["base", "window-only", "converted"] and saved["contexts"] == [450, 520]
    assert len(saved["trials_run"]) == 3 * 2 * (3 + 2)  # tasks * formats * models per context (1 trial)
    for task in needles.TASKS:
        for fmt in needles.FORMATS:
            row = saved["accuracy"][task][fmt]
            assert set(row["base"]) == {"450"} and set(row["converted"]) == {"450", "520"}
            for cell in row["converted"].values():
                lo, hi = cell["ci95"]
                assert cell["trials"] == 1 and 0 <= lo <= cell["accuracy"] <= hi <= 1
    text = suite.table(saved)
    assert "multikey / chat" in text and "all tasks" in text and "-" in text  # base is not run at 520
    assert saved["pooled"]["converted"]["520"]["trials"] == 6


def test_converted_wrapper_continues_like_the_model(tiny_models):
    """The suite's continuation is the model's greedy decode: a prompt and its first continuation token agree
    with an argmax over forward_full."""
    converted = tiny_models[2]
    ids = CharTokenizer()("The vault sequence is")["input_ids"]
    first = converted.greedy(ids, 1)[0]
    assert first == int(torch.argmax(converted.model.forward_full(ids)[-1]))


def test_cli_runs_the_suite(monkeypatch, tmp_path):
    calls = {}
    monkeypatch.setattr(suite, "run", lambda *args: calls.update(args=args))
    main(["default", "--suite", "--suite-contexts", "1k", "3000", "--trials", "5", "--tasks", "docqa",
          "--formats", "chat", "--new-tokens", "12", "--seed", "3", "--suite-models", "converted", "--out",
          str(tmp_path)])
    assert calls["args"] == ("default", [1024, 3000], 5, ["docqa"], ["chat"], 12, 3, tmp_path, ["converted"])
    main(["default", "--suite", "--out", str(tmp_path)])
    assert calls["args"][1:3] == (list(suite.CONTEXTS), suite.TRIALS) and calls["args"][-1] == list(suite.MODELS)


def oracle_run(contexts, trials=2, models=(Echo(), Mute()), **settings):
    """A suite result of the oracle models, as `suite.run` writes it."""
    args = dict(trials=trials, tasks=["passkey"], formats=["raw"], new_tokens=8, seed=1) | settings
    return {"adapter": "default", "window": 16, "sinks": 2, **suite.measure(list(models), CharTokenizer(), contexts,
                                                                            **args)}


def test_merging_runs_at_different_lengths_equals_one_run_over_all():
    """Runs at 450 and at 600 merge into what one run at both would have measured, cell for cell."""
    whole = oracle_run([450, 600])
    merged = suite.merge([oracle_run([600]), oracle_run([450])])
    assert merged["contexts"] == [450, 600] and merged["models"] == ["echo", "mute"]
    assert merged["accuracy"] == whole["accuracy"] and merged["pooled"] == whole["pooled"]
    assert sorted(map(json.dumps, merged["trials_run"])) == sorted(map(json.dumps, whole["trials_run"]))
    assert suite.merge([oracle_run([450], formats=["chat"]), oracle_run([450])])["formats"] == ["chat", "raw"]


@pytest.mark.parametrize("other, message", [
    (dict(contexts=[600], trials=3), "differ in trials"),  # other depths: not the same prompts
    (dict(contexts=[600], seed=2), "differ in seed"),
    (dict(contexts=[450]), "same cells"),                  # measured twice
])
def test_merging_refuses_runs_that_are_not_of_one_suite(other, message):
    with pytest.raises(ValueError, match=message):
        suite.merge([oracle_run([450]), oracle_run(**other)])


def test_cli_merges_suite_files(tmp_path):
    for context in (450, 600):
        suite.write(tmp_path / str(context), oracle_run([context]))
    main(["--suite-merge", str(tmp_path / "450" / "suite.json"), str(tmp_path / "600" / "suite.json"), "--out",
          str(tmp_path / "merged")])
    merged = json.loads((tmp_path / "merged" / "suite.json").read_text())
    assert merged["contexts"] == [450, 600] and merged["pooled"]["echo"]["600"]["hits"] == 2
    assert (tmp_path / "merged" / "suite.png").stat().st_size > 1000


def test_cli_refuses_runs_that_do_not_merge_with_a_message(tmp_path, capsys):
    """Runs of different suites, or a file that is not there, end in a one-line usage error, not a traceback."""
    suite.write(tmp_path / "a", oracle_run([450]))
    suite.write(tmp_path / "b", {**oracle_run([600]), "seed": 7})
    for files in (["a/suite.json", "b/suite.json"], ["a/suite.json", "missing.json"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--suite-merge", *(str(tmp_path / f) for f in files), "--out", str(tmp_path / "merged")])
        assert exit_info.value.code == 2
    errors = capsys.readouterr().err
    assert "the runs differ in seed" in errors and "missing.json" in errors and "Traceback" not in errors


def test_runs_without_prose_documents_merge(tmp_path):
    """A RULER run (eval/ruler.py) has no held-out prose documents; its runs join as the suite's do."""
    runs = [{key: value for key, value in oracle_run([context]).items() if key != "prose_documents"}
            for context in (450, 600)]
    merged = suite.merge(runs)
    assert merged["contexts"] == [450, 600] and "prose_documents" not in merged
    with pytest.raises(ValueError, match="differ in prose_documents"):
        suite.merge([oracle_run([450]), runs[1]])


def test_merged_ruler_runs_keep_what_does_not_run_offline(tmp_path):
    """RULER's runs carry `not_offline`: merged, they keep it and are written as ruler.{json,png}; a RULER run
    and a suite run never join."""
    ruler_runs = [{**{key: value for key, value in oracle_run([context]).items() if key != "prose_documents"},
                   "not_offline": {"niah_single_2": "essay haystack"}} for context in (450, 600)]
    for context, run in zip((450, 600), ruler_runs):
        suite.write(tmp_path / str(context), run)
    main(["--suite-merge", str(tmp_path / "450" / "ruler.json"), str(tmp_path / "600" / "ruler.json"), "--out",
          str(tmp_path / "merged")])
    merged = json.loads((tmp_path / "merged" / "ruler.json").read_text())
    assert merged["not_offline"] == {"niah_single_2": "essay haystack"} and merged["contexts"] == [450, 600]
    assert not (tmp_path / "merged" / "suite.json").exists()
    with pytest.raises(ValueError, match="differ in not_offline"):
        suite.merge([oracle_run([450]), ruler_runs[1]])


def test_ruler_runs_compare_prompt_by_prompt(tmp_path):
    """RULER's trials (eval/ruler.record) have no depth or source and a list of answers; two RULER runs of the
    same samples still compare prompt by prompt, from the command line too."""
    def ruler_run(adapter, hits):
        records = [{"model": "converted", "task": "niah_single_1", "format": "raw", "context": 1024,
                    "prompt_tokens": 1000 + i, "answer": [str(1234567 + i)], "output": "", "hit": hit}
                   for i, hit in enumerate(hits)]
        return {"adapter": adapter, "models": ["converted"], "contexts": [1024], "tasks": ["niah_single_1"],
                "formats": ["raw"], "trials": len(hits), "new_tokens": 40, "seed": 0, "not_offline": {},
                **suite.summarize(records), "trials_run": records}

    a, b = ruler_run("s7", [True, True, False, True]), ruler_run("s9", [True, False, True, True])
    assert suite.compare(a, b)["pooled"]["converted"]["1024"] == {"trials": 4, "hits_a": 3, "hits_b": 3,
                                                                  "only_a": 1, "only_b": 1, "p": 1.0}
    for name, run in (("a", a), ("b", b)):
        suite.write(tmp_path / name, run)
    main(["--suite-compare", str(tmp_path / "a" / "ruler.json"), str(tmp_path / "b" / "ruler.json"), "--out",
          str(tmp_path / "compared")])
    assert json.loads((tmp_path / "compared" / "suite_compare.json").read_text())["b"] == "s9"


def test_run_measures_only_the_models_asked_for(monkeypatch, tmp_path):
    """`--suite-models converted`: only that model is asked of the loader, and only it runs."""
    from types import SimpleNamespace

    from tptt_runtime.eval import run as run_module

    asked = []
    converted = SimpleNamespace(config=SimpleNamespace(window=16, sinks=2), tokenizer=CharTokenizer())

    def load_models(adapter, names):
        asked.append(list(names))
        return converted, [SimpleNamespace(name=name, max_len=None, greedy=Echo().greedy) for name in names]

    monkeypatch.setattr(run_module, "load_models", load_models)
    results = suite.run("default", [450], 2, ["passkey"], ["raw"], 8, 1, tmp_path, ["converted"])
    assert asked == [["converted"]]
    assert results["models"] == ["converted"] and {r["model"] for r in results["trials_run"]} == {"converted"}


def test_load_models_loads_only_the_models_named(monkeypatch):
    """A run of the converted model alone loads no base weights beside it (the base / window-only loaders are
    never called), and the three come in the order base, window-only, converted when all are asked."""
    from types import SimpleNamespace

    from tptt_runtime.eval import run as run_module

    calls = []
    config = SimpleNamespace(base_model="base-dir", window=16, sinks=2)

    def load(source, **overrides):
        calls.append(("load", source, tuple(sorted(overrides))))
        return SimpleNamespace(config=config, hf=None, tokenizer=None)  # no EOS ids

    def load_base_model(source):
        calls.append(("load_base_model", source))
        return SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64))

    monkeypatch.setattr(run_module, "load", load)
    monkeypatch.setattr(run_module, "load_base_model", load_base_model)
    monkeypatch.setattr(run_module, "base_directory", lambda source: f"/models/{source}")
    _, models = run_module.load_models("adapter-dir", ["converted"])
    assert [m.name for m in models] == ["converted"] and calls == [("load", "adapter-dir", ())]
    calls.clear()
    _, models = run_module.load_models("adapter-dir")
    assert [m.name for m in models] == list(suite.MODELS)
    assert calls == [("load", "adapter-dir", ()), ("load_base_model", "base-dir"),
                     ("load", "/models/base-dir", ("mag_weight", "sinks", "window"))]


@pytest.mark.parametrize("only_a, only_b, p", [
    (0, 0, 1.0),
    (3, 3, 1.0),                                    # P(X <= 3) = 42 / 64 for n = 6: doubled past 1
    (0, 5, 2 / 32),                                 # the most uneven split of 5: both tails of Binomial(5, 1/2)
    (8, 1, 2 * (1 + 9) / 2 ** 9),                   # P(X <= 1) = (C(9,0) + C(9,1)) / 2^9, doubled
    (6, 4, 2 * (1 + 10 + 45 + 120 + 210) / 2 ** 10),
])
def test_sign_test_against_binomial_tails_by_hand(only_a, only_b, p):
    assert suite.sign_test(only_a, only_b) == pytest.approx(p)
    assert suite.sign_test(only_b, only_a) == pytest.approx(p)


def with_misses(run, context, count):
    """`run` with its first `count` trials at `context` scored as misses, summarized again."""
    records = [dict(r) for r in run["trials_run"]]
    for record in [r for r in records if r["context"] == context][:count]:
        record["hit"] = False
    return {**run, "adapter": "other", **suite.summarize(records), "trials_run": records}


def test_comparing_two_runs_counts_the_prompts_only_one_side_found():
    a = oracle_run([450, 600], trials=3, models=(Echo(),), tasks=["passkey", "docqa"])
    b = with_misses(a, 450, 4)  # passkey's 3 and docqa's first
    comparison = suite.compare(a, b)
    assert comparison["a"] == "default" and comparison["b"] == "other"
    assert comparison["pooled"]["echo"]["450"] == {"trials": 6, "hits_a": 6, "hits_b": 2, "only_a": 4,
                                                   "only_b": 0, "p": 2 / 16}
    assert comparison["cells"]["echo"]["450"]["docqa / raw"]["only_a"] == 1
    assert comparison["pooled"]["echo"]["600"]["p"] == 1.0 and comparison["pooled"]["echo"]["600"]["only_b"] == 0
    reverse = suite.compare(b, a)["pooled"]["echo"]["450"]
    assert (reverse["only_a"], reverse["only_b"], reverse["p"]) == (0, 4, 2 / 16)


@pytest.mark.parametrize("other, message", [
    (dict(contexts=[450], seed=2), "differ in seed"),     # other keys: not the same prompts
    (dict(contexts=[450], trials=3), "differ in trials"),  # other depths
    (dict(contexts=[600]), "share no trial"),
])
def test_comparing_refuses_runs_not_asked_the_same_prompts(other, message):
    with pytest.raises(ValueError, match=message):
        suite.compare(oracle_run([450]), oracle_run(**other))


def test_comparing_two_models_sets_them_side_by_side_on_the_same_prompts(tmp_path, capsys):
    """The echo model of one run (every answer found) against the mute model of another (none found)."""
    a, b = oracle_run([450], trials=3, models=(Echo(),)), oracle_run([450], trials=3, models=(Mute(),))
    pooled = suite.compare(a, b, models=("echo", "mute"))["pooled"]
    assert pooled == {"echo against mute": {"450": {"trials": 3, "hits_a": 3, "hits_b": 0, "only_a": 3,
                                                    "only_b": 0, "p": 2 / 8}}}
    with pytest.raises(ValueError, match="share no trial"):  # by default, each model against its namesake only
        suite.compare(a, b)
    for name, run in (("a", a), ("b", b)):
        suite.write(tmp_path / name, run)
    main(["--suite-compare", str(tmp_path / "a" / "suite.json"), str(tmp_path / "b" / "suite.json"),
          "--compare-models", "echo", "mute", "--out", str(tmp_path / "compared")])
    assert "echo against mute" in capsys.readouterr().out
    with pytest.raises(ValueError, match="has no trials of model 'base'; it has \\['mute'\\]"):
        suite.compare(a, b, models=("echo", "base"))


def test_comparing_refuses_a_run_that_holds_a_trial_twice():
    a = oracle_run([450])
    with pytest.raises(ValueError, match="twice"):
        suite.compare(a, {**a, "trials_run": a["trials_run"] * 2})


def test_cli_compares_suite_files(tmp_path, capsys):
    a = oracle_run([450], models=(Echo(),))
    for name, run in (("a", a), ("b", with_misses(a, 450, 2))):
        suite.write(tmp_path / name, run)
    main(["--suite-compare", str(tmp_path / "a" / "suite.json"), str(tmp_path / "b" / "suite.json"), "--out",
          str(tmp_path / "compared")])
    compared = json.loads((tmp_path / "compared" / "suite_compare.json").read_text())
    assert compared["pooled"]["echo"]["450"]["only_a"] == 2
    assert "2 / 0 (2 / 0) p 0.50" in capsys.readouterr().out
    assert (tmp_path / "compared" / "suite_compare.png").stat().st_size > 1000



def test_converted_greedy_ends_at_its_first_eos(tiny_models):
    """A continuation ends with the first EOS token, as the server's and Hugging Face generate's (the base's)
    do: a chat model's answer is not scored with the turns it would invent after it."""
    converted = tiny_models[2]
    prompt = list(range(3, 40))
    free = converted.greedy(prompt, 12)
    assert len(free) == 12
    default_stops, converted.stop_ids = converted.stop_ids, {free[4]}
    try:
        assert converted.greedy(prompt, 12) == free[:free.index(free[4]) + 1]
    finally:
        converted.stop_ids = default_stops
