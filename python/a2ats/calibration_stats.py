"""Calibration statistics: what the model's attention sees, and the whitening derived from it.

Per retrieval layer and KV head g, forward hooks on the attention projections capture, for every
calibration token, the pre-RoPE key ``k_pre`` and the pre-RoPE queries of g's query heads (after
q_norm/k_norm where the model has them, times the RoPE ``attention_scaling``). Queries are turned
into WRoPE queries ``q_w = R(b) q_pre`` (b = the WRoPE distance, default 2048) and accumulated
into ``H = Σ q_wᵀ q_w``; keys are kept (:class:`StatisticsCollector`).

``H`` is normalised by the RMS of its entries and factorised, ``L = chol(H + 1e-6 I)``
(:func:`whitening`); k-means then runs on the whitened keys ``k_pre L``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

import a2ats_core

from .models import ModelLayout, attention_modules

__all__ = ["StatisticsCollector", "whitening"]


class StatisticsCollector:
    """Forward hooks that gather pre-RoPE keys and the WRoPE query moment per retrieval layer.

    After running the model on some text inside :meth:`attached`:
    ``keys[l]`` is a list of (Hkv, T, D) f32 CPU tensors (pre-RoPE keys, ``attention_scaling``
    applied), ``query_moment[l]`` (Hkv, D, D) f64 is ``Σ q_wᵀ q_w`` over all tokens and the G
    query heads of each KV head, ``num_tokens`` counts tokens seen.
    Hooks only read the projections' outputs; the model's classes are not patched.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layout: ModelLayout,
        *,
        wrope_distance: int | list[int],
        weights: list[float] | None = None,
        keep_keys: bool = True,
        wrope: bool = True,
    ):
        self.model = model
        self.layout = layout
        # One distance b, or the distances of WRoPE bins with the share of tokens in each: the
        # moment is then the mixture sum_j weights[j] q_w(b_j)^T q_w(b_j), what binned scoring sees.
        self.wrope_distances = [wrope_distance] if isinstance(wrope_distance, int) else list(wrope_distance)
        self.weights = [1.0] if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.wrope_distances) or abs(sum(self.weights) - 1) > 1e-9:
            raise ValueError("weights must give one share per WRoPE distance, summing to 1")
        self.wrope = wrope  # False: post-RoPE keys and queries at their own positions (ablation)
        self.keep_keys = keep_keys
        self.keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in layout.layers}
        self.query_moment: dict[int, torch.Tensor] = {}
        self.num_tokens = 0
        self._attention = attention_modules(model)

    @staticmethod
    def _heads(
        attn: torch.nn.Module, projected: torch.Tensor, norm_name: str, num_heads: int, head_dim: int
    ) -> torch.Tensor:
        """(B, T, H·D) projection output -> (B, H, T, D) f32 as fed to RoPE.

        Qwen3/Gemma 3-style q_norm/k_norm normalise each head before RoPE; OLMo 2-style norms
        span the whole projection. The norm module is called here on the captured output, which
        reproduces the model's computation without hooking inside ``forward``.
        """
        norm = getattr(attn, norm_name, None)
        batch, tokens, _ = projected.shape
        weight = getattr(norm, "weight", None) if norm is not None else None
        if norm is not None and weight is not None and weight.numel() == num_heads * head_dim:
            projected = norm(projected)
            norm = None
        heads = projected.view(batch, tokens, num_heads, head_dim)
        if norm is not None:
            heads = norm(heads)
        return heads.transpose(1, 2).float()

    def _key_hook(self, layer: int) -> Callable:
        layout, attn = self.layout, self._attention[layer]

        def hook(module, inputs, output):
            keys = self._heads(attn, output, "k_norm", layout.num_kv_heads, layout.head_dim)
            keys = keys * layout.rope.attention_scaling  # (B, Hkv, T, D)
            if not self.wrope:
                keys = a2ats_core.rotary(keys, self._own_positions(keys), layout.rope.inv_freq.to(keys.device).float())
            if self.keep_keys:
                self.keys[layer].append(keys.transpose(0, 1).flatten(1, 2).cpu())
            if layer == layout.layers[0]:
                self.num_tokens += keys.shape[0] * keys.shape[2]

        return hook

    def _query_hook(self, layer: int) -> Callable:
        layout, attn = self.layout, self._attention[layer]

        def hook(module, inputs, output):
            queries = self._heads(attn, output, "q_norm", layout.num_q_heads, layout.head_dim)
            batch, _, tokens, head_dim = queries.shape
            # WRoPE: every query is scored as if its keys sat b positions behind it.
            inv_freq = layout.rope.inv_freq.to(queries.device).float()
            shares = zip(self.wrope_distances, self.weights) if self.wrope else [(None, 1.0)]
            moment = None
            for distance, weight in shares:
                positions = (
                    torch.full((batch, tokens), distance, dtype=torch.long, device=queries.device)
                    if distance is not None
                    else self._own_positions(queries)
                )
                q_w = a2ats_core.rotary(queries, positions, inv_freq) * layout.rope.attention_scaling
                grouped = q_w.view(batch, layout.num_kv_heads, layout.group_size, tokens, head_dim)
                part = torch.einsum("bgjtd,bgjte->gde", grouped, grouped).double() * weight
                moment = part if moment is None else moment + part
            if layer in self.query_moment:
                self.query_moment[layer] += moment
            else:
                self.query_moment[layer] = moment

        return hook

    @staticmethod
    def _own_positions(heads: torch.Tensor) -> torch.Tensor:
        """(B, T) positions 0..T-1: each chunk is one sequence starting at position 0."""
        batch, _, tokens, _ = heads.shape
        return torch.arange(tokens, device=heads.device).expand(batch, tokens)

    @contextmanager
    def attached(self) -> Iterator["StatisticsCollector"]:
        handles = []
        try:
            for layer in self.layout.layers:
                attn = self._attention[layer]
                handles.append(attn.k_proj.register_forward_hook(self._key_hook(layer)))
                handles.append(attn.q_proj.register_forward_hook(self._query_hook(layer)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def run(
        self, chunks: Sequence[torch.Tensor], *, progress: bool = False, description: str = "forward"
    ) -> "StatisticsCollector":
        """Feed each 1-D chunk of token ids to the model (no cache, no logits)."""
        from tqdm.auto import tqdm

        from .models import _decoder

        decoder = _decoder(self.model)
        device = next(self.model.parameters()).device
        with self.attached(), torch.inference_mode():
            for chunk in tqdm(chunks, desc=description, unit="chunk", disable=not progress):
                decoder(input_ids=chunk[None].to(device), use_cache=False)
        return self

    def stacked_keys(self, layer: int) -> torch.Tensor:
        """All captured keys of ``layer``: (Hkv, N, D) f32 CPU."""
        return torch.cat(self.keys[layer], dim=1)


def whitening(query_moment: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L⁻¹), each (Hkv, D, D) f32, with L = chol(H / rms(H) + eps·I) per KV head.

    ``query_moment`` (Hkv, D, D) is ``Σ q_wᵀ q_w``. Normalising by the RMS of the entries makes
    ``eps`` relative; the factorisation runs in float64. Should H still not be positive
    definite (a degenerate query space), eps is raised tenfold until it is.
    """
    moment = query_moment.double()
    rms = moment.square().mean(dim=(-2, -1), keepdim=True).sqrt().clamp_min(1e-300)
    normalised = moment / rms
    eye = torch.eye(moment.shape[-1], dtype=torch.float64, device=moment.device)
    jitter = eps
    while True:
        chol, info = torch.linalg.cholesky_ex(normalised + jitter * eye)
        if int(info.max()) == 0:
            break
        if jitter > 1.0:
            raise ValueError(
                "the query second moment is not positive definite even with "
                "jitter 1.0; the calibration queries are degenerate"
            )
        jitter *= 10.0
    chol_inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
    return chol.float(), chol_inv.float()
