"""Retrieval documents: the length of the text they replace, every fact stated before it is asked for, the
answers right (numbers and people's names), the reads on the answers, the statements' tokens marked, nothing of
the passkey evaluation's wording, reproducible from the seed."""

import random
import re

import pytest
import torch

from tptt_runtime.train.retrieval import (CHAT_TURNS, FILLER_SENTENCES, FIRST_NAMES, KINDS, LAST_NAMES,
                                          PERSON_CHAT_TURNS, PERSON_TEMPLATES, SUBJECTS, TEMPLATES,
                                          retrieval_document, with_retrieval)


def is_answer(text: str) -> bool:
    """A number, or a first and last name from the training lists."""
    return text.isdigit() or (len(text.split()) == 2 and text.split()[0] in FIRST_NAMES
                              and text.split()[1] in LAST_NAMES)


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model.tokenizer


@pytest.fixture(scope="module")
def prose(tokenizer):
    text = " ".join(f"Paragraph {i} talks about boats, rivers and the weather in spring." for i in range(200))
    return tokenizer(text, add_special_tokens=False)["input_ids"][:1024]


def questions_start(tokenizer, document, reads) -> int:
    """Where a retrieval document's questions start: the last line break before its first answer."""
    return max(i for i in range(min(reads)) if "\n" in tokenizer.decode([document[i]]))


def split(tokenizer, document, reads):
    """(body text, [(question line, answer)]) of a retrieval document, from its reads."""
    start = questions_start(tokenizer, document, reads)
    answers, lines = [], [line for line in tokenizer.decode(document[start:]).split("\n") if line]
    for position in reads:
        if position - 1 not in reads:
            answers.append("")
        answers[-1] += tokenizer.decode([document[position + 1]])
    return tokenizer.decode(document[:start]), list(zip(lines, (a.strip() for a in answers)))


@pytest.mark.parametrize("seed", range(12))
def test_every_question_is_answered_by_a_fact_stated_earlier(tokenizer, prose, seed):
    document, reads, _, _ = retrieval_document(tokenizer, prose, random.Random(seed))
    assert len(document) == len(prose)
    body, questions = split(tokenizer, document, reads)
    assert 1 <= len(questions) <= 4
    for line, number in questions:
        assert line.endswith(number + ".") and is_answer(number)
        (subject,) = [s for s in SUBJECTS if s in line.lower()]
        statement = re.search(rf"{subject}[^\n]{{0,60}}?{number}|{number}[^\n]{{0,60}}?{subject}", body, re.IGNORECASE)
        assert statement, (subject, number)
    text = tokenizer.decode(document)
    assert "pass key" not in text.lower() and "grass is green" not in text


@pytest.mark.parametrize("templates,answer", [(TEMPLATES, "4821"), (PERSON_TEMPLATES, "Marta Holm")])
def test_templates_state_the_answer_and_ask_without_it(templates, answer):
    fields = dict(kind="PIN", role="caretaker", subject="red door", Subject="Red door", number="4821", name=answer)
    for statement, question in templates:
        statement, question = statement.format(**fields), question.format(**fields)
        assert answer in statement and "red door" in statement.lower()
        assert answer not in question and "red door" in question.lower()
        assert not {"pass key", "remember it"} & {statement.lower(), question.lower()}


def test_a_share_of_the_facts_is_about_a_person_and_the_statements_are_marked(tokenizer, prose):
    """Across seeds, answers are numbers and names; the marked tokens are exactly the documents' statements:
    each run of them decodes to a sentence that holds one asked answer and its subject."""
    kinds = set()
    for seed in range(12):
        document, reads, stated, _ = retrieval_document(tokenizer, prose, random.Random(seed))
        _, questions = split(tokenizer, document, reads)
        kinds |= {answer.isdigit() for _, answer in questions}
        runs = [[stated[0]]]
        for position in stated[1:]:
            runs.append([position]) if position != runs[-1][-1] + 1 else runs[-1].append(position)
        statements = [tokenizer.decode([document[p] for p in run]) for run in runs]
        assert len(statements) == len(questions) and max(stated) < min(reads)
        for _, answer in questions:
            (statement,) = [s for s in statements if answer in s]
            assert any(subject in statement.lower() for subject in SUBJECTS) and statement.strip().endswith(".")
    assert kinds == {True, False}


@pytest.mark.parametrize("seed", range(6))
def test_reads_are_the_positions_before_each_answer_token(tokenizer, prose, seed):
    """Each read is followed by a token of an answer and the questions' lines end with those answers."""
    document, reads, _, _ = retrieval_document(tokenizer, prose, random.Random(seed))
    _, questions = split(tokenizer, document, reads)
    read_tokens = tokenizer.decode([document[position + 1] for position in reads])
    assert read_tokens.split() == " ".join(answer for _, answer in questions).split()
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
    document, reads, _, _ = retrieval_document(tokenizer, prose, random.Random(seed), chat=True)
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
        assert is_answer(number) and answer.removeprefix("assistant\n").rstrip("\n").endswith(number + ".<|im_end|>")
        (subject,) = [s for s in SUBJECTS if re.search(rf"{s}[^\n]{{0,60}}?{number}|{number}[^\n]{{0,60}}?{s}",
                                                     first, re.IGNORECASE)]
        user_turn = text[:text.index(answer)].rsplit("<|im_start|>user\n", 1)[-1]
        question = user_turn.split("<|im_end|>")[0].rsplit("\n", 1)[-1]  # its last line
        assert subject in question.lower() and number not in question


@pytest.mark.parametrize("seed", range(8))
def test_chat_replies_mark_each_assistant_turn_up_to_its_answer(tokenizer, prose, seed):
    """In chat form the replies lead to every token of each assistant turn from its first through the answer
    (not the closing "." and end of turn), so they hold the reads; plain text has none."""
    document, reads, _, replies = retrieval_document(tokenizer, prose, random.Random(seed), chat=True)
    text = tokenizer.decode(document)
    turns = [turn.removeprefix("assistant\n").split(".<|im_end|>")[0]
             for turn in text.split("<|im_start|>") if turn.startswith("assistant\n")]
    runs = [[replies[0]]]
    for position in replies[1:]:
        runs.append([position]) if position != runs[-1][-1] + 1 else runs[-1].append(position)
    assert [tokenizer.decode([document[position + 1] for position in run]) for run in runs] == turns
    assert set(reads) <= set(replies)
    assert retrieval_document(tokenizer, prose, random.Random(seed)).replies == []


def test_chat_turns_ask_without_the_answer():
    fields = dict(kind="PIN", role="caretaker", subject="red door", Subject="Red door")
    for question, reply in CHAT_TURNS + PERSON_CHAT_TURNS:
        question = question.format(**fields)
        assert "red door" in question.lower() and not any(word in question + reply for word in ("4821", "Marta"))


def test_with_retrieval_rebuilds_the_asked_share_of_rows(tokenizer, prose):
    sequences = torch.tensor([prose] * 10)
    mixed, reads, stated, replies = with_retrieval(tokenizer, sequences, 0.3, seed=0)
    assert not replies.any()  # no chat documents
    assert mixed.shape == sequences.shape == reads.shape
    rebuilt = (mixed != sequences).any(dim=1)
    assert rebuilt.sum() == 3
    assert torch.equal(reads.any(dim=1), rebuilt)  # reads only in retrieval documents, in each of them
    again, again_reads, again_stated, _ = with_retrieval(tokenizer, sequences, 0.3, seed=0)
    assert torch.equal(again, mixed) and torch.equal(again_reads, reads) and torch.equal(again_stated, stated)
    assert torch.equal(stated.any(dim=1), rebuilt) and not (stated & reads).any()
    with pytest.raises(ValueError):
        with_retrieval(tokenizer, sequences, 1.5, seed=0)
    chats, _, _, replies = with_retrieval(tokenizer, sequences, 0.6, seed=0, chat_share=0.5)
    in_chat_form = [tokenizer.decode(row[:3].tolist()).startswith("<|im_start|>") for row in chats]
    assert 0 < sum(in_chat_form) < 6 and replies.any(dim=1).tolist() == in_chat_form


@pytest.mark.parametrize("seed", range(6))
def test_same_kind_documents_tell_their_numbers_apart_by_subject_alone(tokenizer, prose, seed):
    document, reads, stated, _ = retrieval_document(tokenizer, prose, random.Random(seed), same_kind=True)
    assert len(document) == len(prose)
    body, questions = split(tokenizer, document, reads)
    assert 3 <= len(questions) <= 4 and all(number.isdigit() for _, number in questions)
    subjects = [next(s for s in SUBJECTS if s in line.lower()) for line, _ in questions]
    kinds = {kind for line, _ in questions for kind in KINDS if kind in line}  # no kind is part of another
    assert len(set(subjects)) == len(questions) and len(kinds) == 1
    for subject, (_, number) in zip(subjects, questions):
        assert re.search(rf"{subject}[^\n]{{0,60}}?{number}|{number}[^\n]{{0,60}}?{subject}", body, re.IGNORECASE)
    assert all(str(number) in tokenizer.decode([document[i] for i in stated]) for _, number in questions)


def test_with_retrieval_makes_the_asked_share_same_kind(tokenizer, prose):
    sequences = torch.tensor([prose] * 12)
    plain, plain_reads, *_ = with_retrieval(tokenizer, sequences, 1.0, seed=3)
    same, same_reads, *_ = with_retrieval(tokenizer, sequences, 1.0, seed=3, same_kind_share=0.0)
    assert torch.equal(plain, same) and torch.equal(plain_reads, same_reads)  # share 0: the documents as before
    mixed, reads, *_ = with_retrieval(tokenizer, sequences, 1.0, seed=3, same_kind_share=0.5)
    questions = [split(tokenizer, row.tolist(), torch.nonzero(row_reads).flatten().tolist())[1]
                 for row, row_reads in zip(mixed, reads)]
    one_kind = [len(q) >= 3 and len({k for line, _ in q for k in KINDS if k in line}) == 1
                and all(a.isdigit() for _, a in q) for q in questions]
    assert 0 < sum(one_kind) < len(questions)
    with pytest.raises(ValueError):
        with_retrieval(tokenizer, sequences, 1.0, seed=0, same_kind_share=2.0)


def filler_sentences(tokenizer, document, reads, stated) -> list[str]:
    """The complete sentences of a document's filler: its tokens before the first question, statements taken out."""
    stated = set(stated)
    text = tokenizer.decode([t for i, t in enumerate(document[:questions_start(tokenizer, document, reads)])
                             if i not in stated])
    return [sentence.strip() for sentence in re.split(r"(?<=\.)[ \n]+", text)][:-1]  # the last may be cut


@pytest.mark.parametrize("seed", range(4))
def test_filler_is_prose_repeated_sentences_or_sentences_in_random_order(tokenizer, prose, seed):
    def sentences(repeated, shuffled):
        document, reads, stated, _ = retrieval_document(tokenizer, prose, random.Random(seed), repeated=repeated,
                                                        shuffled=shuffled)
        return filler_sentences(tokenizer, document, reads, stated)

    assert all(s.startswith("Paragraph") for s in sentences(0.0, 0.0))
    block = sentences(1.0, 0.0)
    assert set(block) <= set(FILLER_SENTENCES) and len(set(block)) <= 6
    period = len(set(block))
    assert block[period:] == block[:-period]  # the same few sentences over and over
    shuffled = sentences(0.0, 1.0)
    assert set(shuffled) <= set(FILLER_SENTENCES) and len(set(shuffled)) > 6
    assert all(shuffled[p:] != shuffled[:-p] for p in range(1, 13))  # no period: drawn one by one


def test_filler_shares_are_checked(tokenizer, prose):
    sequences = torch.tensor([prose] * 8)
    before = with_retrieval(tokenizer, sequences, 1.0, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(before, with_retrieval(tokenizer, sequences, 1.0, seed=5,
                                                                          shuffled_filler=0.0)))
    mixed = with_retrieval(tokenizer, sequences, 1.0, seed=5, repeated_filler=0.0, shuffled_filler=0.5)
    assert not torch.equal(before.ids, mixed.ids) and torch.equal(before.reads.any(1), mixed.reads.any(1))
    for repeated, shuffled in ((0.7, 0.5), (-0.1, 0.0), (0.0, 1.2)):
        with pytest.raises(ValueError, match="filler shares"):
            with_retrieval(tokenizer, sequences, 1.0, seed=0, repeated_filler=repeated, shuffled_filler=shuffled)


def test_sequences_too_short_for_the_facts_are_refused(tokenizer, prose):
    with pytest.raises(ValueError, match="too short"):
        for seed in range(20):
            retrieval_document(tokenizer, prose[:60], random.Random(seed))
