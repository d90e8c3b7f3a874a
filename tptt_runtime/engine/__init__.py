"""Serving engine: continuous batching over SessionStates, sampling, prefix-state reuse, named sessions.

Token ids in, token ids and text out; nothing here knows HTTP (that is the `server` package).
"""

from .async_engine import AsyncEngine
from .engine import EngineConfig, EngineOverloaded, LLMEngine
from .request import FinishReason, Request, RequestOutput
from .sampling import SamplingParams, TokenLogprobs
from .store import Session, SessionStore

__all__ = ["AsyncEngine", "EngineConfig", "EngineOverloaded", "FinishReason", "LLMEngine", "Request",
           "RequestOutput", "SamplingParams", "Session", "SessionStore", "TokenLogprobs"]
