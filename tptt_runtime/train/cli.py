"""`tptt-convert`: base model (local HF dir, .gguf or "default") -> adapter directory, by distillation."""

from __future__ import annotations

import argparse
import logging

import torch

from ..config import ALPHA_GATES, CACHE_SCORES, FEATURE_MAPS, GATE_INPUTS, MAG_GATES, READ_SCALES, TpttConfig
from .data import DEFAULT_SOURCES
from .distill import TrainConfig, convert
from .retrieval import REPEATED_FILLER_SHARE
from .schedules import SCHEDULES, MagSchedule


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tptt-convert", description=__doc__)
    p.add_argument("--base", default="default", help='"default", a .gguf file or a Hugging Face model directory')
    p.add_argument("--out", required=True, help="adapter directory (checkpoints go there too)")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--order", type=int, default=2, choices=(1, 2))
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    p.add_argument("--schedule", choices=SCHEDULES, default="gradual")
    p.add_argument("--mag-weight", type=float, default=0.5,
                   help="target (or peak) memory weight mu; with --mag-gate learned, its initial value")
    p.add_argument("--mag-gate", choices=MAG_GATES, default="constant",
                   help="learned: mu per head and token from the layer input, trained (the schedule is unused)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gate-lr", type=float, default=1e-2,
                   help="learning rate of the memory's own parameters (learned gates and feature maps)")
    p.add_argument("--feature-map", choices=FEATURE_MAPS, default="fixed",
                   help="learned: a D x D map per layer before the memory's feature map")
    p.add_argument("--read-scale", choices=READ_SCALES,
                   help="the memory read's size in the mix: softmax_rms (default) or learned (its own size times "
                        "a learned scale per head); with --init, a change to that adapter's config")
    p.add_argument("--gate-input", choices=GATE_INPUTS,
                   help="what the write gate (beta) averages per token: mean (default: the channel mean of k) or "
                        "learned (a weighted sum + bias per kv head, trained); with --init, a change to that "
                        "adapter's config")
    p.add_argument("--alpha-gate", choices=ALPHA_GATES,
                   help="the memory's decay: c (default: the constant --decay), learned (one per kv head, "
                        "trained, starting at --decay) or from the gate pools (k, v, kv); with --init, a change "
                        "to that adapter's config")
    p.add_argument("--decay", type=float,
                   help="what the memory state is multiplied by per token (default 1: no decay); with --init, a "
                        "change to that adapter's config")
    p.add_argument("--cache-tokens", type=int,
                   help="exact-token cache slots per layer and kv head (default 0: none), in the loop of both "
                        "stages; with --init, a change to that adapter's config")
    p.add_argument("--cache-score", choices=CACHE_SCORES,
                   help="what ranks tokens for the exact-token cache (default write: the memory's write norm; "
                        "retain: its log plus a retaining head's logit on the token's q, k, v, fitted by "
                        "--retain-docs); with --init, a change to that adapter's config")
    p.add_argument("--retain-weight", type=float,
                   help="what the retaining heads' logit is multiplied by in the cache score (default 1: as "
                        "fitted; smaller ranks closer to the write alone); with --init, a change to that "
                        "adapter's config")
    p.add_argument("--cache-pool", type=int,
                   help="offer each token to the exact-token cache with the best score within this many tokens on "
                        "either side (default 0: its own); with --init, a change to that adapter's config")
    p.add_argument("--retain-docs", type=int, default=0,
                   help="stage 0: fit the retaining heads alone on this many retrieval documents before training "
                        "(with --steps 0: fit them and write the adapter, nothing else trained)")
    p.add_argument("--transfer-steps", type=int, default=0,
                   help="stage 1: steps of attention transfer (memory vs full attention) before distillation")
    p.add_argument("--ce-weight", type=float, default=0.0)
    p.add_argument("--recompute", action="store_true",
                   help="gradient checkpointing: recompute each decoder layer in the backward pass (~1/3 more "
                        "compute, a fraction of the activation memory; for long --seq-len)")
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", nargs="+", default=list(DEFAULT_SOURCES), help="glob patterns of training text")
    p.add_argument("--retrieval", type=float, default=0.0,
                   help="share of training sequences rebuilt as retrieval documents (facts asked for at the end)")
    p.add_argument("--chat-retrieval", type=float, default=0.0,
                   help="share of the retrieval documents in chat form (the facts in a user message through the "
                        "chat template, each question a user turn, each answer the assistant's)")
    p.add_argument("--same-kind-retrieval", type=float, default=0.0,
                   help="share of the retrieval documents whose facts are 3-4 numbers of one kind about different "
                        "subjects (only the subject tells them apart, as in multi-key retrieval)")
    p.add_argument("--repeated-filler", type=float, default=REPEATED_FILLER_SHARE,
                   help="share of the retrieval documents whose filler is a few plain sentences repeated instead of "
                        "the sequence's own text")
    p.add_argument("--shuffled-filler", type=float, default=0.0,
                   help="share of the retrieval documents whose filler is plain sentences in random order instead "
                        "of the sequence's own text")
    p.add_argument("--recall-weight", type=float, default=0.0,
                   help="extra weight of the positions that read a retrieval document's answers (both stages; "
                        "they are ~1 %% of the tokens)")
    p.add_argument("--answer-ce", type=float, default=0.0,
                   help="stage 2: add this times the cross-entropy of the retrieval answers' tokens (the positions "
                        "--recall-weight weighs), a loss on recall itself beside the distillation; needs --retrieval")
    p.add_argument("--reply-ce", type=float, default=0.0,
                   help="stage 2: add this times the cross-entropy of the chat documents' assistant replies, their "
                        "opening words and the answer (a loss on answering at all); needs --chat-retrieval")
    p.add_argument("--init", help='start from this adapter ("default" or a directory): its config replaces the '
                                  "model flags above (but the changes --read-scale, --gate-input, --alpha-gate, "
                                  "--decay, --cache-tokens, --cache-score, --retain-weight, --cache-pool) and its "
                                  "weights the fresh LoRA, gates and feature maps")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tptt = TpttConfig(window=args.window, sinks=args.sinks, order=args.order, lora_rank=args.lora_rank,
                      lora_alpha=2 * args.lora_rank, lora_targets=list(args.lora_targets), mag_gate=args.mag_gate,
                      feature_map=args.feature_map, read_scale=args.read_scale or "softmax_rms",
                      gate_input=args.gate_input or "mean", alpha_gate=args.alpha_gate or "c",
                      decay=1.0 if args.decay is None else args.decay, cache_tokens=args.cache_tokens or 0,
                      cache_score=args.cache_score or "write",
                      retain_weight=1.0 if args.retain_weight is None else args.retain_weight,
                      cache_pool=0 if args.init else args.cache_pool or 0,  # with --init: an init change
                      mag_weight=args.mag_weight if args.mag_gate == "learned" else 0.0)
    train = TrainConfig(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                        gate_lr=args.gate_lr, transfer_steps=args.transfer_steps, retain_docs=args.retain_docs,
                        ce_weight=args.ce_weight, checkpoint_every=args.checkpoint_every, seed=args.seed,
                        schedule=MagSchedule(args.schedule, target=args.mag_weight), text=tuple(args.text),
                        retrieval=args.retrieval, chat_retrieval=args.chat_retrieval,
                        same_kind_retrieval=args.same_kind_retrieval, repeated_filler=args.repeated_filler,
                        shuffled_filler=args.shuffled_filler, init=args.init,
                        init_changes={name: value for name, value in (
                            ("read_scale", args.read_scale), ("gate_input", args.gate_input),
                            ("alpha_gate", args.alpha_gate), ("decay", args.decay),
                            ("cache_tokens", args.cache_tokens), ("cache_score", args.cache_score),
                            ("retain_weight", args.retain_weight), ("cache_pool", args.cache_pool))
                            if value is not None},
                        recall_weight=args.recall_weight, answer_ce=args.answer_ce, reply_ce=args.reply_ce,
                        recompute=args.recompute)
    out = convert(args.base, args.out, tptt, train, resume=args.resume, device=args.device)
    print(f"adapter written to {out}")


if __name__ == "__main__":
    main()
