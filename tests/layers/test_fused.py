"""Inference-time fusion (q/k/v in one matmul, gate/up in one matmul) computes what the separate projections
compute, on every family, and changes neither parameter names nor the fingerprint (stored states stay valid)."""

import torch

from tests.conftest import tiny_model
from tptt_runtime import TitansModel, TpttConfig
from tptt_runtime.layers.fused import DecodeLinear, FusedGatedMLP, fuse_projections, linear

CONFIG = TpttConfig(window=5, sinks=1, mag_weight=0.5, chunk_size=4)


def test_fused_model_matches_unfused(family):
    tokens = torch.randint(3, 97, (23,), generator=torch.Generator().manual_seed(0))
    plain = TitansModel(tiny_model(family), CONFIG)
    fused = TitansModel(tiny_model(family), CONFIG)
    names = list(fused.hf.state_dict())
    assert fuse_projections(fused.hf, fused.layers) >= len(fused.layers)  # at least every attention layer
    assert all(layer.qkv_weight is not None for layer in fused.layers)
    fused.refresh_fingerprint()
    assert list(fused.hf.state_dict()) == names and fused.fingerprint == plain.fingerprint
    torch.testing.assert_close(fused.forward_full(tokens), plain.forward_full(tokens), atol=1e-5, rtol=0)
    state_plain, state_fused = plain.new_session(), fused.new_session()
    plain.prefill(state_plain, tokens[:9]), fused.prefill(state_fused, tokens[:9])
    torch.testing.assert_close(fused.step(state_fused, 5), plain.step(state_plain, 5), atol=1e-5, rtol=0)
    assert isinstance(fused.hf.get_output_embeddings(), DecodeLinear)


def test_gated_mlps_are_fused_and_share_weights():
    model = TitansModel(tiny_model("llama"), CONFIG)
    fuse_projections(model.hf, model.layers)
    mlps = [m for m in model.hf.modules() if isinstance(m, FusedGatedMLP)]
    assert len(mlps) == len(model.layers)
    mlp = mlps[0]
    assert mlp.gate_proj.weight.data_ptr() == mlp.gate_up_weight.data_ptr()  # views: no second copy
    assert model.layers[0].q_proj.weight.data_ptr() == model.layers[0].qkv_weight.data_ptr()


def test_linear_for_one_token_per_row_is_f_linear():
    """weight @ x^T for [B, 1, in] (with and without bias), F.linear itself for anything else."""
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(7, 5, generator=gen), torch.randn(7, generator=gen)
    for shape in [(4, 1, 5), (1, 1, 5), (2, 3, 5), (5,)]:
        x = torch.randn(*shape, generator=gen)
        for b in (None, bias):
            out = linear(x, weight, b)
            assert out.shape == torch.nn.functional.linear(x, weight, b).shape
            torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, b), atol=1e-6, rtol=1e-6)
