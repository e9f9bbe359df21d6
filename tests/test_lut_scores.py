"""a2ats_core.lut_scores (native kernel, plain and distance-binned) against
a2ats.reference.lut_scores (pure PyTorch).

Every test that takes ``device`` runs on the CPU and, when available, on CUDA (see the
``device`` fixture in conftest.py). The reference always runs on CPU copies of the same inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

import a2ats_core
from a2ats import reference

from kernel_helpers import check_scores, lut_inputs, sync

# Every CPU case runs at each ISA level the CPU supports (see conftest.py).
pytestmark = pytest.mark.every_isa


def ragged_lengths(B, Tcap):
    if B == 1:
        return torch.tensor([Tcap - 5], dtype=torch.int32)
    return torch.tensor(([0, Tcap, Tcap // 2 + 1] * B)[:B], dtype=torch.int32)


@pytest.mark.parametrize("C", [16, 256, 4096])
@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 3, 7])
@pytest.mark.parametrize("B", [1, 3])
def test_lut_scores_matches_reference(device, B, G, D, M, C):
    Hkv, Tcap = 2, 40
    q, centroids, codes = lut_inputs(B, Hkv, G, D, M, C, Tcap)
    lengths = ragged_lengths(B, Tcap)
    out = a2ats_core.lut_scores(q.to(device), centroids.to(device), codes.to(device), lengths.to(device))
    sync(device)
    assert isinstance(out, torch.Tensor) and out.device.type == device
    check_scores(out, reference.lut_scores(q, centroids, codes, lengths), lengths)


def test_lut_scores_hand_checked():
    # Two orthonormal centroids: the LUT is q itself divided by sqrt(D).
    centroids = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # (Hkv=1, M=1, C=2, D=2)
    q = torch.tensor([[[2.0, 3.0]]])  # (B=1, Hq=1, D=2)
    codes = torch.tensor([0, 1, 1, 0, 1], dtype=torch.int16).reshape(1, 1, 5, 1)
    lengths = torch.tensor([4], dtype=torch.int32)
    s = 1 / math.sqrt(2)
    expect = torch.tensor([2 * s, 3 * s, 3 * s, 2 * s, float("-inf")]).reshape(1, 1, 5)
    torch.testing.assert_close(a2ats_core.lut_scores(q, centroids, codes, lengths), expect)
    torch.testing.assert_close(reference.lut_scores(q, centroids, codes, lengths), expect)
    # Distance-binned, edges [2]: tokens 0..3 sit at distances 3, 2, 1, 0 -> bins 1, 1, 0, 0.
    qb = torch.tensor([[[[2.0, 3.0], [5.0, 7.0]]]])  # (1, 1, NB=2, 2)
    edges = torch.tensor([2], dtype=torch.int32)
    expect_b = torch.tensor([5 * s, 7 * s, 3 * s, 2 * s, float("-inf")]).reshape(1, 1, 5)
    torch.testing.assert_close(a2ats_core.lut_scores(qb, centroids, codes, lengths, bin_edges=edges), expect_b)
    torch.testing.assert_close(reference.lut_scores(qb, centroids, codes, lengths, bin_edges=edges), expect_b)
    # M = 2 subspaces of one dim each: the sum of the two sub-table entries.
    cent2 = torch.tensor([[[[1.0], [-1.0]], [[2.0], [0.5]]]])  # (1, M=2, C=2, 1)
    codes2 = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=torch.int16).reshape(1, 1, 4, 2)
    expect2 = torch.tensor([2 + 6, 2 + 1.5, -2 + 6, -2 + 1.5]).reshape(1, 1, 4) * s
    torch.testing.assert_close(a2ats_core.lut_scores(q, cent2, codes2, lengths), expect2)
    torch.testing.assert_close(reference.lut_scores(q, cent2, codes2, lengths), expect2)


EDGE_SETS = {
    "one_edge": [5],
    "zero_edge": [0],
    "dup_edges": [3, 3, 17],
    "past_tcap": [2, 8, 1000],
    "negative": [-4, 6],
}


@pytest.mark.parametrize("edges", list(EDGE_SETS), ids=list(EDGE_SETS))
@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("B", [1, 3])
def test_lut_scores_binned(device, B, G, M, edges):
    Hkv, D, C, Tcap = 2, 64, 256, 40
    bin_edges = torch.tensor(EDGE_SETS[edges], dtype=torch.int32)
    NB = bin_edges.numel() + 1
    q, centroids, codes = lut_inputs(B, Hkv, G, D, M, C, Tcap, num_bins=NB)
    lengths = ragged_lengths(B, Tcap)
    out = a2ats_core.lut_scores(
        q.to(device), centroids.to(device), codes.to(device), lengths.to(device), bin_edges=bin_edges.to(device)
    )
    sync(device)
    ref = reference.lut_scores(q, centroids, codes, lengths, bin_edges=bin_edges)
    check_scores(out, ref, lengths)
    # Independently of the reference: each token equals the unbinned score with its bin's query.
    for j in range(NB):
        single = a2ats_core.lut_scores(
            q[:, :, j].contiguous().to(device), centroids.to(device), codes.to(device), lengths.to(device)
        ).cpu()
        for b, length in enumerate(lengths.tolist()):
            n = torch.arange(length)
            dist = length - 1 - n
            in_bin = (dist[:, None] >= bin_edges[None, :].long()).sum(-1) == j
            torch.testing.assert_close(
                out.cpu()[b, :, :length][:, in_bin], single[b, :, :length][:, in_bin], rtol=1e-6, atol=1e-6
            )


@pytest.mark.parametrize("empty_edges", [False, True], ids=["no_edges", "empty_edges"])
def test_lut_scores_one_bin_equals_unbinned(device, empty_edges):
    B, Hkv, G, D, M, C, Tcap = 3, 2, 3, 64, 2, 16, 30
    q, centroids, codes = lut_inputs(B, Hkv, G, D, M, C, Tcap)
    lengths = ragged_lengths(B, Tcap)
    args = [t.to(device) for t in (centroids, codes, lengths)]
    flat = a2ats_core.lut_scores(q.to(device), *args)
    edges = torch.zeros(0, dtype=torch.int32, device=device) if empty_edges else None
    binned = a2ats_core.lut_scores(q[:, :, None].to(device), *args, bin_edges=edges)
    sync(device)
    torch.testing.assert_close(flat.cpu(), binned.cpu(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("binned", [False, True], ids=["flat", "binned"])
@pytest.mark.parametrize("codes_layout", ["transposed", "tokens_slice", "heads_slice", "sub_padded"])
@pytest.mark.parametrize("q_layout", ["heads_slice", "row_padded", "transposed"])
def test_lut_scores_strided_and_out(device, q_layout, codes_layout, binned):
    B, Hkv, G, D, M, C, Tcap = 3, 2, 3, 64, 2, 256, 33
    Hq, NB = Hkv * G, 3
    bin_edges = torch.tensor([4, 12], dtype=torch.int32)
    q_dense, centroids, codes_dense = lut_inputs(B, Hkv, G, D, M, C, Tcap, num_bins=NB if binned else None)
    lengths = ragged_lengths(B, Tcap)
    ref = reference.lut_scores(q_dense, centroids, codes_dense, lengths, bin_edges=bin_edges if binned else None)

    qshape = q_dense.shape
    q_views = {  # (base shape, view) for q of shape (B, Hq, [NB,] D)
        "heads_slice": ((B, 2 * Hq, *qshape[2:]), lambda a: a[:, ::2]),
        "row_padded": ((*qshape[:-1], D + 16), lambda a: a[..., 16:]),
        "transposed": (
            ((B, NB, Hq, D), lambda a: a.transpose(1, 2)) if binned else ((Hq, B, D), lambda a: a.transpose(0, 1))
        ),
    }
    c_views = {  # codes (B, Hkv, Tcap, M)
        "transposed": ((B, Tcap, Hkv, M), lambda a: a.transpose(1, 2)),
        "tokens_slice": ((B, Hkv, 2 * Tcap, M), lambda a: a[:, :, 1::2]),
        "heads_slice": ((B, 3 * Hkv, Tcap, M), lambda a: a[:, ::3]),
        "sub_padded": ((B, Hkv, Tcap, M + 3), lambda a: a[..., :M]),
    }
    qb_shape, qv = q_views[q_layout]
    q_base = torch.randn(qb_shape)
    qv(q_base).copy_(q_dense)
    cb_shape, cv = c_views[codes_layout]
    c_base = torch.randint(0, C, cb_shape, dtype=torch.int16)
    cv(c_base).copy_(codes_dense)
    q = qv(q_base.to(device))
    codes = cv(c_base.to(device))
    assert q.shape == q_dense.shape and codes.shape == codes_dense.shape
    assert not q.is_contiguous() and not codes.is_contiguous()
    edges = bin_edges.to(device) if binned else None
    out = a2ats_core.lut_scores(q, centroids.to(device), codes, lengths.to(device), bin_edges=edges)
    sync(device)
    check_scores(out, ref, lengths)
    # A strided out= buffer (row-padded); margins untouched.
    out_base = torch.full((B, Hq, Tcap + 6), 99.0, device=device)
    out_view = out_base[..., 3 : 3 + Tcap]
    res = a2ats_core.lut_scores(q, centroids.to(device), codes, lengths.to(device), bin_edges=edges, out=out_view)
    sync(device)
    assert res is out_view
    check_scores(out_view, ref, lengths)
    assert (out_base[..., :3] == 99.0).all() and (out_base[..., 3 + Tcap :] == 99.0).all()


def test_lut_scores_ignores_codes_past_length(device):
    """Slots at and past each length are unwritten cache: any value there is ignored."""
    B, Hkv, G, D, M, C, Tcap = 3, 2, 3, 64, 2, 256, 24
    q, centroids, codes = lut_inputs(B, Hkv, G, D, M, C, Tcap)
    lengths = torch.tensor([0, 10, Tcap], dtype=torch.int32)
    ref = reference.lut_scores(q, centroids, codes, lengths)
    dirty = codes.clone()
    garbage = torch.tensor([-1, C, 32767, -32768], dtype=torch.int16)
    for b, length in enumerate(lengths.tolist()):
        n = dirty[b, :, length:].numel()
        dirty[b, :, length:] = garbage.repeat(n // 4 + 1)[:n].reshape(dirty[b, :, length:].shape)
    out = a2ats_core.lut_scores(q.to(device), centroids.to(device), dirty.to(device), lengths.to(device))
    sync(device)
    check_scores(out, ref, lengths)


def check_plain_and_binned(device, q, qb, centroids, codes, lengths, edges):
    """lut_scores with q (B, Hq, D) and with binned qb (B, Hq, NB, D) against the reference."""
    args = [t.to(device) for t in (centroids, codes, lengths)]
    out = a2ats_core.lut_scores(q.to(device), *args)
    outb = a2ats_core.lut_scores(qb.to(device), *args, bin_edges=edges.to(device))
    sync(device)
    check_scores(out, reference.lut_scores(q, centroids, codes, lengths), lengths)
    check_scores(outb, reference.lut_scores(qb, centroids, codes, lengths, bin_edges=edges), lengths)


def test_lut_scores_larger(device):
    B, Hkv, G, D, M, C, Tcap = 2, 2, 4, 128, 1, 4096, 3000
    q, centroids, codes = lut_inputs(B, Hkv, G, D, M, C, Tcap)
    lengths = torch.tensor([Tcap, 1777], dtype=torch.int32)
    edges = torch.tensor([64, 256, 1024], dtype=torch.int32)
    qb = torch.randn(B, Hkv * G, 4, D)
    check_plain_and_binned(device, q, qb, centroids, codes, lengths, edges)


@pytest.mark.parametrize("B, G, M", [(2, 65, 1), (3, 64, 1), (2, 70, 2), (17, 5, 1), (9, 3, 2)])
def test_lut_scores_batch_rows_share_builds(device, B, G, M):
    """The CPU builds one table for the heads of several batch rows (up to 64 heads) and splits
    larger groups: rows whose heads straddle 4-head quads, groups past 64, binned and ragged."""
    Hkv, D, C, Tcap = 2, 16, 32, 50
    q, centroids, codes = lut_inputs(B, Hkv, G, D, M, C, Tcap)
    qb = torch.randn(B, Hkv * G, 3, D)
    lengths = torch.randint(1, Tcap + 1, (B,), dtype=torch.int32)
    edges = torch.tensor([3, 10], dtype=torch.int32)
    check_plain_and_binned(device, q, qb, centroids, codes, lengths, edges)


def paged_inputs(B, Hkv, G, D, M, C, block_size, max_blocks, *, num_blocks=11, num_bins=None, seed=0):
    """q, centroids, paged codes (num_blocks, Hkv, block_size, M), block_table (B, max_blocks)
    int32 and ragged lengths. Rows share blocks (as prefix caching does); entries past a row's
    length are -1 or past num_blocks, which must never be read."""
    gen = torch.Generator().manual_seed(seed)
    q, centroids, _ = lut_inputs(B, Hkv, G, D, M, C, 1, num_bins=num_bins)
    codes = torch.randint(0, C, (num_blocks, Hkv, block_size, M), dtype=torch.int16, generator=gen)
    table = torch.randint(0, num_blocks, (B, max_blocks), dtype=torch.int32, generator=gen)
    capacity = max_blocks * block_size
    lengths = torch.tensor(([capacity, 0, capacity // 2 + 1, 1, capacity - 3] * B)[:B], dtype=torch.int32)
    for b, length in enumerate(lengths.tolist()):
        used = -(-length // block_size)
        table[b, used:] = torch.tensor([-1, num_blocks, 2**31 - 1] * max_blocks, dtype=torch.int32)[: max_blocks - used]
    return q, centroids, codes, table, lengths


def unpaged(codes, table, lengths):
    """The paged codes of each row laid out contiguously (B, Hkv, Tcap, M); 0 where never read."""
    B, (_, Hkv, block_size, M) = table.shape[0], codes.shape
    out = torch.zeros(B, Hkv, table.shape[1] * block_size, M, dtype=codes.dtype)
    for b, length in enumerate(lengths.tolist()):
        for i in range(-(-length // block_size)):
            out[b, :, i * block_size : (i + 1) * block_size] = codes[table[b, i]]
    return out


@pytest.mark.parametrize("binned", [False, True], ids=["flat", "binned"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("G", [1, 3, 7])
@pytest.mark.parametrize("B", [1, 5])
def test_lut_scores_paged_matches_reference_and_unpaged(device, B, G, M, block_size, binned):
    """Paged codes through a block table: the reference's scores, and bit for bit the scores of
    the same codes laid out per row (the kernel's arithmetic is the same per token)."""
    Hkv, D, C = 2, 64, 32
    max_blocks = 48 // block_size
    q, centroids, codes, table, lengths = paged_inputs(
        B, Hkv, G, D, M, C, block_size, max_blocks, num_bins=3 if binned else None
    )
    edges = torch.tensor([3, 20], dtype=torch.int32) if binned else None
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    out = a2ats_core.lut_scores(
        on(q), on(centroids), on(codes), on(lengths), bin_edges=on(edges), block_table=on(table)
    )
    sync(device)
    assert out.shape == (B, Hkv * G, max_blocks * block_size)
    check_scores(out, reference.lut_scores(q, centroids, codes, lengths, bin_edges=edges, block_table=table), lengths)
    flat = a2ats_core.lut_scores(q, centroids, unpaged(codes, table, lengths), lengths, bin_edges=edges)
    assert torch.equal(out.cpu(), flat)


def test_lut_scores_paged_strided_views_and_out(device):
    """vLLM hands out views: a column slice of a wider block table, codes a slice of a larger
    cache along blocks and heads, and scores written into a slice of a larger buffer."""
    B, Hkv, G, D, M, C, block_size = 3, 2, 3, 32, 2, 16, 8
    q, centroids, codes, table, lengths = paged_inputs(B, Hkv, G, D, M, C, block_size, 5, num_blocks=9)
    wide_table = torch.full((B, 9), 77, dtype=torch.int32)
    wide_table[:, 2:7] = table
    big = torch.randint(0, C, (12, Hkv + 2, block_size, M), dtype=torch.int16)
    big[1:10, 1 : Hkv + 1] = codes
    out = torch.full((B, Hkv * G, 50), 5.0, device=device)
    got = a2ats_core.lut_scores(
        q.to(device), centroids.to(device), big.to(device)[1:10, 1 : Hkv + 1], lengths.to(device),
        block_table=wide_table.to(device)[:, 2:7], out=out[:, :, 3:43],
    )  # fmt: skip
    sync(device)
    assert got.data_ptr() == out[:, :, 3:43].data_ptr()
    check_scores(out[:, :, 3:43], reference.lut_scores(q, centroids, codes, lengths, block_table=table), lengths)
    assert (out[:, :, :3].cpu() == 5).all() and (out[:, :, 43:].cpu() == 5).all()


def test_lut_scores_paged_refuses_bad_tables():
    B, Hkv, G, D, M, C, block_size = 2, 2, 1, 16, 1, 8, 4
    q, centroids, codes, table, lengths = paged_inputs(B, Hkv, G, D, M, C, block_size, 3, num_blocks=5)
    lengths = torch.tensor([12, 5], dtype=torch.int32)  # row 1 uses blocks 0 and 1 of its table
    table[1] = torch.tensor([4, 0, -1], dtype=torch.int32)  # -1 past its length: never read
    a2ats_core.lut_scores(q, centroids, codes, lengths, block_table=table)
    for bad in (-1, 5):
        broken = table.clone()
        broken[1, 1] = bad
        out = torch.full((B, Hkv * G, 12), 3.0)
        with pytest.raises(ValueError, match=rf"block_table\[1, 1\] = {bad} is outside \[0, 5\)"):
            a2ats_core.lut_scores(q, centroids, codes, lengths, block_table=broken, out=out)
        assert (out == 3).all(), "a refused call must leave out as it was"
    with pytest.raises(TypeError, match="block_table"):
        a2ats_core.lut_scores(q, centroids, codes, lengths, block_table=table.long())
    with pytest.raises(ValueError, match="block_table.*batch of q"):
        a2ats_core.lut_scores(q, centroids, codes, lengths, block_table=table[:1])
    with pytest.raises(ValueError, match="lengths"):  # 13 > 3 blocks of 4
        a2ats_core.lut_scores(q, centroids, codes, torch.tensor([13, 1], dtype=torch.int32), block_table=table)
    with pytest.raises(ValueError, match="block_table"):
        a2ats_core.lut_scores(q, centroids, codes, lengths, block_table=table[:, None])
