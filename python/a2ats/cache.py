"""A²ATS decoding inside transformers: an offloaded cache plus a registered attention function.

Usage (any Llama-, Qwen2/Qwen3-, Mistral-style model; Gemma 3's global layers)::

    cache = a2ats.A2ATSCache(model, codebook, a2ats.A2ATSConfig(topk=0.03))
    out = model.generate(**inputs, cache=cache, max_new_tokens=64)

How the pieces meet. transformers calls ``cache.update(k, v, layer_idx)`` and then the
attention function with the post-RoPE query and whatever ``update`` returned. The cache layer
never sees the query and the attention function never sees the cache, so ``update`` stashes the
new rows and returns them tagged with the layer (``key._a2ats_layer``); the attention function
(registered as ``"a2ats"``, mask function ``sdpa_mask``) checks the tag against
``module.layer_idx`` and hands the work to the cache's steps:

* prefill (several query tokens, or an empty store): dense attention (the model's previous
  implementation, SDPA by default) over the prompt, then the prompt's valid rows are stored in
  the host :class:`a2ats_core.KVStore` and encoded (un-rotated, whitened, nearest centroid);
* decode (one query token): the first retrieval layer plans the step (the budget ``k`` for all
  layers), then each layer is one call that appends and encodes the new row, scores every
  cached token through the WRoPE dual query, selects ``k`` per query head (united per KV head,
  plus sink and window) and attends exactly over them with the model's own query.

A decode step of a layer is one native call (:class:`a2ats_core.Pipeline`) on the CPU and on a
GPU alike, with no torch op inside it. Batches may mix
prompt lengths (left or right padding): only valid rows are stored, each row at its own
length. A step that fails leaves the cache as it was; one cut short inside the model is
refused at the next step until ``reset()``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import a2ats_core

from .codebook import BUDGET_PER, Codebook, budget_tokens, wrope_bins
from .models import decoder_layers, describe_model

__all__ = ["A2ATSConfig", "A2ATSCache", "A2ATSLayer", "ATTENTION_NAME", "register_attention", "attention_timer"]

ATTENTION_NAME = "a2ats"


@dataclass
class A2ATSConfig:
    """What A²ATS keeps and reads per decode step.

    topk: tokens each query head selects: a float in (0, 1] is a share of the current length
        (``int(topk * length)``, the paper's budget ratio, e.g. 0.03), an int >= 0 is absolute.
    budget_per: "query_head" (the paper's): each query head selects topk tokens and a KV head
        reads the union of its G heads' (up to G times topk); "kv_head": each KV head selects
        topk tokens from the max of its heads' log-softmax scores, so rows read = topk.
    window, sink: most recent and first tokens always attended (window >= 1: the current token).
    wrope_distance: the WRoPE distance b far tokens are scored at; None takes the codebook's.
    bins: WRoPE distance bins (:func:`~a2ats.codebook.wrope_bins`): None takes the codebook's
        (``Codebook.bins``: those its query moment was fitted for; 1 for a codebook without); 1
        scores every far token at b; N > 1 scores each of N log-spaced distance bins (window to
        capacity) at its own distance; a tuple of ascending ints gives the bin edges.
    capacity: tokens per sequence the host store holds (prompt + generated); None takes the
        model's ``max_position_embeddings``.
    threads: gather threads (0 = one per core). pinned: page-locked host memory when a GPU is used.
    """

    topk: float | int = 0.03
    budget_per: str = "query_head"
    window: int = 64
    sink: int = 8
    wrope_distance: int | None = None
    bins: int | tuple[int, ...] | None = None
    capacity: int | None = None
    threads: int = 0
    pinned: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.topk, bool) or not isinstance(self.topk, (int, float)):
            raise TypeError(f"topk must be a float share in (0, 1] or an int count, got {self.topk!r}")
        if isinstance(self.topk, float) and not 0.0 < self.topk <= 1.0:
            raise ValueError(f"topk as a share must be in (0, 1], got {self.topk}")
        if isinstance(self.topk, int) and self.topk < 0:
            raise ValueError(f"topk as a count must be >= 0, got {self.topk}")
        if self.budget_per not in BUDGET_PER:
            raise ValueError(f"budget_per must be one of {', '.join(BUDGET_PER)}, got {self.budget_per!r}")
        for name, low in (("window", 1), ("sink", 0), ("threads", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("wrope_distance", "capacity"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        if self.bins is not None:
            if not isinstance(self.bins, int):
                self.bins = tuple(self.bins) if isinstance(self.bins, (list, tuple)) else self.bins
            wrope_bins(self.bins, window=self.window, capacity=1 << 30, distance=0)  # raises naming bins

    def budget(self, length: int) -> int:
        """Tokens each query head (each KV head with budget_per="kv_head") selects at ``length``."""
        return budget_tokens(self.topk, length)


class _AttentionTimer:
    """Times dense decode attention in the fallback path, for same-run comparisons."""

    def __init__(self) -> None:
        self.enabled = False
        self.calls = 0
        self.seconds = 0.0

    def reset(self) -> None:
        self.calls, self.seconds = 0, 0.0


attention_timer = _AttentionTimer()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PipelineSteps:
    """The decode step as one native call per layer: :class:`a2ats_core.Pipeline` on the model's
    device. The pipeline owns the host store and the codes (and on a GPU the resident sink and
    window rows); the store's lengths are the one count of what the cache holds."""

    def __init__(self, cache: "A2ATSCache", batch: int, dtype: torch.dtype, device: torch.device):
        book, layers, config = cache.codebook, list(cache.retrieval), cache.config
        self.device = device
        on_gpu = device.type == "cuda"
        self.store = a2ats_core.KVStore(
            len(layers),
            batch,
            book.num_kv_heads,
            book.head_dim,
            cache.capacity,
            dtype,
            pinned=config.pinned and on_gpu,
            threads=config.threads,
        )

        def stacked(per_layer):
            return torch.stack([per_layer[layer].float().cpu() for layer in layers]).contiguous()

        self.pipeline = a2ats_core.Pipeline(
            self.store,
            num_q_heads=book.num_q_heads,
            inv_freq=book.inv_freq.float().cpu().contiguous(),
            chol=stacked(book.chol),
            chol_inv=stacked(book.chol_inv),
            centroids=stacked(book.centroids),
            sink=config.sink,
            window=config.window,
            wrope_distances=cache.wrope_distances,
            bin_edges=cache.bin_edges,
            budget_per=config.budget_per,
            device=str(device) if on_gpu else None,
        )
        self._stats_base = self.pipeline.stats()

    def lengths(self) -> np.ndarray:
        """Rows held, (retrieval layers, batch) int64."""
        return self.store.lengths()

    def prefill(self, layer: int, keys, values, positions, counts: list[int]) -> None:
        self.pipeline.prefill(
            layer,
            keys,
            values,
            positions.to(torch.int64).contiguous(),
            num_tokens=torch.tensor(counts, dtype=torch.int32),
        )

    def plan(self, k: int) -> None:
        self.pipeline.plan(k)

    def decode(self, layer: int, query, keys, values, positions, scale: float) -> torch.Tensor:
        batch, num_q_heads, _, head_dim = query.shape
        out = torch.empty(batch, 1, num_q_heads, head_dim, dtype=query.dtype, device=query.device)
        self.pipeline.decode(layer, query[:, :, 0], keys, values, positions, scale=scale, out=out[:, 0])
        return out

    def materialize(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Decode steps on a GPU leave their rows in flight to the host store until the stream
        # gets there; the host reads below must come after.
        _synchronize(self.device)
        return _materialize(self.store, layer, self.device)

    def stats(self) -> dict[str, int]:
        now = self.pipeline.stats()
        return {key: now[key] - self._stats_base[key] for key in now}

    def reset_stats(self) -> None:
        self._stats_base = self.pipeline.stats()

    def reset(self) -> None:
        self.pipeline.reset()


def _materialize(store, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """All stored rows of ``layer`` as dense (B, Hkv, T, D) tensors (equal lengths only)."""
    length = int(store.lengths()[layer][0])
    batch, num_kv = store.batch, store.num_kv_heads
    indices = torch.arange(length, dtype=torch.int32).expand(batch, num_kv, length).contiguous()
    counts = torch.full((batch, num_kv), length, dtype=torch.int32)
    out_k = torch.empty(batch, num_kv, length, store.head_dim, dtype=getattr(torch, store.dtype), device=device)
    out_v = torch.empty_like(out_k)
    store.gather(layer, indices, counts, out_k, out_v)
    return out_k, out_v


class A2ATSLayer(CacheLayerMixin):
    """transformers' view of one retrieval layer; its rows and codes live in the cache's steps."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: "A2ATSCache", layer_idx: int, store_layer: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.store_layer = store_layer
        self.keys = self.values = None
        self.is_initialized = False
        self.seq_length = 0  # length in the model's (padded) layout, for masks
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---- transformers' CacheLayerMixin protocol --------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.cache._initialize(key_states)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.cache.batch:
            raise ValueError(
                f"batch of {key_states.shape[0]} rows but this A2ATSCache holds "
                f"{self.cache.batch}; use a new cache per batch"
            )
        if self.store_layer == 0:
            self.cache._check_whole_steps()
        self._pending = (key_states, value_states)
        keys, values = key_states, value_states
        if key_states.shape[2] > 1 and self.seq_length > 0:
            # A multi-token step after the prompt (chunked prefill): dense attention needs the past.
            held = self.cache.steps.lengths()[self.store_layer]
            if self.cache.padded or len(set(held.tolist())) > 1:
                self._pending = None
                raise NotImplementedError(
                    "a multi-token step after a padded or ragged prompt is not "
                    "supported; prefill the whole prompt at once"
                )
            past_k, past_v = self.cache.steps.materialize(self.store_layer)
            keys, values = torch.cat([past_k, key_states], 2), torch.cat([past_v, value_states], 2)
        tagged = keys.detach().view_as(keys)  # a fresh tensor object to carry the tag
        tagged._a2ats_layer = self
        return tagged, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seq_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.seq_length

    def get_max_length(self) -> int:
        return self.cache.capacity

    def reset(self) -> None:
        self.seq_length = 0
        self._pending = None

    def offload(self) -> None:  # rows already live in host memory
        pass

    def prefetch(self) -> None:
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("A2ATSCache does not support beam search")

    # ---- the A²ATS work, called from the attention function ---------------------------------
    def _take_pending(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pending is None:
            raise RuntimeError(f"layer {self.layer_idx}: attention called without a cache update")
        pending, self._pending = self._pending, None
        return pending

    def prefill(self, module, query, key, value, attention_mask, scaling, dropout, position_ids, fallback, kwargs):
        """Dense attention over ``key``/``value`` (past + new), then the new rows are stored and encoded."""
        keys, values = self._take_pending()
        batch, _, t, _ = keys.shape
        # Valid rows of this chunk: the mask row of its last query over the chunk's keys.
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            valid = attention_mask[:, 0, -1, -t:].to(keys.device)
        elif attention_mask is not None:
            valid = attention_mask[:, 0, -1, -t:] > torch.finfo(attention_mask.dtype).min
        else:
            valid = torch.ones(batch, t, dtype=torch.bool, device=keys.device)
        counts = valid.sum(1).tolist()
        held = self.cache.steps.lengths()[self.store_layer]
        self.cache._check_room(held, counts)
        if position_ids is None:
            position_ids = torch.arange(t, device=keys.device)[None] + torch.from_numpy(held).to(keys.device)[:, None]
        position_ids = position_ids.expand(batch, t)
        padded = not bool(valid.all())
        if padded:
            # Valid rows first, in order, so the store holds each sequence contiguously.
            order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # (B, t)
            gather_rows = order[:, None, :, None].expand_as(keys)
            keys, values = keys.gather(2, gather_rows), values.gather(2, gather_rows)
            position_ids = position_ids.gather(1, order.to(position_ids.device))
        output = fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        self.cache.steps.prefill(self.store_layer, keys, values, position_ids, counts)
        self.cache.padded |= padded
        self.seq_length += t
        return output

    def decode(self, query: torch.Tensor, scaling: float, position_ids: torch.Tensor | None):
        """Attention output (B, 1, Hq, D) for one new token per batch row."""
        cache = self.cache
        timed = cache.time_attention if cache.time_attention is not None else cache.device.type == "cpu"
        started = time.perf_counter() if timed else 0.0
        keys, values = self._take_pending()
        if self.store_layer == 0:
            cache._plan_step()
        if position_ids is None:
            positions = torch.from_numpy(cache.steps.lengths()[self.store_layer]).to(keys.device)
        else:
            positions = position_ids.expand(keys.shape[0], 1)[:, 0].to(keys.device, torch.int64)
        out = cache.steps.decode(self.store_layer, query, keys, values, positions, scaling)
        self.seq_length += 1
        if timed:
            _synchronize(out.device)
            cache.attention_seconds += time.perf_counter() - started
            cache.timed_calls += 1
        return out


class A2ATSCache(Cache):
    """A transformers ``Cache`` whose full-attention layers decode with A²ATS.

    model: a loaded causal LM; codebook: a :class:`~a2ats.Codebook` built for it (checked);
    config: :class:`A2ATSConfig`. Layers without a codebook (Gemma 3's sliding-window layers)
    keep transformers' own cache layers and attention. The host store is created at the first
    forward, when the batch size is known. Use one cache per ``generate`` call, or ``reset()``.

    Each decode step of a layer is one native call (:class:`a2ats_core.Pipeline`) on the model's
    device: on a GPU the codes and the sink and window rows stay on the device and the selected
    middle rows are gathered from the host store (the layer's one host synchronisation).
    """

    def __init__(self, model, codebook: Codebook, config: A2ATSConfig | None = None):
        if not isinstance(codebook, Codebook):
            raise TypeError(f"codebook must be an a2ats.Codebook, got {type(codebook).__name__}")
        self.config = config if config is not None else A2ATSConfig()
        if not isinstance(self.config, A2ATSConfig):
            raise TypeError(f"config must be an a2ats.A2ATSConfig, got {type(self.config).__name__}")
        layout = describe_model(model)  # raises for models without RoPE
        codebook.check_compatible(model)
        if codebook.ablation is not None:
            raise ValueError(
                f"this codebook is the {codebook.ablation!r} ablation, made for a2ats eval; "
                "A2ATSCache needs a codebook from plain a2ats.calibrate"
            )
        parameter = next(model.parameters())
        if parameter.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(
                f"model dtype {parameter.dtype} is not supported: the KV store holds "
                "float32, float16 or bfloat16 rows; convert the model with .to(dtype)"
            )
        if parameter.device.type not in ("cpu", "cuda"):
            raise ValueError(f"model device {parameter.device} is not supported: A²ATS runs on cpu or cuda")
        if parameter.device.type == "cuda" and not a2ats_core.built_with_cuda():
            raise RuntimeError(
                "the model is on CUDA but a2ats_core was built without CUDA; reinstall with nvcc available (see README)"
            )
        text_config = getattr(model.config, "get_text_config", lambda: model.config)()
        self.capacity = int(self.config.capacity or getattr(text_config, "max_position_embeddings", 0) or 0)
        if self.capacity < 1:
            raise ValueError("the model declares no max_position_embeddings; pass A2ATSConfig(capacity=...)")
        self.codebook = codebook
        self.wrope_distance = int(self.config.wrope_distance or codebook.wrope_distance)
        self.wrope_distances, self.bin_edges = codebook.scoring_bins(
            self.config.bins,
            window=self.config.window,
            capacity=self.capacity,
            wrope_distance=self.config.wrope_distance,
        )
        # Time the attention part per layer: None = where it is free (CPU); on a GPU timing needs
        # a sync per layer, so the demo and the benchmark ask for it and nothing else pays it.
        self.time_attention: bool | None = None
        self.attention_seconds = 0.0
        self.timed_calls = 0
        self.padded = False
        self.steps: _PipelineSteps | None = None
        self.batch = 0
        self.device: torch.device | None = None
        layer_types = getattr(text_config, "layer_types", None)
        layers = []
        self.retrieval = {}
        for index in range(len(decoder_layers(model))):
            if index in codebook.layers:
                layer = A2ATSLayer(self, index, store_layer=len(self.retrieval))
                self.retrieval[index] = layer
            elif layer_types and layer_types[index] == "sliding_attention":
                layer = DynamicSlidingWindowLayer(sliding_window=text_config.sliding_window)
            else:
                layer = DynamicLayer()
            layers.append(layer)
        super().__init__(layers=layers)
        self.layout = layout
        register_attention()
        _use_a2ats_attention(model)

    @property
    def store(self):
        """The host K/V store (:class:`a2ats_core.KVStore`), None before the first forward."""
        return self.steps.store if self.steps is not None else None

    @classmethod
    def from_dense(cls, model, codebook: Codebook, dense: Cache, config: A2ATSConfig | None = None) -> "A2ATSCache":
        """An A²ATS cache holding the rows of ``dense``, a transformers cache filled by any prefill.

        Every row of ``dense`` is taken as valid (no padding), token n at position n; its keys are
        post-RoPE as transformers caches them. The dense cache is left unchanged.
        """
        cache = cls(model, codebook, config)
        lengths = {dense.layers[index].get_seq_length() for index in cache.retrieval}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(
                f"dense must hold the same non-zero number of rows in every retrieval "
                f"layer, got lengths {sorted(lengths)}"
            )
        for index, layer in enumerate(cache.layers):
            source = dense.layers[index]
            keys, values = source.keys, source.values  # (B, Hkv, T, D)
            if index not in cache.retrieval:
                if keys is not None:
                    layer.update(keys, values)
                continue
            batch, _, length, _ = keys.shape
            if not layer.is_initialized:
                layer.lazy_initialization(keys, values)
            cache._check_room(cache.steps.lengths()[layer.store_layer], [length] * batch)
            positions = torch.arange(length, device=keys.device).expand(batch, length)
            cache.steps.prefill(layer.store_layer, keys, values, positions, [length] * batch)
            layer.seq_length = length
        return cache

    def reset(self) -> None:
        """Forgets every sequence: the layers' lengths and the host store's rows. The store and
        the buffers stay allocated for the next prompt of the same batch size."""
        super().reset()
        if self.steps is not None:
            self.steps.reset()
        self.padded = False

    def reset_stats(self) -> None:
        """Zeroes the counters :meth:`summary` reports (rows read, attention time)."""
        self.attention_seconds = 0.0
        self.timed_calls = 0
        if self.steps is not None:
            self.steps.reset_stats()

    # ---- shared state -------------------------------------------------------------------------
    def _initialize(self, key_states: torch.Tensor) -> None:
        """Creates the host store and the per-step state (first forward)."""
        if self.steps is not None:
            return
        self.device = key_states.device
        self.batch = key_states.shape[0]
        self.steps = _PipelineSteps(self, self.batch, key_states.dtype, self.device)

    def _check_room(self, held, counts) -> None:
        for b, (have, new) in enumerate(zip(held.tolist(), counts)):
            if have + new > self.capacity:
                raise ValueError(
                    f"A2ATSCache capacity exceeded: batch row {b} holds {have} tokens, "
                    f"{new} more would exceed capacity {self.capacity}; "
                    "pass A2ATSConfig(capacity=...) large enough for prompt + new tokens"
                )

    def _check_whole_steps(self) -> None:
        """Raises when an earlier step stopped inside the model (an exception or KeyboardInterrupt
        between two retrieval layers), so that layers hold different rows. Called as each step
        enters the first retrieval layer."""
        layers = list(self.retrieval.values())
        held = self.steps.lengths()  # the store's lengths: the one count of the rows
        if len({layer.seq_length for layer in layers}) != 1 or not (held == held[:1]).all():
            per_layer = {layer.layer_idx: held[layer.store_layer].tolist() for layer in layers}
            raise RuntimeError(
                "this A2ATSCache holds a half-applied step: an earlier forward stopped inside the model, "
                f"so its layers hold different rows (rows per layer and batch row: {per_layer}). "
                "Call cache.reset() and prefill again, or use a new cache"
            )

    def _plan_step(self) -> None:
        """Plans a decode step for every layer: one new row each, k rows per query head."""
        held = self.steps.lengths()[0]
        self._check_room(held, [1] * len(held))
        self.steps.plan(self.config.budget(int(held.max()) + 1))

    def summary(self) -> dict[str, Any]:
        """Measured figures: share of KV rows read per decode step, attention time per step."""
        s = (
            self.steps.stats()
            if self.steps is not None
            else dict(decode_calls=0, rows_read=0, rows_fetched=0, rows_cached=0)
        )
        steps = s["decode_calls"] / max(1, len(self.retrieval))
        cached = s["rows_cached"]
        return {
            "decode_steps": steps,
            "rows_read_share": s["rows_read"] / cached if cached else float("nan"),
            "rows_fetched_share": s["rows_fetched"] / cached if cached else float("nan"),
            "attention_seconds_per_step": (
                self.attention_seconds / (self.timed_calls / len(self.retrieval)) if self.timed_calls else float("nan")
            ),
            "kv_location": ("pinned host memory" if self.store is not None and self.store.pinned else "host memory"),
            "compute_device": str(self.device),
            "decode_path": f"a2ats_core.Pipeline ({self.device})" if self.steps is not None else None,
            "host_store_bytes": self.store.nbytes if self.store is not None else 0,
        }


def _fallback_name(module) -> str:
    return getattr(module.config, "_a2ats_fallback", "sdpa")


def a2ats_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``"a2ats"`` attention implementation (see the module docstring)."""
    fallback = ALL_ATTENTION_FUNCTIONS[_fallback_name(module)]
    layer = getattr(key, "_a2ats_layer", None)
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    if layer is None:
        # Not an A²ATS layer (dense cache, sliding-window layer): the model's own attention.
        if attention_timer.enabled and query.shape[2] == 1:
            _synchronize(query.device)
            started = time.perf_counter()
            out = fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
            _synchronize(query.device)
            attention_timer.calls += 1
            attention_timer.seconds += time.perf_counter() - started
            return out
        return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if getattr(module, "layer_idx", layer.layer_idx) != layer.layer_idx:
        raise RuntimeError(f"attention of layer {module.layer_idx} received the cache rows of layer {layer.layer_idx}")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("A²ATS attention does not support attention logit soft-capping")
    position_ids = kwargs.get("position_ids")
    if query.shape[2] > 1 or layer.seq_length == 0:
        return layer.prefill(
            module, query, key, value, attention_mask, scaling, dropout, position_ids, fallback, kwargs
        )
    return layer.decode(query, scaling, position_ids), None


def register_attention() -> None:
    """Registers ``"a2ats"`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, a2ats_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _use_a2ats_attention(model) -> None:
    """Switches ``model`` to the "a2ats" implementation, remembering the one it had for fallback."""
    configs = [model.config]
    sub = getattr(model.config, "get_text_config", None)
    if sub is not None and sub() is not model.config:
        configs.append(sub())
    for config in configs:
        current = getattr(config, "_attn_implementation", None) or "sdpa"
        if current != ATTENTION_NAME:
            config._a2ats_fallback = current if current in ("sdpa", "eager") else "sdpa"
    model.set_attn_implementation(ATTENTION_NAME)
