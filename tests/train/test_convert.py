"""Conversion training on a tiny random model: the distillation loss falls, checkpoints resume exactly, and the
adapter round-trips through tptt_runtime.load with the logits the trainer saw."""

import math

import pytest
import torch

import tptt_runtime as tr
from tptt_runtime.adapters import adapter_state_dict
from tests.conftest import tiny_model
from tptt_runtime.config import TpttConfig
from tptt_runtime.model import TitansModel
from tptt_runtime.train.distill import Trainer, TrainConfig, distillation_loss, marked_cross_entropy
from tptt_runtime.train.schedules import MagSchedule
from tptt_runtime.layers.full_attention import split_attention
from tptt_runtime.train.transfer import AttentionTransfer, transfer_loss

TPTT = TpttConfig(window=8, sinks=2, lora_rank=4, lora_alpha=8, lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"],
                  chunk_size=16)  # several chunks per sequence: gradients flow through the carried state


def peaked_model():
    """A tiny random model with confident predictions (random heads are near-uniform: nothing to distil)."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def make_trainer(out, steps, schedule=MagSchedule("constant", target=0.5)):
    torch.manual_seed(0)
    sequences = torch.randint(3, 97, (6, 48))
    student = TitansModel(peaked_model(), TPTT)
    train = TrainConfig(steps=steps, seq_len=48, lr=1e-2, warmup_steps=1, checkpoint_every=2, schedule=schedule)
    return Trainer(peaked_model(), student, train, sequences, out)


def held_out_kl(trainer, ids):
    trainer.student.set_mag_weight(0.5)
    with torch.no_grad():
        trainer.student.hf.eval()
        teacher = trainer.teacher(input_ids=ids).logits
        return distillation_loss(trainer.student.hf(input_ids=ids).logits, teacher, ids, 0.0)[1]


def test_a_few_steps_lower_the_distillation_loss(tmp_path):
    trainer = make_trainer(tmp_path, steps=12)
    ids = trainer.sequences[:2]
    before = held_out_kl(trainer, ids)
    trainer.run()
    assert held_out_kl(trainer, ids) < 0.8 * before  # measured: 0.26 -> 0.13


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    whole = make_trainer(tmp_path / "whole", steps=6)
    whole.out.mkdir()
    whole.run()
    (tmp_path / "split").mkdir()
    first = make_trainer(tmp_path / "split", steps=6)
    first.train_step(), first.train_step(), first.train_step(), first.train_step()
    first.save_checkpoint()
    second = make_trainer(tmp_path / "split", steps=6)
    assert second.load_checkpoint() and second.step == 4
    second.run()
    assert [r["kl"] for r in second.history] == [r["kl"] for r in whole.history]


def test_recomputing_layers_in_the_backward_trains_the_same_weights(tmp_path):
    """Gradient checkpointing (`recompute`) changes what the backward keeps, not what it computes: the same
    losses and weights step for step, with the exact-token cache and learned gates in the loop."""
    config = TPTT.replace(cache_tokens=4, mag_gate="learned", mag_weight=0.1, gate_input="learned")
    runs = []
    for recompute in (False, True):
        torch.manual_seed(0)
        student = TitansModel(peaked_model(), config)
        train = TrainConfig(steps=3, seq_len=48, lr=1e-2, warmup_steps=1, recompute=recompute)
        trainer = Trainer(peaked_model(), student, train, torch.randint(3, 97, (3, 48)), tmp_path)
        initial = {name: tensor.clone() for name, tensor in adapter_state_dict(student.hf).items()}
        calls = []
        student.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
        runs.append(([trainer.train_step()["loss"] for _ in range(3)], adapter_state_dict(student.hf)))
        assert len(calls) == (6 if recompute else 3)  # recomputed: once more in each backward
    (plain_losses, plain), (recomputed_losses, recomputed) = runs
    assert recomputed_losses == pytest.approx(plain_losses, rel=1e-5)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-4, atol=1e-6)
    assert sum(not torch.equal(plain[name], initial[name]) for name in plain) > len(plain) // 2  # they did move


def test_adapter_round_trips_through_load(tmp_path):
    trainer = make_trainer(tmp_path / "adapter", steps=4)
    trainer.out.mkdir()
    trainer.run()
    trainer.save_adapter()
    base_dir = tmp_path / "base"
    peaked_model().save_pretrained(base_dir)
    loaded = tr.load(trainer.out, base=base_dir)
    ids = trainer.sequences[0]
    with torch.no_grad():
        expected = trainer.student.hf(input_ids=ids[None]).logits[0]
    assert loaded.config.mag_weight == 0.5
    assert torch.allclose(loaded.forward_full(ids), expected, atol=1e-4)


def test_schedules():
    gradual = MagSchedule("gradual", target=0.5, start=0.0, warmup=0.5)
    assert gradual(0, 11) == 0.0 and abs(gradual(5, 11) - 0.5) < 1e-9 and gradual(10, 11) == 0.5
    cyclic = MagSchedule("cyclic", target=0.6, start=0.1, cycles=2)
    values = [cyclic(s, 101) for s in range(101)]
    assert min(values) >= 0.1 - 1e-9 and max(values) <= 0.6 + 1e-9 and abs(values[25] - 0.6) < 1e-6
    assert MagSchedule("constant", target=0.3)(7, 10) == 0.3


def test_learned_gates_train_and_round_trip(tmp_path):
    """With mag_gate "learned" the gates train with the LoRA weights, are saved in the adapter and loaded back;
    asking load() for a constant mag_weight drops them."""
    torch.manual_seed(0)
    config = TPTT.replace(mag_gate="learned", mag_weight=0.1)
    student = TitansModel(peaked_model(), config)
    train = TrainConfig(steps=4, seq_len=48, lr=1e-2, warmup_steps=1, checkpoint_every=2)
    trainer = Trainer(peaked_model(), student, train, torch.randint(3, 97, (6, 48)), tmp_path / "adapter")
    trainer.out.mkdir()
    trainer.run()
    assert all(layer.mag_gate.weight.abs().max() > 0 for layer in student.layers)  # the gates moved
    assert trainer.history[-1]["mag_weight"] != 0.1
    trainer.save_adapter()
    base_dir = tmp_path / "base"
    peaked_model().save_pretrained(base_dir)
    ids = trainer.sequences[0]
    with torch.no_grad():
        expected = student.hf(input_ids=ids[None]).logits[0]
    loaded = tr.load(trainer.out, base=base_dir)
    assert loaded.config.mag_gate == "learned"
    torch.testing.assert_close(loaded.forward_full(ids), expected, atol=1e-4, rtol=0)
    constant = tr.load(trainer.out, base=base_dir, mag_weight=0.1)
    assert constant.config.mag_gate == "constant" and all(layer.mag_gate is None for layer in constant.layers)


@pytest.mark.parametrize("cache_tokens", [0, 3])
def test_attention_transfer_trains_the_memory_alone(tmp_path, cache_tokens):
    """Stage 1 lowers the attention-transfer loss by moving only the memory's own parameters (feature maps and
    gates); LoRA weights stay at their initial values; then distillation steps follow. With an exact-token
    cache in the loop of both stages too."""
    torch.manual_seed(0)
    config = TPTT.replace(mag_gate="learned", mag_weight=0.1, feature_map="learned", window=4, sinks=1,
                          cache_tokens=cache_tokens)
    student = TitansModel(peaked_model(), config)
    train = TrainConfig(steps=22, seq_len=48, lr=1e-2, gate_lr=3e-2, warmup_steps=1, checkpoint_every=100,
                        transfer_steps=20)
    trainer = Trainer(peaked_model(), student, train, torch.randint(3, 97, (1, 48)), tmp_path)
    lora_before = {n: p.clone() for n, p in student.hf.named_parameters() if "lora_" in n}
    for _ in range(20):
        trainer.train_step()
    losses = [r["loss"] for r in trainer.history]
    assert all(r["kl"] is None for r in trainer.history)
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3])  # measured: 3.42 -> 2.88, monotone
    assert all(torch.equal(p, lora_before[n]) for n, p in student.hf.named_parameters() if "lora_" in n)
    maps = [layer.memory_map.weight for layer in student.layers]
    assert all(not torch.equal(m, torch.eye(m.shape[0])) for m in maps)
    trainer.run()
    assert trainer.history[-1]["kl"] is not None


def test_a_run_can_start_from_an_adapter(tmp_path):
    """--init: the new adapter keeps the old one's config and, after a step too small to move it, its weights;
    with a config change (--read-scale, --gate-input) it keeps them too, drops the parameters the new config
    lacks and adds the ones it has, fresh."""
    from safetensors.torch import load_file

    from tptt_runtime.loading import DEFAULT_ADAPTER
    from tptt_runtime.train.distill import convert

    train = TrainConfig(steps=1, seq_len=64, lr=1e-9, gate_lr=1e-9, max_corpus_tokens=2000, init="default")
    out = convert("default", tmp_path / "continued", TpttConfig(window=7), train)
    assert TpttConfig.load(out) == TpttConfig.load(DEFAULT_ADAPTER).replace(base_model="default")
    before, after = load_file(DEFAULT_ADAPTER / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[name], after[name], atol=1e-6) for name in before)

    # a config change that drops memory parameters, then one that adds them back: the new ones start fresh
    train.init_changes = {"read_scale": "softmax_rms", "gate_input": "mean"}
    plain = convert("default", tmp_path / "plain", TpttConfig(window=7), train)
    before = load_file(plain / "adapter_model.safetensors")
    assert not any(name.endswith(".read_scale") or ".gate_input_" in name for name in before)
    train.init, train.init_changes = str(plain), {"read_scale": "learned", "gate_input": "learned"}
    out = convert("default", tmp_path / "rescaled", TpttConfig(window=7), train)
    assert TpttConfig.load(out) == TpttConfig.load(plain).replace(read_scale="learned", gate_input="learned")
    after = load_file(out / "adapter_model.safetensors")
    scales = [name for name in after if name.endswith(".read_scale")]
    gate_inputs = [name for name in after if ".gate_input_k." in name]
    assert len(scales) == 30 and len(gate_inputs) == 60 and set(after) == set(before) | set(scales) | set(gate_inputs)
    assert all(torch.allclose(before[name], after[name], atol=1e-6) for name in before)
    assert all(after[name].abs().max() < 1e-6 for name in scales)  # log scales fresh at 0: the read's own size
    for name in gate_inputs:  # fresh: the channel mean
        assert torch.allclose(after[name], torch.full_like(after[name], 1 / 64 if name.endswith("weight") else 0.0))


def test_read_error_measures_direction_and_size_apart():
    """Attention transfer's read error: the squared error of the directions (at unit RMS) and, with a learned
    read scale, the squared log of the size ratio, whatever o_far's own size: a read in o_far's direction at a
    third of its size costs (log 3)^2, not the (2/3)^2 an MSE would charge, whose optimum shrinks reads."""

    from tptt_runtime.train.transfer import read_error

    for size in (0.1, 10.0):
        o_far = size * torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(0))
        for scaled in (True, False):
            assert read_error(o_far, o_far, scaled).abs().max() < 1e-5
            assert ((read_error(-o_far, o_far, scaled) - 4).abs().max()) < 1e-2  # opposite: (2 - -2)^2 / 4 (eps)
        assert read_error(o_far / 3, o_far, False).abs().max() < 1e-5
        torch.testing.assert_close(read_error(o_far / 3, o_far, True), torch.full((1, 2, 5), math.log(3) ** 2),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("learned", ["read_scale", "gate_input", "alpha_gate"])
def test_learned_memory_parameters_train_and_round_trip(tmp_path, learned):
    """read_scale "learned" (the read scales move towards o_far's size, beside a learned gate), gate_input
    "learned" alone (the write gates' inputs, the only memory parameters here) and alpha_gate "learned" alone
    (one decay per kv head): attention transfer's loss falls, every head's parameters moved, they are saved in
    the adapter and loaded back with the logits the trainer saw."""
    torch.manual_seed(0)
    extra = {"read_scale": dict(mag_gate="learned"), "gate_input": {}, "alpha_gate": dict(decay=0.9)}[learned]
    config = TPTT.replace(mag_weight=0.1, window=4, sinks=1, **extra, **{learned: "learned"})
    student = TitansModel(peaked_model(), config)
    train = TrainConfig(steps=21, seq_len=48, lr=1e-2, gate_lr=3e-2, warmup_steps=1, checkpoint_every=100,
                        transfer_steps=20)
    trainer = Trainer(peaked_model(), student, train, torch.randint(3, 97, (1, 48)), tmp_path / "adapter")
    trainer.out.mkdir()
    trainer.run()
    losses = [r["loss"] for r in trainer.history[:20]]
    # write gates alone move a random model's read slowly (measured: -0.3 % in 20 steps; scales: -40 %)
    assert sum(losses[-3:]) < (0.8 if learned == "read_scale" else 0.999) * sum(losses[:3])
    for layer in student.layers:
        if learned == "read_scale":
            assert layer.read_scale.abs().min() > 0.1  # every head's scale moved
        elif learned == "gate_input":
            assert layer.gate_input_k.bias.abs().min() > 1e-3 and layer.gate_input_v is None
        else:
            assert (layer.memory_decay - math.log(0.9 / 0.1)).abs().min() > 1e-3
    trainer.save_adapter()
    base_dir = tmp_path / "base"
    peaked_model().save_pretrained(base_dir)
    ids = trainer.sequences[0]
    with torch.no_grad():
        expected = student.hf(input_ids=ids[None]).logits[0]
    loaded = tr.load(trainer.out, base=base_dir)
    assert getattr(loaded.config, learned) == "learned"
    torch.testing.assert_close(loaded.forward_full(ids), expected, atol=1e-4, rtol=0)


def test_weighted_distillation_loss():
    """Weights average the per-token KL (a plain mean without them); the reported KL stays the plain mean."""
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    ids = torch.zeros(2, 5, dtype=torch.long)
    per_token = (teacher.softmax(-1) * (teacher.log_softmax(-1) - student.log_softmax(-1))).sum(-1)
    weights = torch.ones(2, 5)
    weights[1, 3] = 101.0
    plain, kl = distillation_loss(student, teacher, ids, 0.0)
    weighted, same_kl = distillation_loss(student, teacher, ids, 0.0, weights)
    torch.testing.assert_close(plain, per_token.mean())
    torch.testing.assert_close(weighted, (per_token * weights).sum() / weights.sum())
    assert kl == same_kl == plain.item()


def test_marked_cross_entropy_is_the_mean_over_the_marked_positions():
    """The cross-entropy of the token after each marked position, averaged over the marks (a loop over them as
    the reference); 0 without marks; a mark on the last position has no next token and adds nothing."""
    gen = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(2, 6, 11, generator=gen), torch.randint(0, 11, (2, 6), generator=gen)
    reads = torch.zeros(2, 6, dtype=torch.bool)
    reads[0, 2] = reads[1, 0] = reads[1, 4] = reads[1, 5] = True
    marked = [(0, 2), (1, 0), (1, 4)]
    reference = sum(-logits[b, t].log_softmax(-1)[ids[b, t + 1]] for b, t in marked) / len(marked)
    torch.testing.assert_close(marked_cross_entropy(logits, ids, reads), reference)
    assert marked_cross_entropy(logits, ids, torch.zeros(2, 6, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("weight_name, mask_name", [("answer_ce", "reads"), ("reply_ce", "replies")])
def test_marked_cross_entropy_joins_the_distillation_loss(tmp_path, weight_name, mask_name):
    """With answer_ce (reply_ce), a step's loss is the distillation loss plus that weight times the cross-entropy
    of the positions the reads (replies) mark, on the rows the step trains; and each needs its documents."""
    torch.manual_seed(0)
    sequences = torch.randint(3, 97, (4, 48))
    marked = torch.zeros(4, 48, dtype=torch.bool)
    marked[:, 40:44] = True

    def trainer(weight):
        torch.manual_seed(0)
        train = TrainConfig(steps=2, seq_len=48, lr=1e-2, warmup_steps=1, retrieval=1.0, chat_retrieval=1.0,
                            schedule=MagSchedule("constant", target=0.5), **{weight_name: weight})
        return Trainer(peaked_model(), TitansModel(peaked_model(), TPTT), train, sequences, tmp_path,
                       **{mask_name: marked})

    plain, weighted = trainer(0.0), trainer(2.0)
    ids = sequences[plain.order[0]]
    plain.student.set_mag_weight(0.5)
    plain.student.hf.train()
    expected = marked_cross_entropy(plain.student.hf(input_ids=ids).logits, ids, marked[plain.order[0]]).item()
    assert expected > 0.1
    difference = weighted.train_step()["loss"] - plain.train_step()["loss"]
    assert abs(difference - 2.0 * expected) < 1e-4 * expected
    with pytest.raises(ValueError, match="retrieval"):
        TrainConfig(**{weight_name: 1.0})


def test_reply_cross_entropy_needs_chat_documents():
    with pytest.raises(ValueError, match="chat"):
        TrainConfig(retrieval=1.0, reply_ce=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        TrainConfig(retrieval=1.0, chat_retrieval=1.0, reply_ce=-1.0)


def test_transfer_weights_pick_the_positions_of_the_loss():
    """Position weights are normalised (all-ones = 3 x ones = none), and a weight on position t alone gives the
    loss of the prefix ending at t weighted on its last position: the loss is causal and per position."""
    torch.manual_seed(0)
    config = TPTT.replace(mag_gate="learned", mag_weight=0.1, feature_map="learned", window=4, sinks=1)
    student = TitansModel(peaked_model(), config)
    ids = torch.randint(3, 97, (1, 48))

    def loss(ids, weights):
        return transfer_loss(student, ids, weights).item()

    plain = loss(ids, None)
    assert abs(loss(ids, torch.ones(1, 48)) - plain) < 1e-5 and abs(loss(ids, 3 * torch.ones(1, 48)) - plain) < 1e-5
    at_30 = torch.zeros(1, 48)
    at_30[0, 30] = 1.0
    prefix_last = torch.zeros(1, 31)
    prefix_last[0, 30] = 1.0
    assert abs(loss(ids, at_30) - loss(ids[:, :31], prefix_last)) < 1e-5
    assert abs(loss(ids, at_30) - plain) > 1e-3


def test_the_cache_takes_its_tokens_out_of_the_transfer_target():
    """Stage 1 with a cache: the memory's target is full attention over the far tokens the cache does not hold
    (a cache holding every evicted token leaves it nothing: lam = 0), and o_full is full attention either way."""
    from tptt_runtime.ops import exact_cache

    torch.manual_seed(0)
    layer = TitansModel(peaked_model(), TPTT.replace(window=4, sinks=1, mag_weight=0.3)).layers[0]
    q, k, v = torch.randn(1, 4, 20, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    scores = torch.rand(1, 2, 20)
    full, _, lam = split_attention(q, k, v, layer)
    assert lam[..., 10:].min() > 0
    everything = exact_cache.held_over_time(scores, window=4, sinks=1, size=20)
    held_full, _, none_left = split_attention(q, k, v, layer, everything)
    torch.testing.assert_close(held_full, full)
    assert none_left.abs().max() == 0
    some = exact_cache.held_over_time(scores, window=4, sinks=1, size=2)
    _, _, rest = split_attention(q, k, v, layer, some)
    assert (rest <= lam + 1e-6).all() and (rest[..., 10:] < lam[..., 10:]).any()


def test_attention_transfer_forward_is_the_teachers():
    """In stage 1 every layer passes full attention's output on (each learns on the inputs the teacher gives
    it): the student's logits are the base model's, whatever its memory and gates hold."""
    torch.manual_seed(0)
    config = TPTT.replace(mag_gate="learned", mag_weight=0.3, feature_map="learned", window=4, sinks=1)
    teacher, student = peaked_model(), TitansModel(peaked_model(), config)
    ids = torch.randint(3, 97, (2, 40))
    with student.hooked(AttentionTransfer()) as hook, torch.no_grad():
        logits = student.hf(input_ids=ids, use_cache=False).logits
    assert len(hook.losses) == len(student.layers)
    with torch.no_grad():
        torch.testing.assert_close(logits, teacher(input_ids=ids, use_cache=False).logits, atol=1e-4, rtol=0)
        assert (student.hf(input_ids=ids, use_cache=False).logits - logits).abs().max() > 1e-2  # serving differs
