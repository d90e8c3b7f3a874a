"""POST /v1/completions: legacy completions with echo and prompt logprobs (what log-likelihood scoring needs)."""

from __future__ import annotations

import time

from .errors import APIError
from .generation import (Choice, Job, collect, completion_prompts, new_id, open_session,
                         sampling_params, stream, usage)
from .protocol import CompletionRequest


async def create_completion(ctx, body: CompletionRequest, owner: str, session_header: str | None):
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of must equal n (candidates are not ranked)", param="best_of")
    prompts = completion_prompts(body, ctx.tokenizer)
    session = open_session(ctx, body, session_header, owner, kind="completion")
    if session is not None:
        if len(prompts) != 1:
            raise APIError(400, "a session takes one prompt", param="prompt")
        prompts = [session.token_ids + prompts[0]]
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    if max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens=0 only makes sense with echo", param="max_tokens")
    params = [[sampling_params(body, ctx, max_tokens, i, body.logprobs, prompt_logprobs) for i in range(body.n)]
              for _ in prompts]
    job = Job(new_id("cmpl"), prompts, params, owner, session)
    if body.stream:
        return await stream_completion(ctx, job, body)
    choices = await collect(ctx, job)
    return {
        "id": job.request_id, "object": "text_completion", "created": int(time.time()), "model": ctx.model_name,
        "choices": [completion_choice(ctx, c, body.echo, body.logprobs) for c in choices],
        "usage": usage(choices, job)}


def completion_choice(ctx, choice: Choice, echo: bool, logprobs: int | None) -> dict:
    prompt_text = ctx.detokenize(choice.prompt_ids) if echo else ""
    return {"index": choice.index, "text": prompt_text + choice.text,
            "logprobs": completion_logprobs(ctx, choice, echo) if logprobs is not None else None,
            "finish_reason": choice.finish_reason}


def completion_logprobs(ctx, choice: Choice, echo: bool, token_ids=None, entries=None) -> dict:
    """Legacy logprobs object: tokens, token_logprobs, top_logprobs (token text -> logprob), text_offset.
    With echo, the prompt's tokens come first (the first has no logprob: nothing precedes it)."""
    if token_ids is None:
        token_ids, entries = list(choice.token_ids), list(choice.logprobs)
        if echo:
            token_ids = choice.prompt_ids + token_ids
            entries = list(choice.prompt_logprobs or [None] * len(choice.prompt_ids)) + entries
    tokens = [ctx.token_text(t) for t in token_ids]
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return {"tokens": tokens,
            "token_logprobs": [e.logprob if e else None for e in entries],
            "top_logprobs": [{ctx.token_text(t): lp for t, lp in e.top.items()} if e else None for e in entries],
            "text_offset": offsets}


async def stream_completion(ctx, job: Job, body: CompletionRequest):
    def opening(choice: Choice) -> list[dict]:
        if not body.echo:
            return []
        return [{"index": choice.index, "text": ctx.detokenize(choice.prompt_ids), "logprobs": None,
                 "finish_reason": None}]

    def entries(choice: Choice, output) -> list[dict]:
        logprobs = None
        if body.logprobs is not None:
            ids, items = output.token_ids, output.logprobs
            if body.echo and output.prompt_logprobs is not None:
                ids, items = choice.prompt_ids + ids, list(output.prompt_logprobs) + items
            logprobs = completion_logprobs(ctx, choice, False, ids, items)
        if not (output.text or output.finish_reason or logprobs):
            return []
        return [{"index": choice.index, "text": output.text, "logprobs": logprobs,
                 "finish_reason": output.finish_reason}]

    return await stream(ctx, job, body, "text_completion", opening, entries)
