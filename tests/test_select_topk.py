"""a2ats_core.select_topk (native kernel) against a2ats.reference.select_topk (pure PyTorch)
and a tie-aware checker of any valid selection; also non-contiguous ``lengths`` for
lut_scores and select_topk, and the vq_encode -> lut_scores -> select_topk chain against
the reference chain.

Every test that takes ``device`` runs on the CPU and, when available, on CUDA (see the
``device`` fixture in conftest.py). The reference always runs on CPU copies of the same inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import a2ats_core
from a2ats import reference

from kernel_helpers import check_codes, check_scores, lut_inputs, sync

# Every CPU case runs at each ISA level the CPU supports (see conftest.py).
pytestmark = pytest.mark.every_isa


def _cover(uncovered, options, capacity) -> bool:
    """Whether every element of ``uncovered`` can be assigned to one of its ``options`` heads
    with at most ``capacity[h]`` elements per head (bipartite b-matching, augmenting paths)."""
    assigned = {h: [] for h in capacity}

    def place(u, seen):
        for h in options[u]:
            if h in seen:
                continue
            seen.add(h)
            if len(assigned[h]) < capacity[h]:
                assigned[h].append(u)
                return True
            for j, w in enumerate(assigned[h]):
                if place(w, seen):
                    assigned[h][j] = u
                    return True
        return False

    return all(place(u, set()) for u in uncovered)


def check_selection(scores, k, lengths, group_size, sink, window, indices, counts):
    """Every property a correct selection has, whatever the tie-breaking.

    Per query head h with candidates [sink, length - window): when there are more than k
    candidates it takes some set S_h of exactly k of them with every score > t_h (its k-th
    largest) and the rest == t_h; the KV head's selection is the union of its heads' S_h plus
    the sink and window tokens. We check that such S_h exist for the returned set.
    """
    scores = scores.detach().cpu().float()
    indices, counts = indices.cpu(), counts.cpu()
    B, Hq, Tcap = scores.shape
    Hkv = Hq // group_size
    kmax = group_size * k + sink + window
    assert indices.dtype == torch.int32 and indices.shape == (B, Hkv, kmax)
    assert counts.dtype == torch.int32 and counts.shape == (B, Hkv)
    for b in range(B):
        length = int(lengths[b])
        lo, hi = sink, length - window
        cand = set(range(lo, hi))
        fixed = set(range(min(sink, length))) | set(range(max(length - window, 0), length))
        for g in range(Hkv):
            count = int(counts[b, g])
            where = f"(b={b}, g={g}, length={length})"
            assert 0 <= count <= kmax, where
            row = indices[b, g].tolist()
            sel = row[:count]
            assert all(v == -1 for v in row[count:]), f"padding past counts must be -1 {where}"
            assert sel == sorted(set(sel)), f"indices must be strictly ascending {where}"
            assert all(0 <= v < length for v in sel), f"index outside [0, length) {where}"
            assert fixed <= set(sel), f"sink and window must be included {where}"
            chosen = set(sel) - fixed
            assert chosen <= cand, f"selected a non-candidate {where}"
            if k == 0:
                assert not chosen, where
                continue
            if len(cand) <= k:
                assert chosen == cand, f"with <= k candidates all are taken {where}"
                continue
            must, options, capacity = set(), {}, {}
            for h in range(g * group_size, (g + 1) * group_size):
                s = scores[b, h, lo:hi]
                t = float(s.topk(k).values[-1])
                above = {lo + i for i in (s > t).nonzero().flatten().tolist()}
                ties = {lo + i for i in (s == t).nonzero().flatten().tolist()}
                assert above <= chosen, f"head {h}: a score above its k-th value was not selected {where}"
                need = k - len(above)
                assert len(ties & chosen) >= need, f"head {h} selected fewer than k candidates {where}"
                must |= above
                capacity[h] = need
                for u in ties & chosen:
                    options.setdefault(u, []).append(h)
            uncovered = chosen - must
            assert all(u in options for u in uncovered), f"selected a candidate no head ranks in its top k {where}"
            assert _cover(uncovered, options, capacity), (
                f"more tied candidates selected than the heads' k allow {where}"
            )


def distinct_scores(B, Hq, Tcap, lengths, *, close=False, garbage=None):
    """Scores without ties: a random permutation per head (optionally differing only in the low
    mantissa bits, which exercises every digit of a radix selection). Past each length: -inf,
    or ``garbage`` (a finite value that must never be selected)."""
    rows = []
    for _ in range(B * Hq):
        perm = torch.randperm(Tcap).float()
        rows.append(1.0 + perm * 2.0**-23 if close else (perm - Tcap / 2) * 0.37)
    scores = torch.stack(rows).reshape(B, Hq, Tcap)
    fill = float("-inf") if garbage is None else garbage
    for b, length in enumerate(lengths.tolist()):
        scores[b, :, length:] = fill
    return scores


SINK_WINDOW = [(0, 0), (4, 16), (1, 3)]


@pytest.mark.parametrize("sink_window", SINK_WINDOW, ids=[f"s{s}w{w}" for s, w in SINK_WINDOW])
@pytest.mark.parametrize("k", [0, 1, 5, 40, 1000])
@pytest.mark.parametrize("G", [1, 3, 7])
@pytest.mark.parametrize("B", [1, 3])
def test_select_topk_matches_reference(device, B, G, k, sink_window):
    sink, window = sink_window
    Hkv, Tcap = 2, 96
    lengths = torch.tensor([71] if B == 1 else [Tcap, 57, 13], dtype=torch.int32)
    scores = distinct_scores(B, Hkv * G, Tcap, lengths, garbage=1e30)
    idx, cnt = a2ats_core.select_topk(scores.to(device), k, lengths.to(device), group_size=G, sink=sink, window=window)
    sync(device)
    assert idx.device.type == device and cnt.device.type == device
    ref_idx, ref_cnt = reference.select_topk(scores, k, lengths, group_size=G, sink=sink, window=window)
    check_selection(scores, k, lengths, G, sink, window, idx, cnt)
    assert torch.equal(cnt.cpu(), ref_cnt)
    assert torch.equal(idx.cpu(), ref_idx)


@pytest.mark.parametrize("sink_window", [(0, 1), (4, 16), (3, 5)], ids=["s0w1", "s4w16", "s3w5"])
@pytest.mark.parametrize("k", [0, 2, 9, 1000])
@pytest.mark.parametrize("G", [1, 3, 7])
def test_select_topk_without_resident_rows(device, G, k, sink_window):
    """add_resident=False: the same selection with the sink and window rows left out."""
    sink, window = sink_window
    Hkv, Tcap = 2, 120
    sw = sink + window
    lengths = torch.tensor(
        sorted({0, 1, max(sw - 1, 0), sw, sw + 1, min(sw + k + 1, Tcap), 77, Tcap}), dtype=torch.int32
    )
    B = len(lengths)
    scores = distinct_scores(B, Hkv * G, Tcap, lengths, garbage=1e30)
    idx, cnt = a2ats_core.select_topk(
        scores.to(device), k, lengths.to(device), group_size=G, sink=sink, window=window, add_resident=False
    )
    sync(device)
    assert idx.shape == (B, Hkv, G * k)
    ref_idx, ref_cnt = reference.select_topk(
        scores, k, lengths, group_size=G, sink=sink, window=window, add_resident=False
    )
    assert torch.equal(cnt.cpu(), ref_cnt) and torch.equal(idx.cpu(), ref_idx)
    full_idx, full_cnt = reference.select_topk(scores, k, lengths, group_size=G, sink=sink, window=window)
    for b, length in enumerate(lengths.tolist()):
        middle_lo, middle_hi = sink, length - window
        for g in range(Hkv):
            full = full_idx[b, g, : full_cnt[b, g]]
            middle = full[(full >= middle_lo) & (full < middle_hi)]
            assert torch.equal(idx.cpu()[b, g, : cnt[b, g]], middle)
            assert (idx.cpu()[b, g, cnt[b, g] :] == -1).all()


@pytest.mark.parametrize("sink_window", [(0, 0), (8, 64), (3, 5)], ids=["s0w0", "s8w64", "s3w5"])
@pytest.mark.parametrize("G", [1, 3, 7])
def test_select_topk_edge_lengths(device, G, sink_window):
    """length 0, 1, < sink + window, == sink + window, just above, k == candidates, == Tcap."""
    sink, window = sink_window
    Hkv, k, Tcap = 2, 4, 120
    sw = sink + window
    cases = sorted({0, 1, max(sw - 1, 0), sw, sw + 1, sw + k, sw + k + 1, Tcap})
    lengths = torch.tensor(cases, dtype=torch.int32)
    scores = distinct_scores(len(cases), Hkv * G, Tcap, lengths)
    idx, cnt = a2ats_core.select_topk(scores.to(device), k, lengths.to(device), group_size=G, sink=sink, window=window)
    sync(device)
    check_selection(scores, k, lengths, G, sink, window, idx, cnt)
    ref_idx, ref_cnt = reference.select_topk(scores, k, lengths, group_size=G, sink=sink, window=window)
    assert torch.equal(cnt.cpu(), ref_cnt) and torch.equal(idx.cpu(), ref_idx)
    # Hand-checkable counts: a row of length 0 selects nothing; a short row keeps every token.
    for b, length in enumerate(cases):
        if length <= sw + k:
            assert (cnt.cpu()[b] == length).all()
            assert torch.equal(idx.cpu()[b, :, :length], torch.arange(length, dtype=torch.int32).expand(Hkv, length))


TIE_KINDS = ["few_values", "all_equal", "with_neg_inf", "two_levels"]


@pytest.mark.parametrize("kind", TIE_KINDS)
@pytest.mark.parametrize("k", [1, 3, 10, 50])
@pytest.mark.parametrize("G", [1, 3, 7])
def test_select_topk_ties(device, G, k, kind):
    B, Hkv, Tcap, sink, window = 3, 2, 80, 2, 6
    Hq = Hkv * G
    lengths = torch.tensor([Tcap, 47, 11], dtype=torch.int32)
    if kind == "few_values":
        scores = torch.randint(0, 3, (B, Hq, Tcap)).float()
    elif kind == "all_equal":
        scores = torch.full((B, Hq, Tcap), 0.5)
    elif kind == "signed_zeros":  # the threshold falls among -0 and +0, which compare equal as floats
        scores = torch.where(torch.rand(B, Hq, Tcap) < 0.5, 0.0, -0.0)
        scores[torch.rand(B, Hq, Tcap) < 0.01] = 1.0
    elif kind == "with_neg_inf":
        scores = torch.randint(0, 2, (B, Hq, Tcap)).float()
        scores[torch.rand(B, Hq, Tcap) < 0.6] = float("-inf")
    else:  # a few distinct maxima and a tied bulk below: the threshold sits in the tie
        scores = torch.zeros(B, Hq, Tcap)
        scores[torch.rand(B, Hq, Tcap) < 0.05] = 1.0
    for b, length in enumerate(lengths.tolist()):
        scores[b, :, length:] = float("-inf")
    idx, cnt = a2ats_core.select_topk(scores.to(device), k, lengths.to(device), group_size=G, sink=sink, window=window)
    sync(device)
    check_selection(scores, k, lengths, G, sink, window, idx, cnt)


def test_check_selection_rejects_wrong_answers():
    """The tie-aware checker itself must be able to fail."""
    lengths = torch.tensor([5], dtype=torch.int32)

    def sel(rows, kmax=4):
        idx = torch.full((1, 1, kmax), -1, dtype=torch.int32)
        idx[0, 0, : len(rows)] = torch.tensor(rows, dtype=torch.int32)
        return idx, torch.tensor([[len(rows)]], dtype=torch.int32)

    # G = 2, k = 2: each head has one clear maximum and a three-way tie for its second pick.
    scores = torch.tensor([[[5.0, 1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0, 5.0]]])
    check_selection(scores, 2, lengths, 2, 0, 0, *sel([0, 1, 4]))  # both heads pick tie 1
    check_selection(scores, 2, lengths, 2, 0, 0, *sel([0, 1, 3, 4]))  # different ties per head
    for wrong in ([0, 4], [0, 1, 2, 3], [1, 4], [4, 0, 1], [0, 1, 1, 4], [0, 1, 4, 4]):
        with pytest.raises(AssertionError):
            check_selection(scores, 2, lengths, 2, 0, 0, *sel(wrong))
    # Three tied candidates but only two tie slots (one per head): the union cannot hold all three.
    scores = torch.tensor([[[3.0, 1.0, 1.0, 1.0, 0.0], [3.0, 1.0, 1.0, 1.0, 0.0]]])
    check_selection(scores, 2, lengths, 2, 0, 0, *sel([0, 2, 3]))
    with pytest.raises(AssertionError, match="tied"):
        check_selection(scores, 2, lengths, 2, 0, 0, *sel([0, 1, 2, 3]))
    # Padding, sink/window and range checks.
    idx, cnt = sel([0, 1, 4])
    idx[0, 0, 3] = 7
    with pytest.raises(AssertionError, match="padding"):
        check_selection(scores, 2, lengths, 2, 0, 0, idx, cnt)
    with pytest.raises(AssertionError, match="sink and window"):
        check_selection(scores, 1, lengths, 2, 0, 1, *sel([0, 1, 2], kmax=3))


@pytest.mark.parametrize("close", [False, True], ids=["spread", "low_bits"])
def test_select_topk_strided_and_out(device, close):
    B, Hkv, G, Tcap, k, sink, window = 3, 2, 3, 200, 7, 4, 16
    Hq, kmax = Hkv * G, G * 7 + 4 + 16
    lengths = torch.tensor([Tcap, 150, 30], dtype=torch.int32)
    dense = distinct_scores(B, Hq, Tcap, lengths, close=close)
    base = torch.randn(B, 2 * Hq, Tcap + 9)
    base[:, ::2, 5 : 5 + Tcap] = dense
    scores = base.to(device)[:, ::2, 5 : 5 + Tcap]
    idx_base = torch.full((B, Hkv, kmax + 3), 777, dtype=torch.int32, device=device)
    cnt_base = torch.full((B, Hkv + 2), 555, dtype=torch.int32, device=device)
    out_idx, out_cnt = idx_base[..., 1 : 1 + kmax], cnt_base[:, 1 : 1 + Hkv]
    res_idx, res_cnt = a2ats_core.select_topk(
        scores, k, lengths.to(device), group_size=G, sink=sink, window=window, out_indices=out_idx, out_counts=out_cnt
    )
    sync(device)
    assert res_idx is out_idx and res_cnt is out_cnt
    ref_idx, ref_cnt = reference.select_topk(dense, k, lengths, group_size=G, sink=sink, window=window)
    check_selection(dense, k, lengths, G, sink, window, out_idx, out_cnt)
    assert torch.equal(out_idx.cpu(), ref_idx) and torch.equal(out_cnt.cpu(), ref_cnt)
    assert (idx_base[..., 0] == 777).all() and (idx_base[..., 1 + kmax :] == 777).all()
    assert (cnt_base[:, 0] == 555).all() and (cnt_base[:, 1 + Hkv :] == 555).all()


def test_strided_lengths(device):
    """lengths is tiny, so a non-contiguous one may be refused (ValueError naming it), but
    never misread."""
    B, Hkv, G, D, M, C, Tcap = 3, 2, 2, 64, 1, 16, 40
    q, centroids, codes = lut_inputs(B, Hkv, G, D, M, C, Tcap)
    lengths = torch.tensor([40, 7, 23], dtype=torch.int32)
    strided = torch.stack([lengths, torch.tensor([1, 2, 3], dtype=torch.int32)], 1).to(device)[:, 0]
    assert not strided.is_contiguous()
    args = [t.to(device) for t in (q, centroids, codes)]
    try:
        scores = a2ats_core.lut_scores(*args, strided)
    except ValueError as e:
        assert "lengths" in str(e)
    else:
        sync(device)
        check_scores(scores, reference.lut_scores(q, centroids, codes, lengths), lengths)
    scores = distinct_scores(B, Hkv * G, Tcap, lengths)
    try:
        idx, cnt = a2ats_core.select_topk(scores.to(device), 3, strided, group_size=G, sink=1, window=2)
    except ValueError as e:
        assert "lengths" in str(e)
    else:
        sync(device)
        ref_idx, ref_cnt = reference.select_topk(scores, 3, lengths, group_size=G, sink=1, window=2)
        assert torch.equal(idx.cpu(), ref_idx) and torch.equal(cnt.cpu(), ref_cnt)


@pytest.mark.parametrize("G", [1, 4])
def test_select_topk_larger(device, G):
    B, Hkv, Tcap, sink, window = 2, 2, 4096, 8, 64
    k = int(0.03 * Tcap)
    lengths = torch.tensor([Tcap, 3001], dtype=torch.int32)
    scores = torch.randn(B, Hkv * G, Tcap)
    for b, length in enumerate(lengths.tolist()):
        scores[b, :, length:] = float("-inf")
    idx, cnt = a2ats_core.select_topk(scores.to(device), k, lengths.to(device), group_size=G, sink=sink, window=window)
    sync(device)
    check_selection(scores, k, lengths, G, sink, window, idx, cnt)
    # Random normal scores have no ties at the threshold in practice; then the answer is unique.
    ref_idx, ref_cnt = reference.select_topk(scores, k, lengths, group_size=G, sink=sink, window=window)
    assert torch.equal(idx.cpu(), ref_idx) and torch.equal(cnt.cpu(), ref_cnt)


LONG_KINDS = ["normal", "low_bits", "few_values", "two_levels", "signed_zeros", "with_neg_inf", "sample_fooled"]


@pytest.mark.parametrize("kind", LONG_KINDS)
@pytest.mark.parametrize("k", [1, 40, 600])
@pytest.mark.parametrize("G", [1, 4])
def test_select_topk_long_rows(device, G, k, kind):
    """Rows long enough for the CPU's sampled-threshold path, including data that fools the
    sample (its probe positions hold the largest values, so too few keys pass the threshold
    and the radix path must take over)."""
    B, Hkv, Tcap, sink, window = 2, 2, 20000, 8, 64
    Hq = Hkv * G
    lengths = torch.tensor([Tcap, 9000], dtype=torch.int32)
    if kind == "normal":
        scores = torch.randn(B, Hq, Tcap)
    elif kind == "low_bits":
        scores = distinct_scores(B, Hq, Tcap, lengths, close=True)
    elif kind == "few_values":
        scores = torch.randint(0, 4, (B, Hq, Tcap)).float()
    elif kind == "two_levels":
        scores = torch.zeros(B, Hq, Tcap)
        scores[torch.rand(B, Hq, Tcap) < 0.01] = 1.0
    elif kind == "with_neg_inf":
        scores = torch.randn(B, Hq, Tcap)
        scores[torch.rand(B, Hq, Tcap) < 0.9] = float("-inf")
    else:
        scores = torch.zeros(B, Hq, Tcap)
        for b, length in enumerate(lengths.tolist()):
            n = length - sink - window
            stride = -(-n // 2048)  # the sampler reads candidate s * stride + stride // 2
            probes = sink + torch.arange(n // stride) * stride + stride // 2
            scores[b, :, probes] = 1.0 + torch.rand(Hq, probes.numel())
    for b, length in enumerate(lengths.tolist()):
        scores[b, :, length:] = float("-inf")
    idx, cnt = a2ats_core.select_topk(scores.to(device), k, lengths.to(device), group_size=G, sink=sink, window=window)
    sync(device)
    check_selection(scores, k, lengths, G, sink, window, idx, cnt)
    if kind in ("normal", "low_bits", "sample_fooled"):  # no ties at the threshold: one answer
        ref_idx, ref_cnt = reference.select_topk(scores, k, lengths, group_size=G, sink=sink, window=window)
        assert torch.equal(idx.cpu(), ref_idx) and torch.equal(cnt.cpu(), ref_cnt)


def test_select_topk_numpy():
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((2, 4, 50)).astype(np.float32)
    lengths = np.array([50, 20], dtype=np.int32)
    idx, cnt = a2ats_core.select_topk(scores, 3, lengths, group_size=2, sink=2, window=4)
    assert isinstance(idx, np.ndarray) and isinstance(cnt, np.ndarray)
    assert idx.dtype == np.int32 and idx.shape == (2, 2, 2 * 3 + 2 + 4)
    ref_idx, ref_cnt = reference.select_topk(
        torch.from_numpy(scores), 3, torch.from_numpy(lengths), group_size=2, sink=2, window=4
    )
    assert np.array_equal(idx, ref_idx.numpy()) and np.array_equal(cnt, ref_cnt.numpy())


# ---------------------------------------------------------------------- pipeline consistency


def test_pipeline_scores_then_select(device):
    """vq_encode -> lut_scores -> select_topk chained on device arrays, against the reference chain."""
    B, Hkv, G, D, M, C, T = 2, 2, 3, 64, 1, 256, 150
    centroids = torch.randn(Hkv, M, C, D)
    keys = torch.randn(B, Hkv, T, D)
    q = torch.randn(B, Hkv * G, D)
    lengths = torch.tensor([T, 99], dtype=torch.int32)
    codes = a2ats_core.vq_encode(keys.to(device), centroids.to(device))
    scores = a2ats_core.lut_scores(q.to(device), centroids.to(device), codes, lengths.to(device))
    idx, cnt = a2ats_core.select_topk(scores, 5, lengths.to(device), group_size=G, sink=4, window=8)
    sync(device)
    check_codes(codes, keys, centroids)
    ref_scores = reference.lut_scores(q, centroids, codes.cpu(), lengths)
    check_scores(scores, ref_scores, lengths)
    check_selection(scores, 5, lengths, G, 4, 8, idx, cnt)
