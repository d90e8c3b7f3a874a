"""Inject LiZA layers into a Hugging Face causal LM, by module structure rather than by model name.

An attention module is anything with q_proj, k_proj, v_proj and o_proj projections and a head_dim: that
covers Llama, Qwen2/3, Mistral, Gemma3 (text), OLMo, OLMo2 and OLMoE. The base model keeps its embeddings,
MLPs / experts, norms and head; only the attention modules are swapped. The model's own causal-mask
construction is switched off (LiZA builds its window masks from positions), so a 64k-token forward never
materialises a 64k x 64k mask.
"""

from __future__ import annotations

from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .config import TpttConfig
from .layers.liza import ForwardContext, LiZAttention

ATTENTION_IMPLEMENTATION = "tptt_liza"


def _attention_replaced(*args, **kwargs):
    raise RuntimeError("LiZA replaced every attention module; the base attention function must not be called")


def _no_mask(*args, **kwargs):
    return None


AttentionInterface.register(ATTENTION_IMPLEMENTATION, _attention_replaced)
AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, _no_mask)


def _is_attention(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"))


def find_attention_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, module) of every attention module, in layer order."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if _is_attention(child) and not isinstance(child, LiZAttention):
                found.append((parent, name, child))
    return found


def find_rotary(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            return module
    raise ValueError(f"{type(model).__name__} has no rotary embedding module; LiZA needs rotary positions")


def inject_liza(model: nn.Module, config: TpttConfig, context: ForwardContext) -> list[LiZAttention]:
    """Replace every attention module of `model` (in place) by a LiZAttention sharing its projections."""
    targets = find_attention_modules(model)
    if not targets:
        raise ValueError(f"no attention module with q/k/v/o projections found in {type(model).__name__}")
    rotary = find_rotary(model)
    layers = []
    for layer_idx, (parent, name, attention) in enumerate(targets):
        liza = LiZAttention(attention, config, layer_idx, rotary, context)
        setattr(parent, name, liza)
        layers.append(liza)
    model.config._attn_implementation = ATTENTION_IMPLEMENTATION
    text_config = getattr(model.config, "text_config", None)
    if text_config is not None:
        text_config._attn_implementation = ATTENTION_IMPLEMENTATION
    return layers
