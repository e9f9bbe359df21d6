"""a2ats_core.group_scores (the per-KV-head budget's score rows) against a2ats.reference.group_scores.

Every test that takes ``device`` runs on the CPU and, when available, on CUDA; CPU cases run at
every ISA level. The reference works in float64 on CPU copies of the same inputs.
"""

from __future__ import annotations

import pytest
import torch

import a2ats_core
from a2ats import reference

from kernel_helpers import sync

pytestmark = pytest.mark.every_isa

SINK_WINDOW = [(0, 0), (4, 16), (1, 3), (40, 60)]  # the last exceeds the short rows


def check_group_scores(out, scores, lengths, G, sink, window):
    ref = reference.group_scores(scores, lengths, group_size=G, sink=sink, window=window)
    out = out.cpu()
    assert out.shape == ref.shape and out.dtype == torch.float32
    # The same tokens are candidates (finite) in both, and the values agree to float rounding:
    # the native code rounds each head's log sum exp to float32 before subtracting it.
    assert torch.equal(out.isfinite(), ref.isfinite())
    assert torch.equal(out[~out.isfinite()], ref[~ref.isfinite()])
    finite = ref.isfinite()
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-6, atol=4e-6)


def ragged(B, Tcap):
    return torch.tensor([Tcap, 57, 13, 1, 0][:B] if B > 1 else [71], dtype=torch.int32)


@pytest.mark.parametrize("sink_window", SINK_WINDOW, ids=[f"s{s}w{w}" for s, w in SINK_WINDOW])
@pytest.mark.parametrize("G", [1, 3, 7])
@pytest.mark.parametrize("B", [1, 3, 5])
def test_group_scores_matches_reference(device, B, G, sink_window):
    sink, window = sink_window
    Hkv, Tcap = 2, 96
    lengths = ragged(B, Tcap)
    # Heads on very different scales: the normalisation, not the scale, must decide.
    scale = torch.logspace(-1, 1, Hkv * G).view(1, -1, 1)
    scores = torch.randn(B, Hkv * G, Tcap) * 3 * scale
    scores[..., ::7] = 1e30  # garbage past the lengths must not matter; inside, a huge logit
    for b, length in enumerate(lengths.tolist()):
        scores[b, :, length:] = float("nan")
    out = a2ats_core.group_scores(scores.to(device), lengths.to(device), group_size=G, sink=sink, window=window)
    sync(device)
    assert out.device.type == device
    check_group_scores(out, scores, lengths, G, sink, window)


def test_group_scores_hand_checked():
    # One KV head of two query heads over 4 candidates (sink 1, window 1 of length 6).
    s = torch.tensor([[[9.0, 0.0, 1.0, 2.0, 3.0, 9.0], [9.0, 5.0, 5.0, 5.0, 5.0 + 2.0, 9.0]]])
    out = a2ats_core.group_scores(s, torch.tensor([6], dtype=torch.int32), group_size=2, sink=1, window=1)
    lse0 = torch.logsumexp(torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64), 0)
    lse1 = torch.logsumexp(torch.tensor([5.0, 5.0, 5.0, 7.0], dtype=torch.float64), 0)
    want = torch.maximum(
        torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64) - lse0,
        torch.tensor([5.0, 5.0, 5.0, 7.0], dtype=torch.float64) - lse1,
    )
    torch.testing.assert_close(out[0, 0, 1:5].double(), want, rtol=0, atol=1e-6)
    assert out[0, 0, 0] == float("-inf") and out[0, 0, 5] == float("-inf")


def test_group_scores_nan_and_infinite_heads(device):
    """NaN candidates are ignored; a head with no finite candidate (all -inf, or a +inf) adds nothing."""
    G, Tcap = 3, 40
    scores = torch.randn(1, G, Tcap)
    scores[0, 0, 5:9] = float("nan")
    scores[0, 1] = float("-inf")
    scores[0, 2, 11] = float("inf")
    lengths = torch.tensor([Tcap], dtype=torch.int32)
    out = a2ats_core.group_scores(scores.to(device), lengths.to(device), group_size=G, sink=2, window=3)
    sync(device)
    check_group_scores(out, scores, lengths, G, 2, 3)
    # Only head 0 has a distribution: its NaN tokens get -inf, the rest its log softmax.
    assert out.cpu()[0, 0, 5:9].eq(float("-inf")).all()


@pytest.mark.parametrize("G", [1, 4])
def test_group_scores_strided_and_out(device, G):
    B, Hkv, Tcap = 3, 2, 50
    base = torch.randn(B, Hkv * G * 2, Tcap + 9)
    scores = base[:, ::2, 3 : 3 + Tcap]  # strided heads, offset tokens
    lengths = torch.tensor([50, 20, 7], dtype=torch.int32)
    out_base = torch.full((B, Hkv, Tcap + 5), 42.0)
    out = out_base[:, :, :Tcap]
    got = a2ats_core.group_scores(
        scores.to(device),
        lengths.to(device),
        group_size=G,
        sink=2,
        window=4,
        out=out.to(device) if device == "cpu" else None,
    )
    sync(device)
    check_group_scores(got, scores.contiguous(), lengths, G, 2, 4)
    if device == "cpu":
        assert got.data_ptr() == out.data_ptr()
        assert out_base[:, :, Tcap:].eq(42.0).all()  # the padding of the rows is left alone


@pytest.mark.parametrize("k", [1, 5, 30])
@pytest.mark.parametrize("G", [3, 7])
def test_selecting_from_group_scores_reads_exactly_k_rows(device, G, k):
    """The point of the per-KV-head budget: k middle rows per KV head whatever G is (the union of
    per-head top k reads up to G k)."""
    B, Hkv, Tcap, sink, window = 3, 2, 96, 4, 8
    lengths = torch.tensor([96, 40, 10], dtype=torch.int32)
    scores = torch.randn(B, Hkv * G, Tcap)
    combined = a2ats_core.group_scores(scores.to(device), lengths.to(device), group_size=G, sink=sink, window=window)
    idx, cnt = a2ats_core.select_topk(combined, k, lengths.to(device), group_size=1, sink=sink, window=window)
    sync(device)
    for b, length in enumerate(lengths.tolist()):
        resident = min(sink, length) + min(window, max(length - sink, 0))
        middle = max(length - sink - window, 0)
        assert (cnt.cpu()[b] == resident + min(k, middle)).all()
    # ... and those k are the top k of the combined scores (the reference's selection).
    ref_idx, ref_cnt = reference.select_topk(combined.cpu(), k, lengths, group_size=1, sink=sink, window=window)
    assert torch.equal(idx.cpu(), ref_idx) and torch.equal(cnt.cpu(), ref_cnt)


def test_group_scores_refuses_bad_arguments():
    scores, lengths = torch.zeros(1, 6, 8), torch.tensor([8], dtype=torch.int32)
    with pytest.raises(ValueError, match="group_size must be >= 1 and divide scores.shape"):
        a2ats_core.group_scores(scores, lengths, group_size=4, sink=0, window=0)
    with pytest.raises(ValueError, match="sink must be >= 0"):
        a2ats_core.group_scores(scores, lengths, group_size=3, sink=-1, window=0)
    with pytest.raises(TypeError, match="scores"):
        a2ats_core.group_scores(scores.double(), lengths, group_size=3, sink=0, window=0)
    with pytest.raises(ValueError, match=r"lengths\[0\] must be in \[0, 8\]"):
        a2ats_core.group_scores(scores, torch.tensor([9], dtype=torch.int32), group_size=3, sink=0, window=0)
    out = torch.full((1, 2, 8), 7.0)
    with pytest.raises(ValueError, match="out"):
        a2ats_core.group_scores(scores, lengths, group_size=3, sink=0, window=0, out=out[:, :, :4])
    assert out.eq(7.0).all()
