"""`tptt-eval`: a converted model against its base, three models side by side, one run.

    base         the unconverted model, full attention (only up to its trained length)
    window-only  the base weights restricted to the same window + sinks, no memory (mag_weight = 0)
    converted    the adapter under test

Measures (a) mean KL to the base per token on held-out text at --kl-contexts, overall and by position (the
first sinks + window positions, then spans that end at powers of two), (b) passkey retrieval at
--passkey-contexts (depths 0.1 / 0.5 / 0.9), (c) top-1 agreement with the base's greedy continuation of held-out
chat prompts (teacher-forced over its first 16 tokens). Table on stdout, JSON + PNG in --out.

`--suite` runs the held-out needle suite instead (eval/suite.py: passkey, multi-key and document QA in wording
no training text uses, raw and chat formats, accuracy with 95 % Wilson intervals); `--probe` the recall probe
(eval/recall.py); `--ruler` RULER's needle tasks from lm-evaluation-harness, the adapter through the server
(eval/ruler.py).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..bench import report
from ..engine.engine import eos_token_ids
from ..loading import base_directory, load, load_base_model
from ..train import data
from . import suite
from .passkey import passkey_found, passkey_prompt

CHAT_PROMPTS = ["How do I boil an egg?", "Give me three tips for better sleep.", "What is photosynthesis?",
                "Write a haiku about autumn.", "Explain what a prime number is.", "What should I pack for a hike?",
                "Why is the sky blue?", "Suggest a name for a black cat.", "How does a bicycle stay upright?",
                "What is the difference between weather and climate?"]
DEPTHS = (0.1, 0.5, 0.9)
RULER_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3")  # those that run offline (eval/ruler.py)
AGREEMENT_TOKENS = 16


class Base:
    """The unconverted model with full attention."""
    name = "base"

    def __init__(self, hf, max_len: int):
        self.hf, self.max_len = hf, max_len

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()

    @torch.inference_mode()
    def greedy(self, ids: list[int], n: int) -> list[int]:
        prompt = torch.tensor([ids])
        out = self.hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                               pad_token_id=0)
        return out[0, len(ids):].tolist()


class Converted:
    """A TitansModel (window-only or with memory), through the serving code paths. Its greedy continuation ends
    at an EOS token, as the server's and Hugging Face generate's (the base's) do."""

    def __init__(self, model, name: str):
        self.model, self.name, self.max_len = model, name, None
        self.stop_ids = eos_token_ids(model)

    def logits(self, ids: list[int]) -> torch.Tensor:
        state = self.model.new_session()
        return self.model.prefill(state, ids, all_logits=True)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        state, out = self.model.new_session(), []
        logits = self.model.prefill(state, ids)
        for _ in range(n):
            out.append(int(logits.argmax()))
            if out[-1] in self.stop_ids:
                break
            logits = self.model.step(state, out[-1])
        return out


def kl_per_position(model_logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """[T]: KL(base || model) in nats at each position."""
    return F.kl_div(model_logits.log_softmax(-1), base_logits.log_softmax(-1), log_target=True,
                    reduction="none").sum(-1)


def position_edges(length: int, exact_span: int) -> list[int]:
    """Where the KL by position splits a `length`-token sequence: the first `exact_span` positions (sinks +
    window, where every earlier token is still attended exactly), then spans ending at each power of two."""
    doublings = [2 ** k for k in range(exact_span.bit_length(), length.bit_length()) if 2 ** k < length]
    return [0] + ([exact_span] if exact_span < length else []) + doublings + [length]


def kl_table(models, base, tokenizer, contexts, per_context: int, exact_span: int) -> tuple[dict, dict]:
    """Mean KL to the base per token at each context, and the same by position (spans of `position_edges`):
    where in a long context the converted model drifts from the base."""
    per_position = {m.name: {} for m in models}
    for length in tqdm(contexts, desc="KL"):
        for ids in data.sequences(tokenizer, length, held_out=True)[:per_context].tolist():
            reference = base.logits(ids)
            for model in models:
                per_position[model.name].setdefault(length, []).append(kl_per_position(model.logits(ids), reference))
    kl, by_position = {}, {}
    for name, rows in per_position.items():
        means = {length: torch.stack(row).mean(0) for length, row in rows.items()}  # over the sequences
        kl[name] = {str(length): row.mean().item() for length, row in means.items()}
        by_position[name] = {str(length): {f"{a}-{b}": row[a:b].mean().item()
                                           for a, b in itertools.pairwise(position_edges(length, exact_span))}
                             for length, row in means.items()}
    return kl, by_position


def passkey_table(models, tokenizer, contexts, trials: int) -> dict:
    results = {m.name: {} for m in models}
    for length in tqdm(contexts, desc="passkey"):
        for model in models:
            if model.max_len is not None and length > model.max_len:
                continue
            hits = []
            for trial in range(trials):
                ids, key = passkey_prompt(tokenizer, length, DEPTHS[trial % len(DEPTHS)], seed=trial)
                hits.append(passkey_found(tokenizer.decode(model.greedy(ids, 8)), key))
            results[model.name][str(length)] = sum(hits) / len(hits)
    return results


def agreement_table(models, base, tokenizer) -> dict:
    results = {m.name: [] for m in models}
    for prompt in tqdm(CHAT_PROMPTS, desc="agreement"):
        ids = list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 add_generation_prompt=True)["input_ids"])
        reference = base.greedy(ids, AGREEMENT_TOKENS)
        full = ids + reference
        for model in models:
            predicted = model.logits(full)[len(ids) - 1:-1].argmax(-1).tolist()
            results[model.name].append(sum(p == r for p, r in zip(predicted, reference)) / len(reference))
    return {name: sum(v) / len(v) for name, v in results.items()}


def load_models(adapter: str, names=suite.MODELS) -> tuple:
    """The converted model (its config and tokenizer serve every run), and those of the three compared that
    `names` asks for, in the order base, window-only, converted; the others are never loaded."""
    converted = load(adapter)
    base_model = converted.config.base_model or "default"
    models = []
    if "base" in names:
        hf = load_base_model(base_model)
        models.append(Base(hf, hf.config.max_position_embeddings))
    if "window-only" in names:
        base_dir = str(base_directory(base_model))  # the base weights, no adapter
        window_only = load(base_dir, window=converted.config.window, sinks=converted.config.sinks, mag_weight=0.0)
        models.append(Converted(window_only, "window-only"))
    if "converted" in names:
        models.append(Converted(converted, "converted"))
    return converted, models


def run(adapter: str, kl_contexts, passkey_contexts, per_context: int, trials: int, out_dir: Path) -> dict:
    converted, models = load_models(adapter)
    base, tokenizer = models[0], converted.tokenizer
    config = converted.config
    kl, kl_by_position = kl_table(models[1:], base, tokenizer, [c for c in kl_contexts if c <= base.max_len],
                                  per_context, config.sinks + config.window)
    results = {"adapter": adapter, "window": config.window, "sinks": config.sinks, "mag_weight": config.mag_weight,
               "kl": kl, "kl_by_position": kl_by_position,
               "passkey": passkey_table(models, tokenizer, passkey_contexts, trials),
               "agreement": agreement_table(models[1:], base, tokenizer)}
    report.write(out_dir, "eval", results, figure(results), table(results))
    return results


def table(results: dict) -> str:
    lines = [f"window {results['window']} + {results['sinks']} sinks, mag_weight {results['mag_weight']}",
             "KL to base (nats/token):"]
    for name, row in results["kl"].items():
        lines.append(f"  {name:<12} " + "  ".join(f"{k}: {v:.3f}" for k, v in row.items()))
    for name, (length, spans) in _longest_kl_by_position(results).items():
        lines.append(f"  {name:<12} by position at {length}: " + "  ".join(f"{k}: {v:.3f}" for k, v in spans.items()))
    lines.append("passkey accuracy:")
    for name, row in results["passkey"].items():
        lines.append(f"  {name:<12} " + "  ".join(f"{k}: {v:.2f}" for k, v in row.items()))
    lines.append("greedy agreement (first 16 tokens, teacher-forced):")
    for name, value in results["agreement"].items():
        lines.append(f"  {name:<12} {value:.2f}")
    return "\n".join(lines)


def _longest_kl_by_position(results: dict) -> dict[str, tuple[str, dict]]:
    """Each model's (context, KL by position) at its longest KL context."""
    return {name: max(rows.items(), key=lambda item: int(item[0]))
            for name, rows in results["kl_by_position"].items() if rows}


def figure(results: dict):
    fig, (left, middle, right) = report.subplots(1, 3, figsize=(16, 4))
    for name, row in results["kl"].items():
        left.plot([int(k) for k in row], list(row.values()), "o-", label=name)
    left.set_xscale("log", base=2)
    left.set_xlabel("context tokens")
    left.set_ylabel("KL to base (nats/token)")
    left.legend()
    for name, (length, spans) in _longest_kl_by_position(results).items():
        ends = [int(span.split("-")[1]) for span in spans]
        middle.step(ends, list(spans.values()), where="pre", marker="o", label=f"{name} ({length} tokens)")
    middle.set_xscale("log", base=2)
    middle.set_xlabel("position (each span up to the marked end)")
    middle.set_ylabel("KL to base (nats/token)")
    middle.legend()
    for name, row in results["passkey"].items():
        right.plot([int(k) for k in row], list(row.values()), "o-", label=name)
    right.set_xscale("log", base=2)
    right.set_xlabel("context tokens")
    right.set_ylabel("passkey accuracy")
    right.set_ylim(-0.05, 1.05)
    right.legend()
    return fig


def main(argv: list[str] | None = None) -> None:
    import argparse

    from . import needles

    p = argparse.ArgumentParser(prog="tptt-eval", description=__doc__)
    p.add_argument("adapter", nargs="?", default="default", help='"default" or an adapter directory')
    p.add_argument("--kl-contexts", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--passkey-contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--per-context", type=int, default=2, help="held-out sequences per KL context")
    p.add_argument("--trials", type=int, default=None,
                   help="prompts per context: passkey 3 (depths 0.1, 0.5, 0.9), --suite 20 per task and format")
    p.add_argument("--probe", action="store_true",
                   help="instead: the recall probe (eval/recall.py) of the adapter at --passkey-contexts")
    p.add_argument("--suite", action="store_true",
                   help="instead: the held-out needle suite (eval/suite.py) with 95 %% Wilson intervals")
    p.add_argument("--suite-contexts", type=suite.context_tokens, nargs="+", default=list(suite.CONTEXTS),
                   help="suite context lengths in tokens, 4096 or 4k (default 1k..32k; 64k on request)")
    p.add_argument("--tasks", nargs="+", choices=needles.TASKS, default=list(needles.TASKS), help="suite tasks")
    p.add_argument("--formats", nargs="+", choices=needles.FORMATS, default=list(needles.FORMATS),
                   help="suite prompt formats: raw text with an answer lead-in, or a chat-template user message")
    p.add_argument("--suite-models", nargs="+", choices=suite.MODELS, default=list(suite.MODELS),
                   help="suite / RULER models to run (a long context for one of them; --suite-merge joins the runs)")
    p.add_argument("--suite-merge", type=Path, nargs="+", metavar="SUITE_JSON",
                   help="instead: join suite.json (or ruler.json) files of runs of the same suite (same adapter, "
                        "trials, seed, new tokens) at different contexts, tasks, formats or models into "
                        "<out>/suite.{json,png} (RULER runs: <out>/ruler.{json,png})")
    p.add_argument("--suite-compare", type=Path, nargs=2, metavar=("A_JSON", "B_JSON"),
                   help="instead: two suite.json (or two ruler.json) files of the same prompts (two adapters, "
                        "say) prompt by prompt: hits, those only one side found, an exact sign test; "
                        "<out>/suite_compare.{json,png}")
    p.add_argument("--compare-models", nargs=2, metavar=("A_MODEL", "B_MODEL"),
                   help="with --suite-compare: this model of A against that model of B (default: each model "
                        "against its namesake), e.g. converted base")
    p.add_argument("--ruler", action="store_true",
                   help="instead: RULER's needle tasks (lm-evaluation-harness) at --suite-contexts, --trials "
                        "samples each, the adapter through the server (eval/ruler.py)")
    p.add_argument("--ruler-tasks", nargs="+", choices=RULER_TASKS, default=list(RULER_TASKS),
                   help="RULER tasks (those that run offline)")
    p.add_argument("--new-tokens", type=int, default=None,
                   help=f"suite / RULER greedy continuation length (default {suite.NEW_TOKENS} / 40)")
    p.add_argument("--seed", type=int, default=0, help="suite prompts are a function of the seed")
    p.add_argument("--out", type=Path, default=Path("eval-results"))
    args = p.parse_args(argv)
    if args.ruler:
        from . import ruler

        ruler.run(args.adapter, args.suite_contexts, args.trials or ruler.TRIALS, args.ruler_tasks,
                  args.new_tokens or ruler.NEW_TOKENS, args.out, args.suite_models)
        return
    if args.suite_merge or args.suite_compare:
        try:
            runs = [json.loads(path.read_text()) for path in args.suite_merge or args.suite_compare]
            if args.suite_merge:
                suite.write(args.out, suite.merge(runs))
            else:
                suite.write_comparison(args.out, suite.compare(*runs, models=args.compare_models))
        except (OSError, ValueError) as error:  # a missing file, not JSON, or runs that do not go together
            p.error(str(error))
        return
    if args.suite:
        suite.run(args.adapter, args.suite_contexts, args.trials or suite.TRIALS, args.tasks, args.formats,
                  args.new_tokens or suite.NEW_TOKENS, args.seed, args.out, args.suite_models)
        return
    if args.probe:
        from . import recall

        results = recall.probe(load(args.adapter), args.passkey_contexts)
        report.write(args.out, "probe", results, recall.figure(results), recall.table(results))
        return
    run(args.adapter, args.kl_contexts, args.passkey_contexts, args.per_context, args.trials or 3, args.out)
