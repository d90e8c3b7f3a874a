"""`tptt-bench server`: the served model under concurrency and multi-turn reuse, against baselines, one run.

Starts `python -m server` as subprocesses (serving.py) on loopback (one with prefix-state reuse, one without) and measures
through HTTP streaming, as a client sees it:
    decode throughput   one stream vs 16 concurrent streams (aggregate tokens/s), and Hugging Face generate
                        (full KV cache) at batch 1 and 16 in this process
    multi-turn TTFT     a 3-turn chat with `--turn-tokens` user turns, answered by up to `--reply-tokens` tokens:
                        time to first token of turn 3 on the reusing server vs the same prompt sent cold (to the
                        server without reuse, and to Hugging Face generate); also with a short follow-up question
                        as turn 3 (the common case). The reused share of turn 3's prompt, hence the ratio,
                        grows with the replies: equal user turns with short replies cannot go below ~1/3.
Table on stdout, JSON + PNG in --out. Absolute times on shared machines are noise; ratios are the result.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import torch
from tqdm import tqdm

from ..loading import load_base_model
from . import report
from .serving import served

SENTENCES = ["The river ran past the old mill where the miller counted sacks of grain.",
             "In spring the orchards bloomed and the bees worked from dawn until dusk.",
             "A traveller from the coast brought news of ships, storms and distant markets.",
             "The children learned their letters on slates by the light of a small window.",
             "Every evening the bell in the square rang seven times for the close of trade."]


def filler(tokenizer, tokens: int, seed: int) -> str:
    """Deterministic prose of about `tokens` tokens (no data set needed)."""
    text, i = "", seed
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += SENTENCES[i % len(SENTENCES)] + " "
        i += 3
    return text


def stream_chat(url: str, messages: list[dict], max_tokens: int, **extra) -> dict:
    """One streaming chat request; returns text, token count, time to first token and decode tokens/s."""
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}, **extra}
    start, first, text, usage = time.perf_counter(), None, "", {}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    text += choice["delta"]["content"]
    end = time.perf_counter()
    tokens = usage.get("completion_tokens", 0)
    return {"text": text, "tokens": tokens, "ttft_s": (first or end) - start, "start": start, "first": first or end,
            "end": end, "cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)}


def concurrent_decode(url: str, clients: int, max_tokens: int) -> float:
    """Aggregate decode tokens/s of `clients` simultaneous streams (first token to last token)."""
    results = [None] * clients

    def worker(i):
        results[i] = stream_chat(url, [{"role": "user", "content": f"Tell story number {i} about a lighthouse."}],
                                 max_tokens, ignore_eos=True)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    span = max(r["end"] for r in results) - min(r["first"] for r in results)
    return sum(r["tokens"] - 1 for r in results) / span


def hf_generate_decode(model, tokenizer, batch: int, max_tokens: int) -> float:
    """Hugging Face generate (full KV cache), greedy, `batch` prompts: decode tokens/s, prefill excluded."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Tell a story about a lighthouse."}],
                                        add_generation_prompt=True, return_tensors="pt")["input_ids"]
    ids = ids.repeat(batch, 1)
    kwargs = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, **kwargs)
        total = time.perf_counter() - start
    return batch * (max_tokens - 1) / (total - prefill)


def hf_generate_ttft(model, tokenizer, messages: list[dict]) -> float:
    """Hugging Face generate's time to first token on a prompt sent cold (its prefill + one token)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                       pad_token_id=tokenizer.eos_token_id)
    return time.perf_counter() - start


def three_turns(url: str, tokenizer, turn_tokens: int, reply_tokens: int,
                last_turn: str | None) -> tuple[list[dict], dict]:
    """Turns 1 and 2 on `url` (replies of at most `reply_tokens`, ended by the model or the cap, as a chat
    client gets them); returns turn 3's messages and turn 3's measurement on the same server, with the
    replies' lengths."""
    messages, replies = [], []
    for turn in range(3):
        content = last_turn if turn == 2 and last_turn else \
            filler(tokenizer, turn_tokens, turn) + "\nContinue this text."
        messages.append({"role": "user", "content": content})
        result = stream_chat(url, messages, 32 if turn == 2 else reply_tokens)
        if turn < 2:
            messages.append({"role": "assistant", "content": result["text"]})
            replies.append(result["tokens"])
    return messages, {**result, "replies": replies}


def wait_until_compiled(url: str, timeout_s: float = 1800) -> None:
    """Until the server's background compile has swapped the compiled decode step in (`/health`)."""
    deadline = time.monotonic() + timeout_s
    while (mode := httpx.get(url + "/health", timeout=10).json()["decode"]) != "compiled":
        if mode == "eager" or time.monotonic() > deadline:
            raise RuntimeError(f"the server's decode step did not compile (decode: {mode})")
        time.sleep(2)


def run(turn_tokens: int, reply_tokens: int, clients: int, decode_tokens: int, out_dir: Path,
        dtype: torch.dtype = torch.float32, compile: bool = False) -> dict:
    from transformers import AutoTokenizer

    from ..loading import base_directory

    directory = base_directory("default")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    dtype_name = str(dtype).removeprefix("torch.")
    results = {"turn_tokens": turn_tokens, "reply_tokens": reply_tokens, "clients": clients,
               "decode_tokens": decode_tokens, "dtype": dtype_name, "decode": "compiled" if compile else "eager"}
    progress = tqdm(total=6, desc="tptt-bench server")
    with served("--dtype", dtype_name, *(["--compile"] if compile else [])) as server:
        url = server.url
        if compile:
            wait_until_compiled(url)
        stream_chat(url, [{"role": "user", "content": "Hi"}], 4)  # warm-up
        single = concurrent_decode(url, 1, decode_tokens)
        progress.update()
        many = concurrent_decode(url, clients, decode_tokens)
        progress.update()
        long_turn3, warm_long = three_turns(url, tokenizer, turn_tokens, reply_tokens, None)
        progress.update()
        short_turn3, warm_short = three_turns(url, tokenizer, turn_tokens, reply_tokens, "What was the first text about?")
        progress.update()
    with served("--no-prefix-reuse", "--dtype", dtype_name) as server:
        url = server.url
        stream_chat(url, [{"role": "user", "content": "Hi"}], 4)
        cold_long = stream_chat(url, long_turn3, 32)
        cold_short = stream_chat(url, short_turn3, 32)
        progress.update()
    baseline = load_base_model("default").to(dtype)
    hf_single = hf_generate_decode(baseline, tokenizer, 1, decode_tokens)
    hf_many = hf_generate_decode(baseline, tokenizer, clients, decode_tokens)
    hf_ttft = {"long_turn": hf_generate_ttft(baseline, tokenizer, long_turn3),
               "short_turn": hf_generate_ttft(baseline, tokenizer, short_turn3)}
    progress.update()
    progress.close()
    results.update({
        "decode_tok_s": {"ours_1": single, f"ours_{clients}": many, "hf_generate_1": hf_single,
                         f"hf_generate_{clients}": hf_many,
                         "ours_concurrency_gain": many / single, "hf_concurrency_gain": hf_many / hf_single},
        "turn3_ttft_s": {
            "long_turn": {"warm": warm_long["ttft_s"], "cold": cold_long["ttft_s"], "hf_cold": hf_ttft["long_turn"],
                          "warm_over_cold": warm_long["ttft_s"] / cold_long["ttft_s"],
                          "warm_over_hf_cold": warm_long["ttft_s"] / hf_ttft["long_turn"],
                          "prompt_tokens": len(tokenizer.apply_chat_template(long_turn3)["input_ids"]),
                          "cached_tokens": warm_long["cached_tokens"], "replies": warm_long["replies"]},
            "short_turn": {"warm": warm_short["ttft_s"], "cold": cold_short["ttft_s"],
                           "hf_cold": hf_ttft["short_turn"],
                           "warm_over_cold": warm_short["ttft_s"] / cold_short["ttft_s"],
                           "warm_over_hf_cold": warm_short["ttft_s"] / hf_ttft["short_turn"],
                           "prompt_tokens": len(tokenizer.apply_chat_template(short_turn3)["input_ids"]),
                           "cached_tokens": warm_short["cached_tokens"], "replies": warm_short["replies"]}}})
    report.write(out_dir, "server", results, figure(results), table(results))
    return results


def table(results: dict) -> str:
    d, t = results["decode_tok_s"], results["turn3_ttft_s"]
    n = results["clients"]
    lines = [f"weights: {results.get('dtype', 'float32')}, ours and Hugging Face alike; our decode step "
             f"{results.get('decode', 'eager')}",
             f"decode tokens/s      1 stream   {n} streams   gain",
             f"  ours (server)      {d['ours_1']:8.1f}   {d[f'ours_{n}']:10.1f}   {d['ours_concurrency_gain']:5.2f}x",
             f"  HF generate        {d['hf_generate_1']:8.1f}   {d[f'hf_generate_{n}']:10.1f}   "
             f"{d['hf_concurrency_gain']:5.2f}x",
             f"3-turn chat: user turns of {results['turn_tokens']} tokens, replies of up to {results['reply_tokens']} "
             f"(long_turn's: {t['long_turn'].get('replies')})",
             "turn-3 time to first token (s)  prompt  cached   warm    cold  HF cold  warm/cold  warm/HF cold"]
    for name, row in t.items():
        lines.append(f"  {name:<29} {row['prompt_tokens']:6d}  {row['cached_tokens']:6d}  {row['warm']:6.2f}  "
                     f"{row['cold']:6.2f}  {row['hf_cold']:7.2f}  {row['warm_over_cold']:9.2f}  "
                     f"{row['warm_over_hf_cold']:12.2f}")
    return "\n".join(lines)


def figure(results: dict):
    n = results["clients"]
    d, t = results["decode_tok_s"], results["turn3_ttft_s"]
    fig, (left, right) = report.subplots(1, 2, figsize=(11, 4))
    labels = ["ours 1", f"ours {n}", "HF 1", f"HF {n}"]
    left.bar(labels, [d["ours_1"], d[f"ours_{n}"], d["hf_generate_1"], d[f"hf_generate_{n}"]],
             color=["C0", "C0", "C1", "C1"])
    left.set_ylabel("decode tokens/s (aggregate)")
    left.set_title("concurrent streams")
    names = list(t)
    x = range(len(names))
    right.bar([i - 0.27 for i in x], [t[k]["warm"] for k in names], 0.27, label="ours, state reuse")
    right.bar(list(x), [t[k]["cold"] for k in names], 0.27, label="ours, cold")
    right.bar([i + 0.27 for i in x], [t[k]["hf_cold"] for k in names], 0.27, label="HF generate, cold")
    right.set_xticks(list(x), names)
    right.set_ylabel("turn-3 time to first token (s)")
    right.legend()
    return fig
