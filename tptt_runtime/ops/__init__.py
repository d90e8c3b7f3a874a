"""Pure tensor functions of the runtime: window attention, DeltaProduct memory and its inputs."""

import torch


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, without an op when it already is (decode runs many small tensors through here)."""
    return x if x.dtype == torch.float32 else x.float()
