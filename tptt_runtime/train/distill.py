"""The conversion run: LoRA on the shared projections, trained to reproduce the base model's own logits.

Stage 0 (`retain_docs` > 0, before the first step, optional): the exact-token cache's retaining heads alone
are fitted to spot the tokens that state facts in that many fresh retrieval documents (train/retain.py);
nothing else moves, and later steps leave them as they are (no gradient reaches a hard top-C selection), so
LoRA learns with them in the loop. LoRA's steps move the features the heads read a little; to fit the heads
to a finished adapter's own features, run stage 0 alone on it (`steps` 0, `init` that adapter).

Stage 1 (the next `transfer_steps` steps, optional): attention transfer. Every LiZA layer compares its memory
with full softmax attention over the same q, k, v (train/transfer.py): the memory read should
reproduce the attention output over the keys beyond the window, a learned gate the share of attention they
get. Only the memory's own parameters move (learned feature maps and gates). The layers pass full attention's
output on, so every layer learns on the inputs the teacher would give it (as LoLCATs does), and the forward is
the teacher's own: no second model runs.

Stage 2, loss per step = KL(base || converted) per token (+ `ce_weight` * next-token cross-entropy, + `answer_ce`
* the cross-entropy of the retrieval answers' tokens alone: an objective on recall itself, + `reply_ce` * that
of the chat documents' whole assistant replies, their opening words and the answer: an objective on answering at
all, which a chat turn that recites the user's text instead fails), with the converted
model running exactly the serving semantics (window + sinks softmax, DeltaProduct memory, MaG with the
schedule's weight at that step, or learned gates). LoRA weights train at `lr`, the memory's own
parameters at `gate_lr`. Every `checkpoint_every` steps the LoRA weights,
optimizer, step and loss history are written atomically to <out>/checkpoint.pt; `resume=True` continues from
there and, because data order and schedules are functions of the step, ends where an uninterrupted run would.
A run can start from an existing adapter (`init`: its config, with `init_changes`, and weights) instead of a
fresh one, and can turn a share of its sequences into retrieval documents (`retrieval`, train/retrieval.py),
whose answer-reading positions then weigh 1 + `recall_weight` in both stages' losses.
The finished adapter is <out>/tptt_config.json + adapter_model.safetensors (loadable by `tptt_runtime.load`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..adapters import (adapter_state_dict, add_lora, load_adapter_state_dict, load_adapter_weights, save_adapter,
                        trainable_names)
from ..config import TpttConfig
from ..model import TitansModel
from . import data
from .retain import fit_retaining_heads, retain_documents
from .retrieval import REPEATED_FILLER_SHARE, with_retrieval
from .schedules import MagSchedule
from .transfer import transfer_loss

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    steps: int = 300
    seq_len: int = 1024
    batch_size: int = 1
    lr: float = 1e-3
    gate_lr: float = 1e-2                 # the memory's own parameters (gates, feature maps)
    retain_docs: int = 0                  # stage 0: retrieval documents that fit the retaining heads (0: none)
    transfer_steps: int = 0               # stage 1 (attention transfer) steps, counted in `steps`
    warmup_steps: int = 10
    ce_weight: float = 0.0                # 0 = pure distillation
    grad_clip: float = 1.0
    checkpoint_every: int = 20
    seed: int = 0
    schedule: MagSchedule = field(default_factory=MagSchedule)
    text: tuple[str, ...] = data.DEFAULT_SOURCES
    max_corpus_tokens: int | None = 4_000_000
    retrieval: float = 0.0                # share of sequences rebuilt as retrieval documents
    chat_retrieval: float = 0.0           # share of those documents in chat form
    same_kind_retrieval: float = 0.0      # share of those documents whose 3-4 facts are numbers of one kind
    repeated_filler: float = REPEATED_FILLER_SHARE  # share of them on a few plain sentences repeated, not prose
    shuffled_filler: float = 0.0          # share of them on plain sentences in random order, not prose
    init: str | None = None               # adapter directory to start from (its config and weights)
    init_changes: dict = field(default_factory=dict)  # TpttConfig fields changed from init's (read_scale,
                                          # gate_input, alpha_gate, decay): parameters the change adds start fresh
    recall_weight: float = 0.0            # positions that read a retrieval answer weigh 1 + this, both stages
    answer_ce: float = 0.0                # stage 2: + this x the cross-entropy of the answer tokens (retrieval)
    reply_ce: float = 0.0                 # stage 2: + this x the cross-entropy of chat documents' assistant
                                          # replies (opening words and answer)
    recompute: bool = False               # gradient checkpointing: keep only each decoder layer's input and
                                          # recompute the layer in the backward pass (~1/3 more compute,
                                          # activations of one layer at a time: long sequences fit in RAM)

    def __post_init__(self):
        if min(self.seq_len, self.batch_size, self.checkpoint_every) < 1 or self.lr <= 0:
            raise ValueError("seq_len, batch_size, checkpoint_every and lr must be positive")
        if self.steps < 1 and not (self.steps == 0 and self.retain_docs > 0):
            raise ValueError("steps must be positive (0 only to fit the retaining heads alone: retain_docs > 0)")
        if self.retain_docs < 0:
            raise ValueError("retain_docs must be >= 0")
        if not 0 <= self.transfer_steps < max(self.steps, 1):
            raise ValueError("transfer_steps must be in [0, steps)")
        if self.recall_weight < 0:
            raise ValueError("recall_weight must be >= 0")
        if min(self.answer_ce, self.reply_ce) < 0:
            raise ValueError("answer_ce and reply_ce must be >= 0")
        if self.answer_ce and not self.retrieval:
            raise ValueError("answer_ce needs retrieval documents (retrieval > 0): only they have answers")
        if self.reply_ce and not (self.retrieval and self.chat_retrieval):
            raise ValueError("reply_ce needs chat retrieval documents (retrieval and chat_retrieval > 0): only they "
                             "have replies")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor,
                      ce_weight: float, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Per-token KL(teacher || student) averaged with `weights` [B, T] (None = a plain mean) (+ ce_weight *
    CE); logits: [B, T, V], ids: [B, T]. Returns (loss, the plain mean KL as a float)."""
    student = student_logits.float().log_softmax(-1)
    teacher = teacher_logits.float().log_softmax(-1)
    per_token = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)  # [B, T]
    kl = per_token.mean()
    loss = kl if weights is None else (per_token * weights).sum() / weights.sum()
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(student[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return loss, kl.item()


def marked_cross_entropy(student_logits: torch.Tensor, ids: torch.Tensor, marked: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions `marked` [B, T] (those whose next token belongs to a
    retrieval answer, or to a reply); logits [B, T, V], ids [B, T]. 0 when no position is marked (a batch of plain
    prose)."""
    at = marked[:, :-1]
    if not at.any():
        return student_logits.new_zeros(())
    return F.cross_entropy(student_logits[:, :-1][at].float(), ids[:, 1:][at])


READ_SCALE_LR = 5.0  # times gate_lr: a log read scale starts 1-4x from its target (raw reads vs o_far in
                     # SmolLM2-135M), which gate_lr alone would take a few hundred steps to cover


def _param_groups(named: dict[str, torch.nn.Parameter], trainable: list[str], train: TrainConfig) -> list[dict]:
    """LoRA at lr; gate biases at gate_lr; gate weights at gate_lr / sqrt(fan_in), so that one Adam step moves
    a gate's logit W x about as far as its bias whatever the hidden size; log read scales at READ_SCALE_LR x
    gate_lr."""
    groups = {}
    for name in trainable:
        param = named[name]
        if "lora_" in name:
            scale = 1.0
        elif name.endswith(".read_scale"):
            scale = READ_SCALE_LR * train.gate_lr / train.lr
        else:
            scale = train.gate_lr / train.lr / (param.shape[-1] ** 0.5 if param.dim() == 2 else 1.0)
        groups.setdefault(scale, []).append(param)
    return [{"params": params, "lr_scale": scale} for scale, params in groups.items()]


class Trainer:
    def __init__(self, teacher: torch.nn.Module, student: TitansModel, train: TrainConfig, sequences: torch.Tensor,
                 out: Path, reads: torch.Tensor | None = None, replies: torch.Tensor | None = None):
        """`reads` [N, T]: the positions of `sequences` that read a retrieval answer (weighted by recall_weight);
        `replies` [N, T]: those whose next token belongs to a chat document's assistant reply (for reply_ce)."""
        self.teacher, self.student, self.train, self.sequences, self.out = teacher, student, train, sequences, out
        self.reads, self.replies = reads, replies
        if student.config.lora_targets:
            add_lora(student.hf, student.config)
        trainable = trainable_names(student.hf)
        named = dict(student.hf.named_parameters())
        for name, param in named.items():
            param.requires_grad_(name in trainable)
        self.parameters = [named[name] for name in trainable]
        if train.recompute:  # activation_checkpointing_enable: the name of later transformers 5 releases
            enable = getattr(student.hf, "activation_checkpointing_enable", student.hf.gradient_checkpointing_enable)
            enable({"use_reentrant": False})
        self.learned_gate = student.config.mag_gate == "learned"
        learns_memory = any("lora_" not in name for name in trainable)
        if train.transfer_steps and not learns_memory:
            raise ValueError("attention transfer trains the memory's own parameters: it needs a learned mag_gate, "
                             "feature_map, read_scale, gate_input or alpha_gate")
        if train.retain_docs and not student.config.retains:
            raise ValueError("retain_docs fit the exact-token cache's retaining heads: they need cache_tokens > 0 "
                             "and cache_score \"retain\"")
        self.optimizer = torch.optim.AdamW(_param_groups(named, trainable, train), lr=train.lr, weight_decay=0.0)
        self.order = data.order(len(sequences), train.steps, train.batch_size, train.seed)
        self.step, self.history = 0, []

    def learning_rate(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10 %."""
        t = self.train
        if step < t.warmup_steps:
            return t.lr * (step + 1) / t.warmup_steps
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return t.lr * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item()))

    def train_step(self) -> dict:
        rows = self.order[self.step]
        ids = self.sequences[rows].to(self.student.device)  # [B, T]
        weights = self._position_weights(rows)
        if not self.learned_gate:
            self.student.set_mag_weight(self.train.schedule(self.step, self.train.steps))
        self.student.hf.train()
        stage = self.stage(self.step)
        if stage == "transfer":
            loss, kl = transfer_loss(self.student, ids, weights), None
        else:
            loss, kl = self._distillation_loss(ids, weights, rows)
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step) * group["lr_scale"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, self.train.grad_clip)
        self.optimizer.step()
        record = {"step": self.step, "stage": stage, "kl": kl, "loss": loss.item(),
                  "mag_weight": self.mean_memory_weight()}
        self.history.append(record)
        self.step += 1
        return record

    def stage(self, step: int) -> str:
        """"transfer" for the first transfer_steps steps, then "distill"."""
        return "transfer" if step < self.train.transfer_steps else "distill"

    def _position_weights(self, rows: torch.Tensor) -> torch.Tensor | None:
        """[B, T] weight of each position in the loss: 1 + recall_weight where a retrieval answer is read."""
        if self.reads is None or not self.train.recall_weight:
            return None
        return (1.0 + self.train.recall_weight * self.reads[rows].float()).to(self.student.device)

    def _distillation_loss(self, ids: torch.Tensor, weights, rows: torch.Tensor) -> tuple[torch.Tensor, float]:
        """`ids` [B, T]: the sequences of `rows`."""
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits
        logits = self.student.hf(input_ids=ids, use_cache=False).logits
        loss, kl = distillation_loss(logits, teacher_logits, ids, self.train.ce_weight, weights)
        for weight, marks in ((self.train.answer_ce, self.reads), (self.train.reply_ce, self.replies)):
            if weight and marks is not None:
                loss = loss + weight * marked_cross_entropy(logits, ids, marks[rows].to(ids.device))
        return loss, kl

    def mean_memory_weight(self) -> float:
        """mu for a constant gate; for learned gates, sigmoid of their mean bias (what mu is where W x = 0)."""
        if not self.learned_gate:
            return self.student.config.mag_weight
        biases = torch.cat([layer.mag_gate.bias.detach() for layer in self.student.layers])
        return torch.sigmoid(biases).mean().item()

    def run(self) -> list[dict]:
        bar = tqdm(total=self.train.steps, initial=self.step, desc="tptt-convert", unit="step")
        while self.step < self.train.steps:
            record = self.train_step()
            shown = {"kl": record["kl"]} if record["kl"] is not None else {record["stage"]: record["loss"]}
            bar.set_postfix({name: f"{value:.3f}" for name, value in shown.items()}, mu=f"{record['mag_weight']:.3f}")
            bar.update()
            if self.step % self.train.checkpoint_every == 0 or self.step == self.train.steps:
                self.save_checkpoint()
        bar.close()
        self.student.hf.eval()
        return self.history

    # ------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        payload = {"step": self.step, "adapter": adapter_state_dict(self.student.hf),
                   "optimizer": self.optimizer.state_dict(), "history": self.history,
                   "train": json.dumps(asdict(self.train), default=str)}
        tmp = self.out / f".{CHECKPOINT}.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, self.out / CHECKPOINT)

    def load_checkpoint(self) -> bool:
        path = self.out / CHECKPOINT
        if not path.exists():
            return False
        payload = torch.load(path, weights_only=False)
        load_adapter_state_dict(self.student.hf, payload["adapter"], str(path))
        self.optimizer.load_state_dict(payload["optimizer"])
        self.step, self.history = payload["step"], payload["history"]
        log.info("resumed %s at step %d", path, self.step)
        return True

    def save_adapter(self) -> Path:
        config = self.student.config
        if not self.learned_gate and self.train.steps:
            config = config.replace(mag_weight=self.train.schedule(self.train.steps - 1, self.train.steps))
        save_adapter(self.student.hf, config, self.out)
        (self.out / "training_history.json").write_text(json.dumps(self.history))
        return self.out


def convert(base: str, out: str | Path, tptt: TpttConfig, train: TrainConfig, resume: bool = False,
            device: str = "cpu") -> Path:
    """Train an adapter for `base` into `out`; returns the adapter directory."""
    from transformers import AutoTokenizer

    from ..loading import adapter_directory, base_directory, load_base_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(train.seed)
    directory = base_directory(base)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    teacher = load_base_model(directory).to(device)
    init = adapter_directory(train.init) if train.init is not None else None
    if init is not None:
        tptt = TpttConfig.load(init).replace(**train.init_changes)
    student = TitansModel(load_base_model(directory).to(device), tptt.replace(base_model=str(base)), tokenizer)
    prose = data.sequences(tokenizer, train.seq_len, patterns=train.text, max_tokens=train.max_corpus_tokens)
    sequences, reads, replies = prose, None, None
    if train.retrieval:
        sequences, reads, _, replies = with_retrieval(tokenizer, prose, train.retrieval, train.seed,
                                                      train.chat_retrieval, train.same_kind_retrieval,
                                                      train.repeated_filler, train.shuffled_filler)
    log.info("%d training sequences of %d tokens (%.0f %% retrieval documents, %.0f %% of them chats, %.0f %% "
             "of one kind, %.0f %% on repeated and %.0f %% on shuffled plain sentences)", len(sequences),
             train.seq_len, 100 * train.retrieval, 100 * train.chat_retrieval, 100 * train.same_kind_retrieval,
             100 * train.repeated_filler, 100 * train.shuffled_filler)
    trainer = Trainer(teacher, student, train, sequences, out, reads, replies)
    if init is not None:
        load_adapter_weights(student.hf, init, missing_ok=bool(train.init_changes))
    resumed = resume and trainer.load_checkpoint()
    if train.retain_docs and not resumed:  # a checkpoint holds the heads it fitted
        documents, stated = retain_documents(tokenizer, prose, train.retain_docs, train.seed + 1)
        trainer.history.append(fit_retaining_heads(student, documents, stated, train.seed))
        trainer.save_checkpoint()
    trainer.run()
    return trainer.save_adapter()
