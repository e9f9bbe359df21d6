"""Accuracy evaluation: RULER-style tasks, baseline selectors, attention recall (``a2ats eval``)."""
from .harness import Budget, RunResult, evaluate, run_sample
from .report import summarize, write_results
from .selectors import A2ATS, Dense, Oracle, PQCache, Quest, Selector, StreamingLLM
from .tasks import HAYSTACKS, TASKS, Sample, make_sample, score_answer

__all__ = ["Budget", "RunResult", "evaluate", "run_sample", "summarize", "write_results", "Selector", "Dense",
           "StreamingLLM", "Oracle", "Quest", "PQCache", "A2ATS", "TASKS", "HAYSTACKS", "Sample", "make_sample",
           "score_answer"]
