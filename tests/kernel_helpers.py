"""Helpers shared by the native-kernel tests (test_rotary.py, test_vq_encode.py,
test_lut_scores.py, test_select_topk.py): dtypes, raw-bit views, device sync, strided layouts,
and the checkers of vq_encode codes and lut_scores scores against a2ats.reference.

Not a test module: the tests import it as ``from kernel_helpers import ...``, the way they
import ``tiny_models`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import torch

from a2ats import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor (for bit-exact comparisons of float data)."""
    t = t.detach().cpu().contiguous()
    if t.is_floating_point():
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


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


def check_codes(codes: torch.Tensor, x: torch.Tensor, centroids: torch.Tensor, planted=None, even=None):
    """Native codes are (near-)optimal, agree with the reference, and hit planted centroids."""
    B, Hkv, T, D = x.shape
    _, M, C, dsub = centroids.shape
    codes = codes.cpu()
    assert codes.dtype == torch.int16 and codes.shape == (B, Hkv, T, M)
    assert int(codes.min()) >= 0 and int(codes.max()) < C
    xs = x.double().reshape(B, Hkv, T, M, dsub)
    cent = centroids.double()
    dist = (
        xs.square().sum(-1)[..., None]
        + cent.square().sum(-1)[None, :, None]
        - 2 * torch.einsum("bgtmd,gmcd->bgtmc", xs, cent)
    )  # (B, Hkv, T, M, C), exact enough in f64
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


def lut_inputs(B, Hkv, G, D, M, C, Tcap, *, num_bins=None):
    Hq = Hkv * G
    q = torch.randn(B, Hq, D) if num_bins is None else torch.randn(B, Hq, num_bins, D)
    centroids = torch.randn(Hkv, M, C, D // M)
    codes = torch.randint(0, C, (B, Hkv, Tcap, M), dtype=torch.int16)
    return q, centroids, codes


def check_scores(out: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor):
    out = out.cpu()
    assert out.dtype == torch.float32 and out.shape == ref.shape
    for b, length in enumerate(lengths.tolist()):
        assert torch.isfinite(out[b, :, :length]).all()
        assert (out[b, :, length:] == float("-inf")).all(), "scores at and past the length must be -inf"
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
