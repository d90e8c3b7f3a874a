"""TpttConfig: every knob of a LiZA conversion, validated once, saved as JSON beside the adapter.

The config describes the *semantics* of the converted model (window, sinks, memory operator, mixing); it
never names a device or a dtype. Equations for each field live in docs/math.md.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_NAME = "tptt_config.json"

GATE_SOURCES = ("k", "v", "kv", "c")
ALPHA_GATES = GATE_SOURCES + ("learned",)
TRICKS = ("derivative", "rotary", "combined")
MAG_GATES = ("constant", "learned")
FEATURE_MAPS = ("fixed", "learned")
READ_SCALES = ("softmax_rms", "learned")
GATE_INPUTS = ("mean", "learned")
CACHE_SCORES = ("write", "retain")


@dataclass
class TpttConfig:
    # softmax branch: the base model's attention over `sinks` first tokens + `window` most recent tokens
    window: int = 64
    sinks: int = 4
    # exact-token cache: per layer and kv head, the `cache_tokens` tokens that left the window with the highest
    # score, attended with the window in one softmax; 0 = none. cache_score write: the memory's write (write
    # strength x prediction error); retain: the log of that plus a retaining head's logit, a small MLP per kv
    # head on the token's own q, k, v trained to spot the tokens of stated facts (docs/math.md 3b), its logit
    # multiplied by retain_weight (1: as fitted; towards 0 the ranking comes back to the write's).
    # cache_pool r > 0: a token is offered to the cache with the best score within r tokens on either side
    # (a max pool), so the tokens of one statement enter the cache together
    cache_tokens: int = 0
    cache_score: str = "write"
    retain_weight: float = 1.0
    cache_pool: int = 0
    # Memory as Gate: o = (1 - mu) * o_softmax + mu * o_linear (+ cross term if cross_gate), where mu is
    # constant: mag_weight everywhere; learned: sigmoid(W x_t + b) per head and token from the layer's input,
    # trained with the adapter and initialised at mag_weight (W = 0)
    mag_weight: float = 0.0
    mag_gate: str = "constant"
    cross_gate: bool = False
    # linear branch: gated DeltaProduct with `order` Householder steps (virtual tokens) per token
    order: int = 2
    trick: str = "derivative"  # how the order-2 virtual tokens are made
    feature_map: str = "fixed"  # memory q, k: normalize(silu(x)); learned: a D x D map per layer first (identity
                                # at the start, trained with the adapter)
    read_scale: str = "softmax_rms"  # the memory read's size in the mix: softmax_rms: RMS-normalized over all
                                     # heads, at the softmax branch's RMS; learned: its own size times a learned
                                     # scale per head (1 at the start, trained with the adapter)
    beta_gate: str = "k"  # write strength from a causal mean pool of k / v / both through a sigmoid, c = 0.5
    alpha_gate: str = "c"  # decay from the same pools; c: the constant `decay`; learned: one decay per kv head,
                           # trained with the adapter (starting at `decay`), the same for every token
    decay: float = 1.0  # what the state is multiplied by before each token's write (alpha_gate c or learned;
                        # 1 = no decay): forgetting keeps long contexts from piling up in the state
    gate_input: str = "mean"  # what the pools average per token: mean: the channel mean of k (v); learned: a
                              # learned weighted sum + bias per kv head (the mean at the start, trained with
                              # the adapter), so the memory can learn which tokens to write strongly
    gate_pool: int = 3  # tokens in the causal mean pool of the gates
    nonlinear_chunk: int = 0  # apply the state nonlinearity after every `nonlinear_chunk` absolute tokens; 0 = linear
    chunk_size: int = 64  # tokens per chunk in the chunkwise prefill (a speed knob, never changes results)
    # LoRA adapter on the shared projections (peft); empty target list = no adapter
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)
    # where the weights of the base model came from (informational, part of the fingerprint)
    base_model: str = ""

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.cache_tokens < 0:
            raise ValueError(f"cache_tokens must be >= 0, got {self.cache_tokens}")
        if not isinstance(self.cache_pool, int) or not 0 <= self.cache_pool < self.window:
            raise ValueError(f"cache_pool must be >= 0 and below window ({self.window}), got {self.cache_pool}")
        if self.cache_score not in CACHE_SCORES:
            raise ValueError(f"cache_score must be one of {CACHE_SCORES}, got {self.cache_score!r}")
        if not 0.0 <= self.retain_weight < float("inf"):
            raise ValueError(f"retain_weight must be a finite number >= 0, got {self.retain_weight}")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        if not 0.0 <= self.mag_weight <= 1.0:
            raise ValueError(f"mag_weight must be in [0, 1], got {self.mag_weight}")
        if self.mag_gate not in MAG_GATES:
            raise ValueError(f"mag_gate must be one of {MAG_GATES}, got {self.mag_gate!r}")
        if self.mag_gate == "learned" and not 0.0 < self.mag_weight < 1.0:
            raise ValueError(f"a learned mag_gate starts at mag_weight, which must be in (0, 1), got {self.mag_weight}")
        if self.mag_gate == "learned" and self.cross_gate:
            raise ValueError("a learned mag_gate mixes per head, before o_proj; cross_gate mixes after it")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}")
        if self.read_scale not in READ_SCALES:
            raise ValueError(f"read_scale must be one of {READ_SCALES}, got {self.read_scale!r}")
        if self.read_scale == "learned" and self.cross_gate:
            raise ValueError("a learned read_scale scales each head's read before o_proj; cross_gate mixes after it")
        if self.order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {self.order}")
        if self.trick not in TRICKS:
            raise ValueError(f"trick must be one of {TRICKS}, got {self.trick!r}")
        if self.beta_gate not in GATE_SOURCES:
            raise ValueError(f"beta_gate must be one of {GATE_SOURCES}, got {self.beta_gate!r}")
        if self.alpha_gate not in ALPHA_GATES:
            raise ValueError(f"alpha_gate must be one of {ALPHA_GATES}, got {self.alpha_gate!r}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if self.decay < 1.0 and self.alpha_gate not in ("c", "learned"):
            raise ValueError(f"decay is the constant (or learned) decay; alpha_gate {self.alpha_gate!r} computes "
                             "its own from the gate pools")
        if self.alpha_gate == "learned" and self.decay == 1.0:
            raise ValueError("a learned alpha_gate starts at decay, which must be in (0, 1)")
        if self.gate_input not in GATE_INPUTS:
            raise ValueError(f"gate_input must be one of {GATE_INPUTS}, got {self.gate_input!r}")
        if self.gate_pool < 1:
            raise ValueError(f"gate_pool must be >= 1, got {self.gate_pool}")
        if self.nonlinear_chunk < 0:
            raise ValueError(f"nonlinear_chunk must be >= 0, got {self.nonlinear_chunk}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")

    @property
    def uses_memory(self) -> bool:
        """Whether the memory runs: it takes part in the mix (mu > 0 or learned), or scores the cache."""
        return self.mag_gate == "learned" or self.mag_weight > 0.0 or self.needs_write_norms

    @property
    def needs_write_norms(self) -> bool:
        """Whether the memory must give its write norms: the exact-token cache's scores start from them."""
        return self.cache_tokens > 0

    @property
    def retains(self) -> bool:
        """Whether each layer has a retaining head whose logit adds to the cache's score (cache_score "retain")."""
        return self.cache_tokens > 0 and self.cache_score == "retain"

    @property
    def gates_read_v(self) -> bool:
        """Whether beta or alpha reads the values (else only the keys feed the gates)."""
        return "v" in self.beta_gate + self.alpha_gate

    def replace(self, **changes) -> "TpttConfig":
        """A copy with `changes` applied (None values are ignored), validated again."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TpttConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TpttConfig fields: {unknown}")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "TpttConfig":
        return cls.from_dict(json.loads((Path(directory) / CONFIG_NAME).read_text()))
