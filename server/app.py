"""The FastAPI app: context, authentication, and every route. Routes speak JSON, text and token ids; the engine
(on its own thread) does everything with tensors.

    create_app(settings, model) -> FastAPI     (tests pass a model; `tptt-serve` loads settings.model)
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from contextlib import asynccontextmanager, contextmanager, suppress
from functools import lru_cache

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tptt_runtime.engine import AsyncEngine, LLMEngine, Session
from tptt_runtime.model import TitansModel

from . import errors
from .chat import create_chat_completion
from .completions import create_completion
from .errors import APIError
from .limits import BodyLimit
from .generation import chat_messages, render_chat
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ForkRequest, TokenizeRequest
from .settings import Settings

log = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 1
DISCONNECT_POLL_SECONDS = 0.5
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client left; nobody receives it


class ServerContext:
    """What every route needs: settings, the tokenizer, the engine, the store and the metrics."""

    def __init__(self, settings: Settings, model: TitansModel):
        self.settings = settings
        self.model_name = settings.served_model_name or model_name(settings.model, model)
        self.tokenizer = model.tokenizer
        self.model_vocab_size = model.vocab_size
        self.kv_bytes_per_token = model.kv_cache_bytes_per_token
        self.metrics = Metrics(lambda: self.engine.full_stats())
        self.engine = AsyncEngine(LLMEngine(model, settings.engine_config()), observers=[self.metrics.observe],
                                  threads=settings.threads)
        self.store = self.engine.engine.store
        self.token_text = lru_cache(maxsize=1 << 16)(self._token_text)
        self.started = int(time.time())
        self.busy_sessions: set[tuple[str, str]] = set()

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def overloaded(self) -> APIError:
        return APIError(429, "the server is at capacity; retry shortly", code="overloaded",
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    @contextmanager
    def session_turn(self, session: Session | None):
        """One turn at a time per named session: a second concurrent request on it is a 409."""
        key = session and (session.owner, session.session_id)
        if key in self.busy_sessions:
            raise APIError(409, f"session {session.session_id!r} is busy with another request; retry after it",
                           param="session_id", code="session_busy")
        if key:
            self.busy_sessions.add(key)
        try:
            yield
        finally:
            self.busy_sessions.discard(key)

    def check_model(self, name: str | None) -> None:
        if name and name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def session_json(self, session: Session) -> dict:
        snapshots = [self.store.get(k) for k in session.snapshots]
        state_bytes = max((s.nbytes for s in snapshots if s is not None), default=0)
        return {"id": session.session_id, "object": "session", "created": session.created,
                "updated": session.updated, "kind": session.kind, "num_tokens": session.num_tokens,
                "num_messages": len(session.messages), "state_bytes": state_bytes,
                "kv_cache_equivalent_bytes": session.num_tokens * self.kv_bytes_per_token,
                "resident": bool(session.snapshots) and all(self.store.is_resident(k) for k in session.snapshots)}


def model_name(source: str, model: TitansModel) -> str:
    if source == "default":
        return "smollm2-135m-instruct-tptt"
    return model.name.rstrip("/").split("/")[-1] or "tptt-model"


async def cancel_on_disconnect(request: Request, work):
    """Await `work`, cancelling it if the client leaves first. A streaming request returns its response at once
    (the stream notices a disconnect itself); a non-streaming one would otherwise keep its engine requests
    running for nobody until they finish. Cancelling aborts them at the next engine step."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
            return Response(status_code=CLIENT_CLOSED_REQUEST)


def create_app(settings: Settings, model: TitansModel) -> FastAPI:
    ctx = ServerContext(settings, model)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        ctx.engine.start()
        if settings.compile:
            ctx.engine.compile_in_background(settings.compile_cache or None)
        yield
        ctx.engine.stop()

    app = FastAPI(title="tptt-serve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server for TPTT-converted models (constant-size session state)")
    app.state.ctx = ctx
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    def owner(authorization: str | None = Header(default=None)) -> str:
        """The caller's namespace: a hash of its API key (or "anonymous" when the server has no keys)."""
        if not settings.api_key:
            return "anonymous"
        token = authorization[7:].strip() if authorization and authorization.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(token.encode(), key.encode()) for key in settings.api_key):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)", code="invalid_api_key")
        return hashlib.sha256(token.encode()).hexdigest()[:16]

    @app.get("/health")
    async def health():
        if not ctx.engine.thread.is_alive():
            raise APIError(503, "the engine loop is not running", kind="service_unavailable_error")
        remote = ctx.store.remote
        health = {"status": "ok", "decode": ctx.engine.decode_mode,
                  "dtype": str(ctx.engine.engine.model.dtype).removeprefix("torch.")}
        if remote is not None:
            health["store"] = "ok" if remote.stats()["redis_up"] else "degraded"
        return health

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(_: str = Depends(owner)):
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, _: str = Depends(owner)):
        ctx.check_model(name)
        return model_card()

    def model_card() -> dict:
        return {"id": ctx.model_name, "object": "model", "created": ctx.started, "owned_by": "tptt-serve",
                "max_model_len": settings.max_prompt_tokens}

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest, who: str = Depends(owner),
                          x_session_id: str | None = Header(default=None)):
        ctx.check_model(body.model)
        return await cancel_on_disconnect(request, create_completion(ctx, body, who, x_session_id))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest, who: str = Depends(owner),
                               x_session_id: str | None = Header(default=None)):
        ctx.check_model(body.model)
        return await cancel_on_disconnect(request, create_chat_completion(ctx, body, who, x_session_id))

    # ------------------------------------------------------------------------- tokenizer (vLLM shapes)
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, _: str = Depends(owner)):
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages")
        if body.messages is not None:
            ids = render_chat(ctx.tokenizer, chat_messages(body.messages), body)
        else:
            ids = ctx.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
        return {"count": len(ids), "max_model_len": settings.max_prompt_tokens, "tokens": ids,
                "token_strs": ctx.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, _: str = Depends(owner)):
        ctx.check_model(body.model)
        if any(t >= ctx.model_vocab_size for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {ctx.model_vocab_size})", param="tokens")
        return {"prompt": ctx.detokenize(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(_: str = Depends(owner)):
        tok = ctx.tokenizer
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "unk_token": tok.unk_token, "chat_template": tok.chat_template,
                "model_max_length": settings.max_prompt_tokens, "vocab_size": ctx.model_vocab_size}

    # ----------------------------------------------------------------------------------- sessions
    @app.get("/v1/sessions")
    async def list_sessions(who: str = Depends(owner)):
        return {"object": "list", "data": [ctx.session_json(s) for s in ctx.store.list_sessions(who)]}

    def find_session(who: str, session_id: str) -> Session:
        session = ctx.store.get_session(who, session_id)
        if session is None:
            raise APIError(404, f"session {session_id!r} does not exist", param="session_id",
                           code="session_not_found")
        return session

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str, who: str = Depends(owner)):
        return ctx.session_json(find_session(who, session_id))

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str, who: str = Depends(owner)):
        find_session(who, session_id)
        ctx.store.delete_session(who, session_id)
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    @app.post("/v1/sessions/{session_id}/fork")
    async def fork_session(session_id: str, body: ForkRequest | None = None, who: str = Depends(owner)):
        source = find_session(who, session_id)
        target = (body.session_id if body else None) or f"{session_id}-fork-{int(time.time() * 1000) % 10**9}"
        if ctx.store.get_session(who, target) is not None:
            raise APIError(409, f"session {target!r} already exists", param="session_id")
        now = int(time.time())
        fork = Session(target, who, now, now, kind=source.kind, messages=list(source.messages),
                       token_ids=list(source.token_ids), num_tokens=source.num_tokens,
                       snapshots=list(source.snapshots))
        ctx.store.save_session(fork)
        return ctx.session_json(fork)

    return app
