"""``a2ats demo``: one long prompt answered with dense attention and with A²ATS.

The prompt hides several facts "the secret number of the <colour> box is N" in natural text
(CPython's pydoc topics) and asks for one of them. The model answers twice from the same prompt,
once with transformers' dense cache and once with :class:`~a2ats.A2ATSCache` at a small budget,
and the demo prints both answers, whether each is right, how many KV rows A²ATS read per step,
the attention part's latency per generated token, decode tokens per second for both (prefill
apart: it is dense attention either way), and where the KV cache lives.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .compat import cache_kwargs
from .evaluation.tasks import facts_sample, render_prompt

__all__ = [
    "NeedlePrompt",
    "needle_prompt",
    "codebook_cache_path",
    "default_preset",
    "load_or_calibrate",
    "format_quality",
    "run_demo",
]


@dataclass(frozen=True)
class NeedlePrompt:
    """A chat prompt with hidden facts; ``answer`` is the number asked for."""

    input_ids: torch.Tensor  # (1, T) int64
    facts: dict[str, int]  # colour -> secret number, in prompt order
    colour: str  # the colour asked about
    answer: str


def needle_prompt(
    tokenizer,
    num_tokens: int = 4096,
    *,
    num_facts: int = 4,
    asked: int | None = -1,
    first_depth: float = 0.1,
    last_depth: float = 0.75,
    seed: int = 0,
) -> NeedlePrompt:
    """The tokenized prompt of :func:`~a2ats.evaluation.tasks.facts_sample` (same arguments; the
    defaults are the demo's): about ``num_tokens`` tokens of Python documentation hiding
    ``num_facts`` facts "the secret number of the <colour> box is N", asking for fact ``asked``.

    SmolLM2-135M answers reliably only about the latest of several similar facts, so by default
    the question asks for the last one, placed at 75% depth: about a thousand tokens back at 4k,
    far outside the window, behind three distractor facts. The ``niah_facts`` task of
    ``a2ats eval`` is this prompt."""
    made = facts_sample(
        tokenizer,
        num_tokens,
        num_facts=num_facts,
        asked=asked,
        first_depth=first_depth,
        last_depth=last_depth,
        seed=seed,
    )
    sample = made.sample
    text = render_prompt(tokenizer, sample.message, sample.answer_prefix)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    return NeedlePrompt(input_ids=ids, facts=made.facts, colour=made.colour, answer=sample.expected[0])


def codebook_cache_path(model_name: str, preset: str, ablation: str | None = None) -> Path:
    """Where ``a2ats demo``/``a2ats eval`` keep codebooks: $A2ATS_CACHE, else ~/.cache/a2ats."""
    root = Path(
        os.environ.get("A2ATS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "a2ats"
    )
    stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in model_name).strip("-")
    suffix = f"-{ablation}" if ablation else ""
    return root / f"{stem or 'model'}-{preset}{suffix}.a2ats.safetensors"


ABLATIONS = {"no-wrope": {"wrope": False}, "no-query-awareness": {"query_aware": False}}


def default_preset(model) -> str:
    """The preset ``a2ats demo`` and :func:`load_or_calibrate` take when none is named: the
    paper's ``"default"`` with the model on a GPU, ``"small"`` on a CPU."""
    return "default" if next(model.parameters()).device.type == "cuda" else "small"


def load_or_calibrate(
    model,
    tokenizer,
    preset: str | None = None,
    *,
    ablation: str | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
):
    """The codebook for ``model`` from the cache ``a2ats demo`` and ``a2ats eval`` use
    (:func:`codebook_cache_path`: ``$A2ATS_CACHE``, else ``~/.cache/a2ats``), calibrated and saved
    there first when it is missing, was built for another model, or was made with other preset
    settings (a stale file is replaced, never silently used).

    ``preset``: ``"small"`` (C = 1024 from 16k tokens, about three minutes on a 2-core CPU) or
    ``"default"`` (the paper's C = 4096 from 64k tokens; wants a GPU); None takes
    :func:`default_preset`. ``ablation``: one of :data:`ABLATIONS`, for ``a2ats eval``.
    ``log`` gets one line saying which it did; ``progress`` shows calibration progress bars.
    """
    from .calibration import calibrate
    from .codebook import Codebook, CodebookError
    from .models import describe_model
    from .presets import ADDED_SETTINGS, PRESETS, resolve_settings

    if preset is None:
        preset = default_preset(model)
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if ablation is not None and ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {sorted(ABLATIONS)}, got {ablation!r}")
    path = codebook_cache_path(describe_model(model).model_name, preset, ablation)
    if path.exists():
        try:
            codebook = Codebook.load(path)
            codebook.check_compatible(model)
            if codebook.ablation != ablation:
                raise CodebookError(f"it is the {codebook.ablation or 'full'} method, not {ablation or 'full'}")
            # A preset whose settings changed since the file was written gets a new codebook.
            made_with = codebook.metadata.get("calibration", {}).get("settings", {})
            wanted = asdict(resolve_settings(preset, **ABLATIONS.get(ablation, {})))
            changed = sorted(
                name for name, value in wanted.items() if made_with.get(name, ADDED_SETTINGS.get(name)) != value
            )
            if changed:
                raise CodebookError(f"it was made with other {preset!r} preset settings ({', '.join(changed)})")
            log(f"codebook: {path} (cached)")
            return codebook
        except CodebookError as error:
            log(f"codebook: {path} is unusable ({error}); calibrating again")
    log(f"codebook: calibrating with the {preset!r} preset (once; cached in {path})")
    started = time.perf_counter()
    codebook = calibrate(model, tokenizer, preset=preset, progress=progress, **ABLATIONS.get(ablation, {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    codebook.save(partial)
    partial.replace(path)  # never leave a half-written file under the final name
    log(f"codebook: built in {time.perf_counter() - started:.0f} s")
    return codebook


class _PrefillClock:
    """A logits processor that notes when it is first called: the end of the prefill forward."""

    def __init__(self) -> None:
        self.prefill_done: float | None = None

    def __call__(self, input_ids, scores):
        if self.prefill_done is None:
            self.prefill_done = time.perf_counter()
        return scores


@dataclass
class _Timing:
    prefill_seconds: float  # the prompt's forward
    decode_seconds: float  # every later forward
    decode_tokens: int  # tokens those forwards produced

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def _generate(model, prompt: NeedlePrompt, cache, max_new_tokens: int) -> tuple[torch.Tensor, _Timing]:
    """Greedy answer ids, and the prefill and decode parts of the generation's time."""
    from transformers import LogitsProcessorList

    ids = prompt.input_ids.to(model.device)
    clock = _PrefillClock()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **cache_kwargs(model, cache),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
        )
    finished = time.perf_counter()
    new = out[0, ids.shape[1] :]
    # The first token comes from the prefill; each later one from one decode forward.
    return new, _Timing(clock.prefill_done - started, finished - clock.prefill_done, int(new.numel()) - 1)


def format_quality(codebook) -> str:
    """One line with the codebook's held-out score error (from its calibration report)."""
    quality = codebook.quality
    if not quality:
        return "codebook quality: not measured (it was calibrated without held-out text)"
    line = (
        f"codebook quality: held-out score error E[(q·k − q·ĉ)²]/E[(q·k)²] = {quality['query_aware']:.4f}"
        f" (C = {codebook.num_centroids} centroids, {quality['holdout_tokens']} held-out tokens"
    )
    if quality.get("plain_kmeans") is not None:
        line += f"; plain k-means of the same size: {quality['plain_kmeans']:.4f}"
    return line + "; lower is better)"


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _dense_cache_bytes(cache) -> int:
    return sum(
        tensor.numel() * tensor.element_size()
        for layer in cache.layers
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(tensor, torch.Tensor)
    )


def _a2ats_device_parts(cache, codebook, layout, dtype: torch.dtype) -> dict[str, int]:
    """What A²ATS keeps on the compute device: codes, the codebook tensors, and (on a GPU) copies
    of the sink and window rows."""
    retrieval = len(codebook.layers)
    batch = max(1, cache.batch)
    parts = {
        "codes": retrieval * batch * layout.num_kv_heads * cache.capacity * codebook.num_subspaces * 2,
        "codebook": sum(
            table[layer].numel() * 4
            for table in (codebook.centroids, codebook.chol, codebook.chol_inv)
            for layer in codebook.layers
        ),
    }
    if torch.device(cache.summary()["compute_device"]).type == "cuda":
        element = torch.empty(0, dtype=dtype).element_size()
        parts["sink and window rows"] = (
            2
            * retrieval
            * batch
            * layout.num_kv_heads
            * (cache.config.sink + cache.config.window)
            * layout.head_dim
            * element
        )
    return parts


def run_demo(
    model,
    tokenizer,
    codebook,
    *,
    num_tokens: int = 4096,
    topk: float | int = 0.03,
    window: int = 64,
    sink: int = 8,
    bins: int | None = None,
    max_new_tokens: int = 12,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Answer one needle prompt densely and with A²ATS; print and return the figures.
    ``bins``: WRoPE distance bins (:class:`~a2ats.A2ATSConfig`; None: the codebook's), log-spaced
    up to the prompt's end."""
    from transformers import DynamicCache

    from .cache import A2ATSCache, A2ATSConfig, attention_timer
    from .models import describe_model

    layout = describe_model(model)
    prompt = needle_prompt(tokenizer, num_tokens, seed=seed)
    length = prompt.input_ids.shape[1]
    config = A2ATSConfig(topk=topk, window=window, sink=sink, bins=bins, capacity=length + max_new_tokens)
    cache = A2ATSCache(model, codebook, config)  # also routes dense attention through the timer
    cache.time_attention = True
    facts = ", ".join(f"{colour} {number}" for colour, number in prompt.facts.items())
    log(format_quality(codebook))
    log(
        f"prompt: {length} tokens of Python documentation hiding {len(prompt.facts)} secret "
        f"numbers ({facts}); question: the {prompt.colour} box"
    )

    dense_cache = DynamicCache(config=model.config)
    attention_timer.reset()
    attention_timer.enabled = True
    try:
        dense_ids, dense_timing = _generate(model, prompt, dense_cache, max_new_tokens)
    finally:
        attention_timer.enabled = False
    dense_steps = attention_timer.calls / max(1, len(layout.layers))
    dense_attention = attention_timer.seconds / max(1.0, dense_steps)
    ours_ids, ours_timing = _generate(model, prompt, cache, max_new_tokens)
    summary = cache.summary()

    def verdict(ids: torch.Tensor) -> tuple[str, bool]:
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        return text, prompt.answer in text

    dense_text, dense_right = verdict(dense_ids)
    ours_text, ours_right = verdict(ours_ids)
    budget = f"{topk:.1%}" if isinstance(topk, float) else f"{topk} tokens"
    mark = {True: "right", False: "WRONG"}
    log(f"expected answer: {prompt.answer}")
    log(f"dense attention : {dense_text!r:40} {mark[dense_right]}")
    log(f"A²ATS top-{budget:6}: {ours_text!r:40} {mark[ours_right]}")
    if dense_right and not ours_right:
        log(
            f"A²ATS lost the answer that dense attention found: at {length} tokens and this budget its "
            "approximate scores missed rows the answer needs; a larger --topk, or a codebook from "
            "--preset default, scores them more closely"
        )
    log(
        f"KV rows attended per decode step: {summary['rows_read_share']:.1%} of the cache "
        f"(top-k + {sink} sink + {window} window); fetched from host memory: "
        f"{summary['rows_fetched_share']:.1%}"
    )
    k = config.budget(length)
    group = layout.group_size
    ceiling = min(length, group * k + sink + window) / length
    log(
        f"why {summary['rows_read_share']:.1%} and not {budget.strip()}: each of the {layout.num_kv_heads} KV heads "
        f"reads the union of "
        f"its {group} query heads' top-k (k = {k} tokens each at {length} tokens), plus the {sink} sink and "
        f"{window} window rows: at most {group} × {k} + {sink + window} = {ceiling:.1%} of the cache, "
        "less where the heads agree"
    )
    log(
        f"attention part per generated token ({len(layout.layers)} layers): dense "
        f"{dense_attention * 1e3:.2f} ms, A²ATS {summary['attention_seconds_per_step'] * 1e3:.2f} ms "
        "(A²ATS: encode + score + select + fetch or read rows + attend)"
    )
    dense_rate, ours_rate = dense_timing.decode_tokens_per_second, ours_timing.decode_tokens_per_second
    log(
        f"decode: dense {dense_rate:.1f} tok/s, A²ATS {ours_rate:.1f} tok/s ({ours_rate / dense_rate:.2f}x), "
        f"{ours_timing.decode_tokens} tokens after the first"
    )
    log(
        f"prefill: dense {dense_timing.prefill_seconds:.2f} s, A²ATS {ours_timing.prefill_seconds:.2f} s "
        "(both attend densely; A²ATS also stores and encodes the prompt's rows)"
    )
    device = summary["compute_device"]
    dense_bytes = _dense_cache_bytes(dense_cache)
    parts = _a2ats_device_parts(cache, codebook, layout, next(model.parameters()).dtype)
    device_bytes = sum(parts.values())
    log(
        f"KV cache: dense {_mib(dense_bytes)} on {device}; A²ATS {_mib(summary['host_store_bytes'])} in "
        f"{summary['kv_location']} (all K/V rows) + {_mib(device_bytes)} on {device} ("
        + ", ".join(f"{name} {_mib(size)}" for name, size in parts.items())
        + ")"
    )
    if torch.device(device).type == "cpu":
        log(
            "  on a CPU host and device memory are one: A²ATS saves reads here, not memory; on a GPU "
            "only the second part takes device memory"
        )
    return {
        "prompt_tokens": length,
        "expected": prompt.answer,
        "dense_answer": dense_text,
        "dense_correct": dense_right,
        "a2ats_answer": ours_text,
        "a2ats_correct": ours_right,
        "dense_attention_seconds_per_token": dense_attention,
        "dense_decode_tokens_per_second": dense_rate,
        "a2ats_decode_tokens_per_second": ours_rate,
        "dense_prefill_seconds": dense_timing.prefill_seconds,
        "a2ats_prefill_seconds": ours_timing.prefill_seconds,
        "topk_tokens": k,
        "rows_read_ceiling_share": ceiling,
        "dense_kv_bytes": dense_bytes,
        "a2ats_device_bytes": device_bytes,
        "a2ats_device_parts": parts,
        "codebook_error": (codebook.quality or {}).get("query_aware"),
        "codebook_error_plain_kmeans": (codebook.quality or {}).get("plain_kmeans"),
        **{f"a2ats_{key}": value for key, value in summary.items()},
    }
