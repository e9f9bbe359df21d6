"""a2ats_core.vq_encode (native kernel) against a2ats.reference.vq_encode (pure PyTorch) and an
exact float64 nearest-centroid search.

Every test that takes ``device`` runs on the CPU and, when available, on CUDA (see the
``device`` fixture in conftest.py). The reference always runs on CPU copies of the same inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import a2ats_core

from kernel_helpers import DTYPE_IDS, DTYPES, LAYOUTS, bits, check_codes, sync, x_layouts

# Every CPU case runs at each ISA level the CPU supports (see conftest.py).
pytestmark = pytest.mark.every_isa


def planted_keys(B, Hkv, T, D, centroids, dtype):
    """Keys whose even tokens sit right next to a known centroid; odd tokens are random."""
    _, M, C, dsub = centroids.shape
    planted = torch.randint(0, C, (B, Hkv, T, M))
    near = torch.stack([centroids[g, m][planted[:, g, :, m]] for g in range(Hkv) for m in range(M)], dim=2)
    near = near.reshape(B, T, Hkv, M, dsub).permute(0, 2, 1, 3, 4).reshape(B, Hkv, T, D)
    # Check the stacking order against a direct loop on one element.
    assert torch.equal(
        near[0, Hkv - 1, T - 1, (M - 1) * dsub :], centroids[Hkv - 1, M - 1, planted[0, Hkv - 1, T - 1, M - 1]]
    )
    x = torch.randn(B, Hkv, T, D)
    even = torch.arange(T) % 2 == 0
    x[:, :, even] = near[:, :, even] + 0.02 * torch.randn_like(near[:, :, even])
    return x.to(dtype), planted, even


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
