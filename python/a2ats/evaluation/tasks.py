"""RULER-style synthetic long-context tasks, generated offline from a seed.

Each :class:`Sample` is a user message (haystack + question), the first words of the answer
(given to the model so that its reply starts with the content), the strings a right answer
contains, and where the needles sit. Scoring follows RULER: the share of expected strings
present in the reply.

Tasks (names as RULER's): ``niah_single_number``, ``niah_single_uuid``, ``niah_single_word``
(one needle); ``niah_multikey`` (one needle among distractor needles with other keys);
``niah_multivalue`` (one key, several values, all asked); ``niah_multiquery`` (several keys, all
asked); ``vt`` (variable tracking: which variables end up holding a value through a chain of
assignments, among distractor chains); ``cwe`` (the ten most common words of a word list);
``fwe`` (the three most frequent words of a Zipf-distributed stream); and ``niah_facts``, the
demo's task (not RULER's): four "secret number of the <colour> box" facts with 4-digit numbers
in natural text, the last one asked. Haystacks for the needle and variable tasks are
``"repeat"`` (RULER's repeated filler sentences) or ``"natural"`` (CPython's
``pydoc_data.topics``); ``niah_facts`` is always natural text: copying one of several similar
numbers out of prose is what repeated filler makes too easy.
"""

from __future__ import annotations

import random
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

__all__ = [
    "TASKS",
    "HAYSTACKS",
    "COLOURS",
    "Sample",
    "FactsSample",
    "make_sample",
    "facts_sample",
    "render_prompt",
    "score_answer",
    "word_list",
    "haystack_units",
    "insert_at_depths",
]

TASKS = (
    "niah_single_number",
    "niah_single_uuid",
    "niah_single_word",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "niah_facts",
)
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
HAYSTACKS = ("repeat", "natural")

_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass(frozen=True)
class Sample:
    task: str
    message: str  # the user turn: context then question
    answer_prefix: str  # the reply's first words, given to the model
    expected: tuple[str, ...]
    max_new_tokens: int
    needle_offsets: tuple[int, ...] = field(default=())  # character offsets in ``message``


@dataclass(frozen=True)
class FactsSample:
    """A ``niah_facts`` sample and what it hides: ``facts`` colour -> number in text order."""

    sample: Sample
    facts: dict[str, int]
    colour: str  # the colour asked about


def render_prompt(tokenizer, message: str, answer_prefix: str) -> str:
    """The prompt text: the chat template when the tokenizer has one, then the answer prefix."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = message + "\n"
    return text + answer_prefix


def facts_sample(
    tokenizer,
    num_tokens: int,
    *,
    num_facts: int = 4,
    asked: int | None = None,
    first_depth: float = 0.1,
    last_depth: float = 0.9,
    seed: int = 0,
) -> FactsSample:
    """About ``num_tokens`` prompt tokens (as :func:`render_prompt` renders them) of documentation
    text with ``num_facts`` secret numbers at evenly spread depths from ``first_depth`` to
    ``last_depth`` (shares of the text), then a question about fact number ``asked`` in text
    order (default: a random one); the answer's first words are given so that the reply starts
    with the number."""
    if not 1 <= num_facts <= len(COLOURS):
        raise ValueError(f"num_facts must be in [1, {len(COLOURS)}], got {num_facts}")
    if not 0.0 <= first_depth <= last_depth <= 1.0:
        raise ValueError(f"need 0 <= first_depth <= last_depth <= 1, got {first_depth}, {last_depth}")
    rng = random.Random(seed)
    colours = rng.sample(COLOURS, num_facts)
    facts = {colour: rng.randrange(1000, 10000) for colour in colours}
    if asked is None:
        asked = rng.randrange(num_facts)
    if not -num_facts <= asked < num_facts:
        raise ValueError(f"asked must index one of the {num_facts} facts, got {asked}")
    asked = colours[asked]
    question = f"What is the secret number of the {asked} box? Answer with the number only."
    prefix = f"The secret number of the {asked} box is"

    def message(body: str) -> str:
        return f"Read the text below. Some boxes with secret numbers are mentioned in it.\n\n{body}\n\n{question}"

    overhead = len(tokenizer(render_prompt(tokenizer, message(""), prefix), add_special_tokens=False).input_ids)
    overhead += 20 * num_facts
    needles = [f"Remember this: the secret number of the {colour} box is {facts[colour]}." for colour in colours]
    depths = [first_depth + (last_depth - first_depth) * number / max(1, num_facts - 1) for number in range(num_facts)]
    body = insert_at_depths(haystack_units(tokenizer, "natural", num_tokens - overhead, rng), needles, depths)
    text = message("\n\n".join(body))
    sample = Sample("niah_facts", text, prefix, (str(facts[asked]),), 12, _locate(text, needles))
    return FactsSample(sample, facts, asked)


@lru_cache(maxsize=1)
def word_list() -> tuple[str, ...]:
    """Distinct lowercase words (4-10 letters) from CPython's pydoc topics, in a fixed order."""
    import pydoc_data.topics

    words: dict[str, None] = {}
    for text in pydoc_data.topics.topics.values():
        for word in re.findall(r"\b[a-z]{4,10}\b", text):
            words.setdefault(word, None)
    return tuple(words)


@lru_cache(maxsize=1)
def _natural_paragraphs() -> tuple[str, ...]:
    import pydoc_data.topics

    out = []
    for text in pydoc_data.topics.topics.values():
        out.extend(p.strip() for p in text.split("\n\n") if len(p.strip()) > 40)
    return tuple(out)


def _value(kind: str, rng: random.Random) -> str:
    if kind == "number":
        return str(rng.randrange(1_000_000, 10_000_000))
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return rng.choice(word_list())


def haystack_units(tokenizer, haystack: str, num_tokens: int, rng: random.Random) -> list[str]:
    """Filler units whose token count adds up to about ``num_tokens``."""
    if haystack == "repeat":
        unit_tokens = len(tokenizer(_FILLER, add_special_tokens=False).input_ids) + 1
        return [_FILLER] * max(1, num_tokens // unit_tokens)
    if haystack != "natural":
        raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")
    paragraphs = _natural_paragraphs()
    index = rng.randrange(len(paragraphs))
    units, used = [], 0
    for step in range(len(paragraphs)):  # paragraphs that would overshoot are skipped
        if used >= num_tokens - 20:
            break
        paragraph = paragraphs[(index + step) % len(paragraphs)]
        cost = len(tokenizer(paragraph, add_special_tokens=False).input_ids) + 2
        if used + cost <= num_tokens:
            units.append(paragraph)
            used += cost
    return units


def insert_at_depths(units: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """Units with each needle inserted at its depth (a share of the units)."""
    out = list(units)
    for needle, depth in sorted(zip(needles, depths), key=lambda pair: -pair[1]):
        out.insert(int(round(depth * len(out))), needle)
    return out


def _locate(message: str, needles: list[str]) -> tuple[int, ...]:
    """Character offsets of the needles in the final message."""
    return tuple(message.index(needle) for needle in needles)


def make_sample(task: str, tokenizer, num_tokens: int, *, haystack: str = "repeat", seed: int = 0) -> Sample:
    """One sample of ``task`` whose context is about ``num_tokens`` tokens long."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if num_tokens < 256:
        raise ValueError(f"num_tokens must be >= 256, got {num_tokens}")
    if task == "niah_facts":  # the demo's prompt: the last of four facts, at 75% depth
        return facts_sample(tokenizer, num_tokens, num_facts=4, asked=-1, last_depth=0.75, seed=seed).sample
    rng = random.Random(f"{task}/{haystack}/{num_tokens}/{seed}")
    body = num_tokens - 120  # room for the instructions and the question
    separator = " " if haystack == "repeat" else "\n\n"

    if task.startswith("niah"):
        kind = {"niah_single_number": "number", "niah_single_uuid": "uuid", "niah_single_word": "word"}.get(
            task, "number"
        )
        kind_name = {"number": "number", "uuid": "uuid", "word": "word"}[kind]
        keys = rng.sample(word_list(), 4)
        if task == "niah_multivalue":
            pairs = [(keys[0], _value(kind, rng)) for _ in range(4)]
            asked = [keys[0]]
        elif task == "niah_multiquery":
            pairs = [(key, _value(kind, rng)) for key in keys]
            asked = keys
        elif task == "niah_multikey":
            pairs = [(key, _value(kind, rng)) for key in keys]
            asked = [keys[0]]
        else:
            pairs = [(keys[0], _value(kind, rng))]
            asked = [keys[0]]
        needles = [f"One of the special magic {kind_name}s for {key} is: {value}." for key, value in pairs]
        depths = sorted(rng.uniform(0.05, 0.95) for _ in needles)
        order = list(range(len(needles)))
        rng.shuffle(order)
        needles = [needles[i] for i in order]
        expected = tuple(value for key, value in pairs if key in asked)
        units = insert_at_depths(haystack_units(tokenizer, haystack, body, rng), needles, depths)
        context = separator.join(units)
        keys_text = ", ".join(asked)
        plural = "s" if len(expected) > 1 else ""
        message = (
            f"Some special magic {kind_name}s are hidden within the following text. Make sure "
            f"to memorize it. I will quiz you about the {kind_name}s afterwards.\n{context}\n"
            f"What {'are all' if plural else 'is'} the special magic {kind_name}{plural} for "
            f"{keys_text} mentioned in the provided text?"
        )
        verb = "are" if plural else "is"
        prefix = f"The special magic {kind_name}{plural} for {keys_text} mentioned in the provided text {verb}"
        return Sample(
            task, message, prefix, expected, 32 if kind == "uuid" or plural else 16, _locate(message, needles)
        )

    if task == "vt":
        names = [f"{word.upper()[:5]}" for word in rng.sample(word_list(), 10)]
        value = str(rng.randrange(10_000, 100_000))
        distractor = str(rng.randrange(10_000, 100_000))
        chain, other = names[:5], names[5:]
        needles = [f"VAR {chain[0]} = {value}."] + [f"VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, 5)]
        needles += [f"VAR {other[0]} = {distractor}."] + [f"VAR {other[i]} = VAR {other[i - 1]}." for i in range(1, 5)]
        depths = sorted(rng.uniform(0.05, 0.95) for _ in needles)
        # The chains keep their order through the text: assignment i comes before i + 1.
        picked = needles[:5] + needles[5:]
        interleaved = sorted(range(10), key=lambda i: (i % 5, i // 5))
        placed = [picked[i] for i in interleaved]
        units = insert_at_depths(haystack_units(tokenizer, haystack, body, rng), placed, depths)
        context = separator.join(units)
        message = (
            f"Memorize and track the chain(s) of variable assignment hidden in the following "
            f"text.\n\n{context}\nQuestion: Find all variables that are assigned the value "
            f"{value} in the text above."
        )
        prefix = (
            f"Answer: According to the chain(s) of variable assignment in the text above, "
            f"5 variables are assigned the value {value}, they are:"
        )
        return Sample(task, message, prefix, tuple(chain), 30, _locate(message, placed))

    if task == "cwe":
        # Ten words 6+ times each (about a quarter of the list), the rest 3 times each: the answer
        # is unique whatever the length.
        capacity = len(_fit_words(tokenizer, list(word_list()[:4000]), body, _numbered))
        repeats = max(6, capacity // 40)
        num_rare = max(1, (capacity - 10 * repeats) // 3)
        words = rng.sample(word_list(), 10 + num_rare)
        common, rare = words[:10], words[10:]
        stream = [w for w in common for _ in range(repeats)] + [w for w in rare for _ in range(3)]
        rng.shuffle(stream)
        top = sorted(common)
        listing = _numbered(stream)
        message = (
            f"Below is a numbered list of words. In these words, some appear more often than "
            f"others. Memorize the ones that appear most often.\n{listing}\nQuestion: What "
            f"are the 10 most common words in the above list?"
        )
        prefix = "Answer: The top 10 words that appear most often in the list are:"
        return Sample(task, message, prefix, tuple(top), 48)

    # fwe: a Zipf-distributed stream of coded words; the three most frequent are asked.
    vocabulary = [f"{w[:4]}{rng.randrange(10, 99)}" for w in rng.sample(word_list(), 200)]
    weights = [1.0 / (rank + 1) ** 1.3 for rank in range(len(vocabulary))]
    stream = rng.choices(vocabulary, weights=weights, k=body // 3)
    stream = _fit_words(tokenizer, stream, body)
    counts = Counter(stream)
    ranked = counts.most_common(4)
    if len(ranked) > 3 and ranked[2][1] == ranked[3][1]:  # keep the answer unique
        stream.extend([ranked[2][0]] * 2)
        counts = Counter(stream)
    top = [word for word, _ in counts.most_common(3)]
    message = (
        f"Read the following coded text and track the frequency of each coded word. Find the "
        f"three most frequently appeared coded words. ... {' '.join(stream)}\nQuestion: Do not "
        f"provide any explanation. Please ignore the dots '....'. What are the three most "
        f"frequently appeared words in the above coded text?"
    )
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
    return Sample(task, message, prefix, tuple(top), 24)


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def _fit_words(tokenizer, words: list[str], num_tokens: int, render=" ".join) -> list[str]:
    """About the longest prefix of ``words`` whose rendered text takes at most ``num_tokens``
    tokens (tokens per word measured on the first 200, rendered)."""
    probe = words[:200]
    per_word = len(tokenizer(render(probe), add_special_tokens=False).input_ids) / max(1, len(probe))
    return words[: max(1, int(num_tokens / max(1.0, per_word)))]


def score_answer(answer: str, expected: tuple[str, ...] | list[str]) -> float:
    """RULER's metric: the share of expected strings found in the answer (case-insensitive)."""
    if not expected:
        raise ValueError("expected must not be empty")
    lowered = answer.lower()
    return sum(item.lower() in lowered for item in expected) / len(expected)
