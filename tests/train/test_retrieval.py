"""Retrieval documents: the length of the text they replace, every fact stated before it is asked for, the
answers right, the reads on the answers, nothing of the passkey evaluation's wording, reproducible from the
seed."""

import random
import re

import pytest
import torch

from tptt_runtime.train.retrieval import retrieval_document, with_retrieval

STATEMENT = re.compile(r"The ([\w ]+?) for the ([\w ]+?) is (\d+)\. |Note that the ([\w ]+?) has ([\w ]+?) (\d+)\. ")
QUESTION = re.compile(r"The ([\w ]+?) for the ([\w ]+?) is (\d+)\.\n|The ([\w ]+?) has ([\w ]+?) (\d+)\.\n")


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model.tokenizer


@pytest.fixture(scope="module")
def prose(tokenizer):
    text = " ".join(f"Paragraph {i} talks about boats, rivers and the weather in spring." for i in range(200))
    return tokenizer(text, add_special_tokens=False)["input_ids"][:1024]


def facts(pattern, text):
    """{(kind, subject): number} from every match of `pattern`."""
    found = {}
    for match in pattern.finditer(text):
        groups = match.groups()
        kind, subject, number = groups[:3] if groups[0] else (groups[4], groups[3], groups[5])
        found[(kind, subject)] = number
    return found


@pytest.mark.parametrize("seed", range(6))
def test_every_question_is_answered_by_a_fact_stated_earlier(tokenizer, prose, seed):
    document, _ = retrieval_document(tokenizer, prose, random.Random(seed))
    assert len(document) == len(prose)
    text = tokenizer.decode(document)
    tail = min(i for i in (text.find("\nWhat is the "), text.find("\nWhich ")) if i >= 0)
    body, questions = text[:tail], text[tail:]
    stated, asked = facts(STATEMENT, body), facts(QUESTION, questions)
    assert asked and asked == stated
    assert "pass key" not in text.lower() and "grass is green" not in text


@pytest.mark.parametrize("seed", range(6))
def test_reads_are_the_positions_before_each_answer_token(tokenizer, prose, seed):
    """Each read is followed by a token of an answer number; together they spell the answers in order."""
    document, reads = retrieval_document(tokenizer, prose, random.Random(seed))
    text = tokenizer.decode(document)
    tail = min(i for i in (text.find("\nWhat is the "), text.find("\nWhich ")) if i >= 0)
    answers = [number for number in re.findall(r"(\d+)\.\n", text[tail:])]
    read_tokens = tokenizer.decode([document[position + 1] for position in reads])
    assert read_tokens.split() == answers
    assert reads == sorted(reads) and min(reads) > len(document) // 2


def test_documents_are_a_function_of_the_seed(tokenizer, prose):
    assert retrieval_document(tokenizer, prose, random.Random(3)) == retrieval_document(tokenizer, prose,
                                                                                          random.Random(3))
    assert retrieval_document(tokenizer, prose, random.Random(3)) != retrieval_document(tokenizer, prose,
                                                                                          random.Random(4))


def test_with_retrieval_rebuilds_the_asked_share_of_rows(tokenizer, prose):
    sequences = torch.tensor([prose] * 10)
    mixed, reads = with_retrieval(tokenizer, sequences, 0.3, seed=0)
    assert mixed.shape == sequences.shape == reads.shape
    rebuilt = (mixed != sequences).any(dim=1)
    assert rebuilt.sum() == 3
    assert torch.equal(reads.any(dim=1), rebuilt)  # reads only in retrieval documents, in each of them
    again, again_reads = with_retrieval(tokenizer, sequences, 0.3, seed=0)
    assert torch.equal(again, mixed) and torch.equal(again_reads, reads)
    with pytest.raises(ValueError):
        with_retrieval(tokenizer, sequences, 1.5, seed=0)


def test_sequences_too_short_for_the_facts_are_refused(tokenizer, prose):
    with pytest.raises(ValueError, match="too short"):
        for seed in range(20):
            retrieval_document(tokenizer, prose[:60], random.Random(seed))
