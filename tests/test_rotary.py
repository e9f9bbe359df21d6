"""a2ats_core.rotary (native kernel) against a2ats.reference.rotary (pure PyTorch).

Every test that takes ``device`` runs on the CPU and, when available, on CUDA (see the
``device`` fixture in conftest.py). The reference always runs on CPU copies of the same inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import a2ats_core
from a2ats import reference

from kernel_helpers import DTYPE_IDS, DTYPES, LAYOUTS, bits, sync, x_layouts

# Every CPU case runs at each ISA level the CPU supports (see conftest.py).
pytestmark = pytest.mark.every_isa


# Output tolerances when both sides compute in f32 and round once to the output dtype.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
}


def view_mask(base: torch.Tensor, view_fn) -> torch.Tensor:
    """Boolean mask (on CPU) of the elements of ``base`` that ``view_fn(base)`` covers."""
    mask = torch.zeros(base.shape, dtype=torch.bool)
    view_fn(mask).fill_(True)
    return mask


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
        out_view = out_base[..., 2 : 2 + D]
        out = a2ats_core.rotary(x, pos.to(device), inv.to(device), out=out_view)
        assert out is out_view
        result = out_view
        sync(device)
        margin = torch.ones(out_base.shape, dtype=torch.bool)
        margin[..., 2 : 2 + D] = False
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
