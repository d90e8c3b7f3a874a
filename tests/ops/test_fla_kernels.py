"""fla's DeltaProduct kernel behind our layout: the translation (CPU) and the kernel itself (GPU, marked `gpu`).

On a CPU the kernel is replaced by `fla_contract`, a per-token loop written from fla's documented contract
(time first, a token's Householder steps adjacent, no grouped-query heads, q scaled by `scale`): it checks that
`fla_kernels.chunk` feeds that contract what our reference means. On a CUDA machine with fla installed the real
kernel is compared with the reference, and the whole converted model with the torch path.
"""

import pytest
import torch

from tests.ops.test_delta_product import random_inputs
from tptt_runtime.ops import delta_product as dp
from tptt_runtime.ops import fla_kernels


def needs_fla_gpu(test):
    skip = pytest.mark.skipif(not torch.cuda.is_available() or fla_kernels._kernel() is None,
                              reason="needs CUDA and fla-core")
    return pytest.mark.gpu(skip(test))


def fla_contract(q, k, v, g, beta, num_householder, scale, initial_state=None, output_final_state=False):
    """q [B, T, H, K]; k, v [B, T * n, H, *]; beta [B, T * n, H]; g [B, T, H] or None; state [B, H, K, V]."""
    batch, seq_len, heads, key_dim = q.shape
    q, k, v, beta = (x.float() for x in (q, k, v, beta))
    state = (torch.zeros(batch, heads, key_dim, v.shape[-1]) if initial_state is None else initial_state.clone())
    out = torch.empty(batch, seq_len, heads, v.shape[-1])
    for t in range(seq_len):
        if g is not None:
            state = state * g[:, t].exp()[..., None, None]
        for step in range(t * num_householder, (t + 1) * num_householder):
            key, value = k[:, step], v[:, step]  # [B, H, K], [B, H, V]
            error = value - torch.einsum("bhk,bhkv->bhv", key, state)
            state = state + beta[:, step, :, None, None] * key[..., :, None] * error[..., None, :]
        out[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, state)
    return out, (state if output_final_state else None)


def bf16_round(*tensors):
    """The inputs as the kernel sees them (bfloat16), so the reference differs from it by float error only."""
    return [x.to(torch.bfloat16).float() for x in tensors]


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_translation_matches_the_reference(order, gated, with_state):
    q, k, v, beta, g, state = random_inputs(13, order)
    q, k, v, beta = bf16_round(q, k, v, beta)
    g, state = (g if gated else None), (state if with_state else None)
    ref_out, ref_state = dp.naive_recurrent(q, k, v, beta, g, state, True)
    out, final = fla_kernels.chunk(q, k, v, beta, g, state, True, kernel=fla_contract)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final, ref_state, atol=1e-4, rtol=1e-4)
    assert final.shape == ref_state.shape and out.dtype == q.dtype


def test_not_usable_on_cpu_or_with_the_nonlinearity():
    q = torch.zeros(1, 3, 4, 8)
    assert not fla_kernels.usable(q, nonlinear_chunk=0)
    if torch.cuda.is_available():
        assert not fla_kernels.usable(q.cuda(), nonlinear_chunk=64)


@needs_fla_gpu
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("seq_len", [1, 63, 200])
@pytest.mark.parametrize("gated", [False, True])
def test_kernel_matches_the_reference(order, seq_len, gated):
    q, k, v, beta, g, state = random_inputs(seq_len, order, kv_heads=2, groups=3, key_dim=64, value_dim=64)
    q, k, v, beta = bf16_round(q, k, v, beta)
    g = g if gated else None
    ref_out, ref_state = dp.naive_recurrent(q, k, v, beta, g, state, True)
    on_gpu = [None if x is None else x.cuda() for x in (q, k, v, beta, g, state)]
    out, final = fla_kernels.chunk(*on_gpu, output_final_state=True)
    torch.testing.assert_close(out.cpu(), ref_out, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(final.cpu(), ref_state, atol=3e-2, rtol=3e-2)


@needs_fla_gpu
def test_a_converted_model_on_the_kernel_matches_the_torch_path(monkeypatch):
    """A random Llama (head_dim 64, grouped-query heads) converted with the memory at mu = 0.5, bfloat16 weights
    on CUDA, 300 tokens (several windows): logits on the kernel path match the torch path's to bf16 error."""
    import transformers as hf

    from tptt_runtime.config import TpttConfig
    from tptt_runtime.model import TitansModel

    torch.manual_seed(0)
    base = hf.LlamaForCausalLM(hf.LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=512,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    model = TitansModel(base.to("cuda", torch.bfloat16), TpttConfig(window=16, sinks=2, mag_weight=0.5))
    ids = torch.randint(3, 97, (300,), generator=torch.Generator().manual_seed(0))
    with_kernel = model.forward_full(ids)
    monkeypatch.setattr(fla_kernels, "usable", lambda q, nonlinear_chunk: False)
    torch_path = model.forward_full(ids)
    scale = torch_path.abs().max()
    torch.testing.assert_close(with_kernel / scale, torch_path / scale, atol=3e-2, rtol=0)
