"""The calibration quality report: how well a codebook preserves attention scores.

On held-out text, the relative score error ``E[(q·k − q·ĉ)²] / E[(q·k)²]`` of the query-aware
codebook is compared with that of a plain k-means codebook of the same size on the unwhitened
keys.
"""

from __future__ import annotations

from typing import Any

import torch

from .kmeans import _assign

__all__ = ["relative_score_error", "format_quality_report"]


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


def relative_score_error(
    keys: torch.Tensor,
    query_moment: torch.Tensor,
    centroids: torch.Tensor,
    chol: torch.Tensor | None = None,
    chol_inv: torch.Tensor | None = None,
) -> torch.Tensor:
    """E[(q·k − q·ĉ)²] / E[(q·k)²] per KV head, over all query-key pairs of held-out text.

    keys (Hkv, N, D) pre-RoPE; query_moment (Hkv, D, D) = Σ q_wᵀ q_w of the held-out queries, so
    Σ_q Σ_k (q·e)² = Σ_k e H eᵀ needs no pairwise products. centroids (Hkv, M, C, D/M) live in
    the space whitened by ``chol`` (Hkv, D, D) and are mapped back with ``chol_inv``; without
    them (plain k-means) they live in key space. Returns (Hkv,) f64.
    """
    keys = keys.float()
    if chol is not None:
        whitened = torch.einsum("gnd,gde->gne", keys, chol.to(keys.device))
        approx = torch.einsum(
            "gnd,gde->gne", _nearest_codes(whitened, centroids.to(keys.device)), chol_inv.to(keys.device)
        )
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
    lines = [
        f"held-out score error E[(q·k − q·ĉ)²] / E[(q·k)²] on {quality['holdout_tokens']} "
        f"tokens (mean over {quality['num_layers']} layers × {quality['num_kv_heads']} KV "
        f"heads):",
        f"  query-aware codebook (QAVQ): {quality['query_aware']:.4f}",
    ]
    if quality.get("plain_kmeans") is not None:
        ratio = quality["query_aware"] / max(quality["plain_kmeans"], 1e-300)
        lines.append(
            f"  plain k-means, same size:    {quality['plain_kmeans']:.4f}   (query-aware / plain = {ratio:.3f})"
        )
    return "\n".join(lines)
