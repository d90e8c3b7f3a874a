"""SessionState: everything a converted model remembers of one conversation, in a size that never grows.

A state is a list of per-layer dicts of tensors (leading batch dim of 1) plus the number of tokens seen. Its
tensors are allocated at full size when the session starts (window ring, sinks, DeltaProduct memory, small
carries), so `nbytes` after 100 tokens equals `nbytes` after 100,000. The serialized form is a safetensors
blob whose metadata carries a format version and the fingerprint of the model + adapter + config that made it;
a model refuses a state made by another model (TitansModel checks the fingerprint before every use).
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

FORMAT = "tptt-session-state"
FORMAT_VERSION = 2  # 2: the exact-token cache (cache_* and win_score tensors)


class SessionState:
    """A value: one session's tensors (what a snapshot stores, what a pool slot is copied out to or in from)."""

    def __init__(self, layers: list[dict[str, torch.Tensor]], fingerprint: str, num_tokens: int = 0):
        self.layers = layers
        self.fingerprint = fingerprint
        self.num_tokens = num_tokens
        self.nbytes = sum(t.numel() * t.element_size() for layer in layers for t in layer.values())

    def fork(self) -> SessionState:
        """An independent copy: continuing one never changes the other."""
        layers = [{name: t.clone() for name, t in layer.items()} for layer in self.layers]
        return SessionState(layers, self.fingerprint, self.num_tokens)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Flat tensors ("<layer>.<name>") and string metadata: the serialized form before encoding."""
        tensors = {f"{i}.{name}": t.contiguous() for i, layer in enumerate(self.layers) for name, t in layer.items()}
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "fingerprint": self.fingerprint,
                    "num_tokens": str(self.num_tokens), "num_layers": str(len(self.layers))}
        return tensors, metadata

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                     expected_fingerprint: str | None = None) -> SessionState:
        """Inverse of to_tensors; with `expected_fingerprint`, refuse a state made by another model."""
        _check_format(metadata)
        if expected_fingerprint is not None:
            check_fingerprint(metadata["fingerprint"], expected_fingerprint)
        layers: list[dict[str, torch.Tensor]] = [{} for _ in range(int(metadata["num_layers"]))]
        for key, tensor in tensors.items():
            index, name = key.split(".", 1)
            layers[int(index)][name] = tensor
        return cls(layers, metadata["fingerprint"], int(metadata["num_tokens"]))

    def to_bytes(self) -> bytes:
        tensors, metadata = self.to_tensors()
        return save_tensors(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes, expected_fingerprint: str | None = None) -> SessionState:
        """Parse a serialized state; with `expected_fingerprint`, refuse one made by another model."""
        metadata, tensors = parse_safetensors(data)
        return cls.from_tensors(tensors, metadata, expected_fingerprint)

    def __repr__(self) -> str:
        return f"SessionState(num_tokens={self.num_tokens}, nbytes={self.nbytes}, layers={len(self.layers)})"


def check_fingerprint(state_fingerprint: str, model_fingerprint: str) -> None:
    """Refuse a state made by another model (weights, adapter or config)."""
    if state_fingerprint != model_fingerprint:
        raise ValueError(f"session state was made by model {state_fingerprint[:12]}, "
                         f"not by this model ({model_fingerprint[:12]})")


def parse_safetensors(data: bytes) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of safetensors bytes (a state, or a store entry), or a ValueError saying what is wrong."""
    try:
        header_len = struct.unpack("<Q", data[:8])[0]
        metadata = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
        tensors = load_tensors(data)
    except (struct.error, ValueError, UnicodeDecodeError, SafetensorError) as error:
        raise ValueError(f"not a TPTT session state ({error})") from None
    return metadata, tensors


def _check_format(metadata: dict[str, str]) -> None:
    if metadata.get("format") != FORMAT:
        raise ValueError("not a TPTT session state (missing format marker)")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(f"session state format version {metadata.get('format_version')} is not supported "
                         f"(this runtime reads version {FORMAT_VERSION}); start a new session from the text")
