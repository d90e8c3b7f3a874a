"""Retrieval documents: the length of the text they replace, every fact stated before it is asked for, the
answers right, the reads on the answers, nothing of the passkey evaluation's wording, reproducible from the
seed."""

import random
import re

import pytest
import torch

from tptt_runtime.train.retrieval import CHAT_TURNS, SUBJECTS, TEMPLATES, retrieval_document, with_retrieval


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model.tokenizer


@pytest.fixture(scope="module")
def prose(tokenizer):
    text = " ".join(f"Paragraph {i} talks about boats, rivers and the weather in spring." for i in range(200))
    return tokenizer(text, add_special_tokens=False)["input_ids"][:1024]


def split(tokenizer, document, reads):
    """(body text, [(question line, answer number)]) of a retrieval document, from its reads."""
    first_question = max(i for i in range(min(reads)) if "\n" in tokenizer.decode([document[i]]))
    answers, lines = [], [line for line in tokenizer.decode(document[first_question:]).split("\n") if line]
    for position in reads:
        if position - 1 not in reads:
            answers.append("")
        answers[-1] += tokenizer.decode([document[position + 1]])
    return tokenizer.decode(document[:first_question]), list(zip(lines, (a.strip() for a in answers)))


@pytest.mark.parametrize("seed", range(12))
def test_every_question_is_answered_by_a_fact_stated_earlier(tokenizer, prose, seed):
    document, reads = retrieval_document(tokenizer, prose, random.Random(seed))
    assert len(document) == len(prose)
    body, questions = split(tokenizer, document, reads)
    assert 1 <= len(questions) <= 4
    for line, number in questions:
        assert line.endswith(number + ".") and number.isdigit()
        (subject,) = [s for s in SUBJECTS if s in line.lower()]
        statement = re.search(rf"{subject}[^\n]{{0,60}}?{number}|{number}[^\n]{{0,60}}?{subject}", body, re.IGNORECASE)
        assert statement, (subject, number)
    text = tokenizer.decode(document)
    assert "pass key" not in text.lower() and "grass is green" not in text


def test_templates_state_the_number_and_ask_without_it():
    fields = dict(kind="PIN", subject="red door", Subject="Red door", number="4821")
    for statement, question in TEMPLATES:
        statement, question = statement.format(**fields), question.format(**fields)
        assert "4821" in statement and "red door" in statement.lower()
        assert "4821" not in question and "red door" in question.lower()
        assert not {"pass key", "remember it"} & {statement.lower(), question.lower()}


@pytest.mark.parametrize("seed", range(6))
def test_reads_are_the_positions_before_each_answer_token(tokenizer, prose, seed):
    """Each read is followed by a token of an answer number and the questions' lines end with those numbers."""
    document, reads = retrieval_document(tokenizer, prose, random.Random(seed))
    _, questions = split(tokenizer, document, reads)
    read_tokens = tokenizer.decode([document[position + 1] for position in reads])
    assert read_tokens.split() == [number for _, number in questions]
    assert all(tokenizer.decode([document[p + 1]]).strip() in ("", *"0123456789") for p in reads)  # " " or a digit
    assert reads == sorted(reads) and min(reads) > len(document) // 2


def test_documents_are_a_function_of_the_seed(tokenizer, prose):
    assert retrieval_document(tokenizer, prose, random.Random(3)) == retrieval_document(tokenizer, prose,
                                                                                          random.Random(3))
    assert retrieval_document(tokenizer, prose, random.Random(3)) != retrieval_document(tokenizer, prose,
                                                                                          random.Random(4))


@pytest.mark.parametrize("seed", range(8))
def test_chat_documents_are_a_conversation_whose_assistant_answers_from_the_user_message(tokenizer, prose, seed):
    """Chat form: the user's first message (system prompt and all, as the template renders it) holds the facts,
    each question is a user turn that the assistant's next turn answers, and the reads sit on the answers."""
    document, reads = retrieval_document(tokenizer, prose, random.Random(seed), chat=True)
    assert len(document) == len(prose)
    text = tokenizer.decode(document)
    head = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).split("x")[0]
    assert text.startswith(head)
    turns = text.split("<|im_start|>")[2:]  # after the system turn
    first, answers = turns[0], [turn for turn in turns if turn.startswith("assistant\n")]
    assert first.startswith("user\n") and 1 <= len(answers) <= 4
    runs = [[reads[0]]]
    for position in reads[1:]:
        runs.append([position]) if position != runs[-1][-1] + 1 else runs[-1].append(position)
    answered = [tokenizer.decode([document[position + 1] for position in run]).strip() for run in runs]
    assert len(answered) == len(answers)
    for answer, number in zip(answers, answered):
        assert number.isdigit() and answer.removeprefix("assistant\n").rstrip("\n").endswith(number + ".<|im_end|>")
        (subject,) = [s for s in SUBJECTS if re.search(rf"{s}[^\n]{{0,60}}?{number}|{number}[^\n]{{0,60}}?{s}",
                                                     first, re.IGNORECASE)]
        user_turn = text[:text.index(answer)].rsplit("<|im_start|>user\n", 1)[-1]
        question = user_turn.split("<|im_end|>")[0].rsplit("\n", 1)[-1]  # its last line
        assert subject in question.lower() and number not in question


def test_chat_turns_ask_without_the_number():
    fields = dict(kind="PIN", subject="red door", Subject="Red door", number="4821")
    for question, reply in CHAT_TURNS:
        assert "red door" in question.format(**fields).lower() and "4821" not in question.format(**fields) + reply


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
    chats, _ = with_retrieval(tokenizer, sequences, 0.6, seed=0, chat_share=0.5)
    in_chat_form = [tokenizer.decode(row[:3].tolist()).startswith("<|im_start|>") for row in chats]
    assert 0 < sum(in_chat_form) < 6


def test_sequences_too_short_for_the_facts_are_refused(tokenizer, prose):
    with pytest.raises(ValueError, match="too short"):
        for seed in range(20):
            retrieval_document(tokenizer, prose[:60], random.Random(seed))
