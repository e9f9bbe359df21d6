"""A²ATS decoding inside transformers: an offloaded cache plus a registered attention function.

Usage (any Llama-, Qwen2/Qwen3-, Mistral-style model; Gemma 3's global layers)::

    cache = a2ats.A2ATSCache(model, codebook, a2ats.A2ATSConfig(topk=0.03))
    out = model.generate(**inputs, cache=cache, max_new_tokens=64)

How the pieces meet. transformers calls ``cache.update(k, v, layer_idx)`` and then the
attention function with the post-RoPE query and whatever ``update`` returned. The cache layer
never sees the query and the attention function never sees the cache, so ``update`` stashes the
new rows and returns them tagged with the layer (``key._a2ats_layer``); the attention function
(registered as ``"a2ats"``, mask function ``sdpa_mask``) checks the tag against
``module.layer_idx`` and does the work:

* prefill (several query tokens, or an empty store): dense attention (the model's previous
  implementation, SDPA by default) over the prompt, then the prompt's valid rows go to the
  host :class:`a2ats_core.KVStore` and their keys are encoded: un-rotated with ``rotary`` to
  pre-RoPE form, whitened with the codebook's ``L``, ``vq_encode``-d;
* decode (one query token): the new token is encoded and appended, the query is moved to the
  WRoPE distance ``b`` and into the dual space (``q' = R(b - m) q L⁻ᵀ``), ``lut_scores`` scores
  every cached token, ``select_topk`` picks ``k`` per query head (united per KV head, plus sink
  and window), ``KVStore.gather`` fetches those rows and attention is exact over them with the
  model's original RoPE query, softmax in float32.

Batches may mix prompt lengths (left or right padding): only valid rows are stored, each
row at its own length. A step that fails leaves the cache as it was.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import a2ats_core

from . import reference
from .codebook import Codebook
from .models import decoder_layers, describe_model

__all__ = ["A2ATSConfig", "A2ATSCache", "A2ATSLayer", "ATTENTION_NAME", "register_attention", "attention_timer",
           "encode_keys", "dual_matrices", "dual_queries"]

ATTENTION_NAME = "a2ats"


@dataclass
class A2ATSConfig:
    """What A²ATS keeps and reads per decode step.

    topk: tokens each query head selects: a float in (0, 1] is a share of the current length
        (``int(topk * length)``, the paper's budget ratio, e.g. 0.03), an int >= 0 is absolute.
    window, sink: most recent and first tokens always attended (window >= 1: the current token).
    wrope_position: the WRoPE distance b far tokens are scored at; None takes the codebook's.
    capacity: tokens per sequence the host store holds (prompt + generated); None takes the
        model's ``max_position_embeddings``.
    threads: gather threads (0 = one per core). pinned: page-locked host memory when a GPU is used.
    """

    topk: float | int = 0.03
    window: int = 64
    sink: int = 8
    wrope_position: int | None = None
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
        for name, low in (("window", 1), ("sink", 0), ("threads", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("wrope_position", "capacity"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")

    def budget(self, length: int) -> int:
        """Tokens each query head selects at context ``length``."""
        if isinstance(self.topk, float):
            return int(self.topk * length)
        return int(self.topk)


@dataclass
class _Stats:
    """Counters a caller can read after generation (see :meth:`A2ATSCache.summary`)."""

    decode_calls: int = 0           # retrieval-layer decode steps (layers x steps)
    attention_seconds: float = 0.0  # time inside the decode attention path, all layers
    rows_read: int = 0              # KV rows attended, summed over batch rows and KV heads
    rows_fetched: int = 0           # of those, rows copied from the host store (not resident)
    rows_cached: int = 0            # KV rows stored at those steps, same sum


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


def encode_keys(keys: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, chol: torch.Tensor,
                centroids: torch.Tensor) -> torch.Tensor:
    """Codes (B, Hkv, t, M) int16 of post-RoPE keys (B, Hkv, t, D) at positions (B, t): rotated
    back to pre-RoPE form, whitened by chol (Hkv, D, D), nearest of centroids (Hkv, M, C, D/M)."""
    k_pre = a2ats_core.rotary(keys, (-positions).to(torch.int64), inv_freq)
    whitened = torch.matmul(k_pre.float(), chol)  # (B, Hkv, t, D) @ (Hkv, D, D)
    return a2ats_core.vq_encode(whitened, centroids)


def dual_matrices(chol_inv: torch.Tensor, group_size: int) -> torch.Tensor:
    """(Hq, D, D) with [h, d, e] = L⁻¹[g(h)][e, d], from chol_inv (Hkv, D, D): q' = q_w @ dual[h]."""
    return chol_inv.transpose(1, 2).repeat_interleave(group_size, 0).contiguous()


def dual_queries(query: torch.Tensor, positions: torch.Tensor, wrope_position: int, inv_freq: torch.Tensor,
                 dual: torch.Tensor) -> torch.Tensor:
    """Scoring queries (B, Hq, D) f32 for post-RoPE queries (B, Hq, 1, D) at positions (B, 1):
    moved to the WRoPE distance, R(b - m) q, then into the dual space of their KV head with
    dual (Hq, D, D) = L⁻ᵀ per query head."""
    q_w = a2ats_core.rotary(query, (wrope_position - positions).to(torch.int64), inv_freq)
    return torch.matmul(q_w.float(), dual)[:, :, 0].contiguous()


class A2ATSLayer(CacheLayerMixin):
    """Cache state of one retrieval layer: its codes on the compute device, rows in the host store."""

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
        self.seq_length = 0           # length in the model's (padded) layout, for masks
        self.lengths_host: list[int] = []  # valid rows stored per batch row
        self.lengths: torch.Tensor | None = None  # (B,) int32 on the compute device
        self.codes: torch.Tensor | None = None    # (B, Hkv, capacity, M) int16
        # Copies of the always-attended rows on the compute device, so that only the selected
        # middle rows cross from host memory: (B, Hkv, sink + window, D), slots [0, sink) hold
        # positions [0, sink), slots [sink, sink + window) a ring with position p at
        # sink + p % window.
        self.resident_k = self.resident_v = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---- transformers' CacheLayerMixin protocol --------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.cache._initialize(key_states)
        batch = key_states.shape[0]
        self.lengths_host = [0] * batch
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=key_states.device)
        book = self.cache.codebook
        self.codes = torch.zeros(batch, book.num_kv_heads, self.cache.capacity, book.num_subspaces,
                                 dtype=torch.int16, device=key_states.device)
        config = self.cache.config
        resident = dict(dtype=key_states.dtype, device=key_states.device)
        self.resident_k, self.resident_v = (
            torch.zeros(batch, book.num_kv_heads, config.sink + config.window, book.head_dim, **resident)
            for _ in range(2))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != len(self.lengths_host):
            raise ValueError(f"batch of {key_states.shape[0]} rows but this A2ATSCache holds "
                             f"{len(self.lengths_host)}; use a new cache per batch")
        if self.store_layer == 0:
            self.cache._check_whole_steps()
        self._pending = (key_states, value_states)
        keys, values = key_states, value_states
        if key_states.shape[2] > 1 and self.seq_length > 0:
            # A multi-token step after the prompt (chunked prefill): dense attention needs the past.
            if self.cache.padded or len(set(self.lengths_host)) > 1:
                self._pending = None
                raise NotImplementedError("a multi-token step after a padded or ragged prompt is not "
                                          "supported; prefill the whole prompt at once")
            past_k, past_v = self.cache._materialize(self)
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
        if self.is_initialized:
            self.lengths_host = [0] * len(self.lengths_host)
            self.lengths.zero_()
        self.seq_length = 0
        self._pending = None

    def offload(self) -> None:  # rows already live in host memory
        pass

    def prefetch(self) -> None:
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("A2ATSCache does not support beam search")

    # ---- the A²ATS work, called from the attention function ---------------------------------
    def _take_pending(self, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pending is None:
            raise RuntimeError(f"layer {self.layer_idx}: attention called without a cache update")
        pending, self._pending = self._pending, None
        return pending

    def _check_room(self, counts: list[int]) -> None:
        for b, (have, new) in enumerate(zip(self.lengths_host, counts)):
            if have + new > self.cache.capacity:
                raise ValueError(f"A2ATSCache capacity exceeded: batch row {b} holds {have} tokens, "
                                 f"{new} more would exceed capacity {self.cache.capacity}; "
                                 "pass A2ATSConfig(capacity=...) large enough for prompt + new tokens")

    def _encode(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Codes (B, Hkv, t, M) of post-RoPE keys (B, Hkv, t, D) at positions (B, t)."""
        cache = self.cache
        return encode_keys(keys, positions, cache.inv_freq, cache.chol[self.layer_idx],
                           cache.centroids[self.layer_idx])

    def _append(self, keys: torch.Tensor, values: torch.Tensor, codes: torch.Tensor, counts: list[int]) -> None:
        """Stores the first counts[b] rows of each batch row; all checks happened before."""
        counts_t = torch.tensor(counts, dtype=torch.int32)
        self.cache.store.append(self.store_layer, keys, values, num_tokens=counts_t)
        sink, window = self.cache.config.sink, self.cache.config.window
        if keys.shape[2] == 1 and min(self.lengths_host) >= sink:
            # Decode: one row per sequence, past the sink; codes and ring slot in one indexed copy.
            rows = torch.arange(len(counts), device=keys.device)
            starts = self.lengths.long()
            self.codes[rows, :, starts] = codes[:, :, 0]
            slots = sink + starts % window
            self.resident_k[rows, :, slots] = keys[:, :, 0]
            self.resident_v[rows, :, slots] = values[:, :, 0]
            self.lengths_host = [n + 1 for n in self.lengths_host]
            self.lengths += 1
            return
        for b, n in enumerate(counts):
            start = self.lengths_host[b]
            self.codes[b, :, start:start + n] = codes[b, :, :n]
            in_sink = max(0, min(sink, start + n) - start)
            self.resident_k[b, :, start:start + in_sink] = keys[b, :, :in_sink]
            self.resident_v[b, :, start:start + in_sink] = values[b, :, :in_sink]
            in_window = min(window, n)
            slots = sink + torch.arange(start + n - in_window, start + n, device=keys.device) % window
            self.resident_k[b][:, slots] = keys[b, :, n - in_window:n]
            self.resident_v[b][:, slots] = values[b, :, n - in_window:n]
            self.lengths_host[b] = start + n
        self.lengths.copy_(torch.tensor(self.lengths_host, dtype=torch.int32))

    def prefill(self, module, query, key, value, attention_mask, scaling, dropout, position_ids, fallback, kwargs):
        """Dense attention over ``key``/``value`` (past + new), then the new rows are stored and encoded."""
        keys, values = self._take_pending(None)
        batch, _, t, _ = keys.shape
        # Valid rows of this chunk: the mask row of its last query over the chunk's keys.
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            valid = attention_mask[:, 0, -1, -t:].to(keys.device)
        elif attention_mask is not None:
            valid = attention_mask[:, 0, -1, -t:] > torch.finfo(attention_mask.dtype).min
        else:
            valid = torch.ones(batch, t, dtype=torch.bool, device=keys.device)
        counts = valid.sum(1).tolist()
        self._check_room(counts)
        if position_ids is None:
            position_ids = torch.arange(t, device=keys.device)[None] + torch.tensor(
                self.lengths_host, device=keys.device)[:, None]
        position_ids = position_ids.expand(batch, t)
        padded = not bool(valid.all())
        if padded:
            # Valid rows first, in order, so the store holds each sequence contiguously.
            order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # (B, t)
            gather_rows = order[:, None, :, None].expand_as(keys)
            keys_packed = keys.gather(2, gather_rows)
            values_packed = values.gather(2, gather_rows)
            positions_packed = position_ids.gather(1, order.to(position_ids.device))
        else:
            keys_packed, values_packed, positions_packed = keys, values, position_ids
        output = fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        codes = self._encode(keys_packed, positions_packed)
        self._append(keys_packed, values_packed, codes, counts)
        self.cache.padded |= padded
        self.seq_length += t
        return output

    def decode(self, query: torch.Tensor, scaling: float, position_ids: torch.Tensor | None):
        """Attention output (B, 1, Hq, D) for one new token per batch row."""
        cache = self.cache
        started = time.perf_counter()
        keys, values = self._take_pending(None)
        batch = keys.shape[0]
        self._check_room([1] * batch)
        if position_ids is None:
            positions = torch.tensor(self.lengths_host, device=keys.device)[:, None]
        else:
            positions = position_ids.expand(batch, 1).to(keys.device)
        codes = self._encode(keys, positions)
        self._append(keys, values, codes, [1] * batch)
        self.seq_length += 1
        length = max(self.lengths_host)
        book = cache.codebook
        group = book.group_size
        q_dual = dual_queries(query, positions, cache.wrope_position, cache.inv_freq, cache.dual[self.layer_idx])
        scores = a2ats_core.lut_scores(q_dual, cache.centroids[self.layer_idx],
                                       self.codes[:, :, :length], self.lengths,
                                       out=cache.scores_buffer[:batch, :, :length])
        k = cache.config.budget(length)
        sink, window = cache.config.sink, cache.config.window
        kmax = group * k + sink + window
        indices, counts = a2ats_core.select_topk(
            scores, k, self.lengths, group_size=group, sink=sink, window=window,
            out_indices=cache.indices_buffer(batch, kmax), out_counts=cache.counts_buffer[:batch])
        # Each row of indices is ascending: its sink rows, the selected middle rows, its window
        # rows. Sink and window are resident, so only the middle crosses from the host store;
        # a row with any middle rows has all `sink` sink rows, so the middle starts at `sink`.
        lengths = self.lengths.long()[:, None]  # (B, 1)
        sink_valid = torch.arange(sink, device=lengths.device) < lengths  # (B, sink)
        # Position held by each ring slot j: the latest p < length with p ≡ j (mod window);
        # it counts when it is not a sink row (and exists).
        slot = torch.arange(window, device=lengths.device)
        window_positions = lengths - 1 - (lengths - 1 - slot).remainder(window)  # (B, window)
        resident_valid = torch.cat([sink_valid, window_positions >= sink], 1)  # (B, sink + window)
        middle_counts = counts - resident_valid.sum(1, dtype=torch.int32)[:, None]  # (B, Hkv)
        middle = group * k
        middle_indices = indices[:, :, sink:sink + middle]
        # Exact attention with the model's own RoPE query over the resident rows and the middle
        # rows separately, merged through their log-sum-exp: one softmax over both parts without
        # ever concatenating the rows.
        q = query[:, :, 0].float()  # (B, Hq, D)
        if cache.attend_in_place:
            middle_out, middle_lse = cache.store.attend(self.store_layer, q, middle_indices, middle_counts,
                                                        scale=scaling)
        else:
            middle_k, middle_v = cache.rows_buffers(batch, middle)
            cache.store.gather(self.store_layer, middle_indices, middle_counts, middle_k, middle_v)
            middle_valid = torch.arange(middle, device=lengths.device) < middle_counts[..., None]
            middle_out, middle_lse = reference.attend(q, middle_k, middle_v, middle_valid, scale=scaling)
        resident_out, resident_lse = reference.attend(q, self.resident_k, self.resident_v,
                                                      resident_valid[:, None], scale=scaling)
        out, _ = reference.merge_attention(resident_out, resident_lse, middle_out, middle_lse)
        num_kv = book.num_kv_heads
        out = out[:, None].to(query.dtype)  # (B, 1, Hq, D)
        if cache.collect_stats:
            _synchronize(out.device)
            stats = cache.stats
            stats.decode_calls += 1
            stats.attention_seconds += time.perf_counter() - started
            stats.rows_read += int(counts.sum())
            stats.rows_fetched += int(middle_counts.sum())
            stats.rows_cached += sum(self.lengths_host) * num_kv
        return out


class A2ATSCache(Cache):
    """A transformers ``Cache`` whose full-attention layers decode with A²ATS.

    model: a loaded causal LM; codebook: a :class:`~a2ats.Codebook` built for it (checked);
    config: :class:`A2ATSConfig`. Layers without a codebook (Gemma 3's sliding-window layers)
    keep transformers' own cache layers and attention. The host store is created at the first
    forward, when the batch size is known. Use one cache per ``generate`` call.
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
            raise ValueError(f"this codebook is the {codebook.ablation!r} ablation, made for a2ats eval; "
                             "A2ATSCache needs a codebook from plain a2ats.calibrate")
        parameter = next(model.parameters())
        if parameter.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"model dtype {parameter.dtype} is not supported: the KV store holds "
                            "float32, float16 or bfloat16 rows; convert the model with .to(dtype)")
        if parameter.device.type not in ("cpu", "cuda"):
            raise ValueError(f"model device {parameter.device} is not supported: A²ATS runs on "
                             "cpu or cuda")
        if parameter.device.type == "cuda" and not a2ats_core.built_with_cuda():
            raise RuntimeError("the model is on CUDA but a2ats_core was built without CUDA; "
                               "reinstall with nvcc available (see README)")
        text_config = getattr(model.config, "get_text_config", lambda: model.config)()
        self.capacity = int(self.config.capacity or getattr(text_config, "max_position_embeddings", 0) or 0)
        if self.capacity < 1:
            raise ValueError("the model declares no max_position_embeddings; pass A2ATSConfig(capacity=...)")
        self.codebook = codebook
        self.wrope_position = int(self.config.wrope_position or codebook.relative_position)
        self.collect_stats = True
        self.stats = _Stats()
        self.padded = False
        self.store = None
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

    @classmethod
    def from_dense(cls, model, codebook: Codebook, dense: Cache, config: A2ATSConfig | None = None) -> "A2ATSCache":
        """An A²ATS cache holding the rows of ``dense``, a transformers cache filled by any prefill.

        Every row of ``dense`` is taken as valid (no padding), token n at position n; its keys are
        post-RoPE as transformers caches them. The dense cache is left unchanged.
        """
        cache = cls(model, codebook, config)
        lengths = {dense.layers[index].get_seq_length() for index in cache.retrieval}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"dense must hold the same non-zero number of rows in every retrieval "
                             f"layer, got lengths {sorted(lengths)}")
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
            layer._check_room([length] * batch)
            positions = torch.arange(length, device=keys.device).expand(batch, length)
            layer._append(keys, values, layer._encode(keys, positions), [length] * batch)
            layer.seq_length = length
        return cache

    def reset(self) -> None:
        """Forgets every sequence: the layers' lengths and the host store's rows. The store and
        the buffers stay allocated for the next prompt of the same batch size."""
        super().reset()
        if self.store is not None:
            self.store.reset()
        self.padded = False

    def _check_whole_steps(self) -> None:
        """Raises when an earlier step stopped inside the model (an exception or KeyboardInterrupt
        between two retrieval layers, or between a layer's store append and its bookkeeping), so
        that layers hold different rows. Called as each step enters the first retrieval layer."""
        layers = list(self.retrieval.values())
        stored = self.store.lengths() if self.store is not None else None
        batch = len(layers[0].lengths_host)
        # A layer not initialized yet (its first prefill never reached it) holds no rows.
        rows = [layer.lengths_host if layer.is_initialized else [0] * batch for layer in layers]
        for layer, held in zip(layers, rows):
            if (layer.seq_length != layers[0].seq_length or held != rows[0]
                    or (stored is not None and stored[layer.store_layer].tolist() != held)):
                per_layer = {l.layer_idx: held for l, held in zip(layers, rows)}
                raise RuntimeError(
                    "this A2ATSCache holds a half-applied step: an earlier forward stopped inside the model, "
                    f"so its layers hold different rows (rows per layer and batch row: {per_layer}; host "
                    f"store: {stored.tolist() if stored is not None else None}). Call cache.reset() and "
                    "prefill again, or use a new cache")

    # ---- shared state -------------------------------------------------------------------------
    def _initialize(self, key_states: torch.Tensor) -> None:
        """Creates the host store and moves the codebook to the compute device (first forward)."""
        if self.store is not None:
            return
        book = self.codebook
        self.device = key_states.device
        batch = key_states.shape[0]
        on_gpu = self.device.type == "cuda"
        if on_gpu and not a2ats_core.built_with_cuda():
            raise RuntimeError("the model runs on CUDA but a2ats_core was built without CUDA; "
                               "reinstall with nvcc available (see README)")
        self.store = a2ats_core.KVStore(len(self.retrieval), batch, book.num_kv_heads, book.head_dim,
                                        self.capacity, key_states.dtype, pinned=self.config.pinned and on_gpu,
                                        threads=self.config.threads)
        dev = self.device
        self.inv_freq = book.inv_freq.to(dev, torch.float32).contiguous()
        self.centroids = {l: book.centroids[l].to(dev).contiguous() for l in book.layers}
        self.chol = {l: book.chol[l].to(dev) for l in book.layers}
        self.dual = {l: dual_matrices(book.chol_inv[l], book.group_size).to(dev) for l in book.layers}
        num_q = book.num_q_heads
        self.scores_buffer = torch.empty(batch, num_q, self.capacity, dtype=torch.float32, device=dev)
        self.counts_buffer = torch.empty(batch, book.num_kv_heads, dtype=torch.int32, device=dev)
        self._indices = torch.empty(0, dtype=torch.int32, device=dev)
        self._rows = (torch.empty(0, dtype=key_states.dtype, device=dev),) * 2
        # How the middle rows reach attention: read straight from the host store on a CPU
        # (KVStore.attend), gathered into device buffers on a GPU. Either path works on a CPU;
        # the tests run both.
        self.attend_in_place = not on_gpu

    def indices_buffer(self, batch: int, kmax: int) -> torch.Tensor:
        """(B, Hkv, kmax) int32 view of a buffer grown as the budget grows."""
        need = batch * self.codebook.num_kv_heads * kmax
        if self._indices.numel() < need:
            self._indices = torch.empty(2 * need, dtype=torch.int32, device=self.device)
        return self._indices[:need].view(batch, self.codebook.num_kv_heads, kmax)

    def rows_buffers(self, batch: int, kmax: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Hkv, kmax, D) views for gathered K and V."""
        book = self.codebook
        need = batch * book.num_kv_heads * kmax * book.head_dim
        if self._rows[0].numel() < need:
            self._rows = tuple(torch.zeros(2 * need, dtype=self._rows[0].dtype, device=self.device) for _ in range(2))
        shape = (batch, book.num_kv_heads, kmax, book.head_dim)
        return self._rows[0][:need].view(shape), self._rows[1][:need].view(shape)

    def _materialize(self, layer: A2ATSLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored rows of ``layer`` as dense (B, Hkv, T, D) tensors (equal lengths only)."""
        length = layer.lengths_host[0]
        batch, num_kv = len(layer.lengths_host), self.codebook.num_kv_heads
        indices = torch.arange(length, dtype=torch.int32).expand(batch, num_kv, length).contiguous()
        counts = torch.full((batch, num_kv), length, dtype=torch.int32)
        shape = (batch, num_kv, length, self.codebook.head_dim)
        out_k = torch.empty(shape, dtype=self._rows[0].dtype, device=self.device)
        out_v = torch.empty_like(out_k)
        self.store.gather(layer.store_layer, indices, counts, out_k, out_v)
        return out_k, out_v

    def summary(self) -> dict[str, Any]:
        """Measured figures: share of KV rows read per decode step, attention time per step."""
        s = self.stats
        steps = s.decode_calls / max(1, len(self.retrieval))
        return {
            "decode_steps": steps,
            "rows_read_share": s.rows_read / s.rows_cached if s.rows_cached else float("nan"),
            "rows_fetched_share": s.rows_fetched / s.rows_cached if s.rows_cached else float("nan"),
            "attention_seconds_per_step": s.attention_seconds / steps if steps else float("nan"),
            "kv_location": ("pinned host memory" if self.store is not None and self.store.pinned else "host memory"),
            "compute_device": str(self.device),
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
        return layer.prefill(module, query, key, value, attention_mask, scaling, dropout, position_ids, fallback,
                             kwargs)
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
