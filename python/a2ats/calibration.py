"""Building query-aware codebooks (QAVQ) for a model from calibration text: :func:`calibrate`.

Per retrieval layer and KV head g (design notes, steps 1-2):

1. the model runs on the calibration text and hooks gather the pre-RoPE keys and the WRoPE
   query moment ``H`` (:mod:`a2ats.calibration_stats`);
2. ``L = chol(H)`` (normalised, :func:`~a2ats.calibration_stats.whitening`), and k-means
   (:mod:`a2ats.kmeans`) on the whitened keys ``k_pre L``, per subspace when M > 1.

With held-out text, :mod:`a2ats.quality` then compares the codebook with plain k-means.

This module re-exports those modules' public names and the presets' (:mod:`a2ats.presets`), so
that ``from a2ats.calibration import ...`` reaches the whole calibration API. The function is
also ``a2ats.calibrate``; the module has another name because importing a submodule binds its
name on the package, which would then hide the function.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Callable, Sequence

import torch

from . import __version__
from .calibration_stats import StatisticsCollector, whitening
from .codebook import FORMAT, FORMAT_VERSION, Codebook, model_metadata, wrope_bins
from .corpus import build_corpus
from .kmeans import KMeansResult, kmeans
from .models import describe_model, key_projection_fingerprint
from .presets import PRESETS, CalibrationSettings, resolve_settings
from .quality import format_quality_report, relative_score_error

__all__ = [
    "CalibrationSettings",
    "PRESETS",
    "resolve_settings",
    "calibrate",
    "kmeans",
    "KMeansResult",
    "StatisticsCollector",
    "whitening",
    "relative_score_error",
    "format_quality_report",
]


# The window the calibration's bins start from: A2ATSConfig's default.
BINS_WINDOW = 64


def calibration_bins(config, layout) -> dict:
    """The WRoPE bins the query moment is fitted for: ``{"distances", "edges", "weights"}``, with
    :func:`~a2ats.codebook.wrope_bins` from :data:`BINS_WINDOW` to the model's context (``edges``
    empty for 1 bin). A bin's weight is its share of the tokens from the window to the context,
    the mixture binned scoring sees at a full context."""
    capacity = int(layout.max_position_embeddings or 0)
    if config.bins > 1 and capacity <= BINS_WINDOW:
        raise ValueError(f"bins = {config.bins} needs the model's context; it declares max_position_embeddings "
                         f"{capacity or 'none'}")  # fmt: skip
    distances, edges = wrope_bins(config.bins, window=BINS_WINDOW, capacity=capacity, distance=config.wrope_distance)
    bounds = [BINS_WINDOW, *edges, capacity]
    widths = [hi - lo for lo, hi in zip(bounds, bounds[1:])] if edges else [1]
    return {"distances": distances, "edges": edges, "weights": [w / sum(widths) for w in widths]}


def calibrate(
    model: torch.nn.Module,
    tokenizer,
    *,
    preset: str = "default",
    texts: Sequence[str] | None = None,
    text_description: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    **settings: Any,
) -> Codebook:
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
    corpus = build_corpus(
        tokenizer,
        texts,
        num_tokens=config.num_tokens,
        holdout_tokens=config.holdout_tokens,
        chunk_len=chunk_len,
        seed=config.seed,
        description=text_description,
    )
    for note in corpus.notes:
        say(f"note: {note}")
    if corpus.num_calibration_tokens < config.num_centroids:
        raise ValueError(
            f"the corpus gives only {corpus.num_calibration_tokens} calibration "
            f"tokens, fewer than num_centroids = {config.num_centroids}"
        )
    say(
        f"model {layout.model_name} ({layout.model_type}): {len(layout.layers)} retrieval layers, "
        f"{layout.num_q_heads} query / {layout.num_kv_heads} KV heads, head dim {layout.head_dim}, "
        f"rotary dim {layout.rope.rotary_dim}"
    )
    say(
        f"corpus: {corpus.description}; {corpus.num_calibration_tokens} calibration + "
        f"{corpus.num_holdout_tokens} held-out tokens in chunks of <= {chunk_len}"
    )

    bins = calibration_bins(config, layout)
    moment_of = dict(wrope_distance=bins["distances"], weights=bins["weights"], wrope=config.wrope)
    if config.bins > 1:
        say(f"WRoPE bins: distances {bins['distances']}, edges {bins['edges']}, token shares "
            f"{[round(w, 3) for w in bins['weights']]}")  # fmt: skip
    train = StatisticsCollector(model, layout, **moment_of)
    train.run(corpus.calibration, progress=progress, description="calibration text")
    holdout = None
    if corpus.holdout:
        holdout = StatisticsCollector(model, layout, **moment_of)
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
        problems = torch.cat(
            [
                space.view(num_kv_heads, -1, num_subspaces, sub_dim)
                .transpose(1, 2)
                .reshape(num_kv_heads * num_subspaces, -1, sub_dim)
                for space in spaces
            ]
        )
        result = kmeans(
            problems, num_centroids, max_iter=config.max_iter, tol=config.tol, seed=config.seed + 1000 * layer
        )
        fitted = result.centroids.view(len(spaces), num_kv_heads, num_subspaces, num_centroids, sub_dim)
        centroids[layer] = fitted[0].cpu().contiguous()
        chols[layer], chol_invs[layer] = chol.cpu(), chol_inv.cpu()
        iterations.append(int(result.iterations.max()))
        converged.append(bool(result.converged.all()))
        unfilled.append(int(result.unfilled.sum()))
        bar.set_postfix(lloyd_iterations=iterations[-1], refresh=False)
        if holdout is not None:
            held_keys = holdout.stacked_keys(layer).to(device)
            moment = holdout.query_moment[layer]
            errors_qa.append(
                relative_score_error(held_keys, moment, fitted[0], chol.to(device), chol_inv.to(device)).tolist()
            )
            if with_baseline:
                errors_plain.append(relative_score_error(held_keys, moment, fitted[1]).tolist())
        del keys, whitened, problems, result

    quality = None
    if holdout is not None:
        mean = lambda rows: float(sum(map(sum, rows)) / sum(map(len, rows)))  # noqa: E731
        quality = {
            "metric": "E[(q.k - q.c)^2] / E[(q.k)^2], WRoPE queries x pre-RoPE keys, all pairs",
            "holdout_tokens": holdout.num_tokens,
            "num_layers": len(layout.layers),
            "num_kv_heads": num_kv_heads,
            "query_aware": mean(errors_qa),
            "plain_kmeans": mean(errors_plain) if errors_plain else None,
            "per_layer_query_aware": [sum(row) / len(row) for row in errors_qa],
            "per_layer_plain_kmeans": [sum(row) / len(row) for row in errors_plain] or None,
        }
    elapsed = time.perf_counter() - started
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "a2ats_version": __version__,
        "model": model_metadata(layout),
        "rope": layout.rope.to_metadata(),
        "wrope_distance": config.wrope_distance,
        **({"wrope_bins": bins} if config.bins > 1 else {}),
        "num_centroids": num_centroids,
        "num_subspaces": num_subspaces,
        "calibration": {
            "tokens": train.num_tokens,
            "corpus": corpus.description,
            "chunk_len": chunk_len,
            "settings": asdict(config),
            "kmeans_iterations": iterations,
            "kmeans_converged": converged,
            "unfilled_clusters": unfilled,
            "seconds": round(elapsed, 1),
            "device": str(device),
            "torch_version": torch.__version__,
        },
        "fingerprint": key_projection_fingerprint(model, layout.layers),
        "quality": quality,
    }
    say(
        f"calibrated {len(layout.layers)} layers in {elapsed:.1f} s; Lloyd iterations per layer "
        f"{min(iterations)}-{max(iterations)}, converged in {sum(converged)}/{len(converged)} "
        f"layers" + (f", {sum(unfilled)} clusters left empty (too few distinct keys)" if sum(unfilled) else "")
    )
    return Codebook(centroids, chols, chol_invs, layout.rope.inv_freq, metadata)
