"""Adapters: a LoRA adapter saved by us, and a checkpoint in the upstream tptt layout, load back exactly."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import tptt_runtime as tr
from tests.conftest import tiny_model
from tptt_runtime import TitansModel, TpttConfig
from tptt_runtime.adapters import add_lora, save_adapter

TOKENS = torch.randint(3, 97, (23,), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def base_dir(tmp_path):
    path = tmp_path / "base"
    tiny_model("llama").save_pretrained(path)
    return path


def model_with_random_lora(base_dir, config):
    model = TitansModel(AutoModelForCausalLM.from_pretrained(base_dir), config)
    add_lora(model.hf, config)
    with torch.no_grad():
        for name, param in model.hf.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return model


def test_lora_adapter_round_trip(base_dir, tmp_path):
    config = TpttConfig(window=6, sinks=1, mag_weight=0.5, lora_targets=["k_proj", "o_proj", "q_proj", "v_proj"],
                        base_model=str(base_dir))
    trained = model_with_random_lora(base_dir, config)
    expected = trained.forward_full(TOKENS)
    save_adapter(trained.hf, config, tmp_path / "adapter")
    loaded = tr.load(tmp_path / "adapter")
    assert loaded.config == config
    torch.testing.assert_close(loaded.forward_full(TOKENS), expected, atol=1e-4, rtol=0)
    plain = tr.load(base_dir, window=6, sinks=1, mag_weight=0.5)
    assert (plain.forward_full(TOKENS) - expected).abs().max() > 1e-3  # the adapter mattered
    assert plain.fingerprint != loaded.fingerprint


def test_upstream_checkpoint_imports(base_dir, tmp_path):
    """Layout written by upstream TpttModel.save_pretrained: config.json (model_type tptt) + LoRA weights named
    model.model.layers.N.self_attn.base_attn.<proj>.lora_X.default.weight."""
    config = TpttConfig(window=6, mag_weight=0.5, order=2, trick="derivative", beta_gate="k", alpha_gate="c",
                        lora_rank=4, lora_alpha=8.0, lora_targets=["q_proj", "v_proj"], base_model=str(base_dir))
    ours = model_with_random_lora(base_dir, config)
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    (upstream / "config.json").write_text(json.dumps({
        "model_type": "tptt", "base_model_name": str(base_dir), "operator_mode": "delta_product",
        "mag_weight": 0.5, "cross_gate": False, "max_self_attn_length": 6, "max_chunk_size": 64,
        "lora_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}))
    weights = {name.replace("model.layers", "model.model.layers").replace("self_attn.", "self_attn.base_attn."): p
               for name, p in ours.hf.named_parameters() if "lora_" in name}
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, upstream / "adapter_model.safetensors")
    imported = tr.load(upstream)
    assert (imported.config.order, imported.config.window, imported.config.lora_rank) == (2, 6, 4)
    torch.testing.assert_close(imported.forward_full(TOKENS), ours.forward_full(TOKENS), atol=1e-4, rtol=0)


def test_upstream_options_without_equivalent_are_refused(base_dir, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "tptt", "base_model_name": str(base_dir),
                                                      "bidirectional": True}))
    with pytest.raises(ValueError, match="bidirectional"):
        tr.load(tmp_path)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither"):
        tr.load(tmp_path / "nowhere")
