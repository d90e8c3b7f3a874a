"""Gated DeltaProduct linear attention: a reference loop, a chunkwise prefill and a one-token decode step.

Pure tensor functions; nothing here knows about layers, models or sessions. All three share one vocabulary
(flash-linear-attention's): `initial_state`, `output_final_state`. Shapes (heads first):

    q:     [B, Hq, T, K]      queries, one per real token (Hq = Hkv * G, grouped-query heads share a state)
    k:     [B, Hkv, T, n, K]  n = order virtual keys per token, unit L2 norm
    v:     [B, Hkv, T, n, V]  virtual values
    beta:  [B, Hkv, T, n]     write strength of each Householder step
    g:     [B, Hkv, T]        log decay (<= 0), applied once per token before its first step; None = no decay
    state: [B, Hkv, K, V]     float32

Per token t (docs/math.md, section 2):  S <- exp(g_t) S;  for j in 1..n:  S <- S + beta k (v - k^T S)^T;
o_t = S^T q_t;  then, if `nonlinear_chunk` > 0 and the absolute position offset + t + 1 is a multiple of it,
S <- phi(S). With `output_write_norms`, each function also returns [B, Hkv, T]: the size of what each token's
first step wrote, ||beta (v - k^T S)|| (write strength times prediction error, the exact-token cache's score,
ops/exact_cache.py). The chunkwise form is an exact reformulation of that loop: for every chunk size and every length
its output and final state equal `naive_recurrent` up to float error. Chunks are aligned to absolute positions
(zero-padded with identity steps), so the nonlinearity always falls on a chunk boundary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import as_float32

NONLINEARITY_SCALE = 2.0


def memory_nonlinearity(state: torch.Tensor) -> torch.Tensor:
    """phi(S) = (S / c) * gelu_tanh(c * S / ||S||_row), rows over the value dim; c = 2."""
    row_norm = state.norm(dim=-1, keepdim=True) + 1e-6
    return (state / NONLINEARITY_SCALE) * F.gelu(NONLINEARITY_SCALE * state / row_norm, approximate="tanh")


def _initial(state: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    batch, heads, _, _, key_dim = k.shape
    if state is None:
        return k.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=torch.float32)
    return state.float()


def _token_update(state, k, v, beta, g):
    """One token: decay, then its Householder steps. state: [B, Hkv, K, V] float32; k: [B, Hkv, n, K];
    v: [B, Hkv, n, V]; beta: [B, Hkv, n]; g: [B, Hkv] or None. Returns a new tensor (state is not modified)
    and the norm of the first step's write [B, Hkv]."""
    if g is not None:
        state = state * as_float32(g).exp()[..., None, None]
    keys, values, beta = as_float32(k).unsqueeze(-1), as_float32(v).unsqueeze(-2), as_float32(beta)[..., None, None]
    writes = []
    for j in range(k.shape[2]):
        key = keys[:, :, j]  # [B, Hkv, K, 1]
        predicted = key.transpose(-1, -2) @ state  # [B, Hkv, 1, V]
        writes.append(beta[:, :, j] * (values[:, :, j] - predicted))
        state = state + key * writes[-1]
    return state, writes[0].norm(dim=-1)[..., 0]


def naive_recurrent(q, k, v, beta, g, initial_state=None, output_final_state=False, nonlinear_chunk=0, offset=0,
                    output_write_norms=False):
    """The reference: one token, one Householder step at a time. Slow and obviously correct."""
    batch, kv_heads, seq_len, _, _ = k.shape
    groups = q.shape[1] // kv_heads
    state = _initial(initial_state, k, v).clone()
    q = q.float().reshape(batch, kv_heads, groups, seq_len, -1)
    out = q.new_empty(batch, kv_heads, groups, seq_len, v.shape[-1])
    write_norms = q.new_empty(batch, kv_heads, seq_len)
    for t in range(seq_len):
        state, write_norms[:, :, t] = _token_update(state, k[:, :, t], v[:, :, t], beta[:, :, t],
                                                    None if g is None else g[:, :, t])
        out[:, :, :, t] = torch.einsum("bhgk,bhkv->bhgv", q[:, :, :, t], state)
        if nonlinear_chunk and (offset + t + 1) % nonlinear_chunk == 0:
            state = memory_nonlinearity(state)
    result = out.reshape(batch, kv_heads * groups, seq_len, -1), (state if output_final_state else None)
    return result + (write_norms,) if output_write_norms else result


def recurrent_step(q, k, v, beta, g, initial_state, positions, nonlinear_chunk=0, output_write_norms=False):
    """One decode token per batch row (T = 1); `positions` [B] are the tokens' absolute positions.

    Returns (o [B, Hq, 1, V], new state). Rows may sit at different positions: the nonlinearity is applied
    per row with a mask, without a host synchronisation.

    The loop's n Householder steps and the read, regrouped so that the state is read once and written once
    (a decode step is bound by moving states, not by arithmetic). With S0 = exp(g) S and the reads
    P = [k_1 .. k_n, q_1 .. q_G]^T S0 in one pass, step j writes
        w_j = beta_j (v_j - k_j^T S0 - sum_{i<j} (k_j . k_i) w_i)
    and then S' = S0 + sum_j k_j w_j^T, o = q^T S0 + sum_j (q . k_j) w_j: the loop's values, summed in
    another order.
    """
    batch, kv_heads, _, order, key_dim = k.shape
    groups = q.shape[1] // kv_heads
    state = as_float32(initial_state)
    keys, values, beta = as_float32(k[:, :, 0]), as_float32(v[:, :, 0]), as_float32(beta[:, :, 0])  # [B, Hkv, n, .]
    queries = as_float32(q).reshape(batch, kv_heads, groups, key_dim)
    decay = 1.0 if g is None else as_float32(g[:, :, 0]).exp()[..., None, None]  # [B, Hkv, 1, 1]
    keys_and_queries = torch.cat([keys, queries], dim=2)  # [B, Hkv, n + G, K]
    reads = (keys_and_queries @ state) * decay  # [B, Hkv, n + G, V]
    dots = keys_and_queries @ keys.transpose(-1, -2)  # [B, Hkv, n + G, n]: k_j . k_i, then q . k_j
    key_dots, query_dots = dots[:, :, :order], dots[:, :, order:]
    writes = []
    for j in range(order):
        predicted = reads[:, :, j]
        for i in range(j):
            predicted = predicted + key_dots[:, :, j, i, None] * writes[i]
        writes.append(beta[:, :, j, None] * (values[:, :, j] - predicted))  # [B, Hkv, V]
    new_state = state * decay
    for key, write in zip(keys.unbind(2), writes):  # pointwise outer products: one fused pass over the state
        new_state = new_state + key[..., :, None] * write[..., None, :]
    out = reads[:, :, order:] + query_dots @ torch.stack(writes, dim=2)
    out = out.reshape(batch, kv_heads * groups, 1, -1)
    if nonlinear_chunk:
        at_boundary = ((positions + 1) % nonlinear_chunk == 0)[:, None, None, None]
        new_state = torch.where(at_boundary, memory_nonlinearity(new_state), new_state)
    return (out, new_state, writes[0].norm(dim=-1).unsqueeze(-1)) if output_write_norms else (out, new_state)


def _pad_time(x: torch.Tensor, lead: int, trail: int, dim: int = 2) -> torch.Tensor:
    """Zero-pad dim `dim` (time) with `lead` steps before and `trail` after."""
    if lead == 0 and trail == 0:
        return x
    pad = [0, 0] * (x.dim() - dim - 1) + [lead, trail]
    return F.pad(x, pad)


def chunk(q, k, v, beta, g, initial_state=None, output_final_state=False, chunk_size=64, nonlinear_chunk=0,
          offset=0, output_write_norms=False):
    """Chunkwise parallel prefill (WY form, no Python loop over tokens inside a chunk).

    Inside a chunk of L = C * n virtual steps with cumulative log decay Gam and S0 the state entering it:
        U = (I + A)^-1 (beta V - beta exp(Gam) K S0),  A_ij = beta_i exp(Gam_i - Gam_j) k_i.k_j  (j < i)
        o_i = exp(Gam_i) S0^T q_i + sum_{j<=i} exp(Gam_i - Gam_j) (q_i.k_j) u_j
        S_L = exp(Gam_L) S0 + sum_j exp(Gam_L - Gam_j) k_j u_j^T
    Everything that does not depend on S0 is computed for all chunks at once; only the state is carried.
    """
    if nonlinear_chunk:
        chunk_size = math.gcd(chunk_size, nonlinear_chunk)
    if g is None:
        g = torch.zeros(beta.shape[:3], device=beta.device)
    batch, kv_heads, seq_len, order, key_dim = k.shape
    value_dim, groups = v.shape[-1], q.shape[1] // kv_heads
    lead = offset % chunk_size
    trail = (-(lead + seq_len)) % chunk_size
    num_chunks = (lead + seq_len + trail) // chunk_size
    steps = chunk_size * order

    # padding steps have k = 0, beta = 0, g = 0: the identity transition
    k = _pad_time(k.float(), lead, trail).reshape(batch, kv_heads, num_chunks, steps, key_dim)
    v = _pad_time(v.float(), lead, trail).reshape(batch, kv_heads, num_chunks, steps, value_dim)
    beta = _pad_time(beta.float(), lead, trail).reshape(batch, kv_heads, num_chunks, steps)
    q = _pad_time(q.float(), lead, trail).reshape(batch, kv_heads, groups, num_chunks, chunk_size, key_dim)
    # the G query heads of a kv head as rows [B, Hkv, N, G * C, K]: plain batched matmuls, no broadcast copies
    q = q.permute(0, 1, 3, 2, 4, 5).reshape(batch, kv_heads, num_chunks, groups * chunk_size, key_dim)
    step_decay = _pad_time(g.float(), lead, trail).unsqueeze(-1)  # decay sits on each token's first step
    step_decay = F.pad(step_decay, (0, order - 1)).reshape(batch, kv_heads, num_chunks, steps)
    gam = step_decay.cumsum(-1)  # [B, Hkv, N, L]

    causal = torch.ones(steps, steps, dtype=torch.bool, device=k.device).tril()
    decay = (gam[..., :, None] - gam[..., None, :]).masked_fill(~causal, -math.inf).exp()  # [B, Hkv, N, L, L]
    a = (beta[..., :, None] * decay * (k @ k.transpose(-1, -2))).tril(-1)
    eye = torch.eye(steps, dtype=a.dtype, device=a.device)
    rhs = torch.cat([beta[..., None] * v, (beta * gam.exp())[..., None] * k], dim=-1)
    solved = torch.linalg.solve_triangular(a + eye, rhs, upper=False, unitriangular=True)
    u0, w = solved.split([value_dim, key_dim], dim=-1)  # U = u0 - w @ S0

    last_steps = torch.arange(chunk_size, device=k.device) * order + order - 1  # the step each query reads
    gam_q = gam[..., last_steps]  # [B, Hkv, N, C]
    query_decay = (gam_q[..., :, None] - gam[..., None, :]).masked_fill(~causal[last_steps], -math.inf).exp()
    intra = (q @ k.transpose(-1, -2)) * query_decay.repeat(1, 1, 1, groups, 1)  # [B, Hkv, N, G * C, L]
    q_decayed = q * gam_q.exp().repeat(1, 1, 1, groups).unsqueeze(-1)
    chunk_decay = gam[..., -1].exp()[..., None, None]  # [B, Hkv, N, 1, 1]
    k_to_end = (k * (gam[..., -1:] - gam).exp().unsqueeze(-1)).transpose(-1, -2)  # [B, Hkv, N, K, L]

    # only the state is sequential: carry it through the chunks, keeping each chunk's S0 and U; the outputs
    # then come from all chunks at once (lists, not buffers written in place: training backpropagates here)
    state = _initial(initial_state, k, v)
    entering, u = [], []
    first_position = offset - lead
    for c in range(num_chunks):
        entering.append(state)
        u.append(u0[:, :, c] - w[:, :, c] @ state)  # [B, Hkv, L, V]
        state = chunk_decay[:, :, c] * state + k_to_end[:, :, c] @ u[-1]
        end = first_position + (c + 1) * chunk_size
        if nonlinear_chunk and end % nonlinear_chunk == 0 and end <= offset + seq_len:
            state = memory_nonlinearity(state)
    u = torch.stack(u, dim=2)  # [B, Hkv, N, L, V]: what each step wrote
    out = intra @ u + q_decayed @ torch.stack(entering, dim=2)  # [B, Hkv, N, G * C, V]

    out = out.reshape(batch, kv_heads, num_chunks, groups, chunk_size, value_dim).permute(0, 1, 3, 2, 4, 5)
    out = out.reshape(batch, kv_heads * groups, num_chunks * chunk_size, value_dim)
    result = out[:, :, lead:lead + seq_len], (state if output_final_state else None)
    if not output_write_norms:
        return result
    first_steps = u[..., ::order, :]  # [B, Hkv, N, C, V]: u of each token's first step
    return result + (first_steps.norm(dim=-1).flatten(2)[..., lead:lead + seq_len],)
