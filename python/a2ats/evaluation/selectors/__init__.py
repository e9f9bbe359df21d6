"""Token selectors compared by ``a2ats eval``, one per file, all behind :class:`Selector`."""

from .a2ats import A2ATS
from .base import Selector
from .dense import Dense
from .oracle import Oracle
from .pqcache import PQCache
from .quest import Quest, page_bound_scores
from .streaming import StreamingLLM

__all__ = ["Selector", "Dense", "StreamingLLM", "Oracle", "Quest", "PQCache", "A2ATS", "page_bound_scores"]
