"""Native kernels (a2ats_core) against the pure-PyTorch reference (a2ats.reference).

Every test runs on the CPU and, when available, on CUDA (see the ``device`` fixture in
conftest.py). The reference always runs on CPU copies of the same inputs.
"""
from __future__ import annotations

import math

import a2ats_core
import numpy as np
import pytest
import torch
from a2ats import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]
# Output tolerances when both sides compute in f32 and round once to the output dtype.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor (for bit-exact comparisons of float data)."""
    t = t.detach().cpu().contiguous()
    if t.is_floating_point():
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def view_mask(base: torch.Tensor, view_fn) -> torch.Tensor:
    """Boolean mask (on CPU) of the elements of ``base`` that ``view_fn(base)`` covers."""
    mask = torch.zeros(base.shape, dtype=torch.bool)
    view_fn(mask).fill_(True)
    return mask


# ------------------------------------------------------------------------------------ rotary

def inv_freq_for(rot_dim: int, base: float = 10000.0) -> torch.Tensor:
    return (1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)).float()


def make_positions(B: int, T: int, dtype: torch.dtype, *, beyond_int32: bool = False) -> torch.Tensor:
    pos = torch.randint(-100_000, 100_001, (B, T), dtype=torch.int64)
    specials = [0, -1, 1, 100_000, -100_000, 7, 4095]
    for i, v in enumerate(specials[: B * T]):
        pos.view(-1)[i] = v
    if beyond_int32:
        pos.view(-1)[-1] = 2**31 + 12345
        if B * T > 1:
            pos.view(-1)[-2] = -(2**33) - 7
    return pos.to(dtype)


def rot_dims(D: int, partial: bool) -> int:
    return D - 40 if partial else D  # 24 / 88 when partial: not a power of two


@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rotary_matches_reference(device, dtype, B, D, pos_dtype, interleaved, partial):
    H, T = 3, 9
    R = rot_dims(D, partial)
    x = torch.randn(B, H, T, D).to(dtype)
    pos = make_positions(B, T, pos_dtype, beyond_int32=pos_dtype == torch.int64)
    inv = inv_freq_for(R)
    xd = x.to(device)
    out = a2ats_core.rotary(xd, pos.to(device), inv.to(device), interleaved=interleaved)
    sync(device)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == dtype and out.shape == x.shape and out.device.type == device
    ref = reference.rotary(x, pos, inv, interleaved=interleaved)
    torch.testing.assert_close(out.cpu().float(), ref.float(), **TOL[dtype])
    # Dims >= R pass through bit-exactly and the input is left alone.
    assert torch.equal(bits(out[..., R:]), bits(x[..., R:]))
    assert torch.equal(bits(xd), bits(x))


def test_rotary_hand_checked():
    """x = [1, 2, 3, 4] at position 1 with angles (pi/2, pi): checkable by hand."""
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    pos = torch.tensor([[1]], dtype=torch.int32)
    inv = torch.tensor([math.pi / 2, math.pi], dtype=torch.float32)
    # rotate_half pairs (x0, x2) by pi/2 and (x1, x3) by pi.
    expect_half = torch.tensor([-3.0, -2.0, 1.0, -4.0]).reshape(1, 1, 1, 4)
    # interleaved pairs (x0, x1) by pi/2 and (x2, x3) by pi.
    expect_inter = torch.tensor([-2.0, 1.0, -3.0, -4.0]).reshape(1, 1, 1, 4)
    for interleaved, expect in [(False, expect_half), (True, expect_inter)]:
        got = a2ats_core.rotary(x, pos, inv, interleaved=interleaved)
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-6)
        torch.testing.assert_close(reference.rotary(x, pos, inv, interleaved=interleaved), expect, rtol=0, atol=1e-6)
    # Partial rotary: only (x0, x1) rotate (by pi/2); x2, x3 pass through.
    got = a2ats_core.rotary(x, pos, inv[:1])
    torch.testing.assert_close(got, torch.tensor([-2.0, 1.0, 3.0, 4.0]).reshape(1, 1, 1, 4), rtol=0, atol=1e-6)
    # Position 0 is the identity, negative positions rotate backwards.
    torch.testing.assert_close(a2ats_core.rotary(x, pos * 0, inv), x, rtol=0, atol=0)
    back = a2ats_core.rotary(x, -pos, inv)
    torch.testing.assert_close(back, torch.tensor([3.0, -2.0, -1.0, -4.0]).reshape(1, 1, 1, 4), rtol=0, atol=1e-6)


# Strided layouts of a (B, H, T, D) array: (shape of the base, base -> view).
def x_layouts(B, H, T, D):
    return {
        "contiguous": ((B, H, T, D), lambda a: a),
        "heads_slice": ((B, 2 * H, T, D), lambda a: a[:, 1::2]),
        "tokens_slice": ((B, H, 2 * T + 1, D), lambda a: a[:, :, 1::2]),
        "transposed": ((B, T, H, D), lambda a: a.transpose(1, 2)),
        "row_padded": ((B, H, T, D + 8), lambda a: a[..., :D]),
        "batch_slice": ((2 * B, H, T, D), lambda a: a[1::2]),
    }


LAYOUTS = ["contiguous", "heads_slice", "tokens_slice", "transposed", "row_padded", "batch_slice"]


@pytest.mark.parametrize("mode", ["alloc", "inplace", "separate"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rotary_strided_and_out(device, dtype, layout, mode):
    B, H, T, D, R = 2, 3, 7, 64, 48
    base_shape, view_fn = x_layouts(B, H, T, D)[layout]
    base = torch.randn(base_shape).to(dtype)
    base_before = base.clone()
    based = base.to(device)
    x = view_fn(based)
    assert x.shape == (B, H, T, D)
    if layout != "contiguous":
        assert not x.is_contiguous()
    # Strided positions too: a transposed (T, B) array.
    pos = make_positions(T, B, torch.int64).t()
    inv = inv_freq_for(R)
    ref = reference.rotary(view_fn(base_before), pos, inv)

    if mode == "alloc":
        out = a2ats_core.rotary(x, pos.to(device), inv.to(device))
        result = out
    elif mode == "inplace":
        out = a2ats_core.rotary(x, pos.to(device), inv.to(device), out=x)
        assert out is x
        result = x
    else:
        out_base = torch.full((B, H, T, D + 5), 3.25, dtype=dtype, device=device)
        out_view = out_base[..., 2:2 + D]
        out = a2ats_core.rotary(x, pos.to(device), inv.to(device), out=out_view)
        assert out is out_view
        result = out_view
        sync(device)
        margin = torch.ones(out_base.shape, dtype=torch.bool)
        margin[..., 2:2 + D] = False
        assert (out_base.cpu()[margin] == 3.25).all(), "rotary wrote outside out"
    sync(device)
    torch.testing.assert_close(result.cpu().float(), ref.float(), **TOL[dtype])
    assert torch.equal(bits(result[..., R:]), bits(view_fn(base_before)[..., R:]))
    # Memory outside the view of x is never touched; x itself only changes in place.
    mask = view_mask(base, view_fn)
    base_after = based.cpu()
    assert torch.equal(bits(base_after[~mask]), bits(base_before[~mask]))
    if mode != "inplace":
        assert torch.equal(bits(base_after), bits(base_before))


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rotary_round_trip(device, dtype, interleaved):
    """Rotating by p and then by -p, in place, gives the input back."""
    B, H, T, D = 3, 2, 33, 128
    x0 = torch.randn(B, H, T, D).to(dtype)
    pos = make_positions(B, T, torch.int32)
    inv = inv_freq_for(D).to(device)
    x = x0.clone().to(device)
    a2ats_core.rotary(x, pos.to(device), inv, interleaved=interleaved, out=x)
    sync(device)
    assert not torch.equal(bits(x), bits(x0))  # it did rotate
    a2ats_core.rotary(x, (-pos).to(device), inv, interleaved=interleaved, out=x)
    sync(device)
    # Two roundings to the storage dtype at most: a couple of ulps of the pair's norm.
    eps = torch.finfo(dtype).eps
    atol = 1e-5 if dtype == torch.float32 else 4 * eps * float(x0.float().abs().max())
    torch.testing.assert_close(x.cpu().float(), x0.float(), rtol=0, atol=atol)


@pytest.mark.parametrize("np_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("pos_dtype", [np.int32, np.int64])
def test_rotary_numpy(np_dtype, pos_dtype):
    B, H, T, D, R = 2, 3, 5, 64, 32
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, H, T, D)).astype(np_dtype)
    pos = rng.integers(-100_000, 100_000, (B, T)).astype(pos_dtype)
    inv = inv_freq_for(R).numpy()
    out = a2ats_core.rotary(x, pos, inv)
    assert isinstance(out, np.ndarray)
    assert out.dtype == np_dtype and out.shape == x.shape
    ref = reference.rotary(torch.from_numpy(x), torch.from_numpy(pos), torch.from_numpy(inv))
    tol = TOL[torch.float32 if np_dtype == np.float32 else torch.float16]
    torch.testing.assert_close(torch.from_numpy(out).float(), ref.float(), **tol)
    # In place on a numpy array (a strided view: every other token).
    big = rng.standard_normal((B, H, 2 * T, D)).astype(np_dtype)
    view = big[:, :, ::2]
    ref2 = reference.rotary(torch.from_numpy(view.copy()), torch.from_numpy(pos), torch.from_numpy(inv))
    odd_before = big[:, :, 1::2].copy()
    res = a2ats_core.rotary(view, pos, inv, out=view)
    assert res is view
    torch.testing.assert_close(torch.from_numpy(view.copy()).float(), ref2.float(), **tol)
    assert np.array_equal(big[:, :, 1::2], odd_before)


def test_rotary_larger():
    """A larger case so the threaded split of the CPU kernel is exercised."""
    B, H, T, D = 2, 8, 512, 128
    x = torch.randn(B, H, T, D, dtype=torch.bfloat16)
    pos = torch.arange(T, dtype=torch.int64).expand(B, T) + torch.tensor([[0], [70_000]])
    inv = inv_freq_for(D)
    out = a2ats_core.rotary(x, pos, inv)
    torch.testing.assert_close(out.float(), reference.rotary(x, pos, inv).float(), **TOL[torch.bfloat16])


# --------------------------------------------------------------------------------- vq_encode

def planted_keys(B, Hkv, T, D, centroids, dtype):
    """Keys whose even tokens sit right next to a known centroid; odd tokens are random."""
    _, M, C, dsub = centroids.shape
    planted = torch.randint(0, C, (B, Hkv, T, M))
    near = torch.stack([centroids[g, m][planted[:, g, :, m]] for g in range(Hkv) for m in range(M)], dim=2)
    near = near.reshape(B, T, Hkv, M, dsub).permute(0, 2, 1, 3, 4).reshape(B, Hkv, T, D)
    # Check the stacking order against a direct loop on one element.
    assert torch.equal(near[0, Hkv - 1, T - 1, (M - 1) * dsub:], centroids[Hkv - 1, M - 1, planted[0, Hkv - 1, T - 1, M - 1]])
    x = torch.randn(B, Hkv, T, D)
    even = torch.arange(T) % 2 == 0
    x[:, :, even] = near[:, :, even] + 0.02 * torch.randn_like(near[:, :, even])
    return x.to(dtype), planted, even


def check_codes(codes: torch.Tensor, x: torch.Tensor, centroids: torch.Tensor, planted=None, even=None):
    """Native codes are (near-)optimal, agree with the reference, and hit planted centroids."""
    B, Hkv, T, D = x.shape
    _, M, C, dsub = centroids.shape
    codes = codes.cpu()
    assert codes.dtype == torch.int16 and codes.shape == (B, Hkv, T, M)
    assert int(codes.min()) >= 0 and int(codes.max()) < C
    xs = x.double().reshape(B, Hkv, T, M, dsub)
    cent = centroids.double()
    dist = (xs.square().sum(-1)[..., None] + cent.square().sum(-1)[None, :, None]
            - 2 * torch.einsum("bgtmd,gmcd->bgtmc", xs, cent))  # (B, Hkv, T, M, C), exact enough in f64
    best = dist.min(-1).values
    chosen = dist.gather(-1, codes.long()[..., None])[..., 0]
    # Ties may go either way, but never to a clearly farther centroid.
    slack = 2e-5 * best.abs() + 1e-5
    assert (chosen <= best + slack).all(), f"worst excess {float((chosen - best).max())}"
    ref = reference.vq_encode(x, centroids)
    mismatches = int((ref != codes).sum())
    assert mismatches <= 1 + 0.02 * codes.numel(), f"{mismatches} of {codes.numel()} codes differ from the reference"
    if planted is not None:
        assert torch.equal(codes[:, :, even].long(), planted[:, :, even])


@pytest.mark.parametrize("C", [16, 256, 4096])
@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_vq_encode_matches_reference(device, dtype, B, D, M, C):
    Hkv, T = 2, 13
    centroids = torch.randn(Hkv, M, C, D // M)
    x, planted, even = planted_keys(B, Hkv, T, D, centroids, dtype)
    codes = a2ats_core.vq_encode(x.to(device), centroids.to(device))
    sync(device)
    assert isinstance(codes, torch.Tensor) and codes.device.type == device
    check_codes(codes, x, centroids, planted, even)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_vq_encode_strided_and_out(device, dtype, layout):
    B, Hkv, T, D, M, C = 2, 3, 11, 64, 2, 256
    centroids = torch.randn(Hkv, M, C, D // M)
    x_dense, planted, even = planted_keys(B, Hkv, T, D, centroids, dtype)
    base_shape, view_fn = x_layouts(B, Hkv, T, D)[layout]
    base = torch.randn(base_shape).to(dtype)
    view_fn(base).copy_(x_dense)
    base_before = base.clone()
    based = base.to(device)
    x = view_fn(based)
    codes = a2ats_core.vq_encode(x, centroids.to(device))
    sync(device)
    check_codes(codes, x_dense, centroids, planted, even)
    # A strided int16 out= buffer (every other token slot), margins untouched.
    out_base = torch.full((B, Hkv, 2 * T, M), -7, dtype=torch.int16, device=device)
    out = out_base[:, :, ::2]
    res = a2ats_core.vq_encode(x, centroids.to(device), out=out)
    sync(device)
    assert res is out
    assert torch.equal(out.cpu(), codes.cpu())
    assert (out_base[:, :, 1::2] == -7).all()
    assert torch.equal(bits(based), bits(base_before))


def test_vq_encode_numpy():
    rng = np.random.default_rng(1)
    B, Hkv, T, D, M, C = 1, 2, 9, 64, 1, 16
    x = rng.standard_normal((B, Hkv, T, D)).astype(np.float32)
    centroids = rng.standard_normal((Hkv, M, C, D // M)).astype(np.float32)
    codes = a2ats_core.vq_encode(x, centroids)
    assert isinstance(codes, np.ndarray) and codes.dtype == np.int16 and codes.shape == (B, Hkv, T, M)
    check_codes(torch.from_numpy(codes), torch.from_numpy(x), torch.from_numpy(centroids))


def test_vq_encode_hand_checked():
    # Centroids on the axes of a 2-d space: the code is the axis a key is closest to.
    centroids = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]]])  # (1, 1, 4, 2)
    x = torch.tensor([[0.9, 0.1], [0.2, 0.7], [-3.0, 0.5], [0.1, -0.4], [0.0, 0.0]]).reshape(1, 1, 5, 2)
    codes = a2ats_core.vq_encode(x, centroids)
    assert codes.flatten().tolist()[:4] == [0, 1, 2, 3]
    # An exact tie (the origin) must still yield a valid nearest centroid.
    assert 0 <= int(codes.flatten()[4]) < 4


def test_vq_encode_larger():
    B, Hkv, T, D, M, C = 1, 2, 300, 128, 1, 4096
    centroids = torch.randn(Hkv, M, C, D)
    x, planted, even = planted_keys(B, Hkv, T, D, centroids, torch.float16)
    check_codes(a2ats_core.vq_encode(x, centroids), x, centroids, planted, even)


# -------------------------------------------------------------------------------- lut_scores

def lut_inputs(B, Hkv, G, D, M, C, Tcap, *, num_bins=None):
    Hq = Hkv * G
    q = torch.randn(B, Hq, D) if num_bins is None else torch.randn(B, Hq, num_bins, D)
    centroids = torch.randn(Hkv, M, C, D // M)
    codes = torch.randint(0, C, (B, Hkv, Tcap, M), dtype=torch.int16)
    return q, centroids, codes


def ragged_lengths(B, Tcap):
    if B == 1:
        return torch.tensor([Tcap - 5], dtype=torch.int32)
    return torch.tensor(([0, Tcap, Tcap // 2 + 1] * B)[:B], dtype=torch.int32)


def check_scores(out: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor):
    out = out.cpu()
    assert out.dtype == torch.float32 and out.shape == ref.shape
    for b, length in enumerate(lengths.tolist()):
        assert torch.isfinite(out[b, :, :length]).all()
        assert (out[b, :, length:] == float("-inf")).all(), "scores at and past the length must be -inf"
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


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
    out = a2ats_core.lut_scores(q.to(device), centroids.to(device), codes.to(device), lengths.to(device),
                                bin_edges=bin_edges.to(device))
    sync(device)
    ref = reference.lut_scores(q, centroids, codes, lengths, bin_edges=bin_edges)
    check_scores(out, ref, lengths)
    # Independently of the reference: each token equals the unbinned score with its bin's query.
    for j in range(NB):
        single = a2ats_core.lut_scores(q[:, :, j].contiguous().to(device), centroids.to(device), codes.to(device),
                                       lengths.to(device)).cpu()
        for b, length in enumerate(lengths.tolist()):
            n = torch.arange(length)
            dist = length - 1 - n
            in_bin = (dist[:, None] >= bin_edges[None, :].long()).sum(-1) == j
            torch.testing.assert_close(out.cpu()[b, :, :length][:, in_bin], single[b, :, :length][:, in_bin],
                                       rtol=1e-6, atol=1e-6)


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
        "transposed": (((B, NB, Hq, D), lambda a: a.transpose(1, 2)) if binned
                       else ((Hq, B, D), lambda a: a.transpose(0, 1))),
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
    out_view = out_base[..., 3:3 + Tcap]
    res = a2ats_core.lut_scores(q, centroids.to(device), codes, lengths.to(device), bin_edges=edges, out=out_view)
    sync(device)
    assert res is out_view
    check_scores(out_view, ref, lengths)
    assert (out_base[..., :3] == 99.0).all() and (out_base[..., 3 + Tcap:] == 99.0).all()


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


# ------------------------------------------------------------------------------- select_topk

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
            assert _cover(uncovered, options, capacity), f"more tied candidates selected than the heads' k allow {where}"


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
    lengths = torch.tensor(sorted({0, 1, max(sw - 1, 0), sw, sw + 1, min(sw + k + 1, Tcap), 77, Tcap}), dtype=torch.int32)
    B = len(lengths)
    scores = distinct_scores(B, Hkv * G, Tcap, lengths, garbage=1e30)
    idx, cnt = a2ats_core.select_topk(scores.to(device), k, lengths.to(device), group_size=G, sink=sink, window=window,
                                      add_resident=False)
    sync(device)
    assert idx.shape == (B, Hkv, G * k)
    ref_idx, ref_cnt = reference.select_topk(scores, k, lengths, group_size=G, sink=sink, window=window,
                                             add_resident=False)
    assert torch.equal(cnt.cpu(), ref_cnt) and torch.equal(idx.cpu(), ref_idx)
    full_idx, full_cnt = reference.select_topk(scores, k, lengths, group_size=G, sink=sink, window=window)
    for b, length in enumerate(lengths.tolist()):
        middle_lo, middle_hi = sink, length - window
        for g in range(Hkv):
            full = full_idx[b, g, :full_cnt[b, g]]
            middle = full[(full >= middle_lo) & (full < middle_hi)]
            assert torch.equal(idx.cpu()[b, g, :cnt[b, g]], middle)
            assert (idx.cpu()[b, g, cnt[b, g]:] == -1).all()


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
        idx[0, 0, :len(rows)] = torch.tensor(rows, dtype=torch.int32)
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
    base[:, ::2, 5:5 + Tcap] = dense
    scores = base.to(device)[:, ::2, 5:5 + Tcap]
    idx_base = torch.full((B, Hkv, kmax + 3), 777, dtype=torch.int32, device=device)
    cnt_base = torch.full((B, Hkv + 2), 555, dtype=torch.int32, device=device)
    out_idx, out_cnt = idx_base[..., 1:1 + kmax], cnt_base[:, 1:1 + Hkv]
    res_idx, res_cnt = a2ats_core.select_topk(scores, k, lengths.to(device), group_size=G, sink=sink, window=window,
                                              out_indices=out_idx, out_counts=out_cnt)
    sync(device)
    assert res_idx is out_idx and res_cnt is out_cnt
    ref_idx, ref_cnt = reference.select_topk(dense, k, lengths, group_size=G, sink=sink, window=window)
    check_selection(dense, k, lengths, G, sink, window, out_idx, out_cnt)
    assert torch.equal(out_idx.cpu(), ref_idx) and torch.equal(out_cnt.cpu(), ref_cnt)
    assert (idx_base[..., 0] == 777).all() and (idx_base[..., 1 + kmax:] == 777).all()
    assert (cnt_base[:, 0] == 555).all() and (cnt_base[:, 1 + Hkv:] == 555).all()


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
    idx, cnt = a2ats_core.select_topk(scores.to(device), k, lengths.to(device), group_size=G, sink=sink,
                                      window=window)
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
    ref_idx, ref_cnt = reference.select_topk(torch.from_numpy(scores), 3, torch.from_numpy(lengths), group_size=2,
                                             sink=2, window=4)
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
