"""`tptt-bench runtime`: our runtime against Hugging Face with a full KV cache, same model, same process.

For each context length: prefill tokens/s (one sequence, both sides in pieces of the same size), then decode at
each batch size: ms per step (median) and tokens/s, and the bytes a session holds (our SessionState vs the
baseline's KV cache). A batch decodes from copies of the one prefilled sequence (a step's cost does not depend on
what the rows contain): ours copies the session into the rows of a state pool (the serving engine's), the
baseline repeats its cache. The same run measures the
memory-bandwidth floor of a decode step: one matrix-vector pass, in the model's dtype, over every weight
matrix a step reads (every layer's projections and MLP and the output head), and reports each decode
figure's ratio to it (as gpt-fast reports the bandwidth it achieves). The baseline is the loop inside
Hugging Face `generate` (model forward over a DynamicCache, greedy) without generate's logits processors,
which can only make the baseline faster. A side that runs out of device memory is recorded as such and the
other goes on. Models: the default (the shipped adapter and its base), or a transformers config shape with
random weights (speed does not depend on the weights). Results: a table on stdout, JSON and a PNG plot in
--out. Absolute times on shared machines are noise; the ratios from one run are the result.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from ..config import TpttConfig
from ..cuda_graphs import GraphedDecode
from ..engine.state_pool import StatePool
from ..layers.fused import fuse_projections
from ..loading import DEFAULT_ADAPTER, load, load_base_model
from ..model import PREFILL_CHUNK, TitansModel
from . import report
from .shapes import SHAPES

UNTRAINED_MAG_WEIGHT = 0.5
OUT_OF_MEMORY = "out of memory"


def _timed(fn):
    _sync()
    start = time.perf_counter()
    result = fn()
    _sync()
    return result, time.perf_counter() - start


def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def build_models(shape: str, device: str, dtype: torch.dtype, mag_weight: float | None,
                 cache_tokens: int | None = None):
    """(ours, baseline): the same weights, ours converted (window, sinks, memory and exact-token cache of the
    default adapter; `cache_tokens` another cache size)."""
    if shape == "default":
        ours = load("default", mag_weight=mag_weight, cache_tokens=cache_tokens, device=device, dtype=dtype)
        baseline = load_base_model("default").to(device=device, dtype=dtype)
    else:
        torch.manual_seed(0)
        baseline = LlamaForCausalLM(LlamaConfig(**SHAPES[shape])).to(device=device, dtype=dtype).eval()
        weight = UNTRAINED_MAG_WEIGHT if mag_weight is None else mag_weight
        config = TpttConfig.load(DEFAULT_ADAPTER).replace(base_model=shape, mag_gate="constant", mag_weight=weight,
                                                          cache_tokens=cache_tokens)
        ours = TitansModel(copy.deepcopy(baseline), config, name=shape)
        fuse_projections(ours.hf, ours.layers)
        ours.refresh_fingerprint()
    if ours.config.mag_gate == "constant" and ours.config.mag_weight == 0.0:  # an untrained default: measure the
        ours.set_mag_weight(UNTRAINED_MAG_WEIGHT)                              # memory branch all the same
    return ours, baseline


def _decode(step, batch: int, tokens: int) -> dict:
    """`tokens` steps of `batch` rows: median ms per step and the tokens/s that makes."""
    ms = 1000 * statistics.median(_timed(step)[1] for _ in range(tokens))
    return {"ms": ms, "tok_s": 1000 * batch / ms}


def weight_matrices(model: TitansModel) -> list[torch.Tensor]:
    """Every weight matrix one decode step reads, once each: parameters and buffers of 2 or more dims (the
    retaining heads' are one matrix per kv head: read as their rows) deduplicated by storage (a fused q/k/v
    matrix and its views count once, at full size; tied embeddings once, as the output head); the input
    embedding only when it is not the head (a step reads one row of it, not the matrix)."""
    head = model.hf.get_output_embeddings().weight
    embedding = model.hf.get_input_embeddings().weight
    largest: dict[int, torch.Tensor] = {}
    for tensor in [*model.hf.parameters(), *model.hf.buffers()]:
        if tensor is None or tensor.dim() < 2:
            continue
        if tensor is embedding and embedding.data_ptr() != head.data_ptr():
            continue
        tensor = tensor.flatten(0, -2)
        key = tensor.untyped_storage().data_ptr()
        if key not in largest or tensor.numel() > largest[key].numel():
            largest[key] = tensor
    return list(largest.values())


@torch.no_grad()
def measure_floor(model: TitansModel, repeats: int = 7) -> dict:
    """ms of one matrix-vector pass over `weight_matrices` (median of `repeats`) and the bytes it reads."""
    weights = [w.detach() for w in weight_matrices(model)]
    inputs = [torch.randn(w.shape[1], dtype=w.dtype, device=w.device) for w in weights]

    def one_pass():
        for weight, x in zip(weights, inputs):
            torch.mv(weight, x)

    one_pass()
    ms = 1000 * statistics.median(_timed(one_pass)[1] for _ in range(repeats))
    return {"ms": ms, "bytes": sum(w.numel() * w.element_size() for w in weights)}


def measure_ours(model: TitansModel, prompt: torch.Tensor, batches: list[int], decode_tokens: int,
                 cuda_graphs: bool = True) -> dict:
    """Prefill one session, then decode `batch` copies of it from a StatePool, as the serving engine does (on
    CUDA through its graphs, cuda_graphs.py, unless `cuda_graphs` is off)."""
    state = model.new_session()
    logits, prefill_s = _timed(lambda: model.prefill(state, prompt))
    row = {"prefill_tok_s": len(prompt) / prefill_s, "state_bytes": state.nbytes, "decode": {}}
    token = int(logits.argmax())
    for batch in batches:
        try:
            pool = StatePool(model, batch)
            for _ in range(batch):
                pool.acquire(state)
            layers = pool.rows(0, batch)  # views of the slots, written in place
            ids, seen = torch.full((batch,), token, device=model.device), [state.num_tokens]
            graphs = GraphedDecode(model, pool.layers) if cuda_graphs and model.device.type == "cuda" else None

            def step():
                if graphs is None:
                    model.decode_rows(layers, ids, seen * batch)
                else:
                    graphs(ids, seen * batch)
                seen[0] += 1

            row["decode"][str(batch)] = _decode(step, batch, decode_tokens)
        except torch.OutOfMemoryError:
            row["decode"][str(batch)] = OUT_OF_MEMORY
        pool = layers = graphs = None
    return row


@torch.inference_mode()
def measure_baseline(hf_model, prompt: torch.Tensor, batches: list[int], decode_tokens: int) -> dict:
    try:
        cache, out, prefill_s = _baseline_prefill(hf_model, prompt)
    except torch.OutOfMemoryError:
        return {"prefill_tok_s": None, "state_bytes": None, "decode": {str(b): OUT_OF_MEMORY for b in batches}}
    kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    row = {"prefill_tok_s": len(prompt) / prefill_s, "state_bytes": kv_bytes, "decode": {}}
    for batch in batches:
        try:
            batch_cache = _batch_cache(cache, hf_model.config, batch)
            token = out.logits[:, -1].argmax(-1, keepdim=True).expand(batch, 1)
            row["decode"][str(batch)] = _decode(
                lambda: hf_model(input_ids=token, past_key_values=batch_cache, use_cache=True, logits_to_keep=1),
                batch, decode_tokens)
        except torch.OutOfMemoryError:
            row["decode"][str(batch)] = OUT_OF_MEMORY
        batch_cache = None
    return row


def _batch_cache(prefilled: DynamicCache, config, batch: int) -> DynamicCache:
    """A new cache of `batch` copies of the prefilled row, made straight from its tensors (a deep copy first
    would hold one more prompt's KV cache during the repeat); the prefilled cache is left as it was."""
    cache = DynamicCache(config=config)
    for index, layer in enumerate(prefilled.layers):
        cache.update(layer.keys.repeat_interleave(batch, dim=0), layer.values.repeat_interleave(batch, dim=0), index)
    return cache


def _baseline_prefill(hf_model, prompt: torch.Tensor):
    """The prompt through Hugging Face in pieces of PREFILL_CHUNK tokens (as ours): (cache, last output, s)."""
    cache = DynamicCache(config=hf_model.config)

    def prefill():
        for start in range(0, len(prompt), PREFILL_CHUNK):
            out = hf_model(input_ids=prompt[None, start:start + PREFILL_CHUNK], past_key_values=cache,
                           use_cache=True, logits_to_keep=1)
        return out

    out, seconds = _timed(prefill)
    return cache, out, seconds


def run(contexts: list[int], ours_only_above: int, decode_tokens: int, mag_weight: float | None,
        out_dir: Path, compile_decode: bool = False, shape: str = "default", device: str = "cpu",
        dtype: torch.dtype = torch.float32, batches: tuple[int, ...] = (1,), cache_tokens: int | None = None,
        cuda_graphs: bool = True) -> dict:
    torch.manual_seed(0)
    ours, baseline = build_models(shape, device, dtype, mag_weight, cache_tokens)
    if compile_decode:
        ours.compile()
        with tqdm(total=1, desc="compiling our decode step") as bar:
            ours.warm_up()
            bar.update()
    batches = sorted(batches)
    floor = measure_floor(ours)
    rows = []
    for context in tqdm(contexts, desc="contexts"):
        prompt = torch.randint(3, ours.vocab_size, (context,), device=device)
        row = {"context": context, "ours": measure_ours(ours, prompt, batches, decode_tokens, cuda_graphs)}
        if context <= ours_only_above:
            row["baseline"] = measure_baseline(baseline, prompt, batches, decode_tokens)
        rows.append(row)
    label = "default (SmolLM2-135M-Instruct)" if shape == "default" else f"{shape} shape, random weights"
    result = {"model": label, "device": _device_name(device), "dtype": str(dtype).removeprefix("torch."),
              "config": ours.config.to_dict(), "threads": torch.get_num_threads(), "decode_tokens": decode_tokens,
              "compiled": compile_decode, "cuda_graphs": cuda_graphs and str(device).startswith("cuda"),
              "batches": batches, "floor": floor, "rows": rows, "ratios": ratios(rows, floor["ms"])}
    floor_line = (f"decode floor: one matrix-vector pass over {floor['bytes'] / 1e6:.0f} MB of weights = "
                  f"{floor['ms']:.1f} ms")
    report.write(out_dir, "runtime", result, figure(result),
                 table(rows) + "\n" + floor_line + "\n" + json.dumps(result["ratios"], indent=2))
    return result


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if str(device).startswith("cuda") else "cpu"


def ratios(rows: list[dict], floor_ms: float) -> dict:
    """Per context: memory and prefill ours / baseline; per batch, decode tokens/s ours / baseline (or which side
    ran out of memory), and each side's decode ms per step over the bandwidth floor's ms."""
    out = {}
    for row in rows:
        ours, base = row["ours"], row.get("baseline")
        entry = {f"decode_ms_over_floor_{who}_batch_{batch}": decode["ms"] / floor_ms
                 for who in ("ours", "baseline") for batch, decode in (row.get(who) or {}).get("decode", {}).items()
                 if isinstance(decode, dict)}
        out[str(row["context"])] = entry
        if base is None:
            continue
        entry |= {"memory_ours_over_baseline": _ratio(ours["state_bytes"], base["state_bytes"]),
                  "prefill_ours_over_baseline": _ratio(ours["prefill_tok_s"], base["prefill_tok_s"])}
        for batch, decode in ours["decode"].items():
            entry[f"decode_tok_s_ours_over_baseline_batch_{batch}"] = _decode_ratio(decode, base["decode"][batch])
    first, last = rows[0]["ours"]["decode"], rows[-1]["ours"]["decode"]
    smallest = min(first, key=int)
    if isinstance(first[smallest], dict) and isinstance(last[smallest], dict):
        out["decode_ms_longest_over_shortest_ours"] = last[smallest]["ms"] / first[smallest]["ms"]
    return out


def _ratio(ours, base):
    return None if ours is None or base is None else ours / base


def _decode_ratio(ours, base):
    if isinstance(ours, dict) and isinstance(base, dict):
        return ours["tok_s"] / base["tok_s"]
    return f"ours {ours if isinstance(ours, str) else 'ran'}, baseline {base if isinstance(base, str) else 'ran'}"


def table(rows: list[dict]) -> str:
    header = (f"{'context':>8} {'batch':>5} | {'prefill tok/s ours':>18} {'base':>8} | {'decode tok/s ours':>17} "
              f"{'base':>8} | {'state MB ours':>13} {'KV MB base':>10}")
    lines = [header, "-" * len(header)]
    for row in rows:
        ours, base = row["ours"], row.get("baseline") or {}
        prefill = f"{ours['prefill_tok_s']:>18.1f} {_cell(base.get('prefill_tok_s')):>8}"
        memory = f"{ours['state_bytes'] / 1e6:>13.2f} {_cell(base.get('state_bytes'), 1e-6):>10}"
        for batch, decode in ours["decode"].items():
            decode_cells = f"{_cell(decode):>17} {_cell(base.get('decode', {}).get(batch)):>8}"
            lines.append(f"{row['context']:>8} {batch:>5} | {prefill} | {decode_cells} | {memory}")
    return "\n".join(lines)


def _cell(value, scale: float = 1.0) -> str:
    """A table cell: a number, a decode's tokens/s, '-' (not run) or 'OOM'."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return "OOM"
    if isinstance(value, dict):
        value = value["tok_s"]
    return f"{value * scale:.1f}"


def figure(result: dict):
    rows = result["rows"]
    fig, axes = report.subplots(1, 3, figsize=(15, 4.2))
    ours_label = "TPTT runtime" + (" (compiled decode)" if result["compiled"] else "")
    for who, style, label in (("ours", "-", ours_label), ("baseline", "--", "HF full KV cache")):
        marker = "o" if who == "ours" else "s"
        points = [(r["context"], r[who]["prefill_tok_s"]) for r in rows if r.get(who, {}).get("prefill_tok_s")]
        if points:
            axes[0].plot(*zip(*points), marker + style, label=label)
        for batch in result["batches"]:
            points = [(r["context"], r[who]["decode"][str(batch)]["tok_s"]) for r in rows
                      if isinstance(r.get(who, {}).get("decode", {}).get(str(batch)), dict)]
            if points:
                axes[1].plot(*zip(*points), marker + style, label=f"{label}, batch {batch}")
        points = [(r["context"], r[who]["state_bytes"] / 1e6) for r in rows if r.get(who, {}).get("state_bytes")]
        if points:
            axes[2].plot(*zip(*points), marker + style, label=label)
    titles = ("prefill tokens/s (one sequence)", "decode tokens/s (all rows)", "session memory (MB)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['model']}, {result['device']}, {result['dtype']}: TPTT runtime vs Hugging Face "
                 "(same process)")
    return fig
