"""TitansModel: a Hugging Face causal LM with LiZA layers, driven over SessionStates by token ids.

    prefill(state, ids)      feed tokens (chunked), return the logits of the last one
    step(state, token_id)    one decode token
    decode(states, ids)      one decode token for each of several sessions, in one batched forward
    forward_full(ids)        all logits of a sequence, no state: the reference semantics
    prefill_packed(pieces)   prompt pieces of several sessions, each from its own position and of its own
                             length, packed into shared forwards (prefill, and the engine's prefill), with
                             the decode rows of the same engine step among them (layers/liza.py DecodeRows)
    decode_rows              decode over per-layer tensors with a leading batch dim that the caller owns (the
                             serving engine's state pool, engine/state_pool.py), written in place

Invariant: for any split of a sequence into prefill pieces and decode steps, the logits equal forward_full's.
The model knows token ids, never text or HTTP. The Hugging Face model runs its own embeddings, decoder layers
(MLPs, experts, norms) and head; every attention layer reads its session tensors from the ForwardContext.
Forwards run under no_grad rather than inference_mode: session tensors made inside and outside a forward
(new_session, fork, from_bytes, rows copied out of a batch) are then the same kind of tensor, which a compiled
decode graph (`compile()`) requires to be reused.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib

import torch
from torch import nn

from .compiled import CompiledDecode, run_forward
from .config import TpttConfig
from .convert import inject_liza
from .layers.liza import DecodeRows, ForwardContext, PrefillPiece
from .state import SessionState, check_fingerprint

PREFILL_CHUNK = 2048  # tokens per forward in prefill: bounds activation memory whatever the prompt length


class TitansModel:
    def __init__(self, hf_model: nn.Module, config: TpttConfig, tokenizer=None, name: str = ""):
        self.hf = hf_model.eval()
        self.config = config
        self.tokenizer = tokenizer
        self.name = name or config.base_model
        self.context = ForwardContext()
        self._compiled_decode = None  # `compile()`
        self.layers = inject_liza(hf_model, config, self.context)
        self.vocab_size = hf_model.get_output_embeddings().weight.shape[0]
        self.fingerprint = fingerprint(hf_model, config)

    @property
    def device(self) -> torch.device:
        return self.hf.get_output_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.get_output_embeddings().weight.dtype

    @property
    def kv_cache_bytes_per_token(self) -> int:
        """What a full KV cache of the base model (in its dtype) needs per token: the baseline we replace."""
        cfg = self.hf.config.get_text_config()
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return 2 * cfg.num_hidden_layers * heads * head_dim * self.dtype.itemsize

    def set_mag_weight(self, mag_weight: float) -> None:
        """Change mu in every LiZA layer (training schedules); states made before are refused afterwards."""
        self.config = self.config.replace(mag_weight=mag_weight)
        for layer in self.layers:
            layer.config = self.config
        self.refresh_fingerprint()

    def refresh_fingerprint(self) -> None:
        """Call after changing weights in place (training): states of the old weights stop being accepted."""
        self.fingerprint = fingerprint(self.hf, self.config)

    def compile(self, cache_dir: str | None = None) -> None:
        """Run decode steps through one compiled graph (compiled.py): the whole model as fused kernels in place
        of some 150 small operations per layer, whose dispatch dominates one-token steps on a CPU. The graph
        is loaded from `cache_dir` (default $TPTT_COMPILE_CACHE or ~/.cache/tptt/compiled) on the first
        compiled step, or traced, compiled (minutes on a 2-core CPU) and saved there if no process has built
        it for these weights yet; `warm_up()` does it now. Steps that write the sinks (a session's first
        tokens) stay eager."""
        self._compiled_decode = CompiledDecode(self, cache_dir)

    @property
    def is_compiled(self) -> bool:
        return self._compiled_decode is not None

    def compiled_copy(self, cache_dir: str | None = None) -> TitansModel:
        """A copy of this model (the same weights and fingerprint, its own forward context) with its decode step
        compiled and warmed up: built beside a model that goes on serving eagerly, then swapped in for it
        (AsyncEngine.compile_in_background). Costs one more copy of the weights until the swap."""
        twin = copy.deepcopy(self)
        twin.compile(cache_dir)
        twin.warm_up()
        return twin

    def warm_up(self) -> None:
        """Load or build (if `compile()` was called) the compiled decode graph now, and run it at batch 1 and
        2 on throwaway sessions, rather than on the first requests."""
        sessions = [self.new_session() for _ in range(2)]
        for state in sessions:
            self.prefill(state, [0] * (self.config.sinks + 1))
        self.decode(sessions[:1], [0])
        self.decode(sessions, [0, 0])

    # ------------------------------------------------------------------------------------------ sessions
    def new_session(self) -> SessionState:
        layers = [layer.new_state(1, self.dtype, self.device) for layer in self.layers]
        return SessionState(layers, self.fingerprint)

    def _check(self, state: SessionState) -> None:
        check_fingerprint(state.fingerprint, self.fingerprint)

    def _ids(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("no tokens given")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
        return ids.to(self.device)

    # ------------------------------------------------------------------------------------------ forwards
    def _forward(self, ids: torch.Tensor, layer_states=None, positions: torch.Tensor | None = None,
                 filling_sinks: bool = False, pieces=None, logits_to_keep: int | torch.Tensor = 1):
        """run_forward (compiled.py) on this model's Hugging Face module and context."""
        return run_forward(self.hf, self.context, ids, layer_states, positions, filling_sinks, pieces, logits_to_keep)

    @torch.no_grad()
    def prefill(self, state: SessionState, ids, all_logits: bool = False) -> torch.Tensor:
        """Feed `ids` to the session; returns the float32 logits [vocab] after the last one
        (with `all_logits`, [len(ids), vocab]: the logits after each of them)."""
        self._check(state)
        ids = self._ids(ids)
        logits = self.prefill_packed([PrefillPiece(state.layers, state.num_tokens, ids[None], all_logits)])[0][0]
        state.num_tokens += ids.numel()
        return logits if all_logits else logits[-1]

    @torch.no_grad()
    def prefill_packed(self, pieces: list[PrefillPiece | DecodeRows]) -> list[torch.Tensor]:
        """Pieces of different sessions, each from its own position and of its own length, packed one after
        another into forwards of up to PREFILL_CHUNK tokens ([1, T]: no padding). The projections, MLPs and head
        run once for every token of a forward; each attention layer reads and writes every piece's own sessions
        (a piece's rows as one batch). At most one piece may be DecodeRows (`decode_piece`: one token per
        session, each at its own position, as `decode_rows` computes it; never cut). Returns each piece's
        float32 logits [B, T or 1, vocab]: after every new token with the piece's `all_logits`, else after its
        last."""
        if any(piece.ids.shape[1] == 0 for piece in pieces):
            raise ValueError("a prefill piece without tokens")
        if sum(isinstance(piece, DecodeRows) for piece in pieces) > 1:
            raise ValueError("more than one set of decode rows in a packed prefill")
        parts: list[list[torch.Tensor]] = [[] for _ in pieces]
        for pack in _packs(pieces, PREFILL_CHUNK):
            for (index, _), logits in zip(pack, self._forward_packed([piece for _, piece in pack])):
                parts[index].append(logits)
        return [torch.cat(rows, dim=1) if piece.all_logits else rows[-1] for rows, piece in zip(parts, pieces)]

    def _forward_packed(self, pieces: list[PrefillPiece]) -> list[torch.Tensor]:
        """One [1, T] forward of pieces of different sessions: each piece's float32 logits [B, T or 1, vocab]."""
        keep, first = [], 0
        for piece in pieces:
            rows, length = piece.ids.shape
            ends = first + length * torch.arange(1, rows + 1)[:, None]  # [B, 1]: after each row's last token
            keep.append((ends - torch.arange(length if piece.all_logits else 1, 0, -1)).reshape(-1))
            first += rows * length
        ids = torch.cat([piece.ids.reshape(-1) for piece in pieces])[None]
        logits = self._forward(ids, pieces=pieces, logits_to_keep=torch.cat(keep).to(self.device))[0].float()
        return [rows.reshape(piece.ids.shape[0], -1, rows.shape[-1])
                for piece, rows in zip(pieces, logits.split([k.numel() for k in keep]))]

    def step(self, state: SessionState, token_id: int) -> torch.Tensor:
        """One decode token; returns the float32 logits [vocab] after it."""
        return self.decode([state], [token_id])[0]

    @torch.no_grad()
    def decode(self, states: list[SessionState], token_ids) -> torch.Tensor:
        """One token for each session in one batched forward (sessions may sit at different positions).
        Returns float32 logits [len(states), vocab]; each state advances by one token. Several sessions are
        stacked into one batch and copied back after the step (the engine's pool avoids both copies)."""
        for state in states:
            self._check(state)
        ids = self._ids(token_ids)
        if ids.numel() != len(states):
            raise ValueError(f"{len(states)} sessions but {ids.numel()} tokens")
        positions = [s.num_tokens for s in states]
        if len(states) == 1:
            logits = self.decode_rows(states[0].layers, ids, positions)
        else:
            batch = [{name: torch.cat([s.layers[i][name] for s in states]) for name in layer}
                     for i, layer in enumerate(states[0].layers)]
            logits = self.decode_rows(batch, ids, positions)
            for row, state in enumerate(states):
                for mine, stacked in zip(state.layers, batch):
                    for name, tensor in mine.items():
                        tensor.copy_(stacked[name][row:row + 1])
        for state in states:
            state.num_tokens += 1
        return logits

    @torch.no_grad()
    def decode_rows(self, layer_states, token_ids: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """One token per row of per-layer tensors [B, ...] (updated in place): token_ids [B] (on the model's
        device), positions: how many tokens each row has seen. Returns float32 logits [B, vocab]."""
        filling_sinks = self._filling_sinks(positions)
        ids, positions = token_ids.reshape(-1, 1), torch.tensor(positions, device=self.device)
        if filling_sinks:
            return self._forward(ids, layer_states, positions=positions, filling_sinks=True)[:, -1].float()
        return self.decode_logits(layer_states, ids, positions)

    def decode_piece(self, layer_states, token_ids: torch.Tensor, positions: list[int]) -> DecodeRows:
        """`decode_rows`' step as the decode rows of a packed prefill (`prefill_packed`), the same arguments."""
        return DecodeRows(layer_states, torch.tensor(positions, device=self.device), token_ids.reshape(-1, 1),
                          self._filling_sinks(positions))

    def _filling_sinks(self, positions: list[int]) -> bool:
        """Whether a row's new token is one of the first `sinks` (the decode step writes the sinks then)."""
        return min(positions) < self.config.sinks

    @torch.no_grad()
    def decode_logits(self, layer_states, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """decode_rows on tensors alone, for rows past the sinks: ids [B, 1], positions [B] on the model's
        device (what a CUDA graph records, cuda_graphs.py). Float32 logits [B, vocab]."""
        if self._compiled_decode is None:
            logits = self._forward(ids, layer_states, positions=positions)
        else:
            logits = self._compiled_decode(ids, layer_states, positions)
        return logits[:, -1].float()

    @torch.no_grad()
    def forward_full(self, ids) -> torch.Tensor:
        """Logits [T, vocab] (float32) of a whole sequence from an empty state: the reference semantics."""
        return self._forward(self._ids(ids)[None], logits_to_keep=0)[0].float()

    @contextlib.contextmanager
    def hooked(self, hook):
        """Inside the block every LiZA layer's stateless prefill calls `hook` (layers/liza.py, LayerHook): the
        way training and evaluation look inside the layers."""
        self.context.hook = hook
        try:
            yield hook
        finally:
            self.context.hook = None


def _packs(pieces: list[PrefillPiece | DecodeRows], size: int) -> list[list[tuple[int, PrefillPiece | DecodeRows]]]:
    """The pieces (with their index) in order, in packs of at most `size` tokens (or one piece's rows of one
    token); a longer piece is cut along its tokens into consecutive pieces, which later packs continue (decode
    rows, one token each, are never cut)."""
    packs, pack, tokens = [], [], 0
    for index, piece in enumerate(pieces):
        rows, length = piece.ids.shape
        step = max(1, size // rows)
        for offset in range(0, length, step):
            cut = piece if isinstance(piece, DecodeRows) else PrefillPiece(
                piece.layer_states, piece.start + offset, piece.ids[:, offset:offset + step], piece.all_logits)
            if pack and tokens + cut.ids.numel() > size:
                packs.append(pack)
                pack, tokens = [], 0
            pack.append((index, cut))
            tokens += cut.ids.numel()
    return packs + [pack] if pack else packs


def fingerprint(model: nn.Module, config: TpttConfig) -> str:
    """Identity of weights + adapter + config: sha256 over the config and a fixed strided sample of every
    parameter's bytes (deterministic across processes and machines, ~10 ms for a 135M model)."""
    digest = hashlib.sha256(repr(sorted(config.to_dict().items())).encode())
    for name, param in sorted(model.state_dict().items()):
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().contiguous()
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()
