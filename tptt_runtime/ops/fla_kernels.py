"""The chunkwise DeltaProduct prefill through flash-linear-attention's Triton kernel (CUDA, the `cuda` extra).

Only a layout translation: `chunk` takes and returns exactly what `delta_product.chunk` does and computes the
same recurrence (docs/math.md, section 2) with fla's `chunk_gated_delta_product`, whose contract is

    q [B, T, H, K];  k, v [B, T * n, H, *] (a token's n Householder steps adjacent);  beta [B, T * n, H];
    g [B, T, H] applied before a token's first step;  state [B, H, K, V];  o_t = scale * S_t^T q_t

Two differences are bridged here: fla has no grouped-query heads (q and k share H), so keys, values, gates and
the entering state are repeated for the G query heads of each kv head (the G copies then evolve identically and
one of them is returned), and its kernels refuse float32 inputs, so q, k, v, beta run in bfloat16 (or the
model's half dtype) while the state stays float32. The memory nonlinearity has no kernel: `usable` says no when
it is on, and the layer keeps the torch path.
"""

from __future__ import annotations

import functools

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def _kernel():
    """fla's chunk_gated_delta_product, or None where fla (or Triton) is not installed."""
    try:
        from fla.ops.gated_delta_product import chunk_gated_delta_product
    except ImportError:
        return None
    return chunk_gated_delta_product


def usable(q: torch.Tensor, nonlinear_chunk: int) -> bool:
    """Whether `chunk` can run this prefill: a CUDA tensor, fla installed, no memory nonlinearity."""
    return q.is_cuda and not nonlinear_chunk and _kernel() is not None


def chunk(q, k, v, beta, g, initial_state=None, output_final_state=False, kernel=None):
    """`delta_product.chunk`'s contract (heads first, k [B, Hkv, T, n, K], state [B, Hkv, K, V] float32) on
    fla's kernel. `kernel` replaces fla's function (tests check the translation against the reference)."""
    kernel = kernel or _kernel()
    batch, kv_heads, seq_len, order, _ = k.shape
    groups = q.shape[1] // kv_heads
    half = q.dtype if q.dtype in HALF_DTYPES else torch.bfloat16

    def per_query_head(x):  # [B, Hkv, ...] -> [B, Hq, ...]
        return x.repeat_interleave(groups, dim=1) if groups > 1 else x

    def steps_first(x):  # [B, Hq, T, n, ...] -> [B, T * n, Hq, ...]
        x = per_query_head(x).movedim(1, 3)  # [B, T, n, Hq, ...]
        return x.reshape(batch, seq_len * order, *x.shape[3:])

    out, state = kernel(
        q=q.transpose(1, 2).to(half),
        k=steps_first(k).to(half),
        v=steps_first(v).to(half),
        g=None if g is None else per_query_head(g).transpose(1, 2).float(),
        beta=steps_first(beta).to(half),
        num_householder=order,
        scale=1.0,
        initial_state=None if initial_state is None else per_query_head(initial_state.float()),
        output_final_state=output_final_state,
    )
    out = out.transpose(1, 2).to(q.dtype)  # [B, Hq, T, V]
    if state is not None:
        state = state[:, ::groups].float()  # the G copies of a kv head's state are identical
    return out, (state if output_final_state else None)
