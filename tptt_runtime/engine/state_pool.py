"""StatePool: the session tensors of every running request, allocated once and addressed by slot.

Each layer's state tensors exist once, at [num_slots, ...] (the engine's max_num_seqs). A running request holds
a slot index; forwards read and write its row in place (TitansModel.prefill_packed / decode_rows), so a decode
step copies no state. Nothing else holds running state: a SessionState is only a value, copied out of a slot
for a snapshot (`snapshot`) or into a free slot to resume one (`acquire`). The pool never grows.

The engine keeps the slots of the requests decoding together at the front of the pool (`swap`), so that a
decode step reads one contiguous view of rows 0 .. B-1; a packed prefill reads and writes its requests' slots
through views of runs of consecutive slots. Nothing is gathered or copied back (`rows`). The pool knows
tensors and slot numbers, never requests.
"""

from __future__ import annotations

import torch

from ..model import TitansModel
from ..state import SessionState


class PoolFull(RuntimeError):
    """Every slot is taken (the scheduler admits at most num_slots requests, so this is a bug if raised)."""


class StatePool:
    def __init__(self, model: TitansModel, num_slots: int):
        self.model = model
        self.num_slots = num_slots
        self.layers = [layer.new_state(num_slots, model.dtype, model.device) for layer in model.layers]
        self._blank = model.new_session().layers  # what a new session's row holds (empty slots, -inf scores)
        self.slot_nbytes = sum(t[0].numel() * t.element_size() for layer in self.layers for t in layer.values())
        self._free = list(range(num_slots))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def acquire(self, state: SessionState | None = None) -> int:
        """A free slot (the lowest), holding a copy of `state`, or a new session's tensors without one."""
        if not self._free:
            raise PoolFull(f"all {self.num_slots} state slots are in use")
        slot = self._free.pop(self._free.index(min(self._free)))
        source = self._blank if state is None else state.layers
        for mine, theirs in zip(self.layers, source):
            for name, tensor in mine.items():
                tensor[slot].copy_(theirs[name][0])
        return slot

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not in use")
        self._free.append(slot)

    def snapshot(self, slot: int, num_tokens: int) -> SessionState:
        """A copy of the slot's row as a SessionState of `num_tokens` tokens (the slot goes on unchanged)."""
        layers = [{name: tensor[slot:slot + 1].clone() for name, tensor in layer.items()} for layer in self.layers]
        return SessionState(layers, self.model.fingerprint, num_tokens)

    def swap(self, a: int, b: int) -> None:
        """Exchange the contents of two slots (either may be free)."""
        if a == b:
            return
        pair, swapped = torch.tensor([a, b]), torch.tensor([b, a])
        for layer in self.layers:
            for tensor in layer.values():
                tensor[pair] = tensor[swapped]
        free_a, free_b = a in self._free, b in self._free
        if free_a != free_b:
            self._free.remove(a if free_a else b)
            self._free.append(b if free_a else a)

    def rows(self, first: int, count: int = 1) -> list[dict[str, torch.Tensor]]:
        """Per-layer views [count, ...] of slots first .. first+count-1, for one forward that writes them in place
        (the decoding requests at the front; a piece of a packed prefill)."""
        return [{name: t[first:first + count] for name, t in layer.items()} for layer in self.layers]
