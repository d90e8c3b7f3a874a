"""The held-out needle prompts (eval/needles.py) on the default model's tokenizer: length, depth, formats,
multi-key, reproducibility, scoring; and the evaluation stays held out: none of its wording is in training text
or templates (train/, eval/passkey.py's old format), no training wording is in its prompts, and no training
module imports it."""

import ast
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import tptt_runtime
from tptt_runtime.eval import needles
from tptt_runtime.train import data, retrieval

PACKAGE = Path(tptt_runtime.__file__).parent
TRAIN_MODULES = sorted((PACKAGE / "train").glob("*.py"))
OLD_PASSKEY = PACKAGE / "eval" / "passkey.py"
PLACEHOLDER = re.compile(r"\{[^{}]*\}")
MIN_WORDS = 4  # shorter pieces ("for the", "Answer:") are common English, not a template...
NGRAM = 3  # ...but no template shares even 3 words in a row with a training string ("Keep in mind")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tptt_runtime.loading import base_directory

    return AutoTokenizer.from_pretrained(base_directory("default"))


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def fragments(strings) -> set[str]:
    """The word sequences of `strings` between placeholders and line breaks, lowercase, single-spaced."""
    pieces = (piece for s in strings for part in PLACEHOLDER.split(s) for piece in part.split("\n"))
    return {" ".join(words(piece)) for piece in pieces if words(piece)}


def ngrams(fragment_set: set[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    return {tuple(f.split()[i:i + n]) for f in fragment_set for i in range(len(f.split()) - n + 1)}


def all_string_constants(path: Path) -> list[str]:
    """Every string literal of a module: docstrings, constants, f-string pieces."""
    return [node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def module_level_strings(path: Path) -> list[str]:
    """The string literals of a module's top-level assignments: its wording, not its docstrings or messages."""
    tree = ast.parse(path.read_text())
    return [node.value for statement in tree.body if isinstance(statement, ast.Assign)
            for node in ast.walk(statement.value) if isinstance(node, ast.Constant) and isinstance(node.value, str)]


EVAL_WORDING = module_level_strings(PACKAGE / "eval" / "needles.py")
TRAINING_STRINGS = [s for path in TRAIN_MODULES + [OLD_PASSKEY] for s in all_string_constants(path)]
TRAINING_WORDING = ([s for template in retrieval.TEMPLATES + retrieval.CHAT_TURNS + retrieval.PERSON_TEMPLATES
                     + retrieval.PERSON_CHAT_TURNS for s in template]
                    + list(retrieval.FILLER_SENTENCES) + all_string_constants(OLD_PASSKEY))  # its needle is an f-string inside a function


def needles_old_filler() -> str:
    from tptt_runtime.eval import passkey

    return passkey.FILLER


def normalized(text: str) -> str:
    return " " + " ".join(words(text)) + " "


def every_prompt(tokenizer, context=700, trials=3, seed=0):
    return [p for task in needles.TASKS for fmt in needles.FORMATS
            for p in needles.probes(tokenizer, task, fmt, context, trials, seed)]


# --- held out: wording, both directions, and imports


def test_the_wording_lists_are_found_and_long():
    assert len(EVAL_WORDING) > 150 and len(TRAINING_STRINGS) > 50
    assert "Make a careful note of this: the {name} is {key}." in EVAL_WORDING
    assert retrieval.FILLER_SENTENCES[0] in TRAINING_STRINGS


def test_no_evaluation_wording_in_training_strings():
    """No eval fragment of >= 4 words in any string of train/ or eval/passkey.py (docstrings included), and no
    3 words in a row in common (both directions at once)."""
    training = [normalized(s) for s in TRAINING_STRINGS]
    inside = [f for f in fragments(EVAL_WORDING) if len(f.split()) >= MIN_WORDS
              and any(f" {f} " in t for t in training)]
    assert inside == []
    assert ngrams(fragments(EVAL_WORDING)) & ngrams(fragments(TRAINING_STRINGS)) == set()


def test_no_training_phrase_in_evaluation_wording():
    """Training's subjects, kinds of number, roles and names ("north gate", "access code", "caretaker",
    "Marta"), its filler sentences and the old passkey's words are not in any eval string (template pieces: the
    4-word test above)."""
    phrases = {" ".join(words(p)) for p in retrieval.KINDS + retrieval.SUBJECTS + retrieval.ROLES
               + retrieval.FIRST_NAMES + retrieval.LAST_NAMES} | {"pass key", "remember it"}
    phrases |= {" ".join(words(s)) for s in retrieval.FILLER_SENTENCES + (needles_old_filler(),)}
    evaluation = [normalized(s) for s in EVAL_WORDING]
    assert [p for p in phrases if any(f" {p} " in e for e in evaluation)] == []


def test_no_training_wording_in_evaluation_prompts(tokenizer):
    """The prompts themselves (filler of every source included) hold no training template piece, filler
    sentence or old passkey wording of >= 4 words."""
    training = [f for f in fragments(TRAINING_WORDING) if len(f.split()) >= MIN_WORDS]
    assert len(training) > 15
    for probe in every_prompt(tokenizer):
        text = normalized(tokenizer.decode(probe.ids))
        assert [f for f in training if f" {f} " in text] == [], (probe.task, probe.format, probe.source)


def test_no_evaluation_sentence_in_training_documents():
    """Every eval fragment of >= 4 words (whole filler sentences, statements, questions, lead-ins) is absent
    from the text of every training document on this machine."""
    corpus = " ".join(normalized(data.read_text(p)) for p in data.documents() if not data.is_held_out(p))
    assert len(corpus) > 100_000
    found = [f for f in fragments(EVAL_WORDING) if len(f.split()) >= MIN_WORDS and f" {f} " in corpus]
    assert found == []


def imported(path: Path) -> set[str]:
    """Absolute names of the modules (and `from` names) that a module of tptt_runtime/train imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            package = "tptt_runtime.train".rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [package, node.module]))
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return names


def test_training_never_imports_the_evaluation_wording():
    for path in TRAIN_MODULES:
        assert [name for name in imported(path) if name.startswith("tptt_runtime.eval")] == [], path
    assert "tptt_runtime.train.retrieval.with_retrieval" in imported(PACKAGE / "train" / "distill.py")
    modules = ", ".join(f"tptt_runtime.train.{p.stem}" for p in TRAIN_MODULES if p.stem != "__init__")
    code = f"import sys, {modules}; print(sorted(m for m in sys.modules if m.startswith('tptt_runtime.eval')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_prose_is_held_out_and_at_system_paths():
    documents = needles.held_out_documents()
    assert len(documents) >= 3
    for path, _ in documents:
        assert data.is_held_out(Path(path)) and not path.startswith(sys.prefix)


# --- prompts


@pytest.mark.parametrize("context", [300, 1000, 4000])
@pytest.mark.parametrize("fmt", needles.FORMATS)
@pytest.mark.parametrize("task", needles.TASKS)
def test_prompt_length(tokenizer, task, fmt, context):
    for probe in needles.probes(tokenizer, task, fmt, context, trials=3, seed=5):
        assert abs(len(probe.ids) - context) <= 2


@pytest.mark.parametrize("task, source", [(task, source) for task in ("passkey", "docqa")
                                           for source in needles.TASK_SOURCES[task]])
def test_the_fact_is_once_where_the_depth_says(tokenizer, task, source):
    context = 2000
    for depth in (0.0, 0.25, 0.5, 0.8, 1.0):
        probe = needles.probe(tokenizer, task, "raw", context, depth, source, seed=f"depth {depth}")
        text = probe.text
        assert probe.answer in probe.needle and text.count(probe.needle) == 1
        assert len(re.findall(rf"(?<![\d]){re.escape(probe.answer)}(?![\d])", text)) == 1
        start, question = text.index(probe.needle), text.rindex("\n\n")  # the question follows the filler
        encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        filler = len(encode(text[:question])) - len(encode(probe.needle))
        assert abs(len(encode(text[:start])) / filler - depth) < 0.02 + 40 / context, (depth, text[start - 80:start])


def test_raw_prompts_end_with_the_lead_in_and_chat_goes_through_the_template(tokenizer):
    for task in needles.TASKS:
        raw, chat = (needles.probe(tokenizer, task, fmt, 600, 0.5, "prose", seed=3) for fmt in needles.FORMATS)
        assert raw.ids == tokenizer(raw.text, add_special_tokens=False)["input_ids"]
        assert not raw.text.endswith((" ", "\n", "?", "."))  # a lead-in the answer continues
        expected = tokenizer.apply_chat_template([{"role": "user", "content": chat.text}],
                                                 add_generation_prompt=True)["input_ids"]
        assert chat.ids == list(expected)
        decoded = tokenizer.decode(chat.ids)
        assert decoded.endswith("<|im_start|>assistant\n") and "<|im_start|>user\n" in decoded
        assert chat.needle in chat.text and chat.text.rstrip().endswith((".", "?"))
        assert (raw.needle, raw.answer, raw.others) == (chat.needle, chat.answer, chat.others)  # same facts


def test_multikey_keys_are_distinct_and_the_asked_one_is_among_them(tokenizer):
    for probe in needles.probes(tokenizer, "multikey", "raw", 1500, trials=6, seed=2):
        keys = (probe.answer, *probe.others)
        assert len(keys) == needles.MULTIKEY_KEYS == len(set(keys))
        for key in keys:
            assert len(re.findall(rf"(?<![\d]){key}(?![\d])", probe.text)) == 1
        asked = [t for t in needles.MULTIKEY_THINGS if t in probe.text[probe.text.rindex("\n\n"):]]
        assert len(asked) == 1 and asked[0] in probe.needle
        things = [t for t in needles.MULTIKEY_THINGS if t in probe.text]
        assert len(things) == needles.MULTIKEY_KEYS  # one named thing per key


def test_reproducible_by_seed(tokenizer):
    first = every_prompt(tokenizer, context=400, trials=2, seed=7)
    assert first == every_prompt(tokenizer, context=400, trials=2, seed=7)
    other = every_prompt(tokenizer, context=400, trials=2, seed=8)
    assert [p.answer for p in first] != [p.answer for p in other]


def template_of(sentence: str, templates) -> int:
    patterns = [re.escape(t).replace(r"\{", "{").replace(r"\}", "}") for t in templates]
    matches = [i for i, p in enumerate(patterns) if re.fullmatch(PLACEHOLDER.sub(".+", p), sentence)]
    assert matches, sentence
    return matches[0]


@pytest.mark.parametrize("task, templates", [
    ("passkey", needles.PASSKEY_STATEMENTS), ("multikey", needles.MULTIKEY_STATEMENTS),
    ("docqa", [fact[0] for fact in needles.DOCQA_FACTS])])
def test_no_template_dominates(tokenizer, task, templates):
    probes = needles.probes(tokenizer, task, "raw", 300, trials=40, seed=0)
    counts = Counter(template_of(p.needle, templates) for p in probes)
    assert len(counts) == len(templates) and max(counts.values()) <= 0.4 * len(probes)
    assert len({p.text[-60:] for p in probes}) > 20  # questions and lead-ins vary too


def test_depths_spread_evenly_and_sources_take_turns(tokenizer):
    assert needles.depths(5) == [0.0, 0.25, 0.5, 0.75, 1.0] and needles.depths(1) == [0.5]
    probes = needles.probes(tokenizer, "passkey", "raw", 300, trials=6)
    assert [p.depth for p in probes] == needles.depths(6)
    assert [p.source for p in probes] == list(needles.SOURCES) * 2


def test_refusals(tokenizer):
    with pytest.raises(ValueError, match="without filler"):
        needles.probe(tokenizer, "multikey", "chat", 50, 0.5, "prose", seed=0)
    with pytest.raises(ValueError, match="depth"):
        needles.probe(tokenizer, "passkey", "raw", 500, 1.5, "prose", seed=0)
    with pytest.raises(ValueError, match="unknown"):
        needles.probe(tokenizer, "docqa", "raw", 500, 0.5, "repeated", seed=0)


def test_found():
    assert needles.found(" 4821937.", "4821937")
    assert needles.found("The figure is 4,821,937 as given", "4821937")
    assert needles.found(" 4 8 2 1 9 3 7", "4821937")
    assert not needles.found(" 14821937", "4821937")  # a longer number is another number
    assert not needles.found(" 482193", "4821937")
    assert needles.found("It was ingrid  OKAFOR.", "Ingrid Okafor")
    assert not needles.found("Ingrid", "Ingrid Okafor")
    assert not needles.found("", "4821937")
    assert needles.found("It is 4821937.", "4821937", others=("55123", "901234"))
    assert not needles.found("4821937, 55123 and 901234", "4821937", others=("55123", "901234"))  # a listing
