"""The interface every selector implements, and the budget rule they all share.

A selector sees, per retrieval layer, the keys the model caches (post-RoPE, as transformers
stores them) and at each decode step the post-RoPE query; it returns a score per cached token
and query head, or ``None`` when it has no opinion (dense reads everything, StreamingLLM reads
only sink and window). The harness turns scores into rows with the same rule for every method:
``a2ats_core.select_topk`` (top ``k`` per query head among tokens [sink, length - window),
united over the heads of a KV head, plus the first ``sink`` and last ``window`` tokens), so
budgets, sinks and windows are counted the same way whatever the scores.
"""

from __future__ import annotations

import copy

import torch

__all__ = ["Selector"]


class Selector:
    """Base class. ``name`` labels results; ``reads_all`` marks dense attention."""

    name = "selector"
    reads_all = False
    scores_tokens = True  # False: sink and window only

    def reset(self) -> None:
        """Forget every sequence (called before each sample)."""

    def fork(self) -> "Selector":
        """A copy whose later appends leave this one as it is (state dicts copied, tensors shared:
        appends build new tensors)."""
        clone = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, dict):
                setattr(clone, name, dict(value))
        return clone

    def prefill(self, layer: int, keys: torch.Tensor) -> None:
        """keys (Hkv, T, D) post-RoPE, token n at position n."""

    def append(self, layer: int, keys: torch.Tensor, position: int) -> None:
        """keys (Hkv, 1, D) post-RoPE of the token at ``position``."""

    def scores(self, layer: int, query: torch.Tensor, keys: torch.Tensor, position: int) -> torch.Tensor:
        """Scores (Hq, T) f32 for query (Hq, D) post-RoPE at ``position`` over keys (Hkv, T, D)."""
        raise NotImplementedError
