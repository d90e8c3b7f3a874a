"""Inference-time fusion of projections that read the same input: one matmul instead of two or three.

    q, k, v of a LiZA layer      -> LiZAttention.qkv_weight / qkv_bias (buffers, set by `fuse_projections`)
    gate, up of a gated MLP      -> FusedGatedMLP (replaces the MLP module, same submodule names)

and every Linear (and the fused gate/up matmul) computes a forward of one token per row on a CPU as
weight @ x^T (`linear`): with MKL that form ran 1.3-2.3x faster than x @ weight^T for 2-16 rows (the decode
step's matmuls over all weights of the default model: 39 against 88 ms at 2 rows, 75 against 97 ms at 16,
the same at 1 row). Its result is the product's transpose, a strided view: fine for what follows a Linear
in a decoder layer (a residual add, an activation, another matmul), not for q, k and v, whose attention
reads rows (the compiled step gathered them element by element), so the fused q/k/v matmul stays F.linear.

Decoding one token is bound by reading the weights and by per-operation overhead; a fused matmul reads the
same bytes in one call. The original Linear modules stay in place and keep their parameter names, so state
dicts and fingerprints are unchanged; their weights become views of the fused tensor (no extra memory until
something moves the model to another device or dtype, which converts the fused copy too). Fuse only after
LoRA is merged and the model sits on its final device: training never fuses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _fused(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenated weight (and bias) of `linears`; each Linear's parameters become views into them."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    has_bias = [linear.bias is not None for linear in linears]
    bias = None
    if any(has_bias):
        bias = torch.cat([linear.bias.detach() if linear.bias is not None else
                          linear.weight.new_zeros(linear.out_features) for linear in linears])
    start = 0
    for linear in linears:
        end = start + linear.out_features
        linear.weight.data = weight[start:end]
        if linear.bias is not None:
            linear.bias.data = bias[start:end]
        start = end
    return weight, bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, as weight @ x^T for one token per row ([B, 1, in]) on a CPU (see the module docstring)."""
    if x.device.type != "cpu" or x.dim() != 3 or x.shape[1] != 1:
        return F.linear(x, weight, bias)
    out = (weight @ x[:, 0].T).T  # strided: rows are columns of the product
    return (out if bias is None else out + bias).unsqueeze(1)


class DecodeLinear(nn.Linear):
    """An nn.Linear whose forward is `linear` (Linear modules are switched to it in place: same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def _plain_linear(module) -> bool:
    return type(module) is nn.Linear


class FusedGatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up in one matmul."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        weight, bias = _fused([self.gate_proj, self.up_proj])
        self.register_buffer("gate_up_weight", weight, persistent=False)
        self.register_buffer("gate_up_bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def _is_gated_mlp(module: nn.Module) -> bool:
    """Exactly the Llama-style MLP (gate_proj, up_proj, down_proj, act_fn and nothing else), unwrapped."""
    names = {name for name, _ in module.named_children()}
    return names == {"gate_proj", "up_proj", "down_proj", "act_fn"} and all(
        _plain_linear(getattr(module, name)) for name in ("gate_proj", "up_proj", "down_proj")) and \
        module.gate_proj.out_features == module.up_proj.out_features and \
        type(module).forward.__qualname__.endswith("MLP.forward")


def fuse_projections(model: nn.Module, attention_layers) -> int:
    """Fuse q/k/v of every LiZA layer and gate/up of every Llama-style MLP of `model`, and make every plain
    Linear a DecodeLinear; returns how many modules were fused."""
    fused = 0
    for layer in attention_layers:
        projections = [layer.q_proj, layer.k_proj, layer.v_proj]
        if all(_plain_linear(p) for p in projections):
            layer.qkv_weight, layer.qkv_bias = _fused(projections)
            fused += 1
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_gated_mlp(child):
                setattr(parent, name, FusedGatedMLP(child))
                fused += 1
    for module in model.modules():
        if _plain_linear(module):
            module.__class__ = DecodeLinear
    return fused
