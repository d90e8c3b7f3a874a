"""Incremental detokenization that never splits a character, and stop strings that never leak.

Byte-level BPE tokens can end in the middle of a UTF-8 character; decoding such a prefix yields U+FFFD. The
detokenizer decodes a short sliding span of ids and releases text only when the span decodes cleanly (the
approach of Hugging Face's TextStreamer and vLLM). `TextStream` adds stop strings on top: it holds back the
last `len(longest stop) - 1` characters until they cannot start a stop string any more.
"""

from __future__ import annotations

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
