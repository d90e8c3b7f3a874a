"""`tptt-eval --ruler`: RULER's needle tasks from lm-evaluation-harness, the converted model through the server.

The converted model is served by `python -m server` on loopback (bench/serving.py) and scored through lm-eval's
own `local-completions` backend, the path a user's harness takes. The base model (full attention, only up to
its trained length) and window-only run in this process through `GreedyLM`, an lm-eval model over eval/run.py's
wrappers. lm-eval seeds Python's `random` (seed 0) in every `simple_evaluate`, so each model gets the same
samples.

Which RULER needle tasks run offline (eval/run.py's `RULER_TASKS`): their haystacks are generated (a repeated
sentence, or other needles), with words from the `wonderwords` package (lm_eval's `ruler` extra). Those that do
not, and why, are in `NOT_OFFLINE`. RULER's format only: a raw-text prompt ending in an answer lead-in; the held-out
suite (eval/suite.py) has the chat format. Greedy continuations of `new_tokens` tokens; a sample is a hit when
every asked value is in it (RULER's string_match_all). Records, table and figure are the suite's, so the
numbers read the same: accuracy with its 95 % Wilson interval per task and length, and pooled.

Boundaries: lm-eval makes and scores the samples; this module runs the models, turns lm-eval's logged samples
into suite records and reports.
"""

from __future__ import annotations

import os
from pathlib import Path

import lm_eval  # a dev dependency, with its `ruler` extra: eval/run.py imports this module only for --ruler
from lm_eval.api.model import LM
from lm_eval.models.openai_completions import LocalCompletionsAPI
from tqdm import tqdm

from . import suite

NOT_OFFLINE = {
    "niah_single_2": "essay haystack: the Hub dataset baber/paul_graham_essays and NLTK's punkt_tab",
    "niah_single_3": "essay haystack (as niah_single_2)",
    "niah_multikey_1": "essay haystack (as niah_single_2)",
    "niah_multiquery": "essay haystack (as niah_single_2)",
    "niah_multivalue": "essay haystack (as niah_single_2)",
}
NEW_TOKENS = 40  # a RULER answer: a 7-digit number (7 tokens here) or a UUID (about 30)
TRIALS = 20


class GreedyLM(LM):
    """An in-process model of eval/run.py (`greedy(ids, n)`, `name`) as an lm-eval generator: greedy, ended at
    the first of `stop_ids` (EOS, as the server ends it) and cut at the task's stop strings."""

    def __init__(self, model, tokenizer, stop_ids=()):
        super().__init__()
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, set(stop_ids)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [self._continue(*request.args) for request in tqdm(requests, desc=self.model.name,
                                                                 disable=disable_tqdm)]

    def _continue(self, context: str, kwargs: dict) -> str:
        ids = self.model.greedy(self.tokenizer(context)["input_ids"], kwargs.get("max_gen_toks", NEW_TOKENS))
        ends = [i for i, token in enumerate(ids) if token in self.stop_ids]
        text = self.tokenizer.decode(ids[:ends[0]] if ends else ids, skip_special_tokens=True)
        for stop in kwargs.get("until") or []:
            text = text.split(stop)[0]
        return text

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("RULER's needle tasks only generate")

    loglikelihood_rolling = loglikelihood


def evaluate(lm, name: str, tokenizer_dir: str, tasks, context: int, trials: int, new_tokens: int) -> list[dict]:
    """One lm-eval run of `tasks` at `context` tokens, `trials` samples each: suite records of model `name`."""
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), limit=trials, log_samples=True, gen_kwargs={"max_gen_toks": new_tokens},
        metadata={"tokenizer": tokenizer_dir, "max_seq_lengths": [context]})
    return [record(sample, name, task, context) for task in tasks for sample in results["samples"][task]]


def record(sample: dict, name: str, task: str, context: int) -> dict:
    """A suite trial record from one of lm-eval's logged samples (its score is keyed by the context length)."""
    doc = sample["doc"]
    output = sample["filtered_resps"][0] if isinstance(sample["filtered_resps"], list) else sample["filtered_resps"]
    return {"model": name, "task": task, "format": "raw", "context": context, "prompt_tokens": doc["length"],
            "answer": doc["outputs"], "output": output, "hit": sample[str(doc["max_length"])] == 1.0}


def served_lm(url: str, model_name: str, context: int, new_tokens: int):
    """lm-eval's `local-completions` backend on our server, with the server's own tokenizer (/tokenize)."""
    return LocalCompletionsAPI(model=model_name, base_url=f"{url}/v1/completions", tokenizer_backend="remote",
                               tokenized_requests=True, num_concurrent=1, max_retries=1,
                               max_length=context + new_tokens + 64)


def run(adapter: str, contexts, trials: int, tasks, new_tokens: int, out_dir: Path, models=suite.MODELS) -> dict:
    """Those of `models` asked for: base and window-only in process, the adapter ("converted") through a server
    it starts; writes <out>/ruler.{json,png}. Runs of some models each join with `tptt-eval --suite-merge`."""
    import httpx

    from ..bench.serving import served
    from ..engine.engine import eos_token_ids
    from ..loading import base_directory
    from .run import load_models

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("OPENAI_API_KEY", "unused")
    converted, in_process = load_models(adapter, [name for name in models if name != "converted"])
    tokenizer, tokenizer_dir = converted.tokenizer, str(base_directory(converted.config.base_model or "default"))
    records, stop_ids = [], eos_token_ids(converted)
    for context in contexts:
        for model in suite.runs_at(in_process, context):
            lm = GreedyLM(model, tokenizer, stop_ids)
            records += evaluate(lm, model.name, tokenizer_dir, tasks, context, trials, new_tokens)
    if "converted" in models:
        with served("--model", adapter, "--dtype", "float32") as server:
            served_name = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
            for context in contexts:
                lm = served_lm(server.url, served_name, context, new_tokens)
                records += evaluate(lm, "converted", tokenizer_dir, tasks, context, trials, new_tokens)
    results = {"adapter": adapter, "window": converted.config.window, "sinks": converted.config.sinks,
               "models": [name for name in suite.MODELS if name in models], "contexts": list(contexts),
               "trials": trials, "tasks": list(tasks), "formats": ["raw"], "new_tokens": new_tokens, "seed": 0,
               "not_offline": NOT_OFFLINE, **suite.summarize(records), "trials_run": records}
    suite.write(out_dir, results)
    return results
