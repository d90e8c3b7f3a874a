"""`tptt-eval --suite`: held-out needle retrieval (eval/needles.py), models side by side, with confidence intervals.

For each context length, task (passkey, multikey, docqa) and format (raw, chat): `trials` prompts, the asked
fact at depths spread evenly over 0..1, the task's filler sources in turn. Each model continues each prompt
greedily for `new_tokens` tokens (24 by default: tokenizers that split numbers into single digits spend 7 on
a key, and chat answers tend to restate the question first). A trial is a hit when the answer is in the
continuation and no other key of the same document is (needles.found: listing every key is no hit).
Reported per model, task, format and context: hits / trials, accuracy and its 95 % Wilson score interval; and
the same pooled over tasks and formats. A model with a `max_len` (the base model: full attention only up to
its trained positions) skips the contexts beyond it. Table on stdout, <out>/suite.json (every trial, with its
continuation) and <out>/suite.png. `tptt-eval --suite-merge a/suite.json b/suite.json` joins runs of the same
suite made at different lengths (one length can take hours on a CPU) into one such result. `tptt-eval
--suite-compare a/suite.json b/suite.json` sets two runs on the same prompts (two adapters, say) side by side,
prompt by prompt: what each found that the other missed, and an exact sign test on those
(<out>/suite_compare.{json,png}).

Boundaries: prompts come from needles.py, models from the wrappers of eval/run.py (`greedy(ids, n)`, `name`,
`max_len`); this module only schedules, scores and reports.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

from tqdm import tqdm

from ..bench import report
from . import needles

MODELS = ("base", "window-only", "converted")  # what eval/run.py's load_models loads, by name, in its order
CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)  # 65536 on request
TRIALS = 20
NEW_TOKENS = 24
Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson(hits: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % at the default z); (0, 1) without trials."""
    if trials == 0:
        return 0.0, 1.0
    p, z2 = hits / trials, z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    # at 0 or all hits a bound is exactly 0 or 1, which centre -/+ half only reaches up to rounding
    return (0.0 if hits == 0 else centre - half), (1.0 if hits == trials else centre + half)


def context_tokens(text: str) -> int:
    """A context length from the command line: 4096, 4k (= 4096) or 64K."""
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def runs_at(models, context: int) -> list:
    """The models that run at `context`: all but those whose max_len is below it."""
    return [m for m in models if m.max_len is None or context <= m.max_len]


def trial(model, probe: needles.Probe, context: int, tokenizer, new_tokens: int) -> dict:
    """One greedy continuation of one prompt (asked for at `context` tokens), scored."""
    output = tokenizer.decode(model.greedy(probe.ids, new_tokens), skip_special_tokens=True)
    return {"model": model.name, "task": probe.task, "format": probe.format, "context": context,
            "prompt_tokens": len(probe.ids), "source": probe.source, "depth": probe.depth, "answer": probe.answer,
            "others": list(probe.others), "output": output, "hit": needles.found(output, probe.answer, probe.others),
            "names_another": needles.names_another(output, probe.others)}


def evaluate(models, tokenizer, contexts, trials: int, tasks=needles.TASKS, formats=needles.FORMATS,
             new_tokens: int = NEW_TOKENS, seed: int = 0) -> list[dict]:
    """Every (context, task, format, trial, model) once: a list of trial records."""
    cells = [(c, t, f) for c in contexts for t in tasks for f in formats]
    records = []
    with tqdm(total=sum(trials * len(runs_at(models, c)) for c, _, _ in cells), desc="suite") as bar:
        for context, task, fmt in cells:
            for probe in needles.probes(tokenizer, task, fmt, context, trials, seed):
                for model in runs_at(models, context):
                    records.append(trial(model, probe, context, tokenizer, new_tokens))
                    bar.update()
    return records


def cell(records: list[dict]) -> dict:
    """hits, trials, accuracy and 95 % Wilson interval of some trial records."""
    hits = sum(r["hit"] for r in records)
    return {"hits": hits, "trials": len(records), "accuracy": hits / len(records),
            "ci95": list(wilson(hits, len(records)))}


def summarize(records: list[dict]) -> dict:
    """{"accuracy": {task: {format: {model: {context: cell}}}}, "pooled": {model: {context: cell}}}."""
    accuracy: dict = {}
    pooled: dict = {}
    for r in records:
        by_model = accuracy.setdefault(r["task"], {}).setdefault(r["format"], {}).setdefault(r["model"], {})
        by_model.setdefault(str(r["context"]), []).append(r)
        pooled.setdefault(r["model"], {}).setdefault(str(r["context"]), []).append(r)
    return {"accuracy": _cells(accuracy), "pooled": _cells(pooled)}


def _cells(tree):
    """`tree` with each list of trial records replaced by its cell."""
    return cell(tree) if isinstance(tree, list) else {key: _cells(value) for key, value in tree.items()}


def measure(models, tokenizer, contexts, trials: int, tasks=needles.TASKS, formats=needles.FORMATS,
            new_tokens: int = NEW_TOKENS, seed: int = 0) -> dict:
    """The run's settings, its summary (accuracy per cell, pooled) and every trial."""
    records = evaluate(models, tokenizer, contexts, trials, tasks, formats, new_tokens, seed)
    return {**settings(models, contexts, trials, tasks, formats, new_tokens, seed), **summarize(records),
            "trials_run": records}


def settings(models, contexts, trials, tasks, formats, new_tokens, seed) -> dict:
    """What a run was asked to do, and the held-out documents its prose came from."""
    return {"models": [m.name for m in models], "contexts": list(contexts), "trials": trials,
            "tasks": list(tasks), "formats": list(formats), "new_tokens": new_tokens, "seed": seed,
            "prose_documents": [path for path, _ in needles.held_out_documents()]}


# what makes two runs ask the same prompts (at a context both ran) and score them the same way, whatever the adapter
SAME_PROMPTS = ("trials", "new_tokens", "seed", "prose_documents")
# ... and what makes them runs of one suite, to be joined into one table (RULER's runs, eval/ruler.py, carry
# `not_offline`, the suite's do not: the two never join)
SAME_IN_EVERY_RUN = ("adapter", "window", "sinks", "not_offline") + SAME_PROMPTS
# what tells one trial's prompt from another's within a run, beside the model (RULER's trials have no depth or
# source, and a list of answers)
PROMPT_KEYS = ("task", "format", "context", "prompt_tokens", "depth", "source", "answer")


def _require_same(runs: list[dict], keys, what: str) -> None:
    for key in keys:
        values = {json.dumps(run.get(key)) for run in runs}
        if len(values) > 1:
            raise ValueError(f"the runs differ in {key}: {sorted(values)}; only runs of the same suite {what}")


def merge(runs: list[dict]) -> dict:
    """One result from several runs of the same suite (the same settings in SAME_IN_EVERY_RUN, so the same
    prompts at each context) over different contexts, tasks, formats or models: their trials together,
    summarized again. A run measured over hours at a few lengths at a time becomes one table. Raises
    ValueError when the settings differ or two runs measured the same cell (model, task, format, context)."""
    if not runs:
        raise ValueError("nothing to merge")
    _require_same(runs, SAME_IN_EVERY_RUN, "merge")
    records, measured = [], set()
    for run in runs:
        cells = {(r["model"], r["task"], r["format"], r["context"]) for r in run["trials_run"]}
        if cells & measured:
            raise ValueError(f"two runs measured the same cells (model, task, format, context): "
                             f"{sorted(cells & measured)}")
        measured |= cells
        records += run["trials_run"]
    return {**{key: runs[0][key] for key in SAME_IN_EVERY_RUN if key in runs[0]}, "models": _union(runs, "models"),
            "contexts": sorted(_union(runs, "contexts")), "tasks": _union(runs, "tasks"),
            "formats": _union(runs, "formats"), **summarize(records), "trials_run": records}


def sign_test(only_a: int, only_b: int) -> float:
    """Exact two-sided p-value of the sign test on the pairs where exactly one side hit (McNemar's exact test):
    how likely a split at least this uneven is if either side is as likely to win each such pair."""
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare(a: dict, b: dict, models: tuple[str, str] | None = None) -> dict:
    """Run `b` against run `a` trial by trial, on the prompts both asked (same model name, task, format, context,
    prompt length, depth, source and answer). Two runs on the same prompts tell more than their intervals: pairs
    that both find or both miss say nothing about which is better, so the test weighs only the prompts one of them
    found. `models` (a model of a, a model of b) sets those two side by side instead of each model with its
    namesake: the converted model against the base model's run on the same prompts, say.
    {"a": adapter, "b": adapter, "cells": {model: {context: {"task / format": pair}}},
    "pooled": {model: {context: pair}}}, each pair {trials, hits_a, hits_b, only_a, only_b, p}.
    Raises ValueError when the runs were asked different prompts or share no trial."""
    _require_same([a, b], SAME_PROMPTS, "compare")
    label = models and f"{models[0]} against {models[1]}"
    trials_a, trials_b = (_trials(run, name, label) for run, name in zip((a, b), models or (None, None)))
    cells: dict = {}
    pooled: dict = {}
    for key, r in trials_a.items():
        if key not in trials_b:
            continue
        pair, model = (r["hit"], trials_b[key]["hit"]), key[0]
        by_context = cells.setdefault(model, {}).setdefault(str(r["context"]), {})
        by_context.setdefault(f"{r['task']} / {r['format']}", []).append(pair)
        pooled.setdefault(model, {}).setdefault(str(r["context"]), []).append(pair)
    if not pooled:
        raise ValueError("the runs share no trial (model, task, format, context and prompt)")
    return {"a": a["adapter"], "b": b["adapter"], "cells": _pairs(cells), "pooled": _pairs(pooled)}


def _trials(run: dict, model: str | None, label: str | None) -> dict:
    """{(model, prompt...): record} of a run's trials; with `model`, only that model's, named `label`."""
    records = [r for r in run["trials_run"] if model in (None, r["model"])]
    if not records:
        raise ValueError(f"the run of {run['adapter']} has no trials of model {model!r}; it has "
                         f"{sorted({r['model'] for r in run['trials_run']})}")
    trials = {(label or r["model"],) + _prompt(r): r for r in records}
    if len(trials) != len(records):
        raise ValueError("a run holds the same trial twice (model, task, format, context and prompt)")
    return trials


def _prompt(record: dict) -> tuple:
    """The record's PROMPT_KEYS, None for those it lacks, lists as tuples (hashable)."""
    return tuple(tuple(value) if isinstance(value, list) else value for value in map(record.get, PROMPT_KEYS))


def _pairs(tree):
    """`tree` with each list of (hit in a, hit in b) replaced by its counts and sign test."""
    if isinstance(tree, dict):
        return {key: _pairs(value) for key, value in tree.items()}
    only_a, only_b = sum(x and not y for x, y in tree), sum(y and not x for x, y in tree)
    return {"trials": len(tree), "hits_a": sum(x for x, _ in tree), "hits_b": sum(y for _, y in tree),
            "only_a": only_a, "only_b": only_b, "p": sign_test(only_a, only_b)}


def write_comparison(out_dir: Path, comparison: dict) -> None:
    report.write(out_dir, "suite_compare", comparison, comparison_figure(comparison), comparison_table(comparison))


def comparison_table(comparison: dict) -> str:
    lines = [f"a = {comparison['a']}, b = {comparison['b']}, the same prompts: hits a / b, "
             "(found only by a / only by b), exact sign test p"]
    for model, by_context in comparison["pooled"].items():
        contexts = sorted(by_context, key=int)
        rows = [("all tasks", by_context)] + [
            (name, {c: comparison["cells"][model][c].get(name) for c in contexts})
            for name in dict.fromkeys(n for c in contexts for n in comparison["cells"][model][c])]
        width = max(14, *(len(name) for name, _ in rows))  # RULER's task names are longer than the suite's
        lines.append(f"{model:<{width + 2}}" + "".join(f"{c:>28}" for c in contexts))
        for name, row in rows:
            lines.append(f"  {name:<{width}}" + "".join(f"{_pair_text(row.get(c)):>28}" for c in contexts))
    return "\n".join(lines)


def _pair_text(pair: dict | None) -> str:
    if pair is None:
        return "-"
    return f"{pair['hits_a']} / {pair['hits_b']} ({pair['only_a']} / {pair['only_b']}) p {pair['p']:.2f}"


def comparison_figure(comparison: dict):
    """A row per model, a column per context: the prompts only a found (left) and only b found (right), per cell."""
    models = list(comparison["cells"])
    contexts = sorted({c for by_context in comparison["cells"].values() for c in by_context}, key=int)
    fig, axes = report.subplots(len(models), len(contexts), figsize=(4.5 * len(contexts), 4 * len(models)),
                                squeeze=False)
    for (row, model), (column, context) in itertools.product(enumerate(models), enumerate(contexts)):
        axis, cells = axes[row][column], comparison["cells"][model].get(context)
        if cells is None:
            axis.set_axis_off()
            continue
        names = list(cells)
        axis.barh(names, [-cells[n]["only_a"] for n in names], color="C0", label=f"only a ({comparison['a']})")
        axis.barh(names, [cells[n]["only_b"] for n in names], color="C1", label=f"only b ({comparison['b']})")
        axis.axvline(0, color="black", linewidth=0.8)
        pooled = comparison["pooled"][model][context]
        axis.set_title(f"{model}, {context} tokens: {pooled['only_a']} / {pooled['only_b']}, p {pooled['p']:.2f}")
        axis.set_xlabel("prompts found by one side only")
        axis.legend(fontsize=7)
    return fig


def _union(runs: list[dict], key: str) -> list:
    """The items of every run's list `key`, each once, in order of first appearance."""
    return list(dict.fromkeys(item for run in runs for item in run[key]))


def write(out_dir: Path, results: dict) -> None:
    """<out>/suite.{json,png}, or ruler.{json,png} for RULER's results (those that list `not_offline`)."""
    name = "ruler" if "not_offline" in results else "suite"
    report.write(out_dir, name, results, figure(results), table(results))


def run(adapter: str, contexts, trials: int, tasks, formats, new_tokens: int, seed: int, out_dir: Path,
        models=MODELS) -> dict:
    """Load base / window-only / converted for `adapter` (eval/run.py), measure those named in `models`, write
    <out>/suite.{json,png}."""
    from .run import load_models

    converted, models = load_models(adapter, models)
    results = {"adapter": adapter, "window": converted.config.window, "sinks": converted.config.sinks,
               **measure(models, converted.tokenizer, contexts, trials, tasks, formats, new_tokens, seed)}
    write(out_dir, results)
    return results


def _cell_text(c: dict | None) -> str:
    return "-" if c is None else f"{c['accuracy']:.2f} [{c['ci95'][0]:.2f},{c['ci95'][1]:.2f}]"


def _rows(lines: list[str], title: str, by_model: dict, models, contexts, width: int) -> None:
    lines.append(f"{title:<{width}}" + "".join(f"{c:>18}" for c in contexts))
    for name in models:
        row = by_model.get(name, {})
        lines.append(f"  {name:<{width - 2}}" + "".join(f"{_cell_text(row.get(str(c))):>18}" for c in contexts))


def table(results: dict) -> str:
    models, contexts = results["models"], results["contexts"]
    cells = [(f"{task} / {fmt}", results["accuracy"].get(task, {}).get(fmt, {}))
             for task in results["tasks"] for fmt in results["formats"]] + [("all tasks", results["pooled"])]
    width = max(16, *(len(title) for title, _ in cells))  # RULER's task names are longer than the suite's
    lines = [f"needle suite: {results['trials']} trials per cell, {results['new_tokens']} new tokens, "
             f"seed {results['seed']}; accuracy [95 % Wilson interval]; - = not run"]
    for title, by_model in cells:
        _rows(lines, title, by_model, models, contexts, width)
    return "\n".join(lines)


def figure(results: dict):
    tasks = results["tasks"]
    fig, axes = report.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False)
    colors = {name: f"C{i}" for i, name in enumerate(results["models"])}
    series = [(fmt, style, name) for fmt, style in zip(results["formats"], ("o-", "s--")) for name in colors]
    for axis, task in zip(axes[0], tasks):
        for i, (fmt, style, name) in enumerate(series):
            row = results["accuracy"].get(task, {}).get(fmt, {}).get(name)
            if not row:
                continue
            xs = sorted(int(c) for c in row)
            ys = [row[str(x)]["accuracy"] for x in xs]
            errors = [[y - row[str(x)]["ci95"][0] for x, y in zip(xs, ys)],
                      [row[str(x)]["ci95"][1] - y for x, y in zip(xs, ys)]]
            dodge = 2 ** (0.03 * (i - (len(series) - 1) / 2))  # side by side, so the intervals stay readable
            axis.errorbar([x * dodge for x in xs], ys, yerr=errors, fmt=style, color=colors[name], capsize=3,
                          label=f"{name} ({fmt})")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context tokens")
        axis.set_ylabel("accuracy (95 % Wilson)")
        axis.set_ylim(-0.05, 1.05)
        axis.set_title(task)
        axis.legend(fontsize=7)
    return fig
