"""Accuracy evaluation: RULER-style tasks, baseline selectors, attention recall (``a2ats eval``).

The names below are imported on first use: :mod:`a2ats.evaluation.tasks` is torch-free, and
``a2ats eval --help`` reads the task names from it without importing torch or transformers.
"""

# public name -> submodule that defines it
_LAZY = {
    "Budget": "harness",
    "RunResult": "harness",
    "evaluate": "harness",
    "run_sample": "harness",
    "summarize": "report",
    "write_results": "report",
    "Selector": "selectors",
    "Dense": "selectors",
    "StreamingLLM": "selectors",
    "Oracle": "selectors",
    "Quest": "selectors",
    "PQCache": "selectors",
    "A2ATS": "selectors",
    "TASKS": "tasks",
    "HAYSTACKS": "tasks",
    "Sample": "tasks",
    "make_sample": "tasks",
    "score_answer": "tasks",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
