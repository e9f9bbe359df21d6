"""What differs between the transformers versions a2ats supports (5.16.1 up to 6).

transformers 5.24 renamed the cache argument of ``forward`` and ``generate`` from
``past_key_values`` to ``cache`` (the old name still works there, with a deprecation warning);
before 5.24 only ``past_key_values`` exists, and ``cache=`` fails with "model_kwargs are not used
by the model: ['cache']". The vLLM CPU build pins transformers below 5.20, so both must work.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["cache_keyword", "cache_kwargs"]


def cache_keyword(model) -> str:
    """``"cache"`` when ``model.forward`` takes that argument (transformers >= 5.24), else
    ``"past_key_values"``. ``generate`` checks its keyword arguments against ``forward``'s, so
    the same name serves both."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward inspect cannot read: the long-standing name
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(model, cache) -> dict[str, Any]:
    """``{keyword: cache}`` for ``model(...)`` or ``model.generate(...)``, with whichever keyword
    this transformers version takes::

        model.generate(**inputs, **a2ats.cache_kwargs(model, cache), max_new_tokens=32)
    """
    return {cache_keyword(model): cache}
