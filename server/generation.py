"""/v1/completions and /v1/chat/completions: from a validated body to engine requests and back to OpenAI JSON.

One HTTP request becomes len(prompts) x n engine requests (choice index = prompt index * n + i, seed + i). Their
output streams are merged; in streaming mode every engine output becomes an SSE chunk, otherwise the outputs
are collected into one response. A named session (body `session_id` or header X-Session-ID) prepends the
session's conversation to the prompt and records the reply when the request finishes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from sse_starlette import EventSourceResponse

from tptt_runtime.engine import EngineOverloaded, FinishReason, Request, RequestOutput, SamplingParams, Session, TokenLogprobs

from .errors import APIError
from .protocol import CompletionRequest, SamplingFields

log = logging.getLogger(__name__)

@dataclass
class Choice:
    """One choice being assembled from its engine outputs."""
    index: int
    prompt_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    snapshot_keys: list[str] = field(default_factory=list)

    def add(self, output: RequestOutput) -> None:
        self.text += output.text
        self.token_ids += output.token_ids
        self.logprobs += output.logprobs
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        self.finish_reason = output.finish_reason
        self.num_cached_tokens = output.num_cached_tokens
        self.snapshot_keys = output.snapshot_keys


@dataclass
class Job:
    """Everything a route prepared for the engine: prompts, per-choice params and the session, if any."""
    request_id: str
    prompts: list[list[int]]
    params: list[list[SamplingParams]]      # per prompt, per choice
    namespace: str
    session: Session | None = None
    session_messages: list[dict] | None = None

    def requests(self) -> list[Request]:
        return [Request(f"{self.request_id}-{p}-{i}", prompt, params, self.namespace)
                for p, (prompt, choice_params) in enumerate(zip(self.prompts, self.params))
                for i, params in enumerate(choice_params)]


# ----------------------------------------------------------------------------------------------- params
def sampling_params(body: SamplingFields, ctx, max_tokens: int, index: int, logprobs: int | None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    if max_tokens > ctx.settings.max_tokens_limit:
        raise APIError(400, f"max_tokens={max_tokens} is above this server's limit "
                            f"({ctx.settings.max_tokens_limit}, --max-tokens-limit)", param="max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
    except ValueError:
        raise APIError(400, "logit_bias keys must be token ids", param="logit_bias") from None
    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
            min_p=body.min_p or 0.0, seed=None if body.seed is None else body.seed + index, stop=stop,
            stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos,
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0, logit_bias=bias, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs)
        params.check_vocab(ctx.model_vocab_size)
    except ValueError as error:
        raise APIError(400, str(error)) from None
    return params


def completion_prompts(body: CompletionRequest, tokenizer) -> list[list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    prompts = [p if isinstance(p, list) else tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompt]
    if any(not p for p in prompts):
        raise APIError(400, "prompt is empty", param="prompt")
    return prompts


def chat_messages(messages) -> list[dict]:
    """Request messages as plain dicts for the chat template ("developer" is the newer name of "system")."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


def render_chat(tokenizer, messages: list[dict], body) -> list[int]:
    if body.add_generation_prompt and body.continue_final_message:
        raise APIError(400, "add_generation_prompt and continue_final_message cannot both be true")
    try:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=body.add_generation_prompt and not body.continue_final_message,
            continue_final_message=body.continue_final_message, tokenize=True)
    except Exception as error:  # noqa: BLE001 - a template that refuses the conversation is the client's 400
        raise APIError(400, f"the chat template cannot render these messages: {error}", param="messages") from None
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


# -------------------------------------------------------------------------------------------- sessions
def open_session(ctx, body: SamplingFields, header_id: str | None, owner: str, kind: str) -> Session | None:
    session_id = body.session_id or header_id
    if session_id is None:
        return None
    if body.n != 1:
        raise APIError(400, "a session continues one conversation: n must be 1", param="n")
    session = ctx.store.get_session(owner, session_id)
    if session is None:
        now = int(time.time())
        session = Session(session_id, owner, now, now, kind=kind)
    if session.kind != kind:
        raise APIError(400, f"session {session_id} is a {session.kind} session", param="session_id")
    return session


async def finish_turn(ctx, job: Job, choices: list[Choice]) -> None:
    """Record the turn in its session and, with a shared store, wait until the turn's states are there: a reply
    the client holds can then be continued on any server. Off the event loop (both may wait on Redis)."""
    await asyncio.to_thread(close_session, ctx, job, choices[0])
    await asyncio.to_thread(ctx.store.wait_shared, [key for choice in choices for key in choice.snapshot_keys])


def close_session(ctx, job: Job, choice: Choice) -> None:
    """Record a finished turn in its session (aborted or failed turns leave the session as it was)."""
    session = job.session
    if session is None or choice.finish_reason not in (FinishReason.STOP, FinishReason.LENGTH):
        return
    if session.kind == "chat":
        session.messages = job.session_messages + [{"role": "assistant", "content": choice.text}]
    else:
        session.token_ids = job.prompts[0] + choice.token_ids
    session.num_tokens = len(job.prompts[0]) + len(choice.token_ids)
    session.snapshots = choice.snapshot_keys
    session.updated = int(time.time())
    ctx.store.save_session(session)


# -------------------------------------------------------------------------------------------- running
QUEUED = None  # the first item `run` yields: every engine request of the job is queued


async def run(ctx, job: Job) -> AsyncIterator[tuple[int, RequestOutput] | None]:
    """Queue every engine request of `job`, yield QUEUED, then (choice index, output) as outputs arrive.
    Refusals (409 busy session, 429 overload, 400) raise before QUEUED, so a caller that waits for it can still
    answer with a status code. Logs one line when queued and one at the end; prompt text only with
    --log-prompts. Leaving early (a disconnect) aborts what is still running."""
    with ctx.session_turn(job.session):
        streams = submit(ctx, job)
        log_queued(ctx, job)
        started, tokens, reasons = time.monotonic(), 0, Counter()
        try:
            yield QUEUED
            async for index, output in merge(streams):
                tokens += len(output.token_ids)
                reasons.update([output.finish_reason] if output.finish_reason else [])
                yield index, output
        finally:
            log.info("%s: %d tokens in %.2f s, finished %s", job.request_id, tokens, time.monotonic() - started,
                     dict(reasons) if reasons else "before any output")


def submit(ctx, job: Job) -> list[AsyncIterator[RequestOutput]]:
    requests = job.requests()
    streams = []
    try:
        for request in requests:
            streams.append(ctx.engine.submit(request))
    except BaseException as error:
        for request in requests[:len(streams)]:
            ctx.engine.abort(request.request_id)
        if isinstance(error, EngineOverloaded):
            raise ctx.overloaded() from None
        if isinstance(error, ValueError):
            raise APIError(400, str(error)) from None
        raise
    return streams


def log_queued(ctx, job: Job) -> None:
    log.info("%s: %d prompt(s) of %s tokens, %d choice(s) each%s", job.request_id, len(job.prompts),
             "/".join(str(len(p)) for p in job.prompts), len(job.params[0]),
             f", session {job.session.session_id!r}" if job.session else "")
    if ctx.settings.log_prompts:
        for prompt in job.prompts:
            log.info("%s prompt: %r", job.request_id, ctx.detokenize(prompt))


async def merge(streams) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from several output streams, in arrival order."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
        finally:
            await stream.aclose()
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, output = await queue.get()
            if output is None:
                remaining -= 1
            else:
                yield index, output
    finally:
        for task in tasks:
            task.cancel()


async def collect(ctx, job: Job) -> list[Choice]:
    """Run `job` to the end (non-streaming) and record the turn in its session."""
    choices = new_choices(job)
    async for item in run(ctx, job):
        if item is QUEUED:
            continue
        index, output = item
        check_failed(output)
        choices[index].add(output)
    await finish_turn(ctx, job, choices)
    return choices


async def stream(ctx, job: Job, body: SamplingFields, kind: str, opening, entries) -> EventSourceResponse:
    """The SSE response of a streaming job, returned once the job is queued (refusals raise before it starts):
    `opening(choice)` and `entries(choice, output)` give the choice objects of the first chunks and of each
    engine output; then the usage chunk (when asked for) and [DONE]."""
    events = stream_events(ctx, job, body, kind, opening, entries)
    await anext(events)  # queues the job
    return EventSourceResponse(events, ping=15, headers={"Cache-Control": "no-cache"})


async def stream_events(ctx, job: Job, body: SamplingFields, kind: str, opening, entries):
    choices = new_choices(job)
    created = int(time.time())
    outputs = run(ctx, job)
    await anext(outputs)  # QUEUED, or the refusal raises to `stream`
    yield None

    def chunk(choice_list: list[dict], **extra) -> dict:
        return sse({"id": job.request_id, "object": kind, "created": created, "model": ctx.model_name,
                    "choices": choice_list, **extra})

    try:
        for choice in choices:
            for entry in opening(choice):
                yield chunk([entry])
        async for index, output in outputs:
            check_failed(output)
            choices[index].add(output)
            for entry in entries(choices[index], output):
                yield chunk([entry])
        await finish_turn(ctx, job, choices)
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], usage=usage(choices, job))
    except APIError as error:
        yield sse(error.body())
    finally:
        await outputs.aclose()
    yield {"data": "[DONE]"}


def check_failed(output: RequestOutput) -> None:
    if output.finish_reason == FinishReason.ERROR:
        raise APIError(500, f"generation failed: {output.error}", kind="server_error")


def new_choices(job: Job) -> list[Choice]:
    n = len(job.params[0])
    return [Choice(p * n + i, prompt) for p, prompt in enumerate(job.prompts) for i in range(n)]


def usage(choices: list[Choice], job: Job) -> dict:
    n = len(job.params[0])
    prompt_tokens = sum(len(p) for p in job.prompts) * n
    completion = sum(len(c.token_ids) for c in choices)
    cached = sum(c.num_cached_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}


def sse(payload: dict) -> dict:
    return {"data": json.dumps(payload, separators=(",", ":"))}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
