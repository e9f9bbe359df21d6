"""Building query-aware codebooks (QAVQ) for a model from calibration text.

Per retrieval layer and KV head g (design notes, steps 1-2):

1. Forward hooks on the attention projections capture, for every calibration token, the
   pre-RoPE key ``k_pre`` and the pre-RoPE queries of g's query heads (after q_norm/k_norm
   where the model has them, times the RoPE ``attention_scaling``). Queries are turned into
   WRoPE queries ``q_w = R(b) q_pre`` (b = the WRoPE distance, default 2048) and accumulated
   into ``H = Σ q_wᵀ q_w``; keys are kept.
2. ``H`` is normalised by the RMS of its entries, ``L = chol(H + 1e-6 I)``, and k-means
   (k-means++ seeding, Lloyd iterations, empty clusters re-seeded) runs on the whitened keys
   ``k_pre L``, per subspace when M > 1.

The quality report compares, on held-out text, the relative score error
``E[(q·k − q·ĉ)²] / E[(q·k)²]`` of this codebook with a plain k-means codebook of the same size
on the unwhitened keys.
"""
from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import a2ats_core
import torch

from . import __version__
from .codebook import FORMAT, FORMAT_VERSION, Codebook, model_metadata
from .corpus import build_corpus
from .models import ModelLayout, attention_modules, describe_model, key_projection_fingerprint
from .presets import MAX_CENTROIDS, PRESETS, CalibrationSettings, resolve_settings  # noqa: F401 (re-exported)

__all__ = ["CalibrationSettings", "PRESETS", "resolve_settings", "calibrate", "kmeans",
           "KMeansResult", "StatisticsCollector", "whitening", "relative_score_error",
           "format_quality_report"]


# -- statistics --------------------------------------------------------------------------------

class StatisticsCollector:
    """Forward hooks that gather pre-RoPE keys and the WRoPE query moment per retrieval layer.

    After running the model on some text inside :meth:`attached`:
    ``keys[l]`` is a list of (Hkv, T, D) f32 CPU tensors (pre-RoPE keys, ``attention_scaling``
    applied), ``query_moment[l]`` (Hkv, D, D) f64 is ``Σ q_wᵀ q_w`` over all tokens and the G
    query heads of each KV head, ``num_tokens`` counts tokens seen.
    Hooks only read the projections' outputs; the model's classes are not patched.
    """

    def __init__(self, model: torch.nn.Module, layout: ModelLayout, *, wrope_distance: int,
                 keep_keys: bool = True, wrope: bool = True):
        self.model = model
        self.layout = layout
        self.wrope_distance = wrope_distance
        self.wrope = wrope  # False: post-RoPE keys and queries at their own positions (ablation)
        self.keep_keys = keep_keys
        self.keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in layout.layers}
        self.query_moment: dict[int, torch.Tensor] = {}
        self.num_tokens = 0
        self._attention = attention_modules(model)

    @staticmethod
    def _heads(attn: torch.nn.Module, projected: torch.Tensor, norm_name: str, num_heads: int,
               head_dim: int) -> torch.Tensor:
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
            positions = torch.full((batch, tokens), self.wrope_distance, dtype=torch.long,
                                   device=queries.device) if self.wrope else self._own_positions(queries)
            q_w = a2ats_core.rotary(queries, positions, layout.rope.inv_freq.to(queries.device).float())
            q_w = q_w * layout.rope.attention_scaling
            grouped = q_w.view(batch, layout.num_kv_heads, layout.group_size, tokens, head_dim)
            moment = torch.einsum("bgjtd,bgjte->gde", grouped, grouped).double()
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

    def run(self, chunks: Sequence[torch.Tensor], *, progress: bool = False,
            description: str = "forward") -> "StatisticsCollector":
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
            raise ValueError("the query second moment is not positive definite even with "
                             "jitter 1.0; the calibration queries are degenerate")
        jitter *= 10.0
    chol_inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
    return chol.float(), chol_inv.float()


# -- k-means -----------------------------------------------------------------------------------

@dataclass
class KMeansResult:
    """Outcome of :func:`kmeans` over P independent problems.

    centroids (P, C, d) f32; iterations, converged, unfilled (P,): Lloyd iterations run, whether
    the tolerance was met, and clusters that stayed empty because the problem has fewer distinct
    points than C (they keep a data point, never a zero vector); inertia (P,): mean squared
    distance of the points to their centroid at the last assignment.
    """

    centroids: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    unfilled: torch.Tensor
    inertia: torch.Tensor


# Elements of one (P, block, C) distance block: 2^25 floats = 128 MiB.
_BLOCK_ELEMENTS = 1 << 25


def _assign(points: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each point: native ``vq_encode`` on CPU, else a blocked bmm.

    points (P, N, d), centroids (P, C, d) -> labels (P, N) int64 (lowest index on ties),
    squared distances (P, N) f32.
    """
    num_problems, num_points, _ = points.shape
    num_centroids = centroids.shape[1]
    if points.device.type == "cpu" and num_centroids <= MAX_CENTROIDS:
        # The native encoder fuses the product with the argmin in cache-sized tiles: about
        # 2.3x faster than the blocked product below, whose (block, C) distances go through
        # memory. Ties go to the lowest index there too.
        labels = a2ats_core.vq_encode(points[None], centroids[:, None].contiguous())
        labels = labels[0, :, :, 0].long()  # (P, N)
        nearest = centroids.gather(1, labels[..., None].expand(-1, -1, points.shape[-1]))
        return labels, (points - nearest).square().sum(-1)
    centroid_sq = centroids.square().sum(-1)  # (P, C)
    transposed = centroids.transpose(1, 2)  # (P, d, C)
    labels = torch.empty(num_problems, num_points, dtype=torch.long, device=points.device)
    distances = torch.empty(num_problems, num_points, dtype=points.dtype, device=points.device)
    block = max(1, _BLOCK_ELEMENTS // (num_problems * num_centroids))
    for start in range(0, num_points, block):
        part = points[:, start:start + block]
        # ‖x − c‖² = ‖x‖² + (‖c‖² − 2 x·c); the bracket decides the argmin.
        partial = torch.baddbmm(centroid_sq[:, None, :], part, transposed, alpha=-2.0)
        smallest, nearest = partial.min(-1)  # first index among ties
        labels[:, start:start + block] = nearest
        distances[:, start:start + block] = smallest + part.square().sum(-1)
    return labels, distances.clamp_min_(0.0)


def _kmeans_plus_plus(points: torch.Tensor, num_centroids: int,
                      generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding of each problem: points (P, N, d) -> centroids (P, C, d).

    Each next centroid is drawn with probability ∝ squared distance to the nearest chosen one;
    once every point coincides with a centroid (fewer distinct points than C) draws are uniform.
    """
    num_problems, num_points, dim = points.shape
    rows = torch.arange(num_problems, device=points.device)
    point_sq = points.square().sum(-1)  # (P, N)
    centroids = points.new_empty(num_problems, num_centroids, dim)
    first = torch.randint(num_points, (num_problems,), generator=generator, device=points.device)
    centroids[:, 0] = points[rows, first]
    nearest_sq = torch.full_like(point_sq, float("inf"))
    dist = torch.empty_like(point_sq)
    uniform_cdf = torch.arange(1, num_points + 1, dtype=torch.float64, device=points.device)
    for index in range(num_centroids):
        if index:
            # Inverse-CDF draw (float64 running sum): an order of magnitude faster than
            # torch.multinomial for one sample from long rows.
            cumulative = torch.cumsum(nearest_sq, -1, dtype=torch.float64)  # (P, N)
            degenerate = cumulative[:, -1:] <= 0
            if bool(degenerate.any()):
                cumulative = torch.where(degenerate, uniform_cdf, cumulative)
            draw = torch.rand((num_problems, 1), generator=generator, dtype=torch.float64,
                              device=points.device) * cumulative[:, -1:]
            chosen = torch.searchsorted(cumulative, draw, right=True)[:, 0]
            centroids[:, index] = points[rows, chosen.clamp_max(num_points - 1)]
        newest = centroids[:, index]  # (P, d)
        newest_sq = newest.square().sum(-1)  # (P,)
        for problem in range(num_problems):
            # One matrix-vector product per problem: this step reads all points once per
            # centroid, and addmv streams them about 3x faster than a batched (N, d) x (d, 1) bmm.
            torch.addmv(point_sq[problem], points[problem], newest[problem], beta=1.0,
                        alpha=-2.0, out=dist[problem])
        dist.add_(newest_sq[:, None]).clamp_min_(0.0)
        torch.minimum(nearest_sq, dist, out=nearest_sq)
    return centroids


def _reseed_empty(points: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor,
                  empty: torch.Tensor) -> int:
    """Move the empty clusters of one problem onto distinct points that are not centroids.

    points (N, d), labels (N,), centroids (C, d) updated in place, empty (E,) cluster indices.
    Candidates are the points farthest from their own centroid, taken in that order with
    exact duplicates removed and points at an existing centroid skipped: layer-0 keys
    repeat heavily (they depend on the token id only), and re-seeding several empty clusters
    onto copies of one key would empty them again at once. Returns the clusters that could not
    be filled (they keep their previous, non-zero position).
    """
    error = (points - centroids[labels]).square().sum(-1)  # (N,)
    # A point this close to a centroid already is one: the mean of n copies of a key differs
    # from the key in the last bits, and must not count as a different place.
    at_centroid = 1e-9 * float(points.square().sum(-1).mean()) + 1e-30
    order = torch.sort(error, descending=True, stable=True).indices
    order = order[error[order] > at_centroid]
    wanted = int(empty.numel())
    take = min(order.numel(), 4 * wanted + 64)
    chosen = order[:0]
    while True:
        candidates = order[:take]
        count = int(candidates.numel())
        _, inverse = torch.unique(points[candidates], dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1 if count else 0,), count, dtype=torch.long,
                           device=points.device)
        first = first.scatter_reduce(0, inverse, torch.arange(count, device=points.device),
                                     reduce="amin")
        distinct = candidates[torch.sort(first).values]  # first copies, in farthest-first order
        if distinct.numel():
            # Direct differences: the matmul expansion loses distances this small.
            to_centroids = torch.cdist(points[distinct], centroids,
                                       compute_mode="donot_use_mm_for_euclid_dist").min(-1).values
            distinct = distinct[to_centroids.square() > at_centroid]
        chosen = distinct[:wanted]
        if chosen.numel() >= wanted or take >= order.numel():
            break
        take = min(order.numel(), take * 4)
    centroids[empty[:chosen.numel()]] = points[chosen]
    return wanted - int(chosen.numel())


def kmeans(points: torch.Tensor, num_centroids: int, *, max_iter: int = 300, tol: float = 1e-4,
           seed: int = 0) -> KMeansResult:
    """k-means++ then Lloyd iterations, independently for each of P problems.

    points (P, N, d) f32 on any device (the work runs there); the assignment step is a
    blocked batched matrix product. A problem stops when the mean squared centroid shift
    (1/C) Σ_c ‖Δc‖² <= tol · mean_j var(x_j), or after ``max_iter`` iterations. This is
    scikit-learn's criterion averaged instead of summed over centroids, so that it does not
    tighten as C grows (summed, C = 4096 rarely converges within 300 iterations). Empty
    clusters are re-seeded (:func:`_reseed_empty`). Deterministic for a given seed on the
    CPU; on CUDA the cluster sums use atomics and may differ in the last bits between runs.
    """
    if points.dim() != 3:
        raise ValueError(f"points must be (P, N, d), got shape {tuple(points.shape)}")
    num_problems, num_points, dim = points.shape
    if not 1 <= num_centroids <= num_points:
        raise ValueError(f"num_centroids must be in [1, {num_points}] (the number of points), "
                         f"got {num_centroids}")
    points = points.float().contiguous()
    device = points.device
    generator = torch.Generator(device=device).manual_seed(seed)
    centroids = _kmeans_plus_plus(points, num_centroids, generator)
    tolerance = tol * points.var(dim=1, unbiased=False).mean(-1)  # (P,)
    iterations = torch.zeros(num_problems, dtype=torch.long)
    converged = torch.zeros(num_problems, dtype=torch.bool)
    unfilled = torch.zeros(num_problems, dtype=torch.long)
    inertia = torch.zeros(num_problems)
    active = torch.arange(num_problems)
    for _ in range(max_iter):
        subset = points if active.numel() == num_problems else points[active.to(device)]
        current = centroids[active.to(device)]
        labels, distances = _assign(subset, current)
        inertia[active] = distances.mean(-1).cpu()
        flat = (labels + torch.arange(active.numel(), device=device)[:, None] * num_centroids)
        flat = flat.flatten()
        sums = torch.zeros(active.numel() * num_centroids, dim, device=device)
        sums.index_add_(0, flat, subset.reshape(-1, dim))
        counts = torch.bincount(flat, minlength=active.numel() * num_centroids)
        sums = sums.view(active.numel(), num_centroids, dim)
        counts = counts.view(active.numel(), num_centroids)
        updated = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], current)
        unfilled[active] = 0
        for position in (counts == 0).any(-1).nonzero().flatten().tolist():
            empty = (counts[position] == 0).nonzero().flatten()
            unfilled[active[position]] = _reseed_empty(subset[position], labels[position],
                                                       updated[position], empty)
        shift = (updated - current).square().sum(-1).mean(-1)  # (P_active,)
        centroids[active.to(device)] = updated
        iterations[active] += 1
        done = (shift <= tolerance[active.to(device)]).cpu()
        converged[active[done]] = True
        active = active[~done]
        if active.numel() == 0:
            break
    return KMeansResult(centroids=centroids, iterations=iterations, converged=converged,
                        unfilled=unfilled, inertia=inertia)


# -- quality -----------------------------------------------------------------------------------

def _nearest_codes(vectors: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Reconstruction of vectors (Hkv, N, D) by centroids (Hkv, M, C, D/M): (Hkv, N, D)."""
    num_kv_heads, num_points, head_dim = vectors.shape
    _, num_subspaces, num_centroids, sub_dim = centroids.shape
    problems = vectors.view(num_kv_heads, num_points, num_subspaces, sub_dim).transpose(1, 2)
    problems = problems.reshape(num_kv_heads * num_subspaces, num_points, sub_dim)
    flat_centroids = centroids.reshape(num_kv_heads * num_subspaces, num_centroids, sub_dim)
    labels, _ = _assign(problems.contiguous(), flat_centroids)
    picked = flat_centroids.gather(1, labels[..., None].expand(-1, -1, sub_dim))
    picked = picked.view(num_kv_heads, num_subspaces, num_points, sub_dim).transpose(1, 2)
    return picked.reshape(num_kv_heads, num_points, head_dim)


def relative_score_error(keys: torch.Tensor, query_moment: torch.Tensor, centroids: torch.Tensor,
                         chol: torch.Tensor | None = None,
                         chol_inv: torch.Tensor | None = None) -> torch.Tensor:
    """E[(q·k − q·ĉ)²] / E[(q·k)²] per KV head, over all query-key pairs of held-out text.

    keys (Hkv, N, D) pre-RoPE; query_moment (Hkv, D, D) = Σ q_wᵀ q_w of the held-out queries, so
    Σ_q Σ_k (q·e)² = Σ_k e H eᵀ needs no pairwise products. centroids (Hkv, M, C, D/M) live in
    the space whitened by ``chol`` (Hkv, D, D) and are mapped back with ``chol_inv``; without
    them (plain k-means) they live in key space. Returns (Hkv,) f64.
    """
    keys = keys.float()
    if chol is not None:
        whitened = torch.einsum("gnd,gde->gne", keys, chol.to(keys.device))
        approx = torch.einsum("gnd,gde->gne", _nearest_codes(whitened, centroids.to(keys.device)),
                              chol_inv.to(keys.device))
    else:
        approx = _nearest_codes(keys, centroids.to(keys.device))
    moment = query_moment.to(keys.device).double()
    error = (keys - approx).double()
    numerator = torch.einsum("gnd,gde,gne->g", error, moment, error)
    denominator = torch.einsum("gnd,gde,gne->g", keys.double(), moment, keys.double())
    return (numerator / denominator.clamp_min(1e-300)).cpu()


def format_quality_report(quality: dict[str, Any] | None) -> str:
    """Human-readable lines of the ``quality`` metadata section."""
    if not quality:
        return "quality: no held-out text, not measured"
    lines = [f"held-out score error E[(q·k − q·ĉ)²] / E[(q·k)²] on {quality['holdout_tokens']} "
             f"tokens (mean over {quality['num_layers']} layers × {quality['num_kv_heads']} KV "
             f"heads):",
             f"  query-aware codebook (QAVQ): {quality['query_aware']:.4f}"]
    if quality.get("plain_kmeans") is not None:
        ratio = quality["query_aware"] / max(quality["plain_kmeans"], 1e-300)
        lines.append(f"  plain k-means, same size:    {quality['plain_kmeans']:.4f}   "
                     f"(query-aware / plain = {ratio:.3f})")
    return "\n".join(lines)


# -- driver ------------------------------------------------------------------------------------

def calibrate(model: torch.nn.Module, tokenizer, *, preset: str = "default",
              texts: Sequence[str] | None = None, text_description: str | None = None,
              device: str | torch.device | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None, **settings: Any) -> Codebook:
    """Build a query-aware codebook for ``model``.

    ``preset``: "default" (C = 4096, M = 1, 64k tokens) or "small" (see :data:`PRESETS`);
    keyword ``settings`` override its fields (num_centroids, num_subspaces, num_tokens,
    holdout_tokens, chunk_len, wrope_distance, max_iter, tol, seed, chol_eps, baseline).
    ``texts``: calibration documents (default: pydoc topics + random strings). ``device``: where
    k-means runs (default CUDA when available); the model stays where it is. ``log`` receives
    progress lines. Returns the :class:`~a2ats.codebook.Codebook` with the quality report in
    its metadata (``codebook.quality``).
    """
    config = resolve_settings(preset, **settings)
    layout = describe_model(model)
    config.validate(layout.head_dim)
    if texts is not None and not any(text.strip() for text in texts):
        raise ValueError("the calibration corpus is empty: no non-blank text was given")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    say = log or (lambda message: None)
    started = time.perf_counter()

    chunk_len = config.chunk_len
    if layout.max_position_embeddings:
        chunk_len = min(chunk_len, int(layout.max_position_embeddings))
    corpus = build_corpus(tokenizer, texts, num_tokens=config.num_tokens,
                          holdout_tokens=config.holdout_tokens, chunk_len=chunk_len,
                          seed=config.seed, description=text_description)
    for note in corpus.notes:
        say(f"note: {note}")
    if corpus.num_calibration_tokens < config.num_centroids:
        raise ValueError(f"the corpus gives only {corpus.num_calibration_tokens} calibration "
                         f"tokens, fewer than num_centroids = {config.num_centroids}")
    say(f"model {layout.model_name} ({layout.model_type}): {len(layout.layers)} retrieval layers, "
        f"{layout.num_q_heads} query / {layout.num_kv_heads} KV heads, head dim {layout.head_dim}, "
        f"rotary dim {layout.rope.rotary_dim}")
    say(f"corpus: {corpus.description}; {corpus.num_calibration_tokens} calibration + "
        f"{corpus.num_holdout_tokens} held-out tokens in chunks of <= {chunk_len}")

    train = StatisticsCollector(model, layout, wrope_distance=config.wrope_distance,
                                wrope=config.wrope)
    train.run(corpus.calibration, progress=progress, description="calibration text")
    holdout = None
    if corpus.holdout:
        holdout = StatisticsCollector(model, layout, wrope_distance=config.wrope_distance,
                                      wrope=config.wrope)
        holdout.run(corpus.holdout, progress=progress, description="held-out text")
    say(f"statistics collected in {time.perf_counter() - started:.1f} s")

    from tqdm.auto import tqdm

    num_kv_heads, head_dim = layout.num_kv_heads, layout.head_dim
    num_subspaces, num_centroids = config.num_subspaces, config.num_centroids
    sub_dim = head_dim // num_subspaces
    centroids, chols, chol_invs = {}, {}, {}
    iterations, converged, unfilled = [], [], []
    errors_qa, errors_plain = [], []
    bar = tqdm(layout.layers, desc="k-means", unit="layer", disable=not progress)
    for layer in bar:
        if config.query_aware:
            chol, chol_inv = whitening(train.query_moment[layer], config.chol_eps)
        else:
            chol = torch.eye(layout.head_dim).expand(num_kv_heads, -1, -1).contiguous()
            chol_inv = chol.clone()
        keys = train.stacked_keys(layer).to(device)  # (Hkv, N, D)
        train.keys[layer] = []  # release host memory as layers are done
        whitened = torch.einsum("gnd,gde->gne", keys, chol.to(device))
        with_baseline = config.baseline and config.query_aware  # without L the two coincide
        spaces = [whitened, keys] if with_baseline else [whitened]
        # One batch of problems: (space, KV head, subspace) -> (P, N, D/M).
        problems = torch.cat([
            space.view(num_kv_heads, -1, num_subspaces, sub_dim).transpose(1, 2)
            .reshape(num_kv_heads * num_subspaces, -1, sub_dim) for space in spaces])
        result = kmeans(problems, num_centroids, max_iter=config.max_iter, tol=config.tol,
                        seed=config.seed + 1000 * layer)
        fitted = result.centroids.view(len(spaces), num_kv_heads, num_subspaces, num_centroids,
                                       sub_dim)
        centroids[layer] = fitted[0].cpu().contiguous()
        chols[layer], chol_invs[layer] = chol.cpu(), chol_inv.cpu()
        iterations.append(int(result.iterations.max()))
        converged.append(bool(result.converged.all()))
        unfilled.append(int(result.unfilled.sum()))
        bar.set_postfix(lloyd_iterations=iterations[-1], refresh=False)
        if holdout is not None:
            held_keys = holdout.stacked_keys(layer).to(device)
            moment = holdout.query_moment[layer]
            errors_qa.append(relative_score_error(held_keys, moment, fitted[0], chol.to(device),
                                                  chol_inv.to(device)).tolist())
            if with_baseline:
                errors_plain.append(relative_score_error(held_keys, moment, fitted[1]).tolist())
        del keys, whitened, problems, result

    quality = None
    if holdout is not None:
        mean = lambda rows: float(sum(map(sum, rows)) / sum(map(len, rows)))  # noqa: E731
        quality = {
            "metric": "E[(q.k - q.c)^2] / E[(q.k)^2], WRoPE queries x pre-RoPE keys, all pairs",
            "holdout_tokens": holdout.num_tokens, "num_layers": len(layout.layers),
            "num_kv_heads": num_kv_heads, "query_aware": mean(errors_qa),
            "plain_kmeans": mean(errors_plain) if errors_plain else None,
            "per_layer_query_aware": [sum(row) / len(row) for row in errors_qa],
            "per_layer_plain_kmeans": [sum(row) / len(row) for row in errors_plain] or None,
        }
    elapsed = time.perf_counter() - started
    metadata = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "a2ats_version": __version__,
        "model": model_metadata(layout), "rope": layout.rope.to_metadata(),
        "wrope_distance": config.wrope_distance, "num_centroids": num_centroids,
        "num_subspaces": num_subspaces,
        "calibration": {
            "tokens": train.num_tokens, "corpus": corpus.description, "chunk_len": chunk_len,
            "settings": asdict(config), "kmeans_iterations": iterations,
            "kmeans_converged": converged, "unfilled_clusters": unfilled,
            "seconds": round(elapsed, 1), "device": str(device), "torch_version": torch.__version__,
        },
        "fingerprint": key_projection_fingerprint(model, layout.layers),
        "quality": quality,
    }
    say(f"calibrated {len(layout.layers)} layers in {elapsed:.1f} s; Lloyd iterations per layer "
        f"{min(iterations)}-{max(iterations)}, converged in {sum(converged)}/{len(converged)} "
        f"layers" + (f", {sum(unfilled)} clusters left empty (too few distinct keys)"
                     if sum(unfilled) else ""))
    return Codebook(centroids, chols, chol_invs, layout.rope.inv_freq, metadata)


class _CallableModule(type(math)):
    """Lets ``a2ats.calibrate(...)`` call :func:`calibrate`: the package attribute of that name
    is this module as soon as anything imports ``a2ats.calibrate``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Codebook:
        return calibrate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
