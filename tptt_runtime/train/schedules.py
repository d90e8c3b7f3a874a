"""Memory-as-Gate weight schedules (the paper's): constant, gradual warm-up from ~0, cyclic.

`mag_weight(step, total)` -> mu in [0, 1]; pure functions of the step so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "gradual", "cyclic")


@dataclass(frozen=True)
class MagSchedule:
    kind: str = "gradual"
    target: float = 0.5          # final (constant, gradual) or peak (cyclic) memory weight
    start: float = 0.01          # gradual: the weight at step 0
    warmup: float = 0.3          # gradual: fraction of training spent rising to target
    cycles: int = 4              # cyclic: number of cosine cycles between start and target

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.kind!r}")
        if not (0.0 <= self.start <= self.target <= 1.0):
            raise ValueError("need 0 <= start <= target <= 1")
        if not 0.0 < self.warmup <= 1.0 or self.cycles < 1:
            raise ValueError("warmup must be in (0, 1] and cycles >= 1")

    def __call__(self, step: int, total: int) -> float:
        progress = step / max(1, total - 1)
        if self.kind == "constant":
            return self.target
        if self.kind == "gradual":
            return self.start + (self.target - self.start) * min(1.0, progress / self.warmup)
        phase = (progress * self.cycles) % 1.0
        return self.start + (self.target - self.start) * 0.5 * (1 - math.cos(2 * math.pi * phase))
