"""A²ATS attention over vLLM's paged cache, per engine process (vllm-free; the backend calls it).

Where things live:

* the engine's paged cache of each layer, ``(num_blocks, num_kv_heads, block_size, M)`` int16,
  holds only the codes (2·M bytes per KV head per token, ``customize_spec``);
* the full K/V rows live in one host :class:`a2ats_core.KVStore` of batch 1 whose capacity is the
  engine's number of slots (block × block_size + offset): rows are written at their slot ids
  (``write_slots``) and read by slot lists, so prefix caching, preemption and block reuse keep
  rows and codes consistent exactly as they keep the engine's own pages;
* under tensor parallelism each rank holds its own KV heads' slice of the codebook and store.

Per layer and step: new rows go to the store (``write``); ``attend`` encodes the new keys into
the paged codes (:class:`a2ats_core.PagedPipeline`: un-rotated at their positions, whitened,
nearest centroid), then

* the requests with one query token (decode) run the native decode step in one call: scored
  from the paged codes with the WRoPE dual query, each selects its top-k per query head (united
  per KV head, or per KV head) plus sink and window, and attends exactly over those rows, read
  straight from the store;
* every request with several query tokens (a prompt or a prefill chunk) attends exactly over
  its whole context plus the new tokens, causally.
"""

from __future__ import annotations

import glob
import os
import threading
from dataclasses import dataclass

import torch

import a2ats_core

from ..codebook import Codebook
from .settings import A2ATSVllmConfigError, VllmSettings, blocks_for_budget, store_bytes

_LOCK = threading.Lock()
_CODEBOOKS: dict[tuple[str, int, int], Codebook] = {}


def read_checkpoint_tensors(model_dir: str, names: set[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a local safetensors checkpoint (only those are read)."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise A2ATSVllmConfigError(
            f"a2ats checks its codebook against the model's key projections and needs a local safetensors "
            f"checkpoint; {model_dir!r} has none"
        )
    found: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as handle:
            for name in names & set(handle.keys()):
                found[name] = handle.get_tensor(name)
    return found


def model_skeleton(hf_config, model_dir: str) -> torch.nn.Module:
    """The transformers model of ``hf_config`` on the meta device, with a real rotary embedding
    and the checkpoint's k_proj weights: what :meth:`Codebook.check_compatible` reads, without
    loading the rest of the weights."""
    from transformers import AutoModelForCausalLM

    from ..models import _decoder, _rotary_module, _text_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    decoder, rotary = _decoder(model), _rotary_module(model)
    if getattr(decoder, "rotary_emb", None) is rotary:
        decoder.rotary_emb = type(rotary)(config=_text_config(model))
    names = {name for name, _ in model.named_parameters() if name.endswith("k_proj.weight")}
    weights = read_checkpoint_tensors(model_dir, names)
    missing = sorted(names - set(weights))
    if missing:
        raise A2ATSVllmConfigError(f"the checkpoint in {model_dir!r} lacks {missing[:3]} (not a transformers layout?)")
    for name, tensor in weights.items():
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        owner.weight = torch.nn.Parameter(tensor.float(), requires_grad=False)
    return model


def load_rank_codebook(settings: VllmSettings, hf_config, model_dir: str, rank: int, world_size: int) -> Codebook:
    """The codebook of ``settings``, checked against the model, sliced to this rank's KV heads
    (vLLM's split: rank r holds KV heads [r·Hkv/tp, (r+1)·Hkv/tp), one replicated head each
    when tp > Hkv). Loaded once per process."""
    key = (settings.codebook, rank, world_size)
    with _LOCK:
        if key in _CODEBOOKS:
            return _CODEBOOKS[key]
        from ..codebook import CodebookError

        try:
            codebook = Codebook.load(settings.codebook, model_skeleton(hf_config, model_dir))
        except (CodebookError, FileNotFoundError) as error:
            raise A2ATSVllmConfigError(f'additional_config["a2ats"]["codebook"]: {error}') from None
        num_kv_heads = codebook.num_kv_heads
        if world_size > num_kv_heads and world_size % num_kv_heads:
            raise A2ATSVllmConfigError(
                f"tensor_parallel_size {world_size} is neither a divisor nor a multiple of {num_kv_heads} KV heads"
            )
        if world_size <= num_kv_heads:
            if num_kv_heads % world_size:
                raise A2ATSVllmConfigError(f"{num_kv_heads} KV heads do not split over {world_size} ranks")
            per_rank = num_kv_heads // world_size
            start = rank * per_rank
        else:
            per_rank, start = 1, rank * num_kv_heads // world_size
        _CODEBOOKS[key] = codebook.kv_heads(start, start + per_rank)
        return _CODEBOOKS[key]


@dataclass
class StepRequests:
    """One step's requests, from vLLM's attention metadata (all int64 CPU tensors: the budgets
    and the prefill gathers are planned on the host whatever device the engine runs on)."""

    query_start: torch.Tensor  # (num_reqs + 1,) first query token of each request
    seq_lens: torch.Tensor  # (num_reqs,) tokens in context after this step
    block_table: torch.Tensor  # (num_reqs, max_blocks) engine blocks of each request
    positions: torch.Tensor  # (num_tokens,) position of each query token

    @classmethod
    def from_metadata(cls, query_start_loc, seq_lens, block_table, num_tokens: int) -> "StepRequests":
        query_start = query_start_loc.to("cpu", torch.int64)
        seq_lens = seq_lens.to("cpu", torch.int64)
        query_lens = query_start[1:] - query_start[:-1]
        context = seq_lens - query_lens
        token_request = torch.repeat_interleave(torch.arange(len(seq_lens)), query_lens)
        offsets = torch.arange(int(query_start[-1])) - query_start[token_request]
        positions = (context[token_request] + offsets)[:num_tokens]
        return cls(query_start, seq_lens, block_table.to("cpu", torch.int64), positions)

    @property
    def query_lens(self) -> torch.Tensor:
        return self.query_start[1:] - self.query_start[:-1]

    def slots(self, request: int, block_size: int) -> torch.Tensor:
        """(seq_len,) slot ids of the request's context, in token order."""
        tokens = torch.arange(int(self.seq_lens[request]))
        return self.block_table[request, tokens // block_size] * block_size + tokens % block_size


class RankRuntime:
    """A²ATS state of one engine process: its codebook slice, host store and budget."""

    def __init__(
        self, settings: VllmSettings, codebook: Codebook, num_layers: int, dtype: torch.dtype, max_model_len: int
    ):
        self.settings = settings
        self.config = settings.attention_config()
        self.codebook = codebook
        try:
            self.wrope_distances, edges = codebook.scoring_bins(
                self.config.bins, window=self.config.window, capacity=max_model_len
            )
        except ValueError as error:
            raise A2ATSVllmConfigError(f'additional_config["a2ats"]: {error} (max_model_len {max_model_len})') from None
        self.bin_edges = torch.tensor(edges, dtype=torch.int32) if edges else None
        if codebook.layers != tuple(range(num_layers)):
            raise A2ATSVllmConfigError(
                f'additional_config["a2ats"]["codebook"]: the vLLM backend runs A²ATS in every layer, but the '
                f"codebook covers layers {list(codebook.layers)} of {num_layers}; calibrate it for all layers"
            )
        self.num_layers = num_layers
        self.dtype = dtype
        self.store: a2ats_core.KVStore | None = None
        self.pipeline: a2ats_core.PagedPipeline | None = None
        self.device = torch.device("cpu")  # of the engine's cache, the pipeline and its arrays
        self.block_size = 0
        self._lock = threading.Lock()
        self._step: tuple[object, StepRequests] | None = None  # (the step's metadata, its requests)

    @property
    def num_subspaces(self) -> int:
        return self.codebook.num_subspaces

    def check_layer(self, num_heads: int, num_kv_heads: int, head_size: int) -> None:
        """Refuse a layer whose heads this rank's codebook does not cover."""
        cb = self.codebook
        if (num_heads, num_kv_heads, head_size) != (cb.num_q_heads, cb.num_kv_heads, cb.head_dim):
            raise A2ATSVllmConfigError(
                f"the layer has {num_heads} query / {num_kv_heads} KV heads of {head_size} on this rank, the "
                f"codebook's slice {cb.num_q_heads} / {cb.num_kv_heads} of {cb.head_dim}"
            )

    def ensure_store(self, kv_cache: torch.Tensor) -> a2ats_core.KVStore:
        """The host store, made on first use from the engine cache's shape (num_blocks, Hkv, bs, M),
        and the pipeline on the cache's device (the store pinned when that is a GPU)."""
        if self.store is not None:
            return self.store
        with self._lock:
            if self.store is None:
                num_blocks, _, block_size, _ = kv_cache.shape
                cb = self.codebook
                size = dict(
                    num_layers=self.num_layers,
                    num_kv_heads=cb.num_kv_heads,
                    head_dim=cb.head_dim,
                    element_size=torch.empty((), dtype=self.dtype).element_size(),
                )
                need = store_bytes(num_blocks * block_size, **size)
                if need > self.settings.host_memory_bytes:
                    fits = blocks_for_budget(self.settings.host_memory_bytes, block_size=block_size, **size)
                    raise A2ATSVllmConfigError(
                        f"the engine's cache has {num_blocks} blocks of {block_size} tokens; their host K/V rows "
                        f"would take {need / 2**30:.2f} GiB > host_memory_gb "
                        f"{self.settings.host_memory_gb:g}. Pass num_gpu_blocks_override={fits} "
                        f"(--num-gpu-blocks-override {fits}) or raise host_memory_gb"
                    )
                self.block_size = int(block_size)
                store = a2ats_core.KVStore(
                    self.num_layers,
                    1,
                    cb.num_kv_heads,
                    cb.head_dim,
                    num_blocks * block_size,
                    self.dtype,
                    pinned=kv_cache.is_cuda,
                    threads=self.settings.threads,
                )
                self.pipeline = a2ats_core.PagedPipeline(
                    store,
                    num_q_heads=cb.num_q_heads,
                    inv_freq=cb.inv_freq.float().contiguous(),
                    chol=torch.stack(list(cb.chol.values())).float().contiguous(),
                    chol_inv=torch.stack(list(cb.chol_inv.values())).float().contiguous(),
                    centroids=torch.stack(list(cb.centroids.values())).float().contiguous(),
                    sink=self.config.sink,
                    window=self.config.window,
                    wrope_distances=list(self.wrope_distances),
                    bin_edges=[] if self.bin_edges is None else self.bin_edges.tolist(),
                    interleaved=cb.rope.interleaved,
                    budget_per=self.config.budget_per,
                    device=str(kv_cache.device),
                )
                self.device = kv_cache.device
                self.store = store
        return self.store

    def step_requests(self, attn_metadata) -> StepRequests:
        """The step's requests from vLLM's attention metadata, read once per step: every layer of
        a step gets the same metadata object."""
        if self._step is None or self._step[0] is not attn_metadata:
            step = StepRequests.from_metadata(
                attn_metadata.query_start_loc,
                attn_metadata.seq_lens,
                attn_metadata.block_table,
                attn_metadata.num_actual_tokens,
            )
            self._step = (attn_metadata, step)
        return self._step[1]

    def decode_rows(self) -> dict[str, int]:
        """{"read": rows attended, "context": rows in context} summed over decode requests, layers
        and KV heads since the store was made (the pipeline's counters)."""
        if self.pipeline is None:
            return {"read": 0, "context": 0}
        stats = self.pipeline.stats()
        return {"read": stats["rows_read"], "context": stats["rows_cached"]}

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor, kv_cache) -> None:
        """Store the rows of key, value (num_tokens, Hkv, D) at their slots ((num_tokens,), -1 skips)."""
        store = self.ensure_store(kv_cache)
        n = slot_mapping.shape[0]
        store.write_slots(layer, slot_mapping.to(torch.int64).contiguous(), key[:n], value[:n])

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        kv_cache: torch.Tensor,
        step: StepRequests,
        slot_mapping: torch.Tensor,
        scale: float,
        output: torch.Tensor,
    ) -> None:
        """output (num_tokens, Hq, D) for query (num_tokens, Hq, D) post-RoPE; see the module doc."""
        self.ensure_store(kv_cache)
        num_tokens = query.shape[0]
        slots = slot_mapping[:num_tokens].to(torch.int64).contiguous()
        positions = step.positions.to(self.device).contiguous()
        self.pipeline.encode(layer, key[:num_tokens], positions, slots, kv_cache)
        query_lens = step.query_lens
        decodes = torch.nonzero(query_lens == 1).flatten()
        if decodes.numel():
            rows = step.query_start[decodes]
            output[rows] = self._decode(layer, query[rows], kv_cache, step, decodes, scale).to(output.dtype)
        for request in torch.nonzero(query_lens > 1).flatten().tolist():
            lo, hi = int(step.query_start[request]), int(step.query_start[request + 1])
            output[lo:hi] = self._prefill(layer, query[lo:hi], step, request, scale).to(output.dtype)

    def _decode(self, layer, query, kv_cache, step: StepRequests, requests, scale: float) -> torch.Tensor:
        """Attention (N, Hq, D) of N one-token requests over their selected rows: one native call
        (scores from the paged codes through the block table, each request's own budget, exact
        attention over the selected slots of the store)."""
        lengths = step.seq_lens[requests]
        blocks = step.block_table[requests, : (int(lengths.max()) + self.block_size - 1) // self.block_size]
        # Each request selects its own length's budget, so its tokens do not depend on which other
        # requests share the step.
        budgets = torch.tensor([self.config.budget(int(length)) for length in lengths.tolist()], dtype=torch.int32)
        return self.pipeline.decode(
            layer,
            query.to(self.dtype),
            kv_cache,
            lengths.to(torch.int32),
            blocks.to(self.device, torch.int32).contiguous(),
            budgets,
            scale=float(scale),
        )

    def _prefill(self, layer, query, step: StepRequests, request: int, scale: float) -> torch.Tensor:
        """Causal attention (t, Hq, D) of a request's t query tokens over its whole context."""
        cb = self.codebook
        slot_ids = step.slots(request, self.block_size).to(torch.int32)
        length, t = slot_ids.numel(), query.shape[0]
        indices = slot_ids[None, None].expand(1, cb.num_kv_heads, length).contiguous()
        counts = torch.full((1, cb.num_kv_heads), length, dtype=torch.int32)
        keys = torch.empty(1, cb.num_kv_heads, length, cb.head_dim, dtype=self.dtype, device=self.device)
        values = torch.empty_like(keys)
        self.store.gather(layer, indices, counts, keys, values)
        positions = torch.arange(length, device=self.device)
        visible = positions[None, :] <= (length - t + positions[:t])[:, None]  # (t, length)
        out = torch.nn.functional.scaled_dot_product_attention(
            query.transpose(0, 1)[None].to(self.dtype), keys, values, attn_mask=visible, scale=scale, enable_gqa=True
        )
        return out[0].transpose(0, 1)
