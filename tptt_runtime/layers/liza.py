"""LiZAttention: one attention layer of a converted model, the pretrained projections shared by two branches.

    softmax branch  the base model's attention over sinks + window (ops/window_attention.py)
    linear branch   gated DeltaProduct memory over the whole past (ops/delta_product.py)
    Memory as Gate  o = (1 - mu) o_softmax + mu o_linear (+ (1 - mu) o_softmax * mu o_linear with cross_gate),
                    mu constant, or learned per head and token; o_linear the memory read at the softmax
                    branch's RMS or at its own size times a learned scale per head. The learned gate, scale,
                    feature map (for the memory's q and k), gate inputs (what the write strength beta and
                    the decay take from each token's k and v), per-head decays and the exact-token cache's
                    retaining head (layers/retaining.py) are the only parameters this module adds

The module replaces a Hugging Face attention module in place and keeps its projection submodules under the
same names (q_proj, k_proj, v_proj, o_proj, q_norm, k_norm), so state dicts and LoRA targets are unchanged.
Per-forward metadata (which session state, which positions) comes from a `ForwardContext` shared by all
layers of one model, never through the Hugging Face call signature. Every tensor of a session lives in the
layer's state dict, whose size is fixed at creation: nothing here grows with the context. Forwards write into
those tensors in place, never replace them, so a session holds exactly its own bytes (a replacing view would pin
the whole activation it was sliced from) and decode allocates no state.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TpttConfig
from ..ops import as_float32, delta_product, exact_cache, fla_kernels, memory_inputs, store
from ..ops import window_attention as window_ops
from .retaining import RetainingHead

QUERY_BLOCK = 128  # queries per block in the windowed prefill (64 and 256 measured slower at 2k)
VIRTUAL_KEY_EPS = 1e-3  # virtual keys are e / max(|e|, eps): a difference of two nearly equal keys (a token
                        # repeated at the start) has no direction to write, and a smaller eps would blow its
                        # float noise up to a write of its own (docs/math.md, 2)


@dataclass
class PrefillPiece:
    """New prompt tokens of B sessions that have all seen `start` tokens, each taking the same number T (B is
    usually 1): one piece of a packed prefill (TitansModel.prefill_packed), placed row after row along the
    tokens of a [1, N] forward."""
    layer_states: list[dict[str, torch.Tensor]]  # the sessions' per-layer tensors [B, ...], written in place
    start: int                                   # tokens each session has seen
    ids: torch.Tensor                            # [B, T] new token ids on the model's device
    all_logits: bool = False                     # logits after every new token, not only after the last


@dataclass
class DecodeRows:
    """One new token for each of B sessions, each at its own position: the decode rows of an engine step that
    also prefills, carried by the same packed forward as its PrefillPieces (placed along its tokens like a
    piece of B rows of one token)."""
    layer_states: list[dict[str, torch.Tensor]]  # the sessions' per-layer tensors [B, ...], written in place
    positions: torch.Tensor                      # [B] tokens each session has seen, on the model's device
    ids: torch.Tensor                            # [B, 1] the new token ids
    filling_sinks: bool = False                  # a row's new token is one of the first `sinks` (host-side)
    all_logits = False                           # as a PrefillPiece without all_logits: one logit row per session


@dataclass
class ForwardContext:
    """What every LiZA layer needs to know about the forward in flight (set by TitansModel around one call)."""

    # decode: per-layer state dicts [B, ...], updated in place
    layer_states: list[dict[str, torch.Tensor]] | None = None
    # decode: [B] absolute position of the single new token of each row
    positions: torch.Tensor | None = None
    # decode: whether a row's new token is one of the first `sinks` tokens (known on the host)
    filling_sinks: bool = False
    # prefill: the pieces of several sessions, one after another along the tokens of a [1, N] forward,
    # decode rows among them (at most one DecodeRows); None (and no positions) = a stateless forward from
    # token 0 (forward_full, training)
    pieces: list[PrefillPiece | DecodeRows] | None = None
    # what the first layer computed from positions alone, for the others (see `shared`)
    memo: dict = field(default_factory=dict)
    # research hook (training's attention transfer, evaluation's recall probes): see LayerHook; None to serve
    hook: "LayerHook | None" = None

    def reset(self) -> None:
        """Back to no forward in flight (after every forward)."""
        self.layer_states, self.positions, self.filling_sinks, self.pieces = None, None, False, None
        self.memo.clear()

    def __deepcopy__(self, memo) -> "ForwardContext":
        """A copied model (TitansModel.compiled_copy, made while the original serves) gets a context of its own
        with no forward in flight: never the original's session tensors or pieces."""
        return ForwardContext()

    def shared(self, key, compute):
        """`compute()` once per forward for every layer asking with the same key (position geometry)."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]


class LayerHook:
    """The documented way for train/ and eval/ to look inside a LiZA layer's stateless prefill (forward_full,
    training forwards), set as `ForwardContext.hook` for the duration of a forward (`with model.hooked(hook):`);
    never in serving (decode steps do not call it). A method that returns a tensor [B, T, hidden] makes it the
    layer's output; None lets the layer go on. The layer's building blocks (`memory_branch`, `memory_weight`,
    `sized_read`, `mix`, `new_state`, its projections) are public for hooks to call."""

    def prefill(self, layer: "LiZAttention", hidden_states, q, k, v) -> torch.Tensor | None:
        """Right after the projections: q [B, Hq, T, D], k, v [B, Hkv, T, D], before rotary."""
        return None

    def mix(self, layer: "LiZAttention", hidden_states, softmax_out, read, seen) -> torch.Tensor | None:
        """In place of the Memory-as-Gate mix: the softmax branch's output and the memory read [B, Hq, T, D]."""
        return None


def rotary_table(rotary: nn.Module, layer_type: str | None, size: int, like: torch.Tensor):
    """cos, sin [size, D] for positions 0 .. size-1 from the base model's own rotary module (any rope type)."""
    positions = torch.arange(size, device=like.device)[None]
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        cos, sin = rotary(like, positions, layer_type)
    else:
        cos, sin = rotary(like, positions)
    return cos[0].to(like.dtype), sin[0].to(like.dtype)


def _last(history: torch.Tensor, new: torch.Tensor, keep: int) -> torch.Tensor:
    """The last `keep` values of history followed by new, along the last dim."""
    return torch.cat([history, new], dim=-1)[..., history.shape[-1] + new.shape[-1] - keep:]


class LiZAttention(nn.Module):
    def __init__(self, base: nn.Module, config: TpttConfig, layer_idx: int, rotary: nn.Module,
                 context: ForwardContext):
        super().__init__()
        self.config, self.layer_idx, self.context = config, layer_idx, context
        self._rotary = [rotary]  # a list: the model owns the module, we must not register it again
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.q_proj, base.k_proj, base.v_proj, base.o_proj
        self.head_dim = base.head_dim
        self.num_heads = base.q_proj.out_features // self.head_dim
        self.num_kv_heads = base.k_proj.out_features // self.head_dim
        self.scaling = base.scaling
        base_config = getattr(base, "config", None)
        self.clip_qkv = getattr(base_config, "clip_qkv", None)
        self.softcap = getattr(base_config, "attn_logit_softcapping", None)
        self.layer_type = getattr(base, "layer_type", None)
        self.q_norm = getattr(base, "q_norm", None)
        self.k_norm = getattr(base, "k_norm", None)
        self.per_head_norm = self.q_norm is not None and self.q_norm.weight.numel() == self.head_dim
        self._table = None
        self.register_buffer("qkv_weight", None, persistent=False)  # q, k, v in one matmul (layers/fused.py)
        self.register_buffer("qkv_bias", None, persistent=False)
        self.mag_gate = _learned_gate(base.q_proj, self.num_heads, config) if config.mag_gate == "learned" else None
        self.memory_map = _identity_map(self.head_dim, base.q_proj) if config.feature_map == "learned" else None
        self.read_scale = (nn.Parameter(torch.zeros(self.num_heads, device=base.q_proj.weight.device))
                           if config.read_scale == "learned" else None)  # log of each head's scale
        learned_input = config.gate_input == "learned"
        self.gate_input_k = GateInput(self.num_kv_heads, self.head_dim, base.q_proj) if learned_input else None
        self.gate_input_v = (GateInput(self.num_kv_heads, self.head_dim, base.q_proj)
                             if learned_input and config.gates_read_v else None)
        self.memory_decay = (nn.Parameter(torch.full((self.num_kv_heads,), _logit(config.decay),
                                                     device=base.q_proj.weight.device))
                             if config.alpha_gate == "learned" else None)  # logit of each kv head's decay
        group_width = (self.num_heads // self.num_kv_heads + 2) * self.head_dim  # a group's q, its k and v
        self.retaining_head = (RetainingHead(self.num_kv_heads, group_width, base.q_proj)
                               if config.retains else None)

    # ----------------------------------------------------------------------------------------------- state
    def new_state(self, batch: int, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
        """Zeroed state of this layer for `batch` sessions; its size never changes afterwards."""
        cfg, heads, dim = self.config, self.num_kv_heads, self.head_dim
        state = window_ops.new_cache(batch, heads, dim, window=cfg.window, sinks=cfg.sinks, dtype=dtype,
                                     device=device)
        if cfg.cache_tokens:
            state |= exact_cache.new_tensors(batch, heads, dim, window=cfg.window, size=cfg.cache_tokens,
                                             dtype=dtype, device=device, pool=cfg.cache_pool)
        f32 = dict(dtype=torch.float32, device=device)
        state["memory"] = torch.zeros(batch, heads, dim, dim, **f32)
        state["prev_k"] = torch.zeros(batch, heads, 1, dim, **f32)  # last token's feature-mapped key
        state["prev_v"] = torch.zeros(batch, heads, 1, dim, **f32)  # last token's value
        state["gate_k"] = torch.zeros(batch, heads, cfg.gate_pool - 1, **f32)  # last gate inputs
        state["gate_v"] = torch.zeros(batch, heads, cfg.gate_pool - 1, **f32)
        return state

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        ctx = self.context
        if ctx.positions is not None:
            plan = self._shared_decode_plan(ctx.positions, ctx.filling_sinks, hidden_states)
            return self.decode_step(hidden_states, ctx.layer_states[self.layer_idx], plan), None
        q, k, v = self._project(hidden_states)  # q: [B, Hq, T, D]; k, v: [B, Hkv, T, D], before rotary
        if ctx.pieces is not None:
            return self.packed_prefill(hidden_states, q, k, v, ctx.pieces), None
        hook = ctx.hook
        if hook is not None and (out := hook.prefill(self, hidden_states, q, k, v)) is not None:
            return out, None
        state = self.new_state(hidden_states.shape[0], hidden_states.dtype, hidden_states.device)
        return self.prefill_piece(hidden_states, q, k, v, state, 0, hook), None

    def prefill_piece(self, hidden_states, q, k, v, state, start: int, hook: LayerHook | None = None) -> torch.Tensor:
        """New tokens after the `start` every row of `state` has seen: [B, T, hidden] and their projections ->
        [B, T, hidden]; `state` updated in place. `hook`: the stateless forward's LayerHook, whose `mix` may
        take the place of the layer's (a served piece passes none)."""
        cos, sin = self._rotary_tables(q)
        read, write_norms = self.memory_branch(q, k, v, state, start) if self.config.uses_memory else (None, None)
        softmax_out = window_ops.prefill(q, k, v, state, start, window=self.config.window,
                                         sinks=self.config.sinks, scaling=self.scaling, cos=cos, sin=sin,
                                         softcap=self.softcap, block=QUERY_BLOCK,
                                         scores=self.cache_scores(q, k, v, write_norms), pool=self.config.cache_pool)
        if hook is not None and (out := hook.mix(self, hidden_states, softmax_out, read, start)) is not None:
            return out
        return self._output(hidden_states, softmax_out, read, start)

    def packed_prefill(self, hidden_states, q, k, v, pieces: list[PrefillPiece | DecodeRows]) -> torch.Tensor:
        """Pieces of several sessions in one [1, T, hidden] forward (ForwardContext.pieces): the projections
        were computed for all tokens at once; each piece reads and writes its own sessions from its own start,
        its rows as one batch (decode rows: one token each, as a decode step does)."""
        outputs, first = [], 0
        for piece in pieces:
            shape = piece.ids.shape  # [B, T]
            part = slice(first, first + piece.ids.numel())
            x = hidden_states[:, part].reshape(*shape, -1)
            heads = (t[:, :, part].transpose(1, 2).reshape(*shape, -1, self.head_dim).transpose(1, 2)
                     for t in (q, k, v))
            state = piece.layer_states[self.layer_idx]
            if isinstance(piece, DecodeRows):
                plan = self._shared_decode_plan(piece.positions, piece.filling_sinks, x)
                out = self.decode_projected(x, *heads, state, plan)
            else:
                out = self.prefill_piece(x, *heads, state, piece.start)
            outputs.append(out.reshape(1, -1, out.shape[-1]))
            first = part.stop
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def decode_step(self, hidden_states: torch.Tensor, state, plan: window_ops.DecodePlan) -> torch.Tensor:
        """One new token per row: [B, 1, hidden] -> [B, 1, hidden]; `state` updated in place."""
        return self.decode_projected(hidden_states, *self._project(hidden_states), state, plan)

    def decode_projected(self, hidden_states, q, k, v, state, plan: window_ops.DecodePlan) -> torch.Tensor:
        """decode_step after the projections: q [B, Hq, 1, D], k, v [B, Hkv, 1, D], before rotary."""
        read, write_norm = (self.memory_branch(q, k, v, state, plan.positions) if self.config.uses_memory
                            else (None, None))
        softmax_out = window_ops.decode(q, k, v, state, plan, scaling=self.scaling, softcap=self.softcap,
                                        score=self.cache_scores(q, k, v, write_norm))
        return self._output(hidden_states, softmax_out, read, plan.positions)

    def _shared_decode_plan(self, positions: torch.Tensor, filling_sinks: bool, like: torch.Tensor):
        """The decode rows' position geometry, computed by the first layer of the forward for all (one set of
        decode rows per forward)."""
        return self.context.shared(("decode", self.layer_type, like.dtype), lambda: self._decode_plan(
            positions, filling_sinks, like))

    def _decode_plan(self, positions, filling_sinks: bool, like: torch.Tensor) -> window_ops.DecodePlan:
        cos, sin = self._rotary_tables(like)
        return window_ops.decode_plan(positions, window=self.config.window, sinks=self.config.sinks, cos=cos,
                                      sin=sin, filling_sinks=filling_sinks, cached=self.config.cache_tokens > 0,
                                      pool=self.config.cache_pool)

    def _output(self, hidden_states, softmax_out, read, seen) -> torch.Tensor:
        """o_proj of the softmax branch mixed with the memory read, or alone when the memory does not take
        part in the mix (mu = 0: its read is then None, or not used). `seen`: tokens before this piece, an int
        (prefill) or per row [B] (decode)."""
        if self.mag_gate is None and self.config.mag_weight == 0.0:
            return self.o_proj(merge_heads(softmax_out))
        return self.mix(softmax_out, self.sized_read(read, softmax_out), self.memory_weight(hidden_states, seen))

    def memory_weight(self, hidden_states: torch.Tensor, seen) -> torch.Tensor:
        """mu [B or 1, T, Hq * D or 1]: constant, or one value per head and token (repeated over the head's
        channels); 0 at positions before the first eviction (t < sinks + window), where the window still
        holds every earlier token, so the softmax branch is full attention and the memory has nothing to add.
        `seen` as in `_output`."""
        mu = (self.config.mag_weight if self.mag_gate is None else
              torch.sigmoid(self.mag_gate(hidden_states)).repeat_interleave(self.head_dim, dim=-1))
        length = hidden_states.shape[1]
        key = ("after_eviction", "decode" if torch.is_tensor(seen) else seen, length, hidden_states.dtype)
        return mu * self.context.shared(key, lambda: _after_first_eviction(seen, length, self.config, hidden_states))

    def _project(self, x: torch.Tensor):
        batch, seq_len, _ = x.shape
        if self.qkv_weight is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            sizes = (self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features)
            q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).split(sizes, dim=-1)
        if self.q_norm is not None and not self.per_head_norm:  # OLMo2 / OLMoE: norm over all heads
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:  # OLMo / OLMoE
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q, k, v = (t.view(batch, seq_len, -1, self.head_dim) for t in (q, k, v))
        if self.per_head_norm:  # Qwen3 / Gemma3: norm per head
            q, k = self.q_norm(q), self.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _rotary_tables(self, like: torch.Tensor):
        size = self.config.sinks + self.config.window + QUERY_BLOCK
        table = self._table
        if table is None or table[0].device != like.device or table[0].dtype != like.dtype:
            table = self._table = rotary_table(self._rotary[0], self.layer_type, size, like)
        return table

    def cache_scores(self, q, k, v, write_norms: torch.Tensor | None) -> torch.Tensor | None:
        """Each new token's exact-token cache score [B, Hkv, T] (docs/math.md 3b), fixed when it is written: the
        memory's write norms, or with a retaining head their log plus its logit on the token's q, k, v (before
        rotary) times retain_weight; None without a cache."""
        if self.retaining_head is not None:
            return self.retaining_head.score(q, k, v, write_norms, self.config.retain_weight)
        return write_norms

    def memory_branch(self, q, k, v, state, seen):
        """The memory read [B, Hq, T, D] and each token's write norm [B, Hkv, T] (what the exact-token cache's
        scores start from; None without a cache); `seen` as in `_output` (a tensor means one
        decode token)."""
        cfg = self.config
        pooled_k = self._pooled_gate_input(k, self.gate_input_k, state, "gate_k", seen)
        pooled_v = self._pooled_gate_input(v, self.gate_input_v, state, "gate_v", seen) if cfg.gates_read_v else None
        log_decay = math.log(cfg.decay) if self.memory_decay is None else F.logsigmoid(self.memory_decay)
        beta, g = memory_inputs.gates(pooled_k, pooled_v, cfg.beta_gate, cfg.alpha_gate, log_decay)

        if self.memory_map is not None:
            q, k = self.memory_map(q), self.memory_map(k)
        q_mem, k_mem, v = memory_inputs.feature_map(q), memory_inputs.feature_map(k), as_float32(v)
        k_virtual = F.normalize(memory_inputs.expand_virtual(k_mem, state["prev_k"], cfg.order, cfg.trick), dim=-1,
                                eps=VIRTUAL_KEY_EPS)
        v_virtual = memory_inputs.expand_virtual(v, state["prev_v"], cfg.order, cfg.trick)
        store(state, "prev_k", k_mem[:, :, -1:])
        store(state, "prev_v", v[:, :, -1:])
        beta = beta.unsqueeze(-1).expand(*beta.shape, cfg.order)
        scored = cfg.needs_write_norms
        if torch.is_tensor(seen):
            out, memory, *scores = delta_product.recurrent_step(
                q_mem, k_virtual, v_virtual, beta, g, state["memory"], seen, cfg.nonlinear_chunk, scored)
        elif not scored and fla_kernels.usable(q_mem, cfg.nonlinear_chunk):  # fla returns no write norms
            out, memory, *scores = fla_kernels.chunk(q_mem, k_virtual, v_virtual, beta, g, state["memory"], True)
        else:
            out, memory, *scores = delta_product.chunk(
                q_mem, k_virtual, v_virtual, beta, g, state["memory"], True, cfg.chunk_size, cfg.nonlinear_chunk,
                offset=seen, output_write_norms=scored)
        store(state, "memory", memory)
        return out, (scores[0] if scored else None)

    def _pooled_gate_input(self, x: torch.Tensor, learned, state, name: str, seen) -> torch.Tensor:
        """Causal mean pool [B, Hkv, T] of x's per-token gate input (its channel mean, or the `learned`
        GateInput); keeps the last inputs in state[name]."""
        gate_in = as_float32(x).mean(-1) if learned is None else learned(as_float32(x))
        pooled = memory_inputs.causal_mean_pool(gate_in, state[name], seen)
        store(state, name, _last(state[name], gate_in, self.config.gate_pool - 1))
        return pooled

    def sized_read(self, read: torch.Tensor, softmax_out: torch.Tensor) -> torch.Tensor:
        """The memory read [B, Hq, T, D] at the size the mix takes it: its own times each head's learned
        scale, or RMS-normalized over all heads and channels at the softmax branch's RMS (two signals of the
        same size), in the softmax branch's dtype."""
        if self.read_scale is not None:
            return (read * self.read_scale.exp()[:, None, None]).to(softmax_out.dtype)
        unit_rms = read * torch.rsqrt(_mean_square_per_token(read) + 1e-6)
        return (unit_rms * _mean_square_per_token(softmax_out).sqrt()).to(softmax_out.dtype)

    def mix(self, softmax_out: torch.Tensor, read: torch.Tensor, mu) -> torch.Tensor:
        """Memory as Gate of the softmax branch [B, Hq, T, D] and a read already sized (`sized_read`)."""
        softmax_out, read = merge_heads(softmax_out), merge_heads(read)
        if not self.config.cross_gate:
            return self.o_proj(torch.lerp(softmax_out, read, mu))
        softmax_part, linear_part = (1 - mu) * self.o_proj(softmax_out), mu * self.o_proj(read)
        return softmax_part + linear_part + softmax_part * linear_part


def _after_first_eviction(seen, length: int, config: TpttConfig, like: torch.Tensor) -> torch.Tensor:
    """[B or 1, T, 1] in like's dtype: 1 at the positions seen + 0 .. length-1 that come after a token left the
    window (t >= sinks + window), else 0. `seen`: an int (prefill) or per row [B] (decode)."""
    offsets = torch.arange(length, device=like.device)
    positions = torch.as_tensor(seen, device=like.device).reshape(-1, 1) + offsets  # [B or 1, T]
    return (positions >= config.sinks + config.window).unsqueeze(-1).to(like.dtype)


def _mean_square_per_token(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, 1, T, 1]: mean square over all heads and channels, in float32."""
    return as_float32(x).pow(2).mean(dim=(1, 3), keepdim=True)


def _learned_gate(like: nn.Linear, heads: int, config: TpttConfig) -> nn.Linear:
    """Hidden state -> one memory-weight logit per head; starts as the constant config.mag_weight."""
    gate = nn.Linear(like.in_features, heads, device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        gate.weight.zero_()
        gate.bias.fill_(_logit(config.mag_weight))
    return gate


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class GateInput(nn.Module):
    """A per-token scalar from k or v [B, Hkv, T, D] -> [B, Hkv, T]: a weighted sum of the channels plus a bias,
    per kv head (a gate's input); the weights start at 1 / D (the channel mean), the bias at 0."""

    def __init__(self, heads: int, dim: int, like: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(torch.full((heads, dim), 1.0 / dim, device=like.weight.device))
        self.bias = nn.Parameter(torch.zeros(heads, device=like.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bhtd,hd->bht", x, self.weight.float()) + self.bias.float()[:, None]


def _identity_map(dim: int, like: nn.Linear) -> nn.Linear:
    map_ = nn.Linear(dim, dim, bias=False, device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        map_.weight.copy_(torch.eye(dim))
    return map_


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H * D]"""
    batch, heads, seq_len, dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq_len, heads * dim)
