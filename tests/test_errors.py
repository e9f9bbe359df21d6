"""Bad input raises a clear TypeError / ValueError naming the argument; nothing aborts the process,
the module keeps working afterwards, and a KVStore keeps the rows it already had."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import a2ats_core
from a2ats import reference

HAS_CUDA = a2ats_core.built_with_cuda() and a2ats_core.cuda_device_count() > 0 and torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA build of a2ats_core, a CUDA device and torch with CUDA"
)
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def bits(t):
    t = t.detach().cpu().contiguous()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]) if t.is_floating_point() else t


@pytest.fixture(autouse=True)
def still_works():
    """After every error test, normal calls still work (the process and the module are fine)."""
    yield
    x = torch.randn(1, 2, 3, 8)
    pos = torch.tensor([[0, 1, -2]], dtype=torch.int32)
    inv = torch.tensor([1.0, 0.5, 0.25, 0.125])
    torch.testing.assert_close(a2ats_core.rotary(x, pos, inv), reference.rotary(x, pos, inv), rtol=1e-5, atol=1e-5)
    scores = torch.randn(1, 2, 10)
    idx, cnt = a2ats_core.select_topk(scores, 2, torch.tensor([10], dtype=torch.int32), group_size=2, sink=1, window=1)
    assert int(cnt[0, 0]) >= 4


# ------------------------------------------------------------------------------------ rotary


def rotary_args(device="cpu", B=2, H=3, T=5, D=16, R=8):
    return (
        torch.randn(B, H, T, D, device=device),
        torch.randint(-50, 50, (B, T), dtype=torch.int32, device=device),
        torch.rand(R // 2, device=device),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_bad_types(device):
    x, pos, inv = rotary_args(device)
    with pytest.raises(TypeError, match=r"\bx\b.*float64"):
        a2ats_core.rotary(x.double(), pos, inv)
    with pytest.raises(TypeError, match=r"\bx\b"):
        a2ats_core.rotary(x.to(torch.int32), pos, inv)
    with pytest.raises(TypeError, match="positions"):
        a2ats_core.rotary(x, pos.float(), inv)
    with pytest.raises(TypeError, match="positions"):
        a2ats_core.rotary(x, pos.to(torch.int16), inv)
    with pytest.raises(TypeError, match="inv_freq"):
        a2ats_core.rotary(x, pos, inv.double())
    with pytest.raises(TypeError, match="out"):
        a2ats_core.rotary(x, pos, inv, out=torch.empty_like(x).half())


def test_rotary_non_arrays():
    x, pos, inv = rotary_args()
    with pytest.raises(TypeError, match=r"\bx\b.*DLPack"):
        a2ats_core.rotary(x.tolist(), pos, inv)
    with pytest.raises(TypeError, match="positions"):
        a2ats_core.rotary(x, pos.tolist(), inv)
    with pytest.raises(TypeError, match="inv_freq"):
        a2ats_core.rotary(x, pos, None)
    with pytest.raises(TypeError, match=r"\bx\b"):
        a2ats_core.rotary(x.numpy().astype(np.float64), pos.numpy(), inv.numpy())
    with pytest.raises(TypeError, match=r"\bx\b"):
        a2ats_core.rotary("not an array", pos, inv)


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_bad_shapes(device):
    x, pos, inv = rotary_args(device)
    with pytest.raises(ValueError, match=r"\bx\b.*dimensions"):
        a2ats_core.rotary(x[0], pos, inv)
    with pytest.raises(ValueError, match="positions"):
        a2ats_core.rotary(x, pos[:, :-1], inv)
    with pytest.raises(ValueError, match="positions"):
        a2ats_core.rotary(x, pos[0], inv)
    with pytest.raises(ValueError, match="inv_freq"):
        a2ats_core.rotary(x, pos, torch.rand(9, device=device))  # rotary dim 18 > head_dim 16
    with pytest.raises(ValueError, match="inv_freq"):
        a2ats_core.rotary(x, pos, inv[None])
    with pytest.raises(ValueError, match=r"\bx\b.*contiguous"):
        a2ats_core.rotary(x.transpose(2, 3), pos[:, :1].expand(2, 16).contiguous(), inv)  # last dim strided
    with pytest.raises(ValueError, match="out"):
        a2ats_core.rotary(x, pos, inv, out=torch.empty(2, 3, 5, 17, device=device))
    # out overlapping x without being x itself (shifted by one token) would corrupt the result.
    big = torch.randn(2, 3, 6, 16, device=device)
    with pytest.raises(ValueError, match="out"):
        a2ats_core.rotary(big[:, :, :5], pos, inv, out=big[:, :, 1:])


# --------------------------------------------------------------------------------- vq_encode


@pytest.mark.parametrize("device", DEVICES)
def test_vq_encode_bad_input(device):
    x = torch.randn(2, 3, 5, 16, device=device)
    cent = torch.randn(3, 2, 8, 8, device=device)
    with pytest.raises(TypeError, match=r"\bx\b"):
        a2ats_core.vq_encode(x.double(), cent)
    with pytest.raises(TypeError, match="centroids"):
        a2ats_core.vq_encode(x, cent.half())
    with pytest.raises(ValueError, match="centroids"):
        a2ats_core.vq_encode(x, cent[:2])  # num_kv_heads mismatch
    with pytest.raises(ValueError, match="centroids"):
        a2ats_core.vq_encode(x, torch.randn(3, 2, 8, 4, device=device))  # M * D/M != D
    with pytest.raises(ValueError, match="centroids"):
        a2ats_core.vq_encode(x, cent[0])
    with pytest.raises(ValueError, match=r"\bx\b"):
        a2ats_core.vq_encode(x[0], cent)
    with pytest.raises(TypeError, match="out"):
        a2ats_core.vq_encode(x, cent, out=torch.empty(2, 3, 5, 2, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="out"):
        a2ats_core.vq_encode(x, cent, out=torch.empty(2, 3, 5, 1, dtype=torch.int16, device=device))
    with pytest.raises(TypeError, match=r"\bx\b"):
        a2ats_core.vq_encode(x.cpu().numpy().astype(np.float64), cent.cpu().numpy())
    with pytest.raises(TypeError, match="centroids"):
        a2ats_core.vq_encode(x, [[1.0]])


# -------------------------------------------------------------------------------- lut_scores


def lut_args(device="cpu", B=2, Hkv=2, G=3, D=16, M=2, C=8, Tcap=12):
    q = torch.randn(B, Hkv * G, D, device=device)
    cent = torch.randn(Hkv, M, C, D // M, device=device)
    codes = torch.randint(0, C, (B, Hkv, Tcap, M), dtype=torch.int16, device=device)
    lengths = torch.tensor([Tcap, 5][:B], dtype=torch.int32, device=device)
    return q, cent, codes, lengths


def test_lut_scores_bad_codes():
    q, cent, codes, lengths = lut_args()
    for bad in (8, 9, 32767, -1, -32768):  # C = 8
        c = codes.clone()
        c[1, 1, 4, 1] = bad  # inside row 1's length 5
        with pytest.raises(ValueError, match="codes"):
            a2ats_core.lut_scores(q, cent, c, lengths)
    c = codes.clone()
    c[0, 0, 11, 0] = 8  # last token of a full row
    with pytest.raises(ValueError, match="codes"):
        a2ats_core.lut_scores(q, cent, c, lengths)


def test_lut_scores_bad_lengths_and_edges():
    q, cent, codes, lengths = lut_args()
    for bad in ([13, 5], [12, -1]):
        with pytest.raises(ValueError, match="lengths"):
            a2ats_core.lut_scores(q, cent, codes, torch.tensor(bad, dtype=torch.int32))
    with pytest.raises(TypeError, match="lengths"):
        a2ats_core.lut_scores(q, cent, codes, lengths.long())
    with pytest.raises(ValueError, match="lengths"):
        a2ats_core.lut_scores(q, cent, codes, lengths[:1])
    qb = torch.randn(2, 6, 3, 16)
    with pytest.raises(ValueError, match="bin_edges"):
        a2ats_core.lut_scores(qb, cent, codes, lengths)  # 3 bins need 2 edges
    with pytest.raises(ValueError, match="bin_edges"):
        a2ats_core.lut_scores(qb, cent, codes, lengths, bin_edges=torch.tensor([5, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="bin_edges"):
        a2ats_core.lut_scores(qb, cent, codes, lengths, bin_edges=torch.tensor([5], dtype=torch.int32))
    with pytest.raises(ValueError, match="bin_edges"):
        a2ats_core.lut_scores(q, cent, codes, lengths, bin_edges=torch.tensor([5], dtype=torch.int32))  # 1 bin
    with pytest.raises(TypeError, match="bin_edges"):
        a2ats_core.lut_scores(qb, cent, codes, lengths, bin_edges=torch.tensor([2, 5]))  # int64


@pytest.mark.parametrize("device", DEVICES)
def test_lut_scores_bad_shapes_and_types(device):
    q, cent, codes, lengths = lut_args(device)
    with pytest.raises(TypeError, match=r"\bq\b"):
        a2ats_core.lut_scores(q.half(), cent, codes, lengths)
    with pytest.raises(TypeError, match="codes"):
        a2ats_core.lut_scores(q, cent, codes.int(), lengths)
    with pytest.raises(TypeError, match="centroids"):
        a2ats_core.lut_scores(q, cent.double(), codes, lengths)
    with pytest.raises(ValueError, match=r"\bq\b"):
        a2ats_core.lut_scores(q[0], cent, codes, lengths)
    with pytest.raises(ValueError, match="num_q_heads"):
        a2ats_core.lut_scores(q[:, :5], cent, codes, lengths)  # 5 query heads, 2 KV heads
    with pytest.raises(ValueError, match="codes"):
        a2ats_core.lut_scores(q, cent, codes[:1], lengths)  # batch mismatch
    with pytest.raises(ValueError, match="codes"):
        a2ats_core.lut_scores(q, cent, codes[..., :1], lengths)  # M mismatch
    with pytest.raises(ValueError, match="centroids"):
        a2ats_core.lut_scores(q[..., :8].contiguous(), cent, codes, lengths)  # head dim mismatch
    with pytest.raises(ValueError, match="out"):
        a2ats_core.lut_scores(q, cent, codes, lengths, out=torch.empty(2, 6, 11, device=device))
    with pytest.raises(TypeError, match="out"):
        a2ats_core.lut_scores(q, cent, codes, lengths, out=torch.empty(2, 6, 12, dtype=torch.float16, device=device))


# ------------------------------------------------------------------------------- select_topk


def test_select_topk_bad_values():
    scores = torch.randn(2, 6, 20)
    lengths = torch.tensor([20, 7], dtype=torch.int32)
    kw = dict(group_size=3, sink=2, window=4)
    with pytest.raises(ValueError, match=r"\bk\b"):
        a2ats_core.select_topk(scores, -1, lengths, **kw)
    for g in (0, -3, 4, 7):
        with pytest.raises(ValueError, match="group_size"):
            a2ats_core.select_topk(scores, 3, lengths, group_size=g, sink=2, window=4)
    with pytest.raises(ValueError, match="sink"):
        a2ats_core.select_topk(scores, 3, lengths, group_size=3, sink=-1, window=4)
    with pytest.raises(ValueError, match="window"):
        a2ats_core.select_topk(scores, 3, lengths, group_size=3, sink=2, window=-4)
    for bad in ([21, 7], [20, -1]):
        with pytest.raises(ValueError, match="lengths"):
            a2ats_core.select_topk(scores, 3, torch.tensor(bad, dtype=torch.int32), **kw)
    with pytest.raises(TypeError):
        a2ats_core.select_topk(scores, 2.5, lengths, **kw)
    # Budgets whose sum would overflow int64 before the int32 check (it used to surface as a
    # torch RuntimeError naming no argument).
    for huge in (dict(sink=2**62, window=2**62), dict(sink=2, window=2**63 - 1), dict(sink=2**31, window=0)):
        with pytest.raises(ValueError, match="sink.*window"):
            a2ats_core.select_topk(scores, 3, lengths, group_size=3, **huge)
    with pytest.raises(ValueError, match="group_size . k"):
        a2ats_core.select_topk(scores, 2**31 - 1, lengths, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_select_topk_bad_shapes_and_types(device):
    scores = torch.randn(2, 6, 20, device=device)
    lengths = torch.tensor([20, 7], dtype=torch.int32, device=device)
    kw = dict(group_size=3, sink=2, window=4)  # Kmax = 3 * 3 + 2 + 4 = 15
    with pytest.raises(TypeError, match="scores"):
        a2ats_core.select_topk(scores.half(), 3, lengths, **kw)
    with pytest.raises(ValueError, match="scores"):
        a2ats_core.select_topk(scores[0], 3, lengths, **kw)
    with pytest.raises(TypeError, match="lengths"):
        a2ats_core.select_topk(scores, 3, lengths.long(), **kw)
    with pytest.raises(ValueError, match="lengths"):
        a2ats_core.select_topk(scores, 3, lengths[None], **kw)
    with pytest.raises(ValueError, match="out_indices"):
        a2ats_core.select_topk(
            scores, 3, lengths, **kw, out_indices=torch.empty(2, 2, 14, dtype=torch.int32, device=device)
        )
    with pytest.raises(TypeError, match="out_counts"):
        a2ats_core.select_topk(scores, 3, lengths, **kw, out_counts=torch.empty(2, 2, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="scores"):
        a2ats_core.select_topk(scores.cpu().double().numpy(), 3, lengths.cpu().numpy(), **kw)


# ----------------------------------------------------------------------------------- KVStore


def test_kv_store_bad_construction():
    with pytest.raises(TypeError, match="dtype"):
        a2ats_core.KVStore(1, 1, 1, 8, 4, "float64")
    with pytest.raises(TypeError, match="dtype"):
        a2ats_core.KVStore(1, 1, 1, 8, 4, torch.int32)
    for i, name in enumerate(["num_layers", "batch", "num_kv_heads", "head_dim", "capacity"]):
        dims = [1, 1, 1, 8, 4]
        dims[i] = 0
        with pytest.raises(ValueError, match=name):
            a2ats_core.KVStore(*dims, "float32")
    for threads in (-1, 1025, 100000):  # 100000 used to hang when thread creation failed partway
        with pytest.raises(ValueError, match="threads"):
            a2ats_core.KVStore(1, 1, 1, 8, 4, "float32", threads=threads)
    # Sizes whose byte count wraps around int64: the store used to construct with nbytes == 0 and
    # the first append wrote past a one-byte allocation.
    for dims in ([1, 1, 2**41, 1, 2**20], [2**20, 2**20, 2**20, 2**20, 2**20], [1, 1, 1, 2**62, 1]):
        with pytest.raises(ValueError, match=r"KVStore\(num_layers=.*capacity=.*would need more than"):
            a2ats_core.KVStore(*dims, "float32")
    # A size that fits int64 but not in memory: a clear error, not a crash.
    with pytest.raises(ValueError, match="could not be allocated; reduce capacity"):
        a2ats_core.KVStore(64, 64, 64, 1024, 2**17, "float32", pinned=False)  # 256 TiB


def filled_store(device="cpu", dtype=torch.float16, L=2, B=2, Hkv=2, D=16, cap=10, n=6):
    store = a2ats_core.KVStore(L, B, Hkv, D, cap, dtype)
    k = torch.randn(L, B, Hkv, n, D).to(dtype)
    v = torch.randn(L, B, Hkv, n, D).to(dtype)
    for layer in range(L):
        store.append(layer, k[layer].to(device), v[layer].to(device))
    return store, k, v


def stored_rows(store, layer, device="cpu"):
    """Every row of `layer` up to the longest batch row (padded rows are zero)."""
    B, Hkv, D = store.batch, store.num_kv_heads, store.head_dim
    lens = store.lengths()[layer]
    n = int(lens.max())
    idx = torch.arange(n, dtype=torch.int32).expand(B, Hkv, n).contiguous()
    cnt = torch.tensor(lens, dtype=torch.int32)[:, None].expand(B, Hkv).contiguous()
    dtype = getattr(torch, store.dtype)
    out_k = torch.zeros(B, Hkv, n, D, dtype=dtype, device=device)
    out_v = torch.zeros_like(out_k)
    store.gather(layer, idx.to(device), cnt.to(device), out_k, out_v)
    if device == "cuda":
        torch.cuda.synchronize()
    return bits(out_k), bits(out_v)


def snapshot(store):
    return store.lengths().copy(), [stored_rows(store, layer) for layer in range(store.num_layers)]


def assert_unchanged(store, snap):
    lengths, rows = snap
    assert np.array_equal(store.lengths(), lengths), "lengths changed by a failed call"
    for layer, (k, v) in enumerate(rows):
        k2, v2 = stored_rows(store, layer)
        assert torch.equal(k, k2) and torch.equal(v, v2), "stored rows changed by a failed call"


@pytest.mark.parametrize("device", DEVICES)
def test_kv_store_capacity_overflow(device):
    store, k, v = filled_store(device)  # 6 of 10 rows used in both layers
    snap = snapshot(store)
    big = torch.randn(2, 2, 5, 16).half().to(device)
    with pytest.raises(ValueError, match="capacity"):
        store.append(0, big, big)
    assert_unchanged(store, snap)
    # Only batch row 1 overflows: nothing is stored for row 0 either.
    with pytest.raises(ValueError, match="capacity"):
        store.append(1, big, big, num_tokens=torch.tensor([1, 5], dtype=torch.int32))
    assert_unchanged(store, snap)
    # A fitting append still works afterwards and fills the store exactly.
    four = torch.randn(2, 2, 4, 16).half()
    store.append(0, four.to(device), four.to(device))
    assert store.lengths().tolist() == [[10, 10], [6, 6]]
    with pytest.raises(ValueError, match="capacity"):
        store.append(0, four[:, :, :1].contiguous().to(device), four[:, :, :1].contiguous().to(device))
    k_rows, _ = stored_rows(store, 0, device)
    assert torch.equal(k_rows, bits(torch.cat([k[0], four], 2)))


@pytest.mark.parametrize("device", DEVICES)
def test_kv_store_bad_append(device):
    store, _, _ = filled_store(device)
    snap = snapshot(store)
    k = torch.randn(2, 2, 3, 16).half().to(device)
    with pytest.raises(TypeError, match=r"\bk\b"):
        store.append(0, k.float(), k)
    with pytest.raises(TypeError, match=r"\bv\b"):
        store.append(0, k, k.bfloat16())
    with pytest.raises(ValueError, match=r"\bk\b"):
        store.append(0, k[:, :1], k[:, :1])  # num_kv_heads mismatch
    with pytest.raises(ValueError, match=r"\bk\b"):
        store.append(0, k[0], k[0])  # rank 3
    with pytest.raises(ValueError, match=r"\bv\b"):
        store.append(0, k, k[:, :, :2])
    with pytest.raises(ValueError, match="layer"):
        store.append(2, k, k)
    with pytest.raises(ValueError, match="layer"):
        store.append(-1, k, k)
    with pytest.raises(ValueError, match="num_tokens"):
        store.append(0, k, k, num_tokens=torch.tensor([4, 1], dtype=torch.int32))  # > 3 new rows
    with pytest.raises(ValueError, match="num_tokens"):
        store.append(0, k, k, num_tokens=torch.tensor([-1, 1], dtype=torch.int32))
    with pytest.raises(TypeError, match="num_tokens"):
        store.append(0, k, k, num_tokens=torch.tensor([1, 1]))
    with pytest.raises(TypeError, match=r"\bk\b"):
        store.append(0, k.cpu().tolist(), k)
    with pytest.raises(TypeError, match=r"\bk\b"):
        store.append(0, k.cpu().float().numpy().astype(np.float64), k.cpu().float().numpy().astype(np.float64))
    assert_unchanged(store, snap)


@pytest.mark.parametrize("device", DEVICES)
def test_kv_store_bad_gather(device):
    store, _, _ = filled_store(device)
    store.append(
        0,
        torch.randn(2, 2, 2, 16).half().to(device),
        torch.randn(2, 2, 2, 16).half().to(device),
        num_tokens=torch.tensor([2, 0], dtype=torch.int32),
    )  # layer 0 lengths: [8, 6]
    snap = snapshot(store)
    kmax = 4
    good_idx = torch.tensor([0, 7, 3, 1], dtype=torch.int32).expand(2, 2, kmax).contiguous()
    good_idx[1] = torch.tensor([0, 5, 3, 1], dtype=torch.int32)
    good_cnt = torch.full((2, 2), kmax, dtype=torch.int32)
    out_k = torch.full((2, 2, kmax, 16), 1.5, dtype=torch.float16, device=device)
    out_v = torch.full((2, 2, kmax, 16), 2.5, dtype=torch.float16, device=device)

    def gather(idx, cnt, ok=out_k, ov=out_v, layer=0):
        store.gather(layer, idx.to(device), cnt.to(device), ok, ov)
        if device == "cuda":
            torch.cuda.synchronize()

    for b, g, i, bad in [
        (1, 0, 1, 6),
        (1, 1, 3, 7),
        (0, 0, 2, 8),
        (0, 1, 0, -1),
        (1, 1, 3, -(2**31)),
        (0, 0, 0, 2**31 - 1),
    ]:
        idx = good_idx.clone()
        idx[b, g, i] = bad  # row b holds 8 (b = 0) or 6 (b = 1) rows
        with pytest.raises(ValueError, match="indices"):
            gather(idx, good_cnt)
    for bad in (kmax + 1, -1):
        cnt = good_cnt.clone()
        cnt[1, 0] = bad
        with pytest.raises(ValueError, match="counts"):
            gather(good_idx, cnt)
    with pytest.raises(ValueError, match="layer"):
        gather(good_idx, good_cnt, layer=2)
    with pytest.raises(TypeError, match="indices"):
        gather(good_idx.long(), good_cnt)
    with pytest.raises(TypeError, match="counts"):
        gather(good_idx, good_cnt.long())
    with pytest.raises(ValueError, match="indices"):
        gather(good_idx[:1], good_cnt)
    with pytest.raises(ValueError, match="counts"):
        gather(good_idx, good_cnt[:, :1])
    with pytest.raises(TypeError, match="out_k"):
        gather(good_idx, good_cnt, ok=out_k.float())
    with pytest.raises(ValueError, match="out_k"):
        gather(good_idx, good_cnt, ok=out_k[:, :, :3])
    with pytest.raises(ValueError, match="out_v"):
        gather(good_idx, good_cnt, ov=out_v[..., :8])
    assert_unchanged(store, snap)
    if device == "cpu":  # validated before any copy: the outputs were not written either
        assert (out_k == 1.5).all() and (out_v == 2.5).all()
    # The same call with valid indices works.
    gather(good_idx, good_cnt)
    assert not (out_k == 1.5).all()


# ------------------------------------------------------------------------------ mixed devices


@requires_cuda
def test_mixed_devices():
    x, pos, inv = rotary_args("cuda")
    with pytest.raises(ValueError, match="positions"):
        a2ats_core.rotary(x, pos.cpu(), inv)
    with pytest.raises(ValueError, match="inv_freq"):
        a2ats_core.rotary(x, pos, inv.cpu())
    with pytest.raises(ValueError, match="out"):
        a2ats_core.rotary(x, pos, inv, out=torch.empty(x.shape))
    with pytest.raises(ValueError, match="centroids"):
        a2ats_core.vq_encode(torch.randn(2, 3, 5, 16, device="cuda"), torch.randn(3, 2, 8, 8))
    q, cent, codes, lengths = lut_args("cuda")
    with pytest.raises(ValueError, match="codes"):
        a2ats_core.lut_scores(q, cent, codes.cpu(), lengths)
    with pytest.raises(ValueError, match="lengths"):
        a2ats_core.lut_scores(q, cent, codes, lengths.cpu())
    with pytest.raises(ValueError, match="centroids"):
        a2ats_core.lut_scores(q, cent.cpu(), codes, lengths)
    scores = torch.randn(2, 6, 12, device="cuda")
    with pytest.raises(ValueError, match="lengths"):
        a2ats_core.select_topk(scores, 2, lengths.cpu(), group_size=3, sink=1, window=1)
    with pytest.raises(ValueError, match="out_indices"):
        a2ats_core.select_topk(
            scores, 2, lengths, group_size=3, sink=1, window=1, out_indices=torch.empty(2, 2, 8, dtype=torch.int32)
        )
    store, _, _ = filled_store("cpu")
    idx = torch.zeros(2, 2, 3, dtype=torch.int32)
    cnt = torch.ones(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="out_v"):
        store.gather(
            0,
            idx,
            cnt,
            torch.zeros(2, 2, 3, 16, dtype=torch.float16, device="cuda"),
            torch.zeros(2, 2, 3, 16, dtype=torch.float16),
        )
    with pytest.raises(ValueError, match="counts"):
        store.gather(
            0,
            idx.cuda(),
            cnt,
            torch.zeros(2, 2, 3, 16, dtype=torch.float16, device="cuda"),
            torch.zeros(2, 2, 3, 16, dtype=torch.float16, device="cuda"),
        )
    with pytest.raises(ValueError, match="indices"):  # CPU outputs need host indices
        store.gather(
            0,
            idx.cuda(),
            cnt.cuda(),
            torch.zeros(2, 2, 3, 16, dtype=torch.float16),
            torch.zeros(2, 2, 3, 16, dtype=torch.float16),
        )
    with pytest.raises(ValueError, match=r"\bv\b"):
        store.append(
            0,
            torch.zeros(2, 2, 1, 16, dtype=torch.float16, device="cuda"),
            torch.zeros(2, 2, 1, 16, dtype=torch.float16),
        )


def test_kv_store_bad_attend():
    """KVStore.attend validates like gather, plus q and scale; the store is never touched."""
    store, _, _ = filled_store()  # float16, L=2, B=2, Hkv=2, D=16, 6 rows per batch row
    snap = snapshot(store)
    q = torch.randn(2, 4, 16)
    idx = torch.tensor([0, 5, 3, 1], dtype=torch.int32).expand(2, 2, 4).contiguous()
    cnt = torch.full((2, 2), 4, dtype=torch.int32)
    store.attend(0, q, idx, cnt, scale=0.25)  # the good call works
    with pytest.raises(TypeError, match=r"\bq\b.*float32"):
        store.attend(0, q.half(), idx, cnt, scale=0.25)
    with pytest.raises(ValueError, match=r"\bq\b"):
        store.attend(0, q[:, :3], idx, cnt, scale=0.25)  # 3 heads over 2 KV heads
    with pytest.raises(ValueError, match=r"\bq\b"):
        store.attend(0, q[..., :8], idx, cnt, scale=0.25)  # head_dim of the store is 16
    with pytest.raises(ValueError, match=r"\bq\b"):
        store.attend(0, q[:1], idx, cnt, scale=0.25)
    with pytest.raises(ValueError, match="scale"):
        store.attend(0, q, idx, cnt, scale=float("nan"))
    bad = idx.clone()
    bad[1, 1, 2] = 6  # batch row 1 holds 6 rows
    with pytest.raises(ValueError, match="indices"):
        store.attend(0, q, bad, cnt, scale=0.25)
    bad[1, 1, 2] = -1
    with pytest.raises(ValueError, match="indices"):
        store.attend(0, q, bad, cnt, scale=0.25)
    with pytest.raises(ValueError, match="counts"):
        store.attend(0, q, idx, cnt + 1, scale=0.25)
    with pytest.raises(TypeError, match="counts"):
        store.attend(0, q, idx, cnt.long(), scale=0.25)
    with pytest.raises(ValueError, match="layer"):
        store.attend(2, q, idx, cnt, scale=0.25)
    with pytest.raises(ValueError, match="out_lse"):
        store.attend(0, q, idx, cnt, scale=0.25, out_lse=torch.empty(2, 3))
    with pytest.raises(TypeError, match=r"\bout\b"):
        store.attend(0, q, idx, cnt, scale=0.25, out=torch.empty(2, 4, 16, dtype=torch.float64))
    assert_unchanged(store, snap)


# ------------------------------------------------------------ checks before writes, aliasing, empty


def test_lut_scores_rejected_call_writes_nothing():
    """Codes are checked before any score is written: a rejected call leaves out= as it was."""
    q, cent, codes, lengths = lut_args()
    for where in ((1, 1, 4, 1), (0, 0, 11, 0), (0, 1, 0, 0)):
        bad = codes.clone()
        bad[where] = 8  # C = 8
        out = torch.full((2, 6, 12), 7.5)
        with pytest.raises(ValueError, match="codes"):
            a2ats_core.lut_scores(q, cent, bad, lengths, out=out)
        assert bool((out == 7.5).all()), f"out was written before codes[{where}] was refused"


def _aliasing_cases():
    """(name of the refused output, call) pairs: each output shares memory with an input or another output."""
    q, cent, codes, lengths = lut_args()
    x = torch.randn(2, 2, 12, 16)
    x_as_codes = x.view(torch.int16)[..., :2]  # (2, 2, 12, 2) int16 inside x's bytes
    scores = torch.randn(2, 6, 12)
    scores_as_int = scores.view(torch.int32)
    store, _, _ = filled_store(dtype=torch.float32)
    idx = torch.tensor([0, 5, 3], dtype=torch.int32).expand(2, 2, 3).contiguous()
    cnt = torch.full((2, 2), 3, dtype=torch.int32)
    rows = torch.zeros(2, 2, 3, 16)
    halves = torch.zeros(2, 2, 3, 32)
    heads = torch.zeros(2, 6, 16)
    topk = dict(group_size=3, sink=1, window=1)
    selection = torch.zeros(2, 2, 6, dtype=torch.int32)
    return [
        ("out", lambda: a2ats_core.vq_encode(x, cent, out=x_as_codes)),
        ("out", lambda: a2ats_core.lut_scores(q, cent, codes, lengths, out=q[..., :12])),
        ("out", lambda: a2ats_core.lut_scores(q, cent, codes, lengths, out=cent.view(-1)[:144].view(2, 6, 12))),
        (
            "out_indices",
            lambda: a2ats_core.select_topk(scores, 1, lengths, out_indices=scores_as_int[:, :2, :5], **topk),
        ),
        ("out_counts", lambda: a2ats_core.select_topk(scores, 1, lengths, out_counts=scores_as_int[:, 0, :2], **topk)),
        (
            "out_counts",
            lambda: a2ats_core.select_topk(
                scores, 1, lengths, out_indices=selection[..., :5], out_counts=selection[:, 0, 3:5], **topk
            ),
        ),
        ("out_v", lambda: store.gather(0, idx, cnt, rows, rows)),
        (
            "out",
            lambda: a2ats_core.lut_scores(
                q, cent, codes, lengths, out=torch.empty(200).as_strided((2, 6, 12), (24, 4, 1))
            ),
        ),
        ("out_v", lambda: store.gather(0, idx, cnt, halves[..., :16], halves[..., 8:24])),
        ("out_k", lambda: store.gather(0, idx, cnt, torch.zeros(2, 2, 1, 16).expand(2, 2, 3, 16), rows)),
        ("out", lambda: store.attend(0, heads[:, :4], idx, cnt, scale=0.25, out=heads[:, 2:])),
        ("out_lse", lambda: store.attend(0, heads[:, :4], idx, cnt, scale=0.25, out_lse=heads[:, 3, :4])),
    ]


@pytest.mark.parametrize("case", range(len(_aliasing_cases())))
def test_outputs_that_share_memory_are_refused(case):
    """An output that overlaps an input or another output, or itself (stride 0), raises
    ValueError naming it."""
    name, call = _aliasing_cases()[case]
    with pytest.raises(ValueError, match=rf"\b{name}\b (overlaps|has stride 0|has strides .* share memory)"):
        call()


def test_interleaved_outputs_are_accepted():
    store, k, v = filled_store(dtype=torch.float32)
    idx = torch.tensor([0, 5, 3], dtype=torch.int32).expand(2, 2, 3).contiguous()
    cnt = torch.full((2, 2), 3, dtype=torch.int32)
    kv = torch.zeros(2, 2, 3, 2, 16)  # K and V of each row side by side
    store.gather(0, idx, cnt, kv[..., 0, :], kv[..., 1, :])
    torch.testing.assert_close(kv[..., 0, :], k[0][:, :, [0, 5, 3]], rtol=0, atol=0)
    torch.testing.assert_close(kv[..., 1, :], v[0][:, :, [0, 5, 3]], rtol=0, atol=0)


def test_numpy_empty_arrays_are_accepted():
    """numpy gives empty arrays stride 0; an empty array touches no memory, so it is accepted."""
    f32 = np.float32
    cent = np.random.default_rng(0).standard_normal((2, 1, 4, 8)).astype(f32)
    assert a2ats_core.vq_encode(np.zeros((0, 2, 5, 8), f32), cent).shape == (0, 2, 5, 1)
    assert a2ats_core.vq_encode(np.zeros((1, 2, 0, 8), f32), cent).shape == (1, 2, 0, 1)
    assert a2ats_core.rotary(np.zeros((1, 2, 0, 8), f32), np.zeros((1, 0), np.int64), np.ones(4, f32)).shape == (
        1,
        2,
        0,
        8,
    )
    assert a2ats_core.lut_scores(
        np.zeros((0, 2, 8), f32), cent, np.zeros((0, 2, 5, 1), np.int16), np.zeros(0, np.int32)
    ).shape == (0, 2, 5)
    assert a2ats_core.lut_scores(
        np.zeros((1, 2, 8), f32), cent, np.zeros((1, 2, 0, 1), np.int16), np.zeros(1, np.int32)
    ).shape == (1, 2, 0)
    indices, counts = a2ats_core.select_topk(
        np.zeros((0, 2, 5), f32), 1, np.zeros(0, np.int32), group_size=1, sink=1, window=1
    )
    assert indices.shape == (0, 2, 3) and counts.shape == (0, 2)
    store = a2ats_core.KVStore(1, 2, 2, 8, 16, "float32")
    store.append(0, np.zeros((2, 2, 0, 8), f32), np.zeros((2, 2, 0, 8), f32))
    store.gather(
        0,
        np.zeros((2, 2, 0), np.int32),
        np.zeros((2, 2), np.int32),
        np.zeros((2, 2, 0, 8), f32),
        np.zeros((2, 2, 0, 8), f32),
    )
    out, lse = store.attend(
        0, np.zeros((2, 2, 8), f32), np.zeros((2, 2, 0), np.int32), np.zeros((2, 2), np.int32), scale=1.0
    )
    assert np.all(out == 0) and np.all(np.isneginf(lse))
    assert store.lengths().tolist() == [[0, 0]]
