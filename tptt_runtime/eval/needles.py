"""Evaluation-only needles: facts hidden in long filler, in wording that no training text or template uses.

Three tasks, each in two formats:

    passkey    one 5-7 digit number, stated once, asked for at the end
    multikey   distinct numbers (default 4) for distinct named things in one document; the question asks for one
    docqa      one fact about a project (a person's name or a number) inserted into real prose

    raw        plain text that ends with an answer lead-in ("... Answer: The vault sequence given in the text is")
    chat       the document and the question as one user message through tokenizer.apply_chat_template with
               add_generation_prompt=True: the model answers as the assistant

Filler comes from one of three sources: `prose`, real text: the held-out documents of train/data.py (split by
a hash of their path), only those under system paths, because a document under the virtual environment has
another path, so maybe another split, on the machine that trained the adapter; `sentences`, this module's own
filler sentences in random order; `repeated`, 3-5 of them over and over (the classic noise haystack). Every
wording (statement, question, lead-in, intro, instruction, frame, names, filler) is drawn per trial from a list
with a RNG seeded by the caller, so no template dominates. The asked fact sits at `depth` of the filler's tokens
(0 = before all of it, 1 = after all of it) on the nearest sentence or line boundary; the other facts of a
multikey document at random depths. A prompt has `context` tokens in total (chat template included), give or
take a token or two.

Boundaries: text and token ids only, no model. Nothing in train/ imports this module, and none of its wording
is in train/ or in eval/passkey.py (the format the adapter was tuned on); tests/eval/test_needles.py checks both
directions.
"""

from __future__ import annotations

import functools
import random
import re
import sys
from dataclasses import dataclass

from ..train import data

TASKS = ("passkey", "multikey", "docqa")
FORMATS = ("raw", "chat")
SOURCES = ("prose", "sentences", "repeated")
TASK_SOURCES = {"passkey": SOURCES, "multikey": SOURCES, "docqa": ("prose",)}  # docqa: real prose only
MULTIKEY_KEYS = 4
# the held-out documents at paths that are the same on every machine (not the virtual environment's)
PROSE_PATTERNS = tuple(p for p in data.DEFAULT_SOURCES if not p.startswith(sys.prefix))

# --- passkey: {name} {key}
PASSKEY_NAMES = ("vault sequence", "entry figure", "clearance value", "dial setting", "unlock sequence",
                 "verification figure")
PASSKEY_STATEMENTS = (
    "Make a careful note of this: the {name} is {key}.",
    "One detail in this text matters more than the rest: the {name} is {key}.",
    "Buried in these pages is the {name}, and it reads {key}.",
    "Whoever reaches the end should know that the {name} is {key}.",
    "Attention, reader: {key} is the {name}.",
    "The {name} you will be quizzed on is {key}.",
)
PASSKEY_QUESTIONS = (  # (question, answer lead-in)
    ("Which {name} was given in the text?", "The {name} given in the text is"),
    ("Recall the {name} stated earlier.", "The {name} stated earlier is"),
    ("What did the text say the {name} was?", "According to the text, the {name} was"),
    ("Can you find the {name} in the text above?", "Yes, the {name} is"),
)

# --- multikey: {name} {thing} {key}; one {name} per document, one {thing} per fact
MULTIKEY_NAMES = ("inventory tag", "catalogue figure", "registry value", "tracking figure", "shelf label")
MULTIKEY_THINGS = ("copper lantern", "violet umbrella", "granite statue", "amber kite", "wooden sled",
                   "brass telescope", "linen tent", "marble fountain", "velvet curtain", "pewter jug",
                   "canvas sail", "crystal vase", "iron anchor", "porcelain teapot", "bamboo flute",
                   "leather satchel")
MULTIKEY_STATEMENTS = (
    "The {name} assigned to the {thing} is {key}.",
    "Catalogue entry: the {thing} carries {name} {key}.",
    "Everyone agreed that the {thing} would get {name} {key}.",
    "Write down {key} as the {name} of the {thing}.",
    "It turns out the {thing} is listed under {name} {key}.",
)
MULTIKEY_QUESTIONS = (
    ("What {name} was assigned to the {thing}?", "The {name} assigned to the {thing} is"),
    ("Which {name} belongs to the {thing}?", "The {name} belonging to the {thing} is"),
    ("Look up the {name} of the {thing}.", "The {thing} is listed under {name}"),
)

# --- docqa: {project} {person} {number}; (statement, question, lead-in, which field answers)
PROJECTS = ("Halcyon", "Bluefinch", "Tamarack", "Orrery", "Saltmarsh", "Kestrel", "Juniper", "Foxglove",
            "Meridian", "Lodestar", "Windrose", "Quillfeather")
FIRST_NAMES = ("Ingrid", "Tomasz", "Amara", "Kenji", "Lucia", "Dmitri", "Priya", "Oskar", "Fatima", "Rafael",
               "Sigrid", "Mateo", "Noor", "Henrike", "Abebe", "Yuki")
LAST_NAMES = ("Okafor", "Lindqvist", "Moreau", "Castellanos", "Nakamura", "Brennan", "Haddad", "Kowalczyk",
              "Varga", "Oyelaran", "Fitzgerald", "Delacroix", "Szabo", "Achterberg")
DOCQA_FACTS = (
    ("The lead engineer for project {project} is {person}.", "Who is the lead engineer for project {project}?",
     "The lead engineer for project {project} is", "person"),
    ("Project {project} was signed off by {person} after a long review.", "Who signed off project {project}?",
     "Project {project} was signed off by", "person"),
    ("{person} chaired the steering group of project {project}.",
     "Who chaired the steering group of project {project}?",
     "The steering group of project {project} was chaired by", "person"),
    ("The field survey for project {project} counted {number} households.",
     "How many households did the field survey for project {project} count?",
     "The field survey for project {project} counted", "number"),
    ("Funding for project {project} was capped at {number} euros.",
     "At how many euros was the funding for project {project} capped?",
     "The funding for project {project} was capped at", "number"),
    ("The prototype built for project {project} weighed {number} grams.",
     "How many grams did the prototype built for project {project} weigh?",
     "The prototype built for project {project} weighed", "number"),
)

# --- framing, both formats
INTROS = ("", "Read the text below carefully.\n\n", "Here is a document.\n\n",
          "Below is some text, followed by a question about it.\n\n")
RAW_FRAMES = ("\n\nQuestion: {question}\nAnswer: {lead}", "\n\n{question} {lead}", "\n\nQ: {question}\nA: {lead}",
              "\n\n---\n{question}\n{lead}")
CHAT_INSTRUCTIONS = {
    "number": ("Answer with the number only.", "Reply with just the digits.", "Give only the figure, nothing else."),
    "person": ("Answer with the name only.", "Reply with just the full name.", "Give only the name, nothing else."),
}

# --- filler of the `sentences` and `repeated` sources (no digits: the only numbers are the facts')
FILLER_SENTENCES = (
    "The lighthouse keeper painted the railings a pale green.", "A heron stood motionless at the edge of the reeds.",
    "Someone had left a chessboard set up on the porch.", "The tram rattled past the shuttered bookshop.",
    "Steam curled from a pot of lentil soup.", "Two students argued about the meaning of a poem.",
    "The orchard smelled of cut grass and windfall apples.",
    "A violinist practised scales behind a half-open window.", "Frost had drawn ferns across the greenhouse glass.",
    "The ferry was late again, as it often was in autumn.", "A tabby kitten chased moths around the streetlight.",
    "Old maps of the valley hung in the town hall.", "The potter trimmed the base of a wet bowl.",
    "Gulls quarrelled over scraps on the pier.", "Her grandfather kept bees at the bottom of the garden.",
    "The choir rehearsed on Thursday evenings.", "A thin layer of dust covered the piano keys.",
    "The night train crossed the border before dawn.", "Wild thyme grew between the paving stones.",
    "The carpenter measured the doorframe twice.", "A kettle whistled somewhere down the corridor.",
    "Lanterns swayed in the courtyard during the festival.", "The tide left ribbons of kelp along the sand.",
    "He repaired the fence with wire and patience.", "The museum guard hummed an old waltz.",
    "A sudden hailstorm flattened the tulips.", "The cartographer sharpened her pencils before breakfast.",
    "Pine needles carpeted the path to the lake.", "The market stalls opened one by one.",
    "A postcard from the coast arrived a week late.", "Wind turned the weathervane toward the east.",
    "The librarian stamped each returned book with care.", "Fog rolled down from the moor in the evening.",
    "A row of scooters leaned against the florist's wall.", "The astronomer waited for the clouds to part.",
    "Chestnuts roasted on a brazier at the corner.", "An owl called twice from the chestnut tree.",
    "The teacher wrote a long equation on the board.", "Apricots dried on trays in the afternoon sun.",
)

BOUNDARY = re.compile(r"(?<=[.!?])\s+|\n")  # where a fact may go: after a sentence or at a line break
CHARS_PER_TOKEN = 8  # generous: filler text of CHARS_PER_TOKEN * tokens characters has enough tokens


@dataclass(frozen=True)
class Probe:
    """One evaluation prompt and what a correct continuation must contain."""
    task: str                # passkey | multikey | docqa
    format: str              # raw | chat
    source: str              # the filler: prose | sentences | repeated
    depth: float             # where the asked fact sits in the filler: 0 = before all of it, 1 = after all of it
    ids: list[int]           # the prompt's token ids (chat: through the tokenizer's chat template)
    text: str                # raw: the prompt's text; chat: the user message
    needle: str              # the sentence that states the asked fact
    answer: str              # what a correct continuation contains: digits or a person's name
    others: tuple[str, ...]  # the answers of the document's other facts (multikey), never equal to `answer`


@dataclass(frozen=True)
class _Plan:
    """What a task hides and asks, before any filler."""
    statements: tuple[str, ...]  # the asked fact's sentence first
    answer: str
    others: tuple[str, ...]
    question: str
    lead: str                    # the raw format's answer lead-in
    kind: str                    # number | person: picks the chat instruction


def _numbers(rng: random.Random, count: int) -> list[str]:
    """`count` distinct numbers of 5-7 digits."""
    numbers: set[str] = set()
    while len(numbers) < count:
        digits = rng.randint(5, 7)
        numbers.add(str(rng.randint(10 ** (digits - 1), 10 ** digits - 1)))
    return rng.sample(sorted(numbers), count)


def _passkey(rng: random.Random, keys: int) -> _Plan:
    fields = dict(name=rng.choice(PASSKEY_NAMES), key=_numbers(rng, 1)[0])
    question, lead = rng.choice(PASSKEY_QUESTIONS)
    return _Plan((rng.choice(PASSKEY_STATEMENTS).format(**fields),), fields["key"], (), question.format(**fields),
                 lead.format(**fields), "number")


def _multikey(rng: random.Random, keys: int) -> _Plan:
    name, things, numbers = rng.choice(MULTIKEY_NAMES), rng.sample(MULTIKEY_THINGS, keys), _numbers(rng, keys)
    statements = tuple(rng.choice(MULTIKEY_STATEMENTS).format(name=name, thing=thing, key=key)
                       for thing, key in zip(things, numbers))
    question, lead = rng.choice(MULTIKEY_QUESTIONS)
    fields = dict(name=name, thing=things[0])
    return _Plan(statements, numbers[0], tuple(numbers[1:]), question.format(**fields), lead.format(**fields),
                 "number")


def _docqa(rng: random.Random, keys: int) -> _Plan:
    statement, question, lead, kind = rng.choice(DOCQA_FACTS)
    fields = dict(project=rng.choice(PROJECTS), person=f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
                  number=_numbers(rng, 1)[0])
    return _Plan((statement.format(**fields),), fields[kind], (), question.format(**fields),
                 lead.format(**fields), kind)


PLANS = {"passkey": _passkey, "multikey": _multikey, "docqa": _docqa}


@functools.lru_cache(maxsize=1)
def held_out_documents() -> tuple[tuple[str, str], ...]:
    """(path, text) of the held-out documents the `prose` source reads, in a stable order."""
    documents = tuple((str(path), data.read_text(path)) for path in data.documents(PROSE_PATTERNS)
                      if data.is_held_out(path))
    if not documents:
        raise FileNotFoundError(f"no held-out documents under {PROSE_PATTERNS}")
    return documents


def _prose(rng: random.Random, chars: int) -> str:
    """`chars` characters of held-out text from a random line of a random document on (then the next ones)."""
    texts = [text for _, text in held_out_documents()]
    first = rng.randrange(len(texts))
    start = texts[first].find("\n", rng.randrange(len(texts[first]))) + 1
    parts, total, index = [texts[first][start:]], len(texts[first]) - start, first
    while total < chars:
        index = (index + 1) % len(texts)
        parts.append(texts[index])
        total += len(texts[index]) + 2
    return "\n\n".join(parts)[:chars]


def _sentences(rng: random.Random, chars: int) -> str:
    """Filler sentences in random order, in paragraphs of 3-7."""
    text = ""
    while len(text) < chars:
        text += " ".join(rng.choice(FILLER_SENTENCES) for _ in range(rng.randint(3, 7))) + "\n\n"
    return text[:chars]


def _repeated(rng: random.Random, chars: int) -> str:
    """3-5 filler sentences, repeated."""
    block = " ".join(rng.sample(FILLER_SENTENCES, rng.randint(3, 5))) + " "
    return (block * (chars // len(block) + 1))[:chars]


FILLERS = {"prose": _prose, "sentences": _sentences, "repeated": _repeated}


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_ids(tokenizer, message: str) -> list[int]:
    """The tokens of one user message through the chat template, up to where the assistant answers."""
    out = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _filler_ids(tokenizer, source: str, rng: random.Random, tokens: int) -> list[int]:
    """At least `tokens` token ids of filler from `source`."""
    chars = CHARS_PER_TOKEN * tokens + 200
    while len(ids := _encode(tokenizer, FILLERS[source](rng, chars))) < tokens:
        chars *= 2
    return ids


def _insert(text: str, at: int, sentence: str) -> str:
    """`sentence` into `text` at character `at` (a boundary): a line break before it at the end of a text cut
    mid-sentence, a space after it where the text goes on without one."""
    left, right = text[:at], text[at:]
    return (left + ("\n" if left and not left[-1].isspace() else "") + sentence
            + (" " if right and not right[0].isspace() else "") + right)


def _haystack(tokenizer, filler: list[int], facts: list[tuple[float, str]]) -> str:
    """The filler's text with each (depth, sentence) on the sentence boundary nearest its depth in tokens."""
    text = tokenizer.decode(filler).replace("\ufffd", "")
    boundaries = [0] + [m.end() for m in BOUNDARY.finditer(text)] + [len(text)]
    placed = []
    for depth, sentence in facts:
        target = len(tokenizer.decode(filler[:round(depth * len(filler))]).replace("\ufffd", ""))
        placed.append((min(boundaries, key=lambda b: abs(b - target)), sentence))
    for at, sentence in sorted(placed, key=lambda p: p[0], reverse=True):  # from the end: offsets stay valid
        text = _insert(text, at, sentence)
    return text


def _render(tokenizer, fmt: str, document: str, plan: _Plan, wording: dict) -> tuple[str, list[int]]:
    """(text, ids) of the prompt around `document`: raw text with a lead-in, or a chat user message."""
    if fmt == "raw":
        text = wording["intro"] + document + wording["frame"].format(question=plan.question, lead=plan.lead)
        return text, _encode(tokenizer, text)
    text = f"{wording['intro']}{document}\n\n{plan.question} {wording['instruction']}"
    return text, chat_ids(tokenizer, text)


def _fit(build, context: int) -> tuple[str, list[int]]:
    """build(filler_tokens) -> (text, ids), with the filler sized so that the ids are `context` long."""
    text, ids = build(0)
    if len(ids) > context:
        raise ValueError(f"a prompt needs {len(ids)} tokens without filler, more than the {context} asked for")
    budget = context - len(ids)
    for _ in range(4):  # separately counted pieces tokenize a little differently once joined
        text, ids = build(budget)
        if len(ids) == context:
            break
        budget = max(0, budget + context - len(ids))
    return text, ids


def probe(tokenizer, task: str, fmt: str, context: int, depth: float, source: str, seed,
          keys: int = MULTIKEY_KEYS) -> Probe:
    """A prompt of about `context` tokens for `task` in `fmt`, the asked fact at `depth` of `source` filler.
    Everything but the format is a function of `seed` (any int or str), so the raw and the chat prompt of a
    seed hide the same facts in the same filler."""
    if task not in PLANS or fmt not in FORMATS or source not in TASK_SOURCES.get(task, ()):
        raise ValueError(f"unknown task / format / source for it: {task} / {fmt} / {source}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"{task}/{seed}")
    plan = PLANS[task](rng, keys)
    fact_depths = [depth] + [rng.random() for _ in plan.statements[1:]]
    wording = dict(intro=rng.choice(INTROS), frame=rng.choice(RAW_FRAMES),
                   instruction=rng.choice(CHAT_INSTRUCTIONS[plan.kind]))
    filler = _filler_ids(tokenizer, source, rng, context)

    def build(tokens: int) -> tuple[str, list[int]]:
        document = _haystack(tokenizer, filler[:tokens], list(zip(fact_depths, plan.statements)))
        return _render(tokenizer, fmt, document, plan, wording)

    text, ids = _fit(build, context)
    return Probe(task, fmt, source, depth, ids, text, plan.statements[0], plan.answer, plan.others)


def depths(trials: int) -> list[float]:
    """`trials` depths spread evenly over [0, 1], both ends included."""
    return [0.5] if trials == 1 else [trial / (trials - 1) for trial in range(trials)]


def probes(tokenizer, task: str, fmt: str, context: int, trials: int, seed: int = 0,
           keys: int = MULTIKEY_KEYS) -> list[Probe]:
    """`trials` prompts at depths spread evenly over [0, 1], the task's filler sources in turn."""
    sources = TASK_SOURCES[task]
    return [probe(tokenizer, task, fmt, context, depth, sources[trial % len(sources)],
                  seed=f"{seed}/{context}/{trial}", keys=keys)
            for trial, depth in enumerate(depths(trials))]


def found(continuation: str, answer: str, others: tuple[str, ...] = ()) -> bool:
    """Whether `answer` is in `continuation` and none of `others` (the document's other keys) is: a number as a
    whole run of digits (spaces and commas between digits ignored), a name case- and spacing-insensitively."""
    return _contains(continuation, answer) and not names_another(continuation, others)


def names_another(continuation: str, others: tuple[str, ...]) -> bool:
    """Whether `continuation` gives one of `others` (the document's other keys): a multi-key miss that found a
    wrong key, with or without the asked one."""
    return any(_contains(continuation, other) for other in others)


def _contains(text: str, answer: str) -> bool:
    if answer.isdigit():
        return answer in re.findall(r"\d+", re.sub(r"(?<=\d)[\s,]+(?=\d)", "", text))
    return " ".join(answer.lower().split()) in " ".join(text.lower().split())
