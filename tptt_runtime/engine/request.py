"""Messages between the engine and its callers: one Request in, a stream of RequestOutputs back.

There is no prefill phase nor decode phase: a request has prompt tokens its state has consumed (`num_computed`,
of which `num_cached` came from a stored snapshot) and output tokens; each step advances it by a prefill chunk
or by one decode token. Token ids only: text is made by the detokenizer, never read back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams, TokenLogprobs, new_generator


class FinishReason:
    STOP = "stop"          # EOS, a stop token or a stop string
    LENGTH = "length"      # max_tokens reached
    ABORT = "abort"        # the client went away or the request was cancelled
    ERROR = "error"        # the model failed on this request (reported, the engine keeps serving)


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    namespace: str = ""                        # owner of the snapshots it may resume from and creates
    arrival_time: float = field(default_factory=time.monotonic)
    # ---- set by the engine
    slot: int | None = None                    # the request's row in the engine's state pool while running
    num_computed: int = 0                      # prompt tokens its state has consumed (cached + prefilled)
    num_cached: int = 0                        # prompt tokens resumed from a snapshot
    pending_logits: torch.Tensor | None = None  # float32 [vocab]: the next token is sampled from these
    last_logits: torch.Tensor | None = None     # the logits the last output token was sampled from
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    finish_reason: str | None = None
    abort_reason: str | None = None            # set by `LLMEngine.abort`: how the next step ends it
    scheduled_time: float | None = None
    first_token_time: float | None = None
    snapshot_keys: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.generator = new_generator(self.params.seed)

    @property
    def is_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    @property
    def num_tokens(self) -> int:
        """Context length of this request: prompt + output."""
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class RequestOutput:
    """What one step did for one request. The last output of a request has `finish_reason` set; when that is
    "stop" and the output has token ids, the last one is the stop token (EOS or a stop token id)."""
    request_id: str
    token_ids: list[int]                       # new output tokens (EOS / stop tokens included)
    text: str                                  # new output text (stop strings and special tokens excluded):
                                               # made by the caller's OutputProcessor, "" from the engine
    logprobs: list[TokenLogprobs]              # one per new token, when asked for
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # first output only, when asked for
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0                 # prompt tokens that were not recomputed
    num_output_tokens: int = 0
    state_bytes: int = 0                       # size of the request's session state
    arrival_time: float = 0.0
    scheduled_time: float | None = None
    first_token_time: float | None = None
    snapshot_keys: list[str] = field(default_factory=list)  # snapshots stored for this request (final output)
    error: str | None = None
