"""Scheduler: which requests advance in the next step, and by how much. Knows requests, never tensors.

Each step is one batched decode (every running request that has a token to feed) plus prefill chunks of the
running requests still reading their prompt, under a per-step token budget (`max_num_batched_tokens`, decode rows
count one each). New requests join the running set between steps, first come first served, up to
`max_num_seqs`. A request whose prompt equals one that is still prefilling waits for it, so that n > 1 choices
(and identical concurrent prompts) resume from its snapshot instead of computing the prompt n times.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .request import Request


@dataclass
class ScheduledBatch:
    prefills: list[tuple[Request, int]] = field(default_factory=list)  # (request, prompt tokens this step)
    decodes: list[Request] = field(default_factory=list)               # one token each


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, admit, wait_for_duplicates: bool = True):
        """`admit(request)` is called once when a request joins the running set (it resumes a snapshot)."""
        self.wait_for_duplicates = wait_for_duplicates
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.admit = admit
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        self._admit_waiting()
        batch = ScheduledBatch()
        batch.decodes = [r for r in self.running if not r.is_prefill and r.pending_logits is None and r.output_ids]
        budget = self.max_num_batched_tokens - len(batch.decodes)
        for request in self.running:
            if budget <= 0:
                break
            if request.is_prefill:
                take = min(budget, len(request.prompt_ids) - request.num_computed)
                batch.prefills.append((request, take))
                budget -= take
        return batch

    def finish(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def _admit_waiting(self) -> None:
        deferred = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            request = self.waiting.popleft()
            if self._duplicate_in_prefill(request):
                deferred.append(request)
                continue
            self.admit(request)
            self.running.append(request)
        self.waiting.extendleft(reversed(deferred))

    def _duplicate_in_prefill(self, request: Request) -> bool:
        return self.wait_for_duplicates and not request.wants_prompt_logprobs and any(
            r.is_prefill and r.namespace == request.namespace and r.prompt_ids == request.prompt_ids
            for r in self.running)
