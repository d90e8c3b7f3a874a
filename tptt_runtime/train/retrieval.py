"""Training documents that need the far past: facts hidden in filler, asked for at the end.

Prose alone rarely makes the next token depend on something hundreds of tokens back, so distillation on it teaches
the memory little about exact recall. A retrieval document takes a training sequence's own text (or, for some
documents, a few plain sentences repeated, or plain sentences in random order) as filler, hides 1-4 facts ("The
access code for the north gate is 4821.", "The caretaker of the red door is Marta Holm.") at random depths, and
ends with the questions and their answers; it also says which positions read an answer, so that training can weigh
them up (they are ~1 % of the tokens), and which tokens state a fact (what the exact-token cache's retaining heads
learn to keep, train/retain.py), and in chat documents which positions lead to the assistant's replies (their
opening words and answers: a reply that answers at all is what a chat about the user's own text needs first). A
share of the documents can hold 3-4 numbers of one kind instead ("The PIN for the red door is 4821." ... "The PIN
for the west tower is 7310."): only the subject tells them apart, so an answer takes binding each number to its
subject, not only recalling a number. A share of the documents can take chat form: the filler and facts are a
user's message through the model's chat template, each question a user turn and each answer the assistant's, the
way users ask a served model about their own text. The teacher (full attention) answers them from the facts; the
student can only do so through its memory once the facts are beyond its window. Phrasings, subjects and filler
sentences are disjoint from the evaluations' (eval/passkey.py, eval/needles.py), so the evaluation stays held out.
Everything is a function of the seed.
"""

from __future__ import annotations

import random
from typing import NamedTuple

import torch

KINDS = ("access code", "secret number", "PIN", "combination", "ticket number", "serial number", "room number",
         "order number", "code word number", "lucky number")
SUBJECTS = ("north gate", "red door", "garden shed", "museum safe", "blue folder", "old bicycle", "attic window",
            "river boat", "library locker", "kitchen drawer", "silver box", "west tower", "train station",
            "green car", "mountain cabin", "office printer", "night shift", "summer camp", "jazz club",
            "second floor", "harbor office", "science lab", "paper archive", "back office")
FILLER_SENTENCES = ("The river runs past the mill.", "Birds sing in the tall trees.", "A cat sleeps on the mat.",
                    "Rain falls on the quiet town.", "The baker opens his shop early.",
                    "Children walk to school together.", "The clock on the wall ticks.",
                    "Clouds drift over the hills.", "A ship waits in the harbor.", "The road bends to the left.",
                    "Snow covers the empty field.", "Lamps glow along the street.")
REPEATED_FILLER_SHARE = 0.3  # share of documents whose filler is a few plain sentences repeated instead of prose


# facts about a person: "{role}" of the subject is "{name}" (first and last name)
ROLES = ("caretaker", "owner", "night guard", "chief cook", "treasurer", "gardener", "inspector", "bookkeeper")
FIRST_NAMES = ("Marta", "Jonas", "Aiko", "Samuel", "Elena", "Viktor", "Nadia", "Hugo", "Leila", "Bruno", "Greta",
               "Emeka", "Ines", "Pavel", "Sofia", "Tariq")
LAST_NAMES = ("Ferreira", "Holm", "Sato", "Adeyemi", "Novak", "Quinn", "Rossi", "Weber", "Costa", "Ivanova",
              "Larsen", "Mendes", "Petrov", "Kaya", "Dubois", "Hughes")
PERSON_SHARE = 0.4  # share of facts about a person (the others state a number)


# (statement, question) templates: a statement may state the number twice; the question ends where the answer
# number starts. None of them uses the passkey evaluation's words ("pass key", "Remember it").
TEMPLATES = (
    (" The {kind} for the {subject} is {number}. ",
     "What is the {kind} for the {subject}? The {kind} for the {subject} is"),
    (" Note that the {subject} has {kind} {number}. ",
     "Which {kind} does the {subject} have? The {subject} has {kind}"),
    (" Keep in mind: {number} is the {kind} of the {subject}. The {kind} of the {subject} is {number}. ",
     "Tell me the {kind} of the {subject}. The {kind} of the {subject} is"),
    (" For the {subject}, use {kind} {number}. ",
     "Which {kind} do we use for the {subject}? For the {subject}, use {kind}"),
    (" My {kind} for the {subject} is {number}. Do not lose it. ",
     "What was my {kind} for the {subject}? My {kind} for the {subject} was"),
    (" {Subject} - {kind}: {number}. ",
     "{Subject} - {kind}:"),
)


# the same for facts about a person; the question ends where the name starts
PERSON_TEMPLATES = (
    (" The {role} of the {subject} is {name}. ",
     "Name the {role} of the {subject}. The {role} of the {subject} is"),
    (" {name} works as the {role} for the {subject}. ",
     "Which person works as the {role} for the {subject}? That is"),
    (" If anything breaks at the {subject}, call {name}, our {role}. ",
     "Whom do we call if anything breaks at the {subject}? We call"),
    (" {Subject} - {role}: {name}. ",
     "{Subject} - {role}:"),
)


# (user question, start of the assistant's answer) for chat-form documents; an empty start: the answer is the
# number (name) alone
CHAT_TURNS = (
    ("What is the {kind} for the {subject}?", "The {kind} for the {subject} is"),
    ("Which {kind} does the {subject} have?", "The {subject} has {kind}"),
    ("Tell me the {kind} of the {subject}.", "The {kind} of the {subject} is"),
    ("I forgot the {kind} for the {subject}. What was it?", "It was"),
    ("{Subject}, {kind}? Digits only.", ""),
)
PERSON_CHAT_TURNS = (
    ("Name the {role} of the {subject}.", "The {role} of the {subject} is"),
    ("I forgot which person works as the {role} for the {subject}.", "That is"),
    ("{Subject}, {role}? Just the name.", ""),
)


class Fact(NamedTuple):
    statement: str    # the sentence that states it, with its spaces
    question: str     # a plain-text question line that the answer completes
    answer: str       # the number or name
    chat_turns: tuple  # the (user question, answer start) templates of its kind, formatted with `fields`
    fields: dict


SAME_KIND_FACTS = (3, 4)  # how many facts a same-kind document holds


def _fact(rng: random.Random, subject: str, kind: str | None = None) -> Fact:
    """One random fact about `subject`: a number of some kind, or (PERSON_SHARE) a person in some role; a number
    of `kind` when it is given."""
    if kind is None and rng.random() < PERSON_SHARE:
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        fields = dict(role=rng.choice(ROLES), subject=subject, Subject=subject.capitalize(), name=name)
        statement, question = rng.choice(PERSON_TEMPLATES)
        return Fact(statement.format(**fields), question.format(**fields), name, PERSON_CHAT_TURNS, fields)
    digits = rng.randint(3, 6)
    number = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
    fields = dict(kind=kind or rng.choice(KINDS), subject=subject, Subject=subject.capitalize(), number=number)
    statement, question = rng.choice(TEMPLATES)
    return Fact(statement.format(**fields), question.format(**fields), number, CHAT_TURNS, fields)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _repeated_filler(tokenizer, rng: random.Random, length: int) -> list[int]:
    ids = _encode(tokenizer, " ".join(rng.sample(FILLER_SENTENCES, rng.randint(3, 6))) + " ")
    return (ids * (length // len(ids) + 1))[:length]


def _shuffled_filler(tokenizer, rng: random.Random, length: int) -> list[int]:
    """`length` tokens of FILLER_SENTENCES drawn at random, now and then a line break between them."""
    ids = []
    while len(ids) < length:
        ids += _encode(tokenizer, rng.choice(FILLER_SENTENCES) + ("\n" if rng.random() < 0.2 else " "))
    return ids[:length]


def _filler(tokenizer, prose: list[int], rng: random.Random, length: int, repeated: float,
            shuffled: float) -> list[int]:
    """`length` tokens of filler: a few plain sentences repeated (share `repeated`), plain sentences in random
    order (share `shuffled`) or else the start of the training sequence's own text `prose`."""
    draw = rng.random()
    if draw < repeated:
        return _repeated_filler(tokenizer, rng, length)
    if draw < repeated + shuffled:
        return _shuffled_filler(tokenizer, rng, length)
    return prose[:length]


def _chat_frame(tokenizer) -> tuple[list[int], list[int], list[int]]:
    """The chat template's tokens around a conversation: (before the first user message, between a user message
    and the assistant's answer, between an answer and the next user message)."""
    marks = ("\ue000", "\ue001", "\ue002")
    turns = [{"role": role, "content": mark} for role, mark in zip(("user", "assistant", "user"), marks)]
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    head, rest = text.split(marks[0])
    user_end, rest = rest.split(marks[1])
    answer_end = rest.split(marks[2])[0]
    return _encode(tokenizer, head), _encode(tokenizer, user_end), _encode(tokenizer, answer_end)


class Question(NamedTuple):
    """A question's ids, in the order the document holds them."""
    ask: list[int]      # the question (plain text: a line; chat: the user's turn up to the assistant's)
    opening: list[int]  # the assistant reply's words before the answer (chat only; may be empty)
    answer: list[int]
    end: list[int]


def _raw_questions(tokenizer, facts: list[Fact]) -> list[Question]:
    """Each question in plain text: a line that the answer completes."""
    return [Question(_encode(tokenizer, "\n" + fact.question), [], _encode(tokenizer, " " + fact.answer),
                     _encode(tokenizer, ".\n")) for fact in facts]


def _chat_questions(tokenizer, rng: random.Random, facts: list[Fact]) -> list[Question]:
    """Each question as a turn of a chat: the first question closes the user's message that holds the document,
    each later one is a user message of its own, the assistant answers."""
    _, user_end, answer_end = _chat_frame(tokenizer)
    questions = []
    for i, fact in enumerate(facts):
        question, reply = (part.format(**fact.fields) for part in rng.choice(fact.chat_turns))
        answer = f" {fact.answer}" if reply else fact.answer
        questions.append(Question(_encode(tokenizer, ("\n\n" if i == 0 else "") + question) + user_end,
                                  _encode(tokenizer, reply), _encode(tokenizer, answer),
                                  _encode(tokenizer, ".") + answer_end))
    return questions


def _facts(rng: random.Random, same_kind: bool) -> list[Fact]:
    """1-4 random facts about distinct subjects, or (`same_kind`) 3-4 numbers of one kind."""
    if same_kind:
        kind = rng.choice(KINDS)
        return [_fact(rng, subject, kind) for subject in rng.sample(SUBJECTS, rng.randint(*SAME_KIND_FACTS))]
    return [_fact(rng, subject) for subject in rng.sample(SUBJECTS, rng.randint(1, 4))]


class Document(NamedTuple):
    """A retrieval document's ids and the positions it marks."""
    ids: list[int]
    reads: list[int]    # positions whose next token belongs to an answer (where the model must recall a fact)
    stated: list[int]   # positions of the tokens that state the facts
    replies: list[int]  # positions whose next token belongs to an assistant's reply, its opening words and the
                        # answer (chat documents; none in plain text)


def retrieval_document(tokenizer, prose: list[int], rng: random.Random, chat: bool = False,
                       same_kind: bool = False, repeated: float = REPEATED_FILLER_SHARE,
                       shuffled: float = 0.0) -> Document:
    """A document of len(prose) tokens: filler with 1-4 facts at depths in [0, 0.9], the questions last.
    `chat`: the filler is a user's message through the chat template and the questions are turns of the chat.
    `same_kind`: the facts are 3-4 numbers of one kind about different subjects. `repeated`, `shuffled`: the
    chances that the filler is plain sentences repeated or in random order instead of `prose` (`_filler`)."""
    facts = _facts(rng, same_kind)
    statements = [_encode(tokenizer, fact.statement) for fact in facts]
    asked = rng.sample(facts, len(facts))
    questions = _chat_questions(tokenizer, rng, asked) if chat else _raw_questions(tokenizer, asked)
    head = _chat_frame(tokenizer)[0] if chat else []
    budget = (len(prose) - len(head) - sum(len(part) for parts in questions for part in parts)
              - sum(map(len, statements)))
    if budget < len(prose) // 2:
        raise ValueError(f"sequences of {len(prose)} tokens are too short for retrieval documents")
    filler = _filler(tokenizer, prose, rng, budget, repeated, shuffled)
    cuts = sorted(int(rng.uniform(0.0, 0.9) * budget) for _ in statements)
    document, last, stated = list(head), 0, []
    for cut, statement in zip(cuts, statements):
        document += filler[last:cut]
        stated += range(len(document), len(document) + len(statement))
        document += statement
        last = cut
    document += filler[last:]
    reads, replies = [], []
    for question in questions:
        document += question.ask
        reply_start = len(document)
        document += question.opening
        reads += range(len(document) - 1, len(document) + len(question.answer) - 1)
        document += question.answer
        if chat:
            replies += range(reply_start - 1, len(document) - 1)
        document += question.end
    return Document(document, reads, stated, replies)


class Documents(NamedTuple):
    """Training sequences [N, T], some of them retrieval documents, and their masks [N, T] (see Document)."""
    ids: torch.Tensor
    reads: torch.Tensor
    stated: torch.Tensor
    replies: torch.Tensor


def with_retrieval(tokenizer, sequences: torch.Tensor, share: float, seed: int, chat_share: float = 0.0,
                   same_kind_share: float = 0.0, repeated_filler: float = REPEATED_FILLER_SHARE,
                   shuffled_filler: float = 0.0) -> Documents:
    """A copy of `sequences` [N, T] in which a seeded `share` of the rows became retrieval documents built on
    their own text (`chat_share` of them in chat form, `same_kind_share` of them 3-4 numbers of one kind,
    `repeated_filler` and `shuffled_filler` of them on plain sentences repeated or in random order instead of
    their text), with their masks (False in the other rows). With `same_kind_share` and `shuffled_filler` 0 and
    `repeated_filler` at its default the documents are those of earlier versions for the same seed."""
    shares = (share, chat_share, same_kind_share, repeated_filler, shuffled_filler)
    if not all(0.0 <= value <= 1.0 for value in shares) or repeated_filler + shuffled_filler > 1.0:
        raise ValueError("retrieval shares must be in [0, 1] and the filler shares add up to at most 1, got "
                         f"{share}, {chat_share}, {same_kind_share}, {repeated_filler} and {shuffled_filler}")
    rng = random.Random(seed)
    out = sequences.clone()
    reads, stated, replies = (torch.zeros(sequences.shape, dtype=torch.bool) for _ in range(3))
    for row in sorted(rng.sample(range(len(sequences)), round(share * len(sequences)))):
        chat = bool(chat_share) and rng.random() < chat_share
        same_kind = bool(same_kind_share) and rng.random() < same_kind_share
        document = retrieval_document(tokenizer, sequences[row].tolist(), rng, chat=chat, same_kind=same_kind,
                                      repeated=repeated_filler, shuffled=shuffled_filler)
        out[row] = torch.tensor(document.ids)
        reads[row, document.reads] = True
        stated[row, document.stated] = True
        replies[row, document.replies] = True
    return Documents(out, reads, stated, replies)
