"""The exact-token cache's retaining heads: their features against a slow reference, a fresh head adding
nothing to the write score, the fit learning what it is shown (a token class in random text) with nothing
else moving, and stage 0 of a conversion writing a fitted adapter."""

import pytest
import torch

from tests.conftest import tiny_model
from tptt_runtime.config import TpttConfig
from tptt_runtime.layers.liza import LayerHook
from tptt_runtime.layers.retaining import RetainingHead, head_features
from tptt_runtime.model import TitansModel
from tptt_runtime.train.distill import Trainer, TrainConfig
from tptt_runtime.train.retain import fit_retaining_heads, retain_documents

CONFIG = TpttConfig(window=5, sinks=1, mag_weight=0.5, chunk_size=4, cache_tokens=3, cache_score="retain")


def marked(ids: torch.Tensor) -> torch.Tensor:
    """The tokens the tests' heads learn to spot: every id that is a multiple of 5."""
    return ids % 5 == 0


def random_documents(count: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 97, (count, length), generator=torch.Generator().manual_seed(seed))


class HeadLogits(LayerHook):
    """Each layer's retaining head logits [Hkv, T] of a one-row stateless forward."""

    def __init__(self):
        self.logits = {}

    def prefill(self, layer, hidden_states, q, k, v):
        self.logits[layer.layer_idx] = layer.retaining_head(head_features(q, k, v))[0]


def test_features_are_the_groups_queries_the_key_and_the_value():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, 5, 3, generator=generator) for heads in (6, 2, 2))
    features = head_features(q, k, v)
    assert features.shape == (2, 2, 5, 5 * 3)
    for b in range(2):
        for h in range(2):
            for t in range(5):
                expected = torch.cat([q[b, 3 * h + g, t] for g in range(3)] + [k[b, h, t], v[b, h, t]])
                assert torch.equal(features[b, h, t], expected)


def test_a_fresh_head_adds_nothing_to_the_write_score():
    head = RetainingHead(2, 15, torch.nn.Linear(1, 1))
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, heads, 7, 3, generator=generator) for heads in (6, 2, 2))
    write = torch.rand(1, 2, 7, generator=generator)
    write[0, 0, 3] = 0.0  # an empty write counts as the floor, not as -inf
    torch.testing.assert_close(head.score(q, k, v, write), write.clamp(min=1e-8).log())


def test_retain_weight_scales_the_heads_logit_and_zero_ranks_by_the_write_alone():
    """score = log(write) + retain_weight * logit; a model with retain_weight 0 and fitted (nonzero) heads gives
    the logits of the same model scoring by the write alone, whatever the heads say."""
    head = RetainingHead(2, 15, torch.nn.Linear(1, 1))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    q, k, v = (torch.randn(1, heads, 7, 3, generator=generator) for heads in (6, 2, 2))
    write = torch.rand(1, 2, 7, generator=generator) + 0.1
    logit = head(head_features(q, k, v))
    torch.testing.assert_close(head.score(q, k, v, write, 0.25), write.log() + 0.25 * logit)

    fitted = TitansModel(tiny_model("llama"), CONFIG)
    with torch.no_grad():
        for layer in fitted.layers:
            for parameter in layer.retaining_head.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    ids = random_documents(1, 40, seed=5)[0]
    logits = {}
    configs = {"weight 0": CONFIG.replace(retain_weight=0.0), "write": CONFIG.replace(cache_score="write"),
               "weight 1": CONFIG}
    for name, config in configs.items():
        model = TitansModel(tiny_model("llama"), config)
        model.hf.load_state_dict(fitted.hf.state_dict(), strict=False)  # the write model has no heads to load
        logits[name] = model.forward_full(ids)
    torch.testing.assert_close(logits["weight 0"], logits["write"])
    assert not torch.allclose(logits["weight 1"], logits["write"])


@pytest.mark.parametrize("weight", [-0.5, float("inf"), float("nan")])
def test_retain_weight_must_be_finite_and_not_negative(weight):
    with pytest.raises(ValueError, match="retain_weight"):
        CONFIG.replace(retain_weight=weight)


@pytest.mark.parametrize("pool", [-1, "window", 2.0])
def test_cache_pool_must_be_below_the_window(pool):
    """A pooled score is final before its token leaves the window only while the pool is narrower than it."""
    with pytest.raises(ValueError, match="cache_pool"):
        CONFIG.replace(cache_pool=CONFIG.window if pool == "window" else pool)
    assert CONFIG.replace(cache_pool=CONFIG.window - 1).cache_pool == CONFIG.window - 1


def test_the_fit_learns_the_marked_tokens_and_moves_nothing_else():
    """On random token ids whose multiples of 5 are the 'statements', every layer's fitted head (standardization
    folded into its weights) gives those tokens higher logits on documents it never saw, and the reported
    validation loss is well under chance; LoRA, gates and the base weights are untouched."""
    model = TitansModel(tiny_model("llama"), CONFIG.replace(mag_gate="learned", mag_weight=0.1))
    before = {name: p.clone() for name, p in model.hf.named_parameters() if ".retaining_head." not in name}
    documents = random_documents(40, 64, seed=2)
    report = fit_retaining_heads(model, documents, marked(documents))
    assert report["stage"] == "retain" and report["documents"] == 40
    assert report["validation_loss"] < 0.35 < 0.69  # chance: ln 2
    assert all(torch.equal(p, before[name]) for name, p in model.hf.named_parameters() if name in before)

    unseen = random_documents(1, 48, seed=3)
    with model.hooked(HeadLogits()) as hook, torch.no_grad():
        model.forward_full(unseen[0])
    positive = marked(unseen[0])
    for logits in hook.logits.values():  # [Hkv, T]
        assert (logits[:, positive].mean(-1) > logits[:, ~positive].mean(-1) + 2.0).all()


def test_fitting_needs_retaining_heads_and_statements():
    documents = random_documents(2, 20, seed=0)
    with pytest.raises(ValueError, match="retain"):
        fit_retaining_heads(TitansModel(tiny_model("llama"), CONFIG.replace(cache_score="write")), documents,
                            marked(documents))
    with pytest.raises(ValueError, match="no fact"):
        fit_retaining_heads(TitansModel(tiny_model("llama"), CONFIG), documents, torch.zeros_like(documents).bool())
    with pytest.raises(ValueError, match="retain_docs"):
        Trainer(tiny_model("llama"), TitansModel(tiny_model("llama"), CONFIG.replace(cache_score="write")),
                TrainConfig(steps=1, seq_len=20, retain_docs=2), documents, None)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="cache_score"):
        TpttConfig(cache_tokens=3, cache_score="learned")


def test_documents_are_retrieval_documents_with_their_statements(default_model):
    tokenizer = default_model.tokenizer
    text = " ".join(f"Line {i} is about tides, maps and lanterns." for i in range(160))
    prose = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:512]] * 4)
    documents, stated = retain_documents(tokenizer, prose, 3, seed=0)
    assert documents.shape == stated.shape == (3, 512) and stated.any(dim=1).all()
    again, _ = retain_documents(tokenizer, prose, 3, seed=0)
    assert torch.equal(documents, again)
    with pytest.raises(ValueError, match="documents"):
        retain_documents(tokenizer, prose, 5, seed=0)


def test_stage_0_fits_the_heads_of_the_default_adapter_and_writes_them(tmp_path):
    """tptt-convert --init default --cache-score retain --retain-weight W --cache-pool R --retain-docs N
    --steps 0: the adapter that comes out holds the default's other weights unchanged, one fitted (non-zero)
    head per layer and the changed weight and pool, and loads back."""
    from safetensors.torch import load_file

    import tptt_runtime
    from tptt_runtime.loading import DEFAULT_ADAPTER
    from tptt_runtime.train.cli import main

    out = tmp_path / "retained"
    main(["--init", "default", "--out", str(out), "--cache-score", "retain", "--retain-weight", "0.5",
          "--cache-pool", "3", "--retain-docs", "6", "--steps", "0", "--seq-len", "512", "--device", "cpu"])
    assert TpttConfig.load(out) == TpttConfig.load(DEFAULT_ADAPTER).replace(
        base_model="default", cache_score="retain", retain_weight=0.5, cache_pool=3)
    before, after = load_file(DEFAULT_ADAPTER / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    heads = {name for name in after if ".retaining_head." in name}
    assert all(torch.equal(before[name], after[name]) for name in before if name not in heads)
    assert set(after) == set(before) | heads and len(heads) == 30 * 4
    assert all(after[name].abs().max() > 0 for name in heads if name.endswith(".w2"))
    model = tptt_runtime.load(str(out))
    assert model.config.retains and all(layer.retaining_head.w2.abs().max() > 0 for layer in model.layers)
