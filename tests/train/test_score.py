"""The exact-token cache's learned score: its target (how much full attention reads each token from beyond the
window) against Hugging Face's own attention weights, and stage 0 of a conversion fitting it alone."""

import pytest
import torch

from tests.conftest import tiny_model
from tptt_runtime.config import TpttConfig
from tptt_runtime.layers.full_attention import causal_probs, far_reads
from tptt_runtime.layers.liza import LayerHook
from tptt_runtime.model import TitansModel
from tptt_runtime.train.distill import Trainer, TrainConfig
from tptt_runtime.train.score import score_loss

WINDOW = 5
READERS = [9, 17, 21]  # the queries a retrieval document's answer positions would be


def test_far_reads_are_the_largest_weights_full_attention_gives_from_beyond_the_window():
    """Layer 0 sees the embeddings in both models, so its q, k are the base model's: far_reads must be, per key,
    the max (or mean) over the kv head's query heads and over the queries at least WINDOW later (all, or only
    READERS) of Hugging Face's eager attention weights."""
    base = tiny_model("llama")
    base.set_attn_implementation("eager")
    model = TitansModel(tiny_model("llama"), TpttConfig(window=WINDOW, sinks=1, mag_weight=0.5))
    tokens = torch.randint(3, 97, (1, 23), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        weights = base(input_ids=tokens, output_attentions=True).attentions[0][0]  # [Hq, T, T]

    class FirstLayer(LayerHook):
        reads = None

        def prefill(self, layer, hidden_states, q, k, v):
            if layer.layer_idx == 0:
                readers = torch.zeros(1, q.shape[2], dtype=torch.bool)
                readers[0, READERS] = True
                probs = causal_probs(q, k, layer)
                FirstLayer.reads = [far_reads(probs, WINDOW)[0], far_reads(probs, WINDOW, readers)[0],
                                    far_reads(probs, WINDOW, reduce="mean")[0]]  # each [Hkv, T]

    with model.hooked(FirstLayer()), torch.no_grad():
        model.forward_full(tokens[0])
    reads, by_readers, mean = FirstLayer.reads
    kv_heads, seq_len = reads.shape
    groups = weights.shape[0] // kv_heads
    for head in range(kv_heads):
        for key in range(seq_len):
            later = weights[head * groups:(head + 1) * groups, key + WINDOW:, key]  # queries t >= key + WINDOW
            expected = later.max() if later.numel() else torch.tensor(0.0)
            torch.testing.assert_close(reads[head, key], expected, atol=1e-5, rtol=0)
            expected = later.mean() if later.numel() else torch.tensor(0.0)
            torch.testing.assert_close(mean[head, key], expected, atol=1e-5, rtol=0)
            chosen = [t - key - WINDOW for t in READERS if t >= key + WINDOW]
            expected = later[:, chosen].max() if chosen else torch.tensor(0.0)
            torch.testing.assert_close(by_readers[head, key], expected, atol=1e-5, rtol=0)
    assert reads[:, -WINDOW:].eq(0).all() and reads[:, :-WINDOW].gt(0).all()


def test_stage_0_fits_the_score_alone(tmp_path):
    """score_steps: the scorers' loss falls, only the scorers move (LoRA and the memory's own parameters stay),
    and the steps that follow distil as before."""
    config = TpttConfig(window=WINDOW, sinks=1, lora_rank=4, lora_alpha=8, lora_targets=["q_proj", "v_proj"],
                        mag_gate="learned", mag_weight=0.1, cache_tokens=3, cache_score="learned")
    student = TitansModel(tiny_model("llama"), config)
    train = TrainConfig(steps=32, seq_len=40, lr=1e-2, gate_lr=1e-1, warmup_steps=1, checkpoint_every=100,
                        score_steps=30)
    trainer = Trainer(tiny_model("llama"), student, train, torch.randint(3, 97, (1, 40)), tmp_path)
    others = {n: p.clone() for n, p in student.hf.named_parameters() if p.requires_grad and "cache_scorer" not in n}
    for _ in range(30):
        trainer.train_step()
    losses = [r["loss"] for r in trainer.history]
    assert {r["stage"] for r in trainer.history} == {"score"} and all(r["kl"] is None for r in trainer.history)
    assert sum(losses[-3:]) < 0.85 * sum(losses[:3])  # measured: 0.238 -> 0.190, monotone
    assert all(torch.equal(p, others[n]) for n, p in student.hf.named_parameters() if n in others)
    assert all(layer.cache_scorer.weight.abs().max() > 0 for layer in student.layers)
    trainer.run()
    assert [r["stage"] for r in trainer.history[-2:]] == ["distill", "distill"]
    assert trainer.history[-1]["kl"] is not None


def test_fitting_needs_a_learned_score(tmp_path):
    student = TitansModel(tiny_model("llama"), TpttConfig(window=WINDOW, sinks=1, mag_weight=0.5, cache_tokens=3))
    train = TrainConfig(steps=2, seq_len=40, score_steps=1)
    with pytest.raises(ValueError, match="cache_score"):
        Trainer(tiny_model("llama"), student, train, torch.randint(3, 97, (1, 40)), tmp_path)
    learned = TitansModel(tiny_model("llama"), TpttConfig(window=WINDOW, sinks=1, cache_tokens=3,
                                                          cache_score="learned"))
    assert score_loss(learned, torch.randint(3, 97, (1, WINDOW + 1))).item() == 0  # no token read from afar
    tokens, readers = torch.randint(3, 97, (1, 40)), torch.zeros(1, 40, dtype=torch.bool)
    assert score_loss(learned, tokens, readers).item() == 0  # no reader: nothing to fit
    readers[0, 30:33] = True  # an answer's positions: the tokens before 28 have a target
    loss = score_loss(learned, tokens, readers)
    loss.backward()
    assert loss.item() > 0 and all(layer.cache_scorer.weight.grad.abs().max() > 0 for layer in learned.layers)
    with pytest.raises(ValueError, match="cache_score"):
        score_loss(student, torch.randint(3, 97, (1, 40)))
    with pytest.raises(ValueError, match="cache_score"):
        TpttConfig(cache_tokens=3, cache_score="attention")
