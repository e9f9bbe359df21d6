"""Running selectors on tasks: one dense prefill per sample, then greedy decoding per method and
budget with attention restricted to the rows the selector picks, measuring accuracy, attention
recall (of all the attention mass, and of the far mass outside sink and window) and rows read.

Every method decodes through the same attention function (registered as ``"a2ats_eval"``): at
each step and retrieval layer it computes the true attention probabilities over the whole cache
(for the recall), asks the selector for scores, turns them into rows with
``a2ats_core.select_topk`` (the shared budget rule, see :mod:`.selectors.base`) and attends
exactly over those rows. A budget counts tokens per query head (the paper's: a KV head reads the
union of its G heads' picks) or per KV head (``a2ats_core.group_scores`` first: rows read equal
the budget, so methods compare at equal rows read). Prompts are prefilled once, densely, and the
cache is copied for each run, so every method answers from identical prompt states. Batch 1.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import a2ats_core

from ..codebook import BUDGET_PER, budget_tokens
from ..compat import cache_kwargs
from ..models import describe_model
from .selectors import Selector
from .tasks import Sample, make_sample, render_prompt, score_answer

__all__ = ["ATTENTION_NAME", "Budget", "RunResult", "prompt_ids", "run_sample", "evaluate"]

ATTENTION_NAME = "a2ats_eval"


@dataclass(frozen=True)
class Budget:
    """Tokens selected per step: ``topk`` a share of the length (float) or a count (int), taken
    by each query head (``per="query_head"``, the paper's) or by each KV head from the max of its
    heads' log-softmax scores (``per="kv_head"``, as ``A2ATSConfig(budget_per="kv_head")``)."""

    topk: float | int
    sink: int = 8
    window: int = 64
    per: str = "query_head"

    def __post_init__(self) -> None:
        if self.per not in BUDGET_PER:
            raise ValueError(f"per must be one of {', '.join(BUDGET_PER)}, got {self.per!r}")

    def tokens(self, length: int) -> int:
        return budget_tokens(self.topk, length)

    @property
    def label(self) -> str:
        share = f"{self.topk:.1%}" if isinstance(self.topk, float) else str(self.topk)
        return share + ("/kv" if self.per == "kv_head" else "")


@dataclass
class RunResult:
    task: str
    method: str
    budget: str
    context_tokens: int
    seed: int
    answer: str
    score: float
    recall: float  # mean over decode steps, retrieval layers and query heads
    far_recall: float  # the same, of the attention mass outside sink and window (NaN: none there)
    rows_read: float  # mean share of cached rows attended per KV head
    seconds: float


class _Recorder:
    """What the attention function needs during one run, and what it measures."""

    def __init__(self, selector: Selector, budget: Budget, layers: Sequence[int]):
        self.selector, self.budget, self.layers = selector, budget, set(layers)
        self.recall_sum = self.rows_sum = self.far_recall_sum = 0.0
        self.calls = self.far_calls = 0


_active: _Recorder | None = None


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def selected_rows(
    selector: Selector, budget: Budget, layer: int, query: torch.Tensor, keys: torch.Tensor, position: int
) -> torch.Tensor:
    """Mask (Hkv, T) of the rows attended for query (Hq, D) over keys (Hkv, T, D)."""
    num_kv, length, _ = keys.shape
    if selector.reads_all:
        return torch.ones(num_kv, length, dtype=torch.bool)
    group = query.shape[0] // num_kv
    if selector.scores_tokens:
        scores, k = selector.scores(layer, query, keys, position), budget.tokens(length)
    else:
        scores, k = torch.zeros(query.shape[0], length), 0
    lengths = torch.tensor([length], dtype=torch.int32)
    scores = scores.float()[None].contiguous()
    if budget.per == "kv_head":
        scores = a2ats_core.group_scores(scores, lengths, group_size=group, sink=budget.sink, window=budget.window)
        group = 1
    indices, counts = a2ats_core.select_topk(
        scores, k, lengths, group_size=group, sink=budget.sink, window=budget.window
    )
    mask = torch.zeros(num_kv, length + 1, dtype=torch.bool)
    valid = torch.arange(indices.shape[-1])[None] < counts[0][:, None]
    rows = torch.where(valid, indices[0].long(), length)  # padding goes to a spare column
    mask.scatter_(1, rows, True)
    return mask[:, :length]


def _eval_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    recorder = _active
    layer = getattr(module, "layer_idx", None)
    if recorder is None or layer not in recorder.layers:
        return _sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if query.shape[0] != 1:
        raise ValueError("the evaluation harness runs batch 1")
    if query.shape[2] > 1:
        out = _sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        recorder.selector.prefill(layer, key[0])
        return out
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    keys, values = key[0], value[0]  # (Hkv, T, D), the new token included
    num_kv, length, _ = keys.shape
    position = length - 1
    recorder.selector.append(layer, keys[:, -1:], position)
    q = query[0, :, 0]  # (Hq, D)
    group = q.shape[0] // num_kv
    # Grouped: (Hkv, G, D) @ (Hkv, D, T), so K and V are never repeated per query head.
    logits = torch.matmul(q.float().view(num_kv, group, -1), keys.float().transpose(1, 2)) * scaling
    mask = selected_rows(recorder.selector, recorder.budget, layer, q, keys, position)[:, None]  # (Hkv, 1, T)
    probs = torch.softmax(logits, -1)  # (Hkv, G, T)
    recorder.recall_sum += float((probs * mask).sum(-1).mean())
    # Far recall: of the mass on tokens that are neither sink nor window, the share selected.
    far = slice(recorder.budget.sink, max(recorder.budget.sink, length - recorder.budget.window))
    if far.stop > far.start:
        far_mass = probs[..., far].sum(-1)
        recorder.far_recall_sum += float(((probs * mask)[..., far].sum(-1) / far_mass).mean())
        recorder.far_calls += 1
    recorder.rows_sum += float(mask.float().mean())
    recorder.calls += 1
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
    out = torch.matmul(probs, values.float()).reshape(num_kv * group, -1)  # (Hq, D)
    return out.to(query.dtype)[None, None], None


def register() -> None:
    AttentionInterface.register(ATTENTION_NAME, _eval_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def prompt_ids(tokenizer, sample: Sample) -> torch.Tensor:
    """(1, T) token ids: the chat template when the tokenizer has one, then the answer prefix."""
    text = render_prompt(tokenizer, sample.message, sample.answer_prefix)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids


def run_sample(
    model, tokenizer, sample: Sample, methods: Sequence[tuple[Selector, Sequence[Budget]]], *, seed: int = 0
) -> list[RunResult]:
    """Prefill ``sample`` once, then decode it greedily with each selector at each budget."""
    global _active
    register()
    layout = describe_model(model)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    ids = prompt_ids(tokenizer, sample)
    length = ids.shape[1]
    results = []
    try:
        with torch.inference_mode():
            prefill_cache = DynamicCache(config=model.config)
            logits = model(input_ids=ids, **cache_kwargs(model, prefill_cache), use_cache=True).logits[:, -1]
            first = int(logits.argmax(-1))
            for selector, budgets in methods:
                selector.reset()
                for layer in layout.layers:  # the prompt's keys, as a prefill would show them
                    selector.prefill(layer, prefill_cache.layers[layer].keys[0])
                for budget in budgets:
                    started = time.perf_counter()
                    cache = copy.deepcopy(prefill_cache)
                    state = selector.fork()  # each budget's decode appends start from the prompt
                    _active = _Recorder(state, budget, layout.layers)
                    tokens = [first]
                    for step in range(sample.max_new_tokens - 1):
                        if tokens[-1] == tokenizer.eos_token_id:
                            break
                        if step % 4 == 3 and score_answer(tokenizer.decode(tokens), sample.expected) == 1.0:
                            break  # every expected string is there: more tokens cannot change the score
                        out = model(
                            input_ids=torch.tensor([[tokens[-1]]]),
                            **cache_kwargs(model, cache),
                            use_cache=True,
                            position_ids=torch.tensor([[length + step]]),
                        )
                        tokens.append(int(out.logits[0, -1].argmax()))
                    recorder, _active = _active, None
                    answer = tokenizer.decode(tokens, skip_special_tokens=True)
                    results.append(
                        RunResult(
                            task=sample.task,
                            method=selector.name,
                            budget="all" if selector.reads_all else budget.label,
                            context_tokens=length,
                            seed=seed,
                            answer=answer.strip(),
                            score=score_answer(answer, sample.expected),
                            recall=recorder.recall_sum / max(1, recorder.calls),
                            far_recall=(
                                recorder.far_recall_sum / recorder.far_calls if recorder.far_calls else float("nan")
                            ),
                            rows_read=recorder.rows_sum / max(1, recorder.calls),
                            seconds=time.perf_counter() - started,
                        )
                    )
    finally:
        _active = None
        model.set_attn_implementation(previous)
    return results


def evaluate(
    model,
    tokenizer,
    tasks: Iterable[str],
    lengths: Iterable[int],
    methods,
    *,
    samples: int = 1,
    haystack: str = "repeat",
    progress: bool = True,
    on_result: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """Every task x length x seed, each sample run with every method (see :func:`run_sample`)."""
    from tqdm.auto import tqdm

    jobs = [(task, length, seed) for length in lengths for task in tasks for seed in range(samples)]
    results = []
    for task, length, seed in tqdm(jobs, desc="samples", disable=not progress):
        sample = make_sample(task, tokenizer, length, haystack=haystack, seed=seed)
        for result in run_sample(model, tokenizer, sample, methods, seed=seed):
            results.append(result)
            if on_result:
                on_result(result)
    return results
