"""Training and held-out token sequences from text already on this machine (nothing is downloaded).

Documents come from glob patterns (default: Vim's manual, plain-text docs under /usr/share/doc, Markdown in the
installed Python packages: English prose and technical writing); the model card says which were used. Documents
are split train / held-out by a hash of their path (stable across runs and machines), joined with EOS and cut
into sequences of `seq_len` tokens. The order is a seeded permutation, so step k always sees the same sequence.
"""

from __future__ import annotations

import glob
import hashlib
import sys
from pathlib import Path

import torch

DEFAULT_SOURCES = ("/usr/share/vim/vim*/doc/*.txt", "/usr/share/doc/*/README*", "/usr/share/doc/*/*.txt",
                   f"{sys.prefix}/lib/python3*/site-packages/*/README.md",
                   f"{sys.prefix}/lib/python3*/site-packages/**/docs/**/*.md")
HELD_OUT_PERCENT = 5
MIN_DOCUMENT_CHARS = 2000


def documents(patterns=DEFAULT_SOURCES) -> list[Path]:
    """Readable text files matched by `patterns`, deduplicated, in a stable order."""
    paths = {Path(p) for pattern in patterns for p in glob.glob(pattern, recursive=True)}
    return sorted(p for p in paths if p.is_file() and p.suffix != ".gz" and p.stat().st_size >= MIN_DOCUMENT_CHARS)


def is_held_out(path: Path) -> bool:
    return int(hashlib.sha256(str(path).encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace").replace("\ufffd", "")


def sequences(tokenizer, seq_len: int, held_out: bool = False, patterns=DEFAULT_SOURCES,
              max_tokens: int | None = None) -> torch.Tensor:
    """[N, seq_len] token ids of the train (or held-out) documents, in file order."""
    ids: list[int] = []
    for path in documents(patterns):
        if is_held_out(path) != held_out:
            continue
        ids += tokenizer(read_text(path), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    count = len(ids) // seq_len
    if count == 0:
        raise ValueError(f"not enough text for one sequence of {seq_len} tokens in {list(patterns)}")
    return torch.tensor(ids[:count * seq_len]).view(count, seq_len)


def order(num_sequences: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """[steps, batch_size] sequence indices: seeded permutations, concatenated as often as needed."""
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    perms = [torch.randperm(num_sequences, generator=generator) for _ in range(max(1, -(-needed // num_sequences)))]
    return torch.cat(perms)[:needed].view(steps, batch_size)
