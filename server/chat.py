"""POST /v1/chat/completions: messages -> the tokenizer's chat template -> engine -> OpenAI chat JSON / SSE."""

from __future__ import annotations

import time

from .errors import APIError
from .generation import (Choice, Job, chat_messages, collect, new_id, open_session, render_chat,
                         sampling_params, stream, usage)
from .protocol import ChatCompletionRequest


async def create_chat_completion(ctx, body: ChatCompletionRequest, owner: str, session_header: str | None):
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    session = open_session(ctx, body, session_header, owner, kind="chat")
    messages = (session.messages if session else []) + chat_messages(body.messages)
    prompt_ids = render_chat(ctx.tokenizer, messages, body)
    max_tokens = body.max_completion_tokens or body.max_tokens or ctx.settings.max_tokens_limit
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = [[sampling_params(body, ctx, max_tokens, i, logprobs) for i in range(body.n)]]
    job = Job(new_id("chatcmpl"), [prompt_ids], params, owner, session, messages)
    if body.stream:
        return await stream_chat(ctx, job, body)
    choices = await collect(ctx, job)
    return {
        "id": job.request_id, "object": "chat.completion", "created": int(time.time()), "model": ctx.model_name,
        "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                     "logprobs": chat_logprobs(ctx, c.logprobs) if body.logprobs else None,
                     "finish_reason": c.finish_reason} for c in choices],
        "usage": usage(choices, job)}


def chat_logprobs(ctx, entries) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        text = ctx.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**item(e.token_id, e.logprob),
                         "top_logprobs": [item(t, lp) for t, lp in e.top.items()]} for e in entries]}


async def stream_chat(ctx, job: Job, body: ChatCompletionRequest):
    def opening(choice: Choice) -> list[dict]:
        return [{"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]

    def entries(choice: Choice, output) -> list[dict]:
        out = []
        logprobs = chat_logprobs(ctx, output.logprobs) if body.logprobs and output.logprobs else None
        if output.text or logprobs:
            out.append({"index": choice.index, "delta": {"content": output.text}, "logprobs": logprobs,
                        "finish_reason": None})
        if output.finish_reason:
            out.append({"index": choice.index, "delta": {}, "logprobs": None,
                        "finish_reason": output.finish_reason})
        return out

    return await stream(ctx, job, body, "chat.completion.chunk", opening, entries)
