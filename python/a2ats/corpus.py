"""Offline calibration text and its chunking into model inputs.

The default corpus needs no download: CPython ships hundreds of KB of English prose in
``pydoc_data.topics`` (the language reference behind ``help()``), and the paper calibrates on a
mix of natural text and random strings, so seeded random UUID and number passages are woven in
(one after every few topics). Users can calibrate on their own text files instead.
"""

from __future__ import annotations

import logging
import os
import random
import uuid
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

__all__ = [
    "DEFAULT_CORPUS_NAME",
    "TokenCorpus",
    "pydoc_documents",
    "random_string_document",
    "default_documents",
    "read_documents",
    "build_corpus",
]

log = logging.getLogger(__name__)

DEFAULT_CORPUS_NAME = "pydoc_data.topics + random UUID/number strings"
# One random-string passage after every this many pydoc topics: roughly a fifth of the tokens.
_TOPICS_PER_RANDOM_DOCUMENT = 3


@dataclass
class TokenCorpus:
    """Token chunks ready for the model, split into calibration and held-out parts.

    Each chunk is a 1-D int64 tensor of at most ``chunk_len`` token ids and starts with the
    BOS token when the tokenizer has one. The held-out text follows the calibration text in the
    token stream and never overlaps it.
    """

    calibration: list[torch.Tensor]
    holdout: list[torch.Tensor]
    description: str
    chunk_len: int
    notes: list[str] = field(default_factory=list)

    @property
    def num_calibration_tokens(self) -> int:
        return sum(int(chunk.numel()) for chunk in self.calibration)

    @property
    def num_holdout_tokens(self) -> int:
        return sum(int(chunk.numel()) for chunk in self.holdout)


def pydoc_documents() -> list[str]:
    """CPython's help topics, sorted by topic name (stable across runs)."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics) if topics[name].strip()]


def random_string_document(rng: random.Random, num_lines: int = 32) -> str:
    """A passage of random UUIDs and numbers, drawn from ``rng`` (deterministic per seed)."""

    def new_uuid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def number() -> str:
        kind = rng.randrange(4)
        if kind == 0:
            return str(rng.randrange(10 ** rng.randint(1, 9)))
        if kind == 1:
            return f"{rng.uniform(-1e4, 1e4):.{rng.randint(1, 6)}f}"
        if kind == 2:
            area, exchange, line = rng.randrange(10**3), rng.randrange(10**4), rng.randrange(10**4)
            return f"{area:03d}-{exchange:04d}-{line:04d}"
        return f"{rng.random():.3e}"

    templates = (
        lambda: new_uuid(),
        lambda: f"{new_uuid()}: {new_uuid()}",
        lambda: f"The value of key {new_uuid()} is {number()}.",
        lambda: f"The pass key is {number()}. Remember it. {number()} is not the pass key.",
        lambda: " ".join(number() for _ in range(rng.randint(4, 12))),
        lambda: f"id={new_uuid()} count={number()} total={number()}",
    )
    return "\n".join(templates[rng.randrange(len(templates))]() for _ in range(num_lines))


def default_documents(seed: int = 0) -> list[str]:
    """pydoc topics with a seeded random-string passage after every few topics."""
    rng = random.Random(seed)
    documents = []
    for index, topic in enumerate(pydoc_documents()):
        documents.append(topic)
        if index % _TOPICS_PER_RANDOM_DOCUMENT == _TOPICS_PER_RANDOM_DOCUMENT - 1:
            documents.append(random_string_document(rng))
    return documents


def read_documents(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The UTF-8 text of each file (undecodable bytes replaced)."""
    documents = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as handle:
            documents.append(handle.read())
    return documents


def _token_stream(tokenizer, documents: Iterable[str], limit: int) -> list[int]:
    """Token ids of the documents, each followed by a blank line, stopping after ``limit``."""
    ids: list[int] = []
    for document in documents:
        if not document.strip():
            continue
        encoded = tokenizer(document + "\n\n", add_special_tokens=False, verbose=False)
        ids.extend(encoded["input_ids"])
        if len(ids) >= limit:
            break
    return ids[:limit]


def _chunks(ids: list[int], chunk_len: int, bos_token_id: int | None) -> list[torch.Tensor]:
    body = chunk_len - (bos_token_id is not None)
    chunks = []
    for start in range(0, len(ids), body):
        piece = ids[start : start + body]
        if bos_token_id is not None:
            piece = [bos_token_id] + piece
        chunks.append(torch.tensor(piece, dtype=torch.long))
    return chunks


def build_corpus(
    tokenizer,
    documents: Sequence[str] | None = None,
    *,
    num_tokens: int,
    holdout_tokens: int,
    chunk_len: int,
    seed: int = 0,
    description: str | None = None,
) -> TokenCorpus:
    """Tokenise ``documents`` (default: :func:`default_documents`) into calibration chunks
    holding about ``num_tokens`` tokens and held-out chunks holding about ``holdout_tokens``.

    Counts include the BOS token of each chunk. When the text is shorter than requested, the
    held-out part shrinks to at most a fifth of it and a note says so; text that yields no
    tokens at all raises ``ValueError``.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if holdout_tokens < 0:
        raise ValueError(f"holdout_tokens must be >= 0, got {holdout_tokens}")
    if chunk_len < 2:
        raise ValueError(f"chunk_len must be >= 2, got {chunk_len}")
    if documents is None:
        documents = default_documents(seed)
        description = description or f"{DEFAULT_CORPUS_NAME} (seed {seed})"
    bos_token_id = getattr(tokenizer, "bos_token_id", None)
    # Rough upper bound of the stream length needed; BOS tokens do not come from the text.
    wanted_cal = num_tokens - (num_tokens + chunk_len - 1) // chunk_len * (bos_token_id is not None)
    wanted_hold = holdout_tokens - (holdout_tokens + chunk_len - 1) // chunk_len * (bos_token_id is not None)
    wanted_cal, wanted_hold = max(wanted_cal, 1), max(wanted_hold, 0)
    ids = _token_stream(tokenizer, documents, wanted_cal + wanted_hold)
    if not ids:
        raise ValueError("the calibration corpus is empty: the given text yields no tokens")
    notes = []
    if len(ids) < wanted_cal + wanted_hold:
        hold = min(wanted_hold, len(ids) // 5)
        notes.append(
            f"the corpus has only {len(ids)} tokens: using {len(ids) - hold} for calibration and {hold} held out"
        )
        log.warning(notes[-1])
    else:
        hold = wanted_hold
    cal_ids, hold_ids = ids[: len(ids) - hold], ids[len(ids) - hold :]
    return TokenCorpus(
        calibration=_chunks(cal_ids, chunk_len, bos_token_id),
        holdout=_chunks(hold_ids, chunk_len, bos_token_id) if hold_ids else [],
        description=description or "user text",
        chunk_len=chunk_len,
        notes=notes,
    )
