"""Shared fixtures: tiny random models of every supported family, and the real default model (loaded once)."""

import atexit
import copy
import os
import shutil
import tempfile

import pytest
import torch
import transformers as hf

# compiled decode graphs (TitansModel.compile) of this run go to a directory of their own, not ~/.cache
if "TPTT_COMPILE_CACHE" not in os.environ:
    os.environ["TPTT_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="tptt-compiled-")
    atexit.register(shutil.rmtree, os.environ["TPTT_COMPILE_CACHE"], ignore_errors=True)

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    "llama": lambda: hf.LlamaConfig(**COMMON),
    "qwen2": lambda: hf.Qwen2Config(**COMMON),
    "qwen3": lambda: hf.Qwen3Config(**COMMON, head_dim=8),
    "mistral": lambda: hf.MistralConfig(**COMMON, sliding_window=4096),
    "gemma3_text": lambda: hf.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=4096,
                                               layer_types=["sliding_attention", "full_attention"]),
    "olmo": lambda: hf.OlmoConfig(**COMMON, clip_qkv=2.0),
    "olmo2": lambda: hf.Olmo2Config(**COMMON),
    "olmoe": lambda: hf.OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, clip_qkv=3.0),
}


def tiny_model(family: str, seed: int = 0):
    """A random Hugging Face causal LM of `family`, in eval mode, float32."""
    torch.manual_seed(seed)
    return hf.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()


COUNTING = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
            "seventeen eighteen nineteen twenty").split()


def counting_prompts(tokenizer, count: int) -> list[list[int]]:
    """`count` prompts, each one word longer than the one before: "one two three and", "one two three four and"..."""
    assert count <= len(COUNTING) - 2, "add words to COUNTING"
    return [tokenizer(" ".join(COUNTING[:3 + i]) + " and")["input_ids"] for i in range(count)]


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def tiny_pair(family):
    """(converted-to-be copy, untouched base) of one tiny model."""
    base = tiny_model(family)
    return copy.deepcopy(base), base


@pytest.fixture(scope="session")
def default_model():
    import tptt_runtime as tr

    return tr.load("default")
