"""Pure tensor functions of the runtime: window attention, DeltaProduct memory and its inputs."""

import torch


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, without an op when it already is (decode runs many small tensors through here)."""
    return x if x.dtype == torch.float32 else x.float()


def store(tensors: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    """Write `value` into a session's tensor in place. Under autograd (training: a fresh state every forward)
    the graph may still need the old tensor, so there it is replaced instead."""
    if value.requires_grad and torch.is_grad_enabled():
        tensors[name] = value
    else:
        tensors[name].copy_(value)
