"""Batched k-means: k-means++ seeding, then Lloyd iterations with empty clusters re-seeded.

:func:`kmeans` solves P independent problems (P, N, d) at once on whatever device the points are
on. Calibration runs one per (KV head, subspace) on the whitened keys; the eval's PQCache
selector runs it on each sequence's post-RoPE keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import a2ats_core

from .presets import MAX_CENTROIDS

__all__ = ["KMeansResult", "kmeans"]


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
        part = points[:, start : start + block]
        # ‖x − c‖² = ‖x‖² + (‖c‖² − 2 x·c); the bracket decides the argmin.
        partial = torch.baddbmm(centroid_sq[:, None, :], part, transposed, alpha=-2.0)
        smallest, nearest = partial.min(-1)  # first index among ties
        labels[:, start : start + block] = nearest
        distances[:, start : start + block] = smallest + part.square().sum(-1)
    return labels, distances.clamp_min_(0.0)


def _kmeans_plus_plus(points: torch.Tensor, num_centroids: int, generator: torch.Generator) -> torch.Tensor:
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
            draw = (
                torch.rand((num_problems, 1), generator=generator, dtype=torch.float64, device=points.device)
                * cumulative[:, -1:]
            )
            chosen = torch.searchsorted(cumulative, draw, right=True)[:, 0]
            centroids[:, index] = points[rows, chosen.clamp_max(num_points - 1)]
        newest = centroids[:, index]  # (P, d)
        newest_sq = newest.square().sum(-1)  # (P,)
        for problem in range(num_problems):
            # One matrix-vector product per problem: this step reads all points once per
            # centroid, and addmv streams them about 3x faster than a batched (N, d) x (d, 1) bmm.
            torch.addmv(point_sq[problem], points[problem], newest[problem], beta=1.0, alpha=-2.0, out=dist[problem])
        dist.add_(newest_sq[:, None]).clamp_min_(0.0)
        torch.minimum(nearest_sq, dist, out=nearest_sq)
    return centroids


def _reseed_empty(points: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, empty: torch.Tensor) -> int:
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
        first = torch.full((int(inverse.max()) + 1 if count else 0,), count, dtype=torch.long, device=points.device)
        first = first.scatter_reduce(0, inverse, torch.arange(count, device=points.device), reduce="amin")
        distinct = candidates[torch.sort(first).values]  # first copies, in farthest-first order
        if distinct.numel():
            # Direct differences: the matmul expansion loses distances this small.
            to_centroids = (
                torch.cdist(points[distinct], centroids, compute_mode="donot_use_mm_for_euclid_dist").min(-1).values
            )
            distinct = distinct[to_centroids.square() > at_centroid]
        chosen = distinct[:wanted]
        if chosen.numel() >= wanted or take >= order.numel():
            break
        take = min(order.numel(), take * 4)
    centroids[empty[: chosen.numel()]] = points[chosen]
    return wanted - int(chosen.numel())


def kmeans(
    points: torch.Tensor, num_centroids: int, *, max_iter: int = 300, tol: float = 1e-4, seed: int = 0
) -> KMeansResult:
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
        raise ValueError(f"num_centroids must be in [1, {num_points}] (the number of points), got {num_centroids}")
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
        flat = labels + torch.arange(active.numel(), device=device)[:, None] * num_centroids
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
            unfilled[active[position]] = _reseed_empty(subset[position], labels[position], updated[position], empty)
        shift = (updated - current).square().sum(-1).mean(-1)  # (P_active,)
        centroids[active.to(device)] = updated
        iterations[active] += 1
        done = (shift <= tolerance[active.to(device)]).cpu()
        converged[active[done]] = True
        active = active[~done]
        if active.numel() == 0:
            break
    return KMeansResult(
        centroids=centroids, iterations=iterations, converged=converged, unfilled=unfilled, inertia=inertia
    )
