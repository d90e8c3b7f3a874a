"""Passkey retrieval: a number hidden at a chosen depth of long filler text, asked for at the end.

The prompt is plain text (no chat template): filler sentences, the key sentence at `depth` (0 = start,
1 = end) of the filler, then "What is the pass key? The pass key is". A model passes when the digits of the key
appear in its greedy continuation.
"""

from __future__ import annotations

import random
import re

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompt(tokenizer, context_tokens: int, depth: float, seed: int) -> tuple[list[int], str]:
    """Token ids of a prompt of about `context_tokens` tokens and the key hidden in it."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError("depth must be in [0, 1]")
    key = str(random.Random(seed).randint(10000, 99999))
    needle = tokenizer(f"The pass key is {key}. Remember it. {key} is the pass key. ",
                       add_special_tokens=False)["input_ids"]
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    unit = tokenizer(FILLER, add_special_tokens=False)["input_ids"]
    budget = max(0, context_tokens - len(needle) - len(question))
    filler = (unit * (budget // len(unit) + 1))[:budget]
    cut = int(round(depth * len(filler) / len(unit))) * len(unit)  # on a sentence boundary
    cut = min(cut, len(filler))
    return filler[:cut] + needle + filler[cut:] + question, key


def passkey_found(continuation: str, key: str) -> bool:
    return key in re.sub(r"[\s,]", "", continuation)
