"""Pure-PyTorch reference of every native op, written from the method description.

These functions are the specification the native kernels (CPU and CUDA) are tested
against. They favour clarity over speed and always compute in float32.

Shapes use: B batch, Hq query heads, Hkv KV heads, G = Hq // Hkv (GQA group size),
T tokens, D head dim, M subspaces, C centroids per subspace, NB distance bins.
"""

from __future__ import annotations

import math

import torch

__all__ = ["rotary", "vq_encode", "lut_scores", "select_topk", "gather", "attend", "merge_attention"]


def rotary(
    x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *, interleaved: bool = False
) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, D) by ``positions`` (B, T) with ``inv_freq`` (R/2,), R <= D.

    Pairs are (x[i], x[i + R/2]) (transformers' ``rotate_half``) or (x[2i], x[2i+1]) when
    ``interleaved``; dims >= R pass through. The angle is ``float32(pos) * inv_freq[i]`` in
    float32, as transformers computes it, so rotating by -p exactly undoes rotating by p.
    """
    half = inv_freq.numel()
    rot = 2 * half
    xf = x.float()
    angle = positions.float()[:, None, :, None] * inv_freq.float()  # (B, 1, T, R/2)
    cos, sin = angle.cos(), angle.sin()
    if interleaved:
        x1, x2 = xf[..., 0:rot:2], xf[..., 1:rot:2]
    else:
        x1, x2 = xf[..., :half], xf[..., half:rot]
    out = xf.clone()
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if interleaved:
        out[..., 0:rot:2], out[..., 1:rot:2] = o1, o2
    else:
        out[..., :half], out[..., half:rot] = o1, o2
    return out.to(x.dtype)


def vq_encode(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest-centroid codes of ``x`` (B, Hkv, T, D) under ``centroids`` (Hkv, M, C, D/M).

    Returns codes (B, Hkv, T, M) int16: per subspace m, argmin_c ||x_m - centroids[g, m, c]||.
    """
    B, Hkv, T, D = x.shape
    _, M, C, dsub = centroids.shape
    xs = x.float().reshape(B, Hkv, T, M, dsub)
    cent = centroids.float()
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is constant per row.
    dots = torch.einsum("bgtmd,gmcd->bgtmc", xs, cent)
    dist = cent.square().sum(-1)[None, :, None] - 2.0 * dots  # (B, Hkv, T, M, C)
    return dist.argmin(-1).to(torch.int16)


def _bin_of_token(lengths: torch.Tensor, tcap: int, bin_edges: torch.Tensor | None) -> torch.Tensor:
    """Bin index (B, Tcap) of each token: the number of edges <= its distance len - 1 - n."""
    n = torch.arange(tcap, device=lengths.device)
    dist = lengths.long()[:, None] - 1 - n[None, :]  # (B, Tcap)
    if bin_edges is None or bin_edges.numel() == 0:
        return torch.zeros_like(dist)
    return (dist[..., None] >= bin_edges.long()).sum(-1)


def lut_scores(
    q: torch.Tensor,
    centroids: torch.Tensor,
    codes: torch.Tensor,
    lengths: torch.Tensor,
    *,
    bin_edges: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Approximate attention scores from codes.

    q (B, Hq, D) or, distance-binned, (B, Hq, NB, D) with bin_edges (NB - 1,) ascending;
    centroids (Hkv, M, C, D/M); codes (B, Hkv, Tcap, M); lengths (B,).
    Returns scores (B, Hq, Tcap) f32 with s(n) = sum_m q'_m . centroids[g, m, code(n, m)] / sqrt(D)
    and -inf at and past each row's length.

    Paged: codes (num_blocks, Hkv, block_size, M) and block_table (B, max_blocks), token n of
    row b at offset n % block_size of block block_table[b, n // block_size]; Tcap = max_blocks *
    block_size. Blocks past a row's length are not read.
    """
    if block_table is not None:
        block_size = codes.shape[2]
        tokens = torch.arange(block_table.shape[1] * block_size)
        valid = tokens[None, :] < lengths.long()[:, None]  # (B, Tcap)
        blocks = torch.where(valid, block_table.long()[:, tokens // block_size], 0)
        codes = codes[blocks, :, tokens % block_size]  # (B, Tcap, Hkv, M)
        codes = torch.where(valid[..., None, None], codes, 0).transpose(1, 2)
    binned = q.dim() == 4
    qb = q if binned else q[:, :, None]
    B, Hq, NB, D = qb.shape
    Hkv, M, C, dsub = centroids.shape
    G = Hq // Hkv
    Tcap = codes.shape[2]
    qs = qb.float().reshape(B, Hkv, G, NB, M, dsub)
    lut = torch.einsum("bgjnmd,gmcd->bgjnmc", qs, centroids.float()) / math.sqrt(D)
    idx = codes.long().permute(0, 1, 3, 2)[:, :, None, None]  # (B, Hkv, 1, 1, M, Tcap)
    idx = idx.expand(B, Hkv, G, NB, M, Tcap)
    per_bin = lut.gather(-1, idx).sum(-2)  # (B, Hkv, G, NB, Tcap)
    which = _bin_of_token(lengths, Tcap, bin_edges)  # (B, Tcap)
    which = which[:, None, None, None, :].expand(B, Hkv, G, 1, Tcap)
    scores = per_bin.gather(3, which).reshape(B, Hq, Tcap)
    past = torch.arange(Tcap, device=scores.device)[None, :] >= lengths.long()[:, None]
    return scores.masked_fill(past[:, None, :], float("-inf"))


def select_topk(
    scores: torch.Tensor,
    k: int,
    lengths: torch.Tensor,
    *,
    group_size: int,
    sink: int,
    window: int,
    add_resident: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows to attend over per (batch, KV head).

    scores (B, Hq, Tcap). Candidates of row b are tokens [sink, lengths[b] - window); each query
    head takes its top ``k`` candidates (all of them when there are <= k), the G heads of a KV
    head are united, and the first ``sink`` and last ``window`` tokens are added (unless
    ``add_resident`` is False). Returns indices (B, Hkv, G*k + sink + window) int32 (G*k without
    the resident rows), ascending, padded with -1, and counts (B, Hkv) int32.
    """
    B, Hq, _ = scores.shape
    Hkv = Hq // group_size
    kmax = group_size * k + (sink + window if add_resident else 0)
    indices = torch.full((B, Hkv, kmax), -1, dtype=torch.int32)
    counts = torch.zeros((B, Hkv), dtype=torch.int32)
    for b in range(B):
        length = int(lengths[b])
        keep = torch.zeros(Hkv, length, dtype=torch.bool)
        if add_resident:
            keep[:, : min(sink, length)] = True
            keep[:, max(length - window, 0) :] = True
        lo, hi = sink, length - window
        take = min(k, hi - lo)
        if take > 0:
            top = scores[b, :, lo:hi].float().topk(take, dim=-1).indices + lo  # (Hq, take)
            kv_head = torch.arange(Hq) // group_size
            keep[kv_head[:, None].expand_as(top), top.cpu()] = True
        for g in range(Hkv):
            rows = keep[g].nonzero().flatten()
            counts[b, g] = rows.numel()
            indices[b, g, : rows.numel()] = rows.to(torch.int32)
    return indices.to(scores.device), counts.to(scores.device)


def group_scores(
    scores: torch.Tensor, lengths: torch.Tensor, *, group_size: int, sink: int, window: int
) -> torch.Tensor:
    """One score row per KV head, for a per-KV-head budget.

    scores (B, Hq, Tcap). Over the candidates [sink, lengths[b] - window) of row b, each query
    head's scores become log softmax (its log attention distribution over the far tokens, NaN
    ignored); KV head g takes, per token, the max over its ``group_size`` heads. Returns
    (B, Hkv, Tcap) float32, -inf outside the candidates. A head with no finite candidate adds
    nothing.
    """
    B, Hq, tcap = scores.shape
    Hkv = Hq // group_size
    out = torch.full((B, Hkv, tcap), float("-inf"), dtype=torch.float32)
    for b in range(B):
        length = int(lengths[b])
        lo = min(sink, length)
        hi = max(lo, length - window)
        if hi == lo:
            continue
        rows = scores[b, :, lo:hi].double().cpu()  # (Hq, n)
        rows = torch.where(rows.isnan(), float("-inf"), rows)
        lse = torch.logsumexp(rows, dim=-1, keepdim=True)  # (Hq, 1)
        shifted = torch.where(lse.isfinite(), rows - lse, float("-inf"))
        out[b, :, lo:hi] = shifted.view(Hkv, group_size, -1).amax(dim=1).float()
    return out.to(scores.device)


def gather(store: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of ``store`` (B, Hkv, T, D) at ``indices`` (B, Hkv, Kmax); rows past counts are zero."""
    B, Hkv, kmax = indices.shape
    valid = torch.arange(kmax, device=indices.device)[None, None, :] < counts[..., None].long()
    safe = torch.where(valid, indices.long(), torch.zeros_like(indices, dtype=torch.long))
    rows = store.gather(2, safe[..., None].expand(B, Hkv, kmax, store.shape[-1]))
    return rows * valid[..., None].to(rows.dtype)


def attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, *, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of each query head over the valid rows of its KV head, in float32.

    q (B, Hq, D); keys, values (B, Hkv, R, D); valid (B, Hkv, R) bool (it broadcasts, e.g.
    (B, 1, R)); query head h reads KV head h // G. Returns out (B, Hq, D) = softmax(scale q·k) v
    over the valid rows and lse (B, Hq) = log Σ exp(scale q·k), the state that
    :func:`merge_attention` combines; a head with no valid row gets out = 0 and lse = -inf.
    ``KVStore.attend`` is this over ``gather(store, indices, counts)`` with the first
    counts[b, g] rows valid.
    """
    B, Hq, D = q.shape
    Hkv, rows = keys.shape[1], keys.shape[2]
    valid = valid.expand(B, Hkv, rows)[:, :, None, :]  # (B, Hkv, 1, R)
    logits = torch.matmul(q.float().reshape(B, Hkv, Hq // Hkv, D), keys.float().transpose(2, 3)) * scale
    logits = logits.masked_fill(~valid, float("-inf"))  # (B, Hkv, G, R)
    lse = torch.logsumexp(logits, -1)  # (B, Hkv, G)
    probs = torch.exp(logits - lse[..., None]).nan_to_num(0.0)  # a head without rows: 0, not nan
    # Invalid rows may hold anything (padding, stale rows): zero them so that 0 * inf is not nan.
    out = torch.matmul(probs, values.float().masked_fill(~valid.transpose(2, 3), 0.0))
    return out.reshape(B, Hq, D), lse.reshape(B, Hq)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint row sets from each one's (out, lse).

    out (..., D), lse (...) as :func:`attend` returns them; one side may be empty (lse = -inf).
    """
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse).nan_to_num(0.0)[..., None]
    weight_b = torch.exp(lse_b - lse).nan_to_num(0.0)[..., None]
    return out_a * weight_a + out_b * weight_b, lse
