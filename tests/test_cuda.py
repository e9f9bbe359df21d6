"""CUDA-only checks beyond the device-parametrised kernel tests (test_rotary.py, test_select_topk.py & co.).

CPU-vs-CUDA equality of the native kernels on identical inputs (codes, scores, selected sets),
large selections (1M tokens, k = 16k), the ``stream`` argument, the KVStore's append from CUDA
tensors, and gathers with several streams (and Python threads) in flight. Every test here is
skipped, with the reason, when there is no usable GPU; ``test_cuda_emulated.py`` runs the CUDA
kernel code on the CPU instead.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import a2ats_core

from conftest import CUDA_SKIP_REASON  # one definition of when CUDA tests can run

SKIP_REASON = CUDA_SKIP_REASON
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(2024)
    yield


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]) if t.is_floating_point() else t


# ------------------------------------------------------------------------------------ rotary


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_cpu_vs_cuda(dtype, interleaved):
    B, H, T, D, R = 2, 4, 33, 128, 96
    x = torch.randn(B, H, T, D).to(dtype)
    positions = torch.randint(-300_000, 2_000_000, (B, T), dtype=torch.int64)
    positions[0, :4] = torch.tensor([0, -1, 131071, -131071])
    inv_freq = 1.0 / 500000 ** (torch.arange(0, R, 2, dtype=torch.float32) / R)
    cpu = a2ats_core.rotary(x, positions, inv_freq, interleaved=interleaved)
    gpu = a2ats_core.rotary(x.cuda(), positions.cuda(), inv_freq.cuda(), interleaved=interleaved)
    torch.cuda.synchronize()
    # Same sin/cos recipe; only FMA contraction on the CPU may move a rounding.
    tol = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(gpu.cpu().float(), cpu.float(), rtol=tol, atol=tol)
    assert torch.equal(bits(gpu[..., R:]), bits(x[..., R:]))  # pass-through dims copied bit for bit
    # In place on a strided view.
    base = x.cuda().transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, T, D) with head stride D
    a2ats_core.rotary(base, positions.cuda(), inv_freq.cuda(), interleaved=interleaved, out=base)
    torch.testing.assert_close(base.cpu().float(), cpu.float(), rtol=tol, atol=tol)


# --------------------------------------------------------------------------------- vq_encode


def _check_codes(x, cent, c_cpu, c_gpu):
    """Codes equal, or (near-ties, different summation order) equally close in float64."""
    if torch.equal(c_cpu, c_gpu):
        return
    B, Hkv, T, D = x.shape
    _, M, C, dsub = cent.shape
    diff = (c_cpu != c_gpu).nonzero().tolist()
    assert len(diff) <= max(3, c_cpu.numel() // 1000), f"{len(diff)} of {c_cpu.numel()} codes differ"
    xs = x.double().reshape(B, Hkv, T, M, dsub)
    for b, g, t, m in diff:
        assert 0 <= int(c_gpu[b, g, t, m]) < C
        d = [float((xs[b, g, t, m] - cent[g, m, int(c[b, g, t, m])].double()).square().sum()) for c in (c_cpu, c_gpu)]
        assert abs(d[0] - d[1]) <= 1e-5 * (1 + d[0]), (b, g, t, m, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("D,M,C", [(128, 1, 4096), (64, 2, 256), (48, 2, 100), (128, 4, 16)])
def test_vq_encode_cpu_equals_cuda(dtype, D, M, C):
    B, Hkv, T = 2, 3, 300
    x = torch.randn(B, Hkv, T, D).to(dtype)
    cent = torch.randn(Hkv, M, C, D // M)
    cent[:, :, 1::2] = cent[:, :, 0::2][:, :, : cent[:, :, 1::2].shape[2]]  # exact duplicates: lowest index wins
    c_cpu = a2ats_core.vq_encode(x, cent)
    c_gpu = a2ats_core.vq_encode(x.cuda(), cent.cuda()).cpu()
    assert (c_gpu % 2 == 0).all(), "an exact tie must go to the lower (even) index"
    _check_codes(x.float(), cent, c_cpu, c_gpu)


def test_vq_encode_strided_output():
    B, Hkv, T, D, M, C = 1, 2, 70, 64, 2, 64
    x = torch.randn(B, Hkv, T, D, device="cuda")
    cent = torch.randn(Hkv, M, C, D // M, device="cuda")
    out = torch.full((B, Hkv, T, M + 3), -7, dtype=torch.int16, device="cuda")
    a2ats_core.vq_encode(x, cent, out=out[..., :M])
    assert (out[..., M:] == -7).all()
    _check_codes(x.cpu(), cent.cpu(), a2ats_core.vq_encode(x.cpu(), cent.cpu()), out[..., :M].cpu())


# -------------------------------------------------------------------------------- lut_scores


@pytest.mark.parametrize(
    "D,M,C,NB", [(128, 1, 4096, 1), (128, 1, 4096, 4), (64, 2, 256, 1), (64, 1, 32768, 2), (40, 4, 50, 3)]
)
def test_lut_scores_cpu_vs_cuda(D, M, C, NB):
    B, Hkv, G, Tcap = 3, 2, 4, 9000
    q = torch.randn(B, Hkv * G, NB, D) if NB > 1 else torch.randn(B, Hkv * G, D)
    cent = torch.randn(Hkv, M, C, D // M)
    codes = torch.randint(0, C, (B, Hkv, Tcap, M), dtype=torch.int16)
    lengths = torch.tensor([Tcap, 0, 4097], dtype=torch.int32)
    edges = torch.tensor([64 * 4**j for j in range(NB - 1)], dtype=torch.int32) if NB > 1 else None
    cpu = a2ats_core.lut_scores(q, cent, codes, lengths, bin_edges=edges)
    gpu = a2ats_core.lut_scores(
        q.cuda(), cent.cuda(), codes.cuda(), lengths.cuda(), bin_edges=None if edges is None else edges.cuda()
    ).cpu()
    assert torch.equal(torch.isinf(gpu), torch.isinf(cpu))
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-6)


def test_lut_scores_bad_codes_give_nan_on_cuda():
    """CUDA does not read codes back to the host: a code outside [0, C) scores NaN (never selected)."""
    B, Hkv, G, D, M, C, Tcap = 2, 2, 2, 16, 2, 8, 12
    q = torch.randn(B, Hkv * G, D, device="cuda")
    cent = torch.randn(Hkv, M, C, D // M, device="cuda")
    codes = torch.randint(0, C, (B, Hkv, Tcap, M), dtype=torch.int16, device="cuda")
    codes[1, 1, 4, 1] = C
    codes[0, 0, 2, 0] = -1
    lengths = torch.tensor([Tcap, 5], dtype=torch.int32, device="cuda")
    scores = a2ats_core.lut_scores(q, cent, codes, lengths).cpu()
    nan = torch.isnan(scores)
    assert nan[1, 2:4, 4].all() and nan[0, 0:2, 2].all() and int(nan.sum()) == 4


def test_lut_scores_lengths_clamped_on_cuda():
    """Device lengths are not validated on the host; out-of-range ones are clamped, never read past."""
    q = torch.randn(2, 4, 16, device="cuda")
    cent = torch.randn(2, 1, 8, 16, device="cuda")
    codes = torch.randint(0, 8, (2, 2, 10, 1), dtype=torch.int16, device="cuda")
    scores = a2ats_core.lut_scores(q, cent, codes, torch.tensor([99, -3], dtype=torch.int32, device="cuda")).cpu()
    assert torch.isfinite(scores[0]).all() and torch.isneginf(scores[1]).all()


# ------------------------------------------------------------------------------- select_topk


def _scores(kind: str, B: int, Hq: int, T: int) -> torch.Tensor:
    if kind == "random":
        return torch.randn(B, Hq, T)
    if kind == "few_values":  # heavy ties: the tie-break (lower index first) decides
        return torch.randint(0, 7, (B, Hq, T)).float() * 0.5
    if kind == "equal":
        return torch.full((B, Hq, T), 0.25)
    s = torch.randn(B, Hq, T)  # specials: NaN ranks lowest, -0.0 below +0.0
    r = torch.randint(0, 10, s.shape)
    s[r == 0] = float("nan")
    s[r == 1] = float("-inf")
    s[r == 2] = float("inf")
    s[r == 3] = -0.0
    s[r == 4] = 0.0
    return s


@pytest.mark.parametrize("kind", ["random", "few_values", "equal", "specials"])
@pytest.mark.parametrize("G,k,sink,window", [(1, 100, 8, 64), (4, 3000, 8, 64), (3, 1, 0, 0), (7, 37, 4, 16)])
def test_select_topk_cpu_equals_cuda(kind, G, k, sink, window):
    B, Hkv, T = 2, 2, 20000
    scores = _scores(kind, B, Hkv * G, T)
    lengths = torch.tensor([T, 9001], dtype=torch.int32)
    args = dict(group_size=G, sink=sink, window=window)
    i_cpu, c_cpu = a2ats_core.select_topk(scores, k, lengths, **args)
    i_gpu, c_gpu = a2ats_core.select_topk(scores.cuda(), k, lengths.cuda(), **args)
    assert torch.equal(c_gpu.cpu(), c_cpu)
    assert torch.equal(i_gpu.cpu(), i_cpu)


@pytest.mark.parametrize("lengths", [[0, 50, 72], [300, 100, 73], [1, 8, 9]])
@pytest.mark.parametrize("k", [0, 5, 1000])
def test_select_topk_short_rows(lengths, k):
    """Rows shorter than sink + window, k >= candidates, k = 0."""
    scores = torch.randn(3, 4, 300)
    lengths = torch.tensor(lengths, dtype=torch.int32)
    args = dict(group_size=2, sink=8, window=64)
    i_cpu, c_cpu = a2ats_core.select_topk(scores, k, lengths, **args)
    i_gpu, c_gpu = a2ats_core.select_topk(scores.cuda(), k, lengths.cuda(), **args)
    assert torch.equal(i_gpu.cpu(), i_cpu) and torch.equal(c_gpu.cpu(), c_cpu)


def test_select_topk_large():
    """k = 16k over 1M tokens (radix selection across 256 tiles per row)."""
    B, Hkv, G, T, k = 1, 2, 4, 1 << 20, 16384
    scores = torch.randn(B, Hkv * G, T)
    scores[0, 1, ::7] = 3.0  # a big tie block straddling the threshold in one head
    lengths = torch.tensor([T - 5], dtype=torch.int32)
    args = dict(group_size=G, sink=8, window=64)
    i_cpu, c_cpu = a2ats_core.select_topk(scores, k, lengths, **args)
    i_gpu, c_gpu = a2ats_core.select_topk(scores.cuda(), k, lengths.cuda(), **args)
    assert torch.equal(c_gpu.cpu(), c_cpu) and torch.equal(i_gpu.cpu(), i_cpu)


def test_pipeline_selected_sets_match():
    """lut_scores + select_topk on each device select (almost always exactly) the same rows."""
    B, Hkv, G, D, C, T = 1, 8, 4, 128, 4096, 32768
    q = torch.randn(B, Hkv * G, D)
    cent = torch.randn(Hkv, 1, C, D)
    codes = torch.randint(0, C, (B, Hkv, T, 1), dtype=torch.int16)
    lengths = torch.tensor([T], dtype=torch.int32)
    k = int(0.03 * T)
    args = dict(group_size=G, sink=8, window=64)
    i_cpu, c_cpu = a2ats_core.select_topk(a2ats_core.lut_scores(q, cent, codes, lengths), k, lengths, **args)
    s_gpu = a2ats_core.lut_scores(q.cuda(), cent.cuda(), codes.cuda(), lengths.cuda())
    i_gpu, c_gpu = a2ats_core.select_topk(s_gpu, k, lengths.cuda(), **args)
    i_gpu, c_gpu = i_gpu.cpu(), c_gpu.cpu()
    for g in range(Hkv):
        a = set(i_cpu[0, g, : c_cpu[0, g]].tolist())
        b = set(i_gpu[0, g, : c_gpu[0, g]].tolist())
        # Bit-equal LUTs give identical sets; a CPU build without FMA may move last-ulp ties of a code.
        assert len(a ^ b) <= 0.01 * len(a), f"KV head {g}: {len(a ^ b)} of {len(a)} rows differ"


def test_stream_argument():
    """Kernels run on the given stream (explicit int, or torch's current stream by default)."""
    side = torch.cuda.Stream()
    scores = torch.randn(1, 4, 50000, device="cuda")
    lengths = torch.tensor([50000], dtype=torch.int32, device="cuda")
    expect = a2ats_core.select_topk(scores.cpu(), 500, lengths.cpu(), group_size=2, sink=8, window=64)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        s2 = scores * 1.0  # produced on `side`
        idx, cnt = a2ats_core.select_topk(s2, 500, lengths, group_size=2, sink=8, window=64)  # current = side
    idx2, cnt2 = a2ats_core.select_topk(s2, 500, lengths, group_size=2, sink=8, window=64, stream=side.cuda_stream)
    side.synchronize()
    for i, c in ((idx, cnt), (idx2, cnt2)):
        assert torch.equal(i.cpu(), expect[0]) and torch.equal(c.cpu(), expect[1])


# -------------------------------------------------------------------------------- KV store


def _reference_gather(k_all, indices, counts):
    B, Hkv, kmax = indices.shape
    out = torch.zeros(B, Hkv, kmax, k_all.shape[-1], dtype=k_all.dtype)
    for b in range(B):
        for g in range(Hkv):
            n = int(counts[b, g])
            out[b, g, :n] = k_all[b, g, indices[b, g, :n].long()]
    return out


def _random_selection(B, Hkv, kmax, lengths, gen=None):
    indices = torch.full((B, Hkv, kmax), -1, dtype=torch.int32)
    counts = torch.zeros(B, Hkv, dtype=torch.int32)
    for b in range(B):
        for g in range(Hkv):
            n = int(torch.randint(0, min(kmax, lengths[b]) + 1, (1,), generator=gen))
            indices[b, g, :n] = torch.randperm(lengths[b], generator=gen)[:n].sort().values.int()
            counts[b, g] = n
    return indices, counts


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
def test_append_from_cuda(dtype):
    L, B, Hkv, D, cap = 2, 2, 3, 64, 400
    store = a2ats_core.KVStore(L, B, Hkv, D, cap, dtype)
    # A strided CUDA view (token stride 2 * D), then a ragged append with num_tokens.
    k1 = torch.randn(B, Hkv, 150, 2 * D, device="cuda").to(dtype)[..., :D]
    v1 = torch.randn(B, Hkv, 150, 2 * D, device="cuda").to(dtype)[..., D:]
    store.append(1, k1, v1)
    k2 = torch.randn(B, Hkv, 40, D, device="cuda").to(dtype)
    v2 = torch.randn(B, Hkv, 40, D, device="cuda").to(dtype)
    store.append(1, k2, v2, num_tokens=torch.tensor([40, 7], dtype=torch.int32))
    assert store.lengths().tolist() == [[0, 0], [190, 157]]
    # Read back with a CPU gather of every stored row.
    kmax = 190
    indices = torch.arange(kmax, dtype=torch.int32).expand(B, Hkv, kmax).contiguous()
    counts = torch.tensor([[190] * Hkv, [157] * Hkv], dtype=torch.int32)
    out_k = torch.zeros(B, Hkv, kmax, D, dtype=dtype)
    out_v = torch.zeros_like(out_k)
    store.gather(1, indices, counts, out_k, out_v)
    k_all = torch.cat([k1.cpu(), k2.cpu()], dim=2)
    v_all = torch.cat([v1.cpu(), v2.cpu()], dim=2)
    assert torch.equal(bits(out_k[0]), bits(k_all[0])) and torch.equal(bits(out_v[0]), bits(v_all[0]))
    assert torch.equal(bits(out_k[1, :, :157]), bits(k_all[1, :, :157]))
    assert torch.equal(bits(out_v[1, :, :157]), bits(v_all[1, :, :157]))


def test_append_on_side_stream():
    """append(stream=s) copies after the work queued on s that produced k and v."""
    store = a2ats_core.KVStore(1, 1, 2, 128, 4096, torch.float16)
    side = torch.cuda.Stream()
    big = torch.randn(1, 2, 4096, 128, device="cuda", dtype=torch.float16)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        k = (big @ torch.eye(128, device="cuda", dtype=torch.float16)) * 2  # slow-ish producer on `side`
        v = k + 1
        store.append(0, k, v)  # default stream: side (current)
    expect = big.cpu().float() * 2
    out = torch.zeros(1, 2, 4096, 128, dtype=torch.float16)
    idx = torch.arange(4096, dtype=torch.int32).expand(1, 2, 4096).contiguous()
    cnt = torch.full((1, 2), 4096, dtype=torch.int32)
    store.gather(0, idx, cnt, out, out.clone())
    torch.testing.assert_close(out.float(), expect, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("indices_on_device", [False, True])
def test_gather_large_many_chunks(indices_on_device):
    """More rows than several staging chunks (4 MiB of K+V each): every chunk lands in place."""
    B, Hkv, D, cap, kmax = 2, 8, 128, 30000, 12000
    store = a2ats_core.KVStore(1, B, Hkv, D, cap, torch.float16)
    k = torch.randn(B, Hkv, cap, D, dtype=torch.float16)
    v = torch.randn(B, Hkv, cap, D, dtype=torch.float16)
    store.append(0, k, v)
    gen = torch.Generator().manual_seed(7)
    indices, counts = _random_selection(B, Hkv, kmax, [cap, cap], gen)
    counts[0, 0] = kmax
    indices[0, 0] = torch.randperm(cap, generator=gen)[:kmax].int()  # unsorted is fine too
    out_k = torch.full((B, Hkv, kmax, D), 9.0, dtype=torch.float16, device="cuda")
    out_v = torch.full_like(out_k, 9.0)
    dev = "cuda" if indices_on_device else "cpu"
    store.gather(0, indices.to(dev), counts.to(dev), out_k, out_v)
    torch.cuda.synchronize()
    ref_k, ref_v = _reference_gather(k, indices, counts), _reference_gather(v, indices, counts)
    valid = torch.arange(kmax)[None, None, :] < counts[..., None]
    assert torch.equal(bits(out_k.cpu()[valid]), bits(ref_k[valid]))
    assert torch.equal(bits(out_v.cpu()[valid]), bits(ref_v[valid]))
    assert (out_k.cpu()[~valid] == 9.0).all() and (out_v.cpu()[~valid] == 9.0).all()  # untouched past counts


def test_gather_several_streams_in_flight():
    """Back-to-back gathers on different streams (and from several Python threads) into separate
    outputs: the shared staging slots must never be refilled while a copy from them is in flight."""
    L, B, Hkv, D, cap, kmax = 3, 2, 4, 128, 20000, 6000
    store = a2ats_core.KVStore(L, B, Hkv, D, cap, torch.bfloat16)
    data = [(torch.randn(B, Hkv, cap, D).bfloat16(), torch.randn(B, Hkv, cap, D).bfloat16()) for _ in range(L)]
    for layer, (k, v) in enumerate(data):
        store.append(layer, k, v)
    streams = [torch.cuda.Stream() for _ in range(4)]
    jobs = []
    gen = torch.Generator().manual_seed(11)
    for j in range(12):
        layer = j % L
        indices, counts = _random_selection(B, Hkv, kmax, [cap, cap], gen)
        out_k = torch.empty(B, Hkv, kmax, D, dtype=torch.bfloat16, device="cuda")
        out_v = torch.empty_like(out_k)
        jobs.append((layer, indices, counts, out_k, out_v, streams[j % len(streams)]))
    torch.cuda.synchronize()  # the outputs' allocation is done before other streams write them

    def run(job, on_device):
        layer, indices, counts, out_k, out_v, stream = job
        dev = "cuda" if on_device else "cpu"
        with torch.cuda.stream(stream):
            idx, cnt = indices.to(dev), counts.to(dev)
            store.gather(layer, idx, cnt, out_k, out_v, stream=stream.cuda_stream)
            # Follow-up work on the same stream must see the gathered rows.
            out_k.mul_(1)

    for n, job in enumerate(jobs[:6]):  # one thread, streams interleaved
        run(job, on_device=n % 2 == 0)
    threads = [threading.Thread(target=run, args=(job, n % 2 == 1)) for n, job in enumerate(jobs[6:])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    for layer, indices, counts, out_k, out_v, _ in jobs:
        k, v = data[layer]
        valid = torch.arange(kmax)[None, None, :] < counts[..., None]
        assert torch.equal(bits(out_k.cpu()[valid]), bits(_reference_gather(k, indices, counts)[valid]))
        assert torch.equal(bits(out_v.cpu()[valid]), bits(_reference_gather(v, indices, counts)[valid]))


def test_gather_after_select_topk_on_device():
    """The decode-step path: scores -> select_topk on the GPU -> gather with device indices."""
    B, Hkv, G, D, T = 1, 2, 2, 64, 5000
    store = a2ats_core.KVStore(1, B, Hkv, D, T, torch.float16)
    k = torch.randn(B, Hkv, T, D, dtype=torch.float16, device="cuda")
    store.append(0, k, k)
    scores = torch.randn(B, Hkv * G, T, device="cuda")
    lengths = torch.tensor([T], dtype=torch.int32, device="cuda")
    idx, cnt = a2ats_core.select_topk(scores, 150, lengths, group_size=G, sink=8, window=64)
    out = torch.zeros(B, Hkv, idx.shape[-1], D, dtype=torch.float16, device="cuda")
    store.gather(0, idx, cnt, out, out.clone())
    torch.cuda.synchronize()
    ref = _reference_gather(k.cpu(), idx.cpu(), cnt.cpu())
    assert torch.equal(bits(out.cpu()), bits(ref))


def test_pinned_store():
    assert a2ats_core.KVStore(1, 1, 2, 64, 32, "float16").pinned is True


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    """Kernels run on the device of their inputs, whichever is current."""
    scores = torch.randn(1, 4, 3000, device="cuda:1")
    lengths = torch.tensor([3000], dtype=torch.int32, device="cuda:1")
    with torch.cuda.device(0):
        idx, cnt = a2ats_core.select_topk(scores, 50, lengths, group_size=2, sink=8, window=64)
    assert idx.device == torch.device("cuda:1")
    expect = a2ats_core.select_topk(scores.cpu(), 50, lengths.cpu(), group_size=2, sink=8, window=64)
    assert torch.equal(idx.cpu(), expect[0]) and torch.equal(cnt.cpu(), expect[1])
    assert np.array_equal(cnt.cpu().numpy(), expect[1].numpy())
