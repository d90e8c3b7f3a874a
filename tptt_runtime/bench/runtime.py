"""`tptt-bench runtime`: our runtime against Hugging Face with a full KV cache, same model, same process.

For each context length: prefill tokens/s, decode ms/token (median of the steps) and the bytes a session
holds (our SessionState vs the baseline's KV cache). The baseline is the loop inside Hugging Face `generate`
(model forward over a DynamicCache, greedy) without generate's logits processors, which can only make the
baseline faster. Results: a table on stdout, JSON and a PNG plot in --out. Absolute times on shared machines
are noise; the ratios from one run are the result.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

from ..loading import load, load_base_model
from . import report

UNTRAINED_MAG_WEIGHT = 0.5


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def measure_ours(model, prompt: torch.Tensor, decode_tokens: int) -> dict:
    state = model.new_session()
    logits, prefill_s = _timed(lambda: model.prefill(state, prompt))
    steps = []
    for _ in range(decode_tokens):
        logits, seconds = _timed(lambda: model.step(state, int(logits.argmax())))
        steps.append(seconds)
    return {"prefill_tok_s": len(prompt) / prefill_s, "decode_ms": 1000 * statistics.median(steps),
            "state_bytes": state.nbytes}


@torch.inference_mode()
def measure_baseline(hf_model, prompt: torch.Tensor, decode_tokens: int) -> dict:
    cache = DynamicCache(config=hf_model.config)
    out, prefill_s = _timed(lambda: hf_model(input_ids=prompt[None], past_key_values=cache, use_cache=True,
                                              logits_to_keep=1))
    steps = []
    for _ in range(decode_tokens):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        out, seconds = _timed(lambda: hf_model(input_ids=token, past_key_values=cache, use_cache=True))
        steps.append(seconds)
    kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return {"prefill_tok_s": len(prompt) / prefill_s, "decode_ms": 1000 * statistics.median(steps),
            "state_bytes": kv_bytes}


def run(contexts: list[int], ours_only_above: int, decode_tokens: int, mag_weight: float | None,
        out_dir: Path, compile_decode: bool = False) -> dict:
    torch.manual_seed(0)
    ours = load("default", mag_weight=mag_weight)
    if ours.config.mag_gate == "constant" and ours.config.mag_weight == 0.0:  # an untrained default: measure the
        ours.set_mag_weight(UNTRAINED_MAG_WEIGHT)                              # memory branch all the same
    if compile_decode:
        ours.compile()
        with tqdm(total=1, desc="compiling our decode step") as bar:
            ours.warm_up()
            bar.update()
    baseline = load_base_model("default")
    rows = []
    for context in tqdm(contexts, desc="contexts"):
        prompt = torch.randint(3, ours.vocab_size, (context,))
        row = {"context": context, "ours": measure_ours(ours, prompt, decode_tokens)}
        if context <= ours_only_above:
            row["baseline"] = measure_baseline(baseline, prompt, decode_tokens)
        rows.append(row)
    result = {"model": "default (SmolLM2-135M-Instruct)", "config": ours.config.to_dict(),
              "threads": torch.get_num_threads(), "decode_tokens": decode_tokens, "compiled": compile_decode,
              "rows": rows,
              "ratios": ratios(rows)}
    report.write(out_dir, "runtime", result, figure(rows, compile_decode),
                 table(rows) + "\n" + json.dumps(result["ratios"], indent=2))
    return result


def ratios(rows: list[dict]) -> dict:
    out = {}
    for row in rows:
        if "baseline" in row:
            ours, base = row["ours"], row["baseline"]
            out[str(row["context"])] = {"memory_ours_over_baseline": ours["state_bytes"] / base["state_bytes"],
                                 "decode_ours_over_baseline": ours["decode_ms"] / base["decode_ms"],
                                 "prefill_ours_over_baseline": ours["prefill_tok_s"] / base["prefill_tok_s"]}
    first, last = rows[0]["ours"], rows[-1]["ours"]
    out["decode_longest_over_shortest_ours"] = last["decode_ms"] / first["decode_ms"]
    return out


def table(rows: list[dict]) -> str:
    header = (f"{'context':>8} | {'prefill tok/s ours':>18} {'base':>8} | {'decode ms ours':>14} {'base':>8} | "
              f"{'state MB ours':>13} {'KV MB base':>10}")
    lines = [header, "-" * len(header)]
    for row in rows:
        ours, base = row["ours"], row.get("baseline")
        fmt = (lambda key, scale=1.0, spec=".1f": "-" if base is None else f"{base[key] * scale:{spec}}")
        lines.append(f"{row['context']:>8} | {ours['prefill_tok_s']:>18.1f} {fmt('prefill_tok_s'):>8} | "
                     f"{ours['decode_ms']:>14.1f} {fmt('decode_ms'):>8} | {ours['state_bytes'] / 1e6:>13.2f} "
                     f"{fmt('state_bytes', 1e-6, '.1f'):>10}")
    return "\n".join(lines)


def figure(rows: list[dict], compiled: bool):
    fig, axes = report.subplots(1, 3, figsize=(15, 4.2))
    labels = {"ours": "TPTT runtime" + (" (compiled decode)" if compiled else ""), "baseline": "HF full KV cache"}
    panels = [("prefill_tok_s", "prefill tokens/s", 1.0), ("decode_ms", "decode ms/token", 1.0),
              ("state_bytes", "session memory (MB)", 1e-6)]
    for ax, (key, title, scale) in zip(axes, panels):
        for who, style in (("ours", "o-"), ("baseline", "s--")):
            points = [(r["context"], r[who][key] * scale) for r in rows if who in r]
            if points:
                ax.plot(*zip(*points), style, label=labels[who])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if key == "state_bytes":
            ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle("SmolLM2-135M-Instruct, CPU, float32: TPTT runtime vs Hugging Face (same process)")
    return fig
