"""Output text, made on the caller's side of the engine: incremental detokenization that never splits a
character, and stop strings that never leak.

Byte-level BPE tokens can end in the middle of a UTF-8 character; decoding such a prefix yields U+FFFD. The
detokenizer decodes a short sliding span of ids and releases text only when the span decodes cleanly (the
approach of Hugging Face's TextStreamer and vLLM). `TextStream` adds stop strings on top: it holds back the
last `len(longest stop) - 1` characters until they cannot start a stop string any more.

`OutputProcessor` applies both to one request's engine outputs (token ids only), on the caller's thread, as
vLLM v1's output processor does: the engine thread never detokenizes. A stop string ends the text at once; the
caller then stops the request in the engine (which may have run a step or two further), and the engine's final
output (snapshot keys, statistics) closes the stream.
"""

from __future__ import annotations

from dataclasses import replace

from .request import FinishReason, Request, RequestOutput

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 4  # prompt tokens decoded with the output so that leading spaces come out right


class IncrementalDetokenizer:
    def __init__(self, tokenizer, context_ids: list[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(context_ids)[-CONTEXT_TOKENS:]
        self.prefix_offset = self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Text that `token_id` completes ("" while a character is still incomplete)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held at the end (an incomplete character becomes U+FFFD, as in the base decoder)."""
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before):]


class TextStream:
    """Output text of one request with stop strings applied. `push` returns (releasable text, stopped)."""

    def __init__(self, tokenizer, context_ids: list[int], stop: list[str]):
        self.detokenizer = IncrementalDetokenizer(tokenizer, context_ids)
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.released = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        return self._add(self.detokenizer.push(token_id), final=False)

    def finish(self) -> str:
        """Release everything left (the request ended for another reason than a stop string)."""
        delta, _ = self._add(self.detokenizer.flush(), final=True)
        return delta

    def _add(self, delta: str, final: bool) -> tuple[str, bool]:
        start = max(0, len(self.text) - self.holdback)
        self.text += delta
        cut = min((i for i in (self.text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
        end = len(self.text) if final or cut >= 0 else max(self.released, len(self.text) - self.holdback)
        out, self.released = self.text[self.released:end], end
        return out, cut >= 0


class OutputProcessor:
    """One request's engine outputs -> the caller's outputs: text added, stop strings applied."""

    def __init__(self, tokenizer, request: Request):
        self.text = TextStream(tokenizer, request.prompt_ids, request.params.stop)
        self.stopped_at: int | None = None  # output tokens up to and with the one that completed a stop string

    def process(self, output: RequestOutput) -> tuple[RequestOutput | None, bool]:
        """(the output with its text, or None for tokens the engine made past a stop string; whether the
        engine must now stop the request: a stop string ended the text while the request still runs)."""
        if self.stopped_at is not None:
            return self._after_stop(output), False
        ids = output.token_ids
        if output.finish_reason == FinishReason.STOP and ids:
            ids = ids[:-1]  # the engine's stop token (EOS or a stop token id): its text is not output
        deltas = []
        for i, token in enumerate(ids):
            delta, hit = self.text.push(token)
            deltas.append(delta)
            if hit:
                return self._stop_string(output, i + 1, "".join(deltas)), output.finish_reason is None
        if output.finish_reason is not None:
            deltas.append(self.text.finish())
        return replace(output, text="".join(deltas)), False

    def _stop_string(self, output: RequestOutput, num_tokens: int, text: str) -> RequestOutput:
        """The output cut after its `num_tokens`-th token, whose text completed a stop string."""
        self.stopped_at = output.num_output_tokens - len(output.token_ids) + num_tokens
        finish = FinishReason.STOP if output.finish_reason is not None else None
        return replace(output, token_ids=output.token_ids[:num_tokens], logprobs=output.logprobs[:num_tokens],
                       text=text, finish_reason=finish, num_output_tokens=self.stopped_at)

    def _after_stop(self, output: RequestOutput) -> RequestOutput | None:
        """Drop what the engine made past the stop string; its final output ends the stream as a stop."""
        if output.finish_reason is None:
            return None
        return replace(output, token_ids=[], logprobs=[], text="", finish_reason=FinishReason.STOP,
                       num_output_tokens=self.stopped_at)
