"""a2ats_core.KVStore: host K/V storage, append and gather, against reference.gather."""

from __future__ import annotations

import faulthandler
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import a2ats_core
from a2ats import reference

requires_cuda = pytest.mark.skipif(
    not (a2ats_core.built_with_cuda() and a2ats_core.cuda_device_count() > 0 and torch.cuda.is_available()),
    reason="needs a CUDA build of a2ats_core, a CUDA device and torch with CUDA",
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]
NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]) if t.is_floating_point() else t


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def random_selection(B, Hkv, kmax, row_lengths, *, full_rows=True):
    """indices (B, Hkv, kmax) int32 and counts (B, Hkv) int32: valid random rows before each
    count, garbage (negative and far out of range) after it. Counts include 0 and kmax."""
    counts = torch.randint(0, kmax + 1, (B, Hkv), dtype=torch.int32)
    if full_rows:
        counts.view(-1)[0] = kmax
        counts.view(-1)[-1] = 0 if B * Hkv > 1 else kmax
    indices = torch.empty(B, Hkv, kmax, dtype=torch.int32)
    for b in range(B):
        length = int(row_lengths[b])
        if length == 0:
            counts[b] = 0
        indices[b] = torch.randint(0, max(length, 1), (Hkv, kmax), dtype=torch.int32)
    garbage = torch.tensor([-5, 10**9, -(2**31), 2**31 - 1], dtype=torch.int32)
    past = torch.arange(kmax)[None, None, :] >= counts[..., None]
    indices[past] = garbage.repeat(int(past.sum()) // 4 + 1)[: int(past.sum())]
    return indices, counts


def check_gathered(out, before, rows, indices, counts):
    """out (B, Hkv, Kmax, D) holds rows[b, g, indices[b, g, i]] for i < counts[b, g] bit-exactly
    (checked against reference.gather) and its slots past counts are untouched (== before)."""
    out, before = out.detach().cpu(), before.detach().cpu()
    kmax = indices.shape[-1]
    valid = torch.arange(kmax)[None, None, :] < counts.long()[..., None]
    ref = reference.gather(rows, indices, counts)
    assert torch.equal(bits(out)[valid], bits(ref)[valid]), "gathered rows differ from reference.gather"
    assert torch.equal(bits(out)[~valid], bits(before)[~valid]), "gather wrote slots past counts"


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype_form", ["torch", "str"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_append_pieces_then_gather(device, dtype, dtype_form, threads):
    L, B, Hkv, D, cap = 2, 3, 2, 64, 900
    store = a2ats_core.KVStore(L, B, Hkv, D, cap, dtype if dtype_form == "torch" else NAMES[dtype], threads=threads)
    assert store.dtype == NAMES[dtype]
    assert (store.num_layers, store.batch, store.num_kv_heads, store.head_dim, store.capacity) == (L, B, Hkv, D, cap)
    assert store.num_threads == threads
    assert store.nbytes == 2 * L * B * Hkv * cap * D * torch.tensor([], dtype=dtype).element_size()
    lengths = store.lengths()
    assert isinstance(lengths, np.ndarray) and lengths.dtype == np.int64 and lengths.shape == (L, B)
    assert (lengths == 0).all()

    pieces = {0: [5, 1, 0, 300, 17], 1: [2, 40]}
    all_k, all_v = {}, {}
    for layer, sizes in pieces.items():
        ks, vs = [], []
        for t in sizes:
            k, v = torch.randn(B, Hkv, t, D).to(dtype), torch.randn(B, Hkv, t, D).to(dtype)
            store.append(layer, k.to(device), v.to(device))
            ks.append(k)
            vs.append(v)
        all_k[layer], all_v[layer] = torch.cat(ks, 2), torch.cat(vs, 2)
    sync(device)
    assert store.lengths().tolist() == [[sum(pieces[0])] * B, [sum(pieces[1])] * B]

    for layer, kmax in [(0, 600), (1, 9)]:
        n = all_k[layer].shape[2]
        indices, counts = random_selection(B, Hkv, kmax, [n] * B)
        out_k = torch.randn(B, Hkv, kmax, D).to(dtype)
        out_v = torch.randn(B, Hkv, kmax, D).to(dtype)
        before_k, before_v = out_k.clone(), out_v.clone()
        out_k, out_v = out_k.to(device), out_v.to(device)
        store.gather(layer, indices.to(device), counts.to(device), out_k, out_v)
        sync(device)
        check_gathered(out_k, before_k, all_k[layer], indices, counts)
        check_gathered(out_v, before_v, all_v[layer], indices, counts)
    # Gathering leaves the store alone.
    assert store.lengths().tolist() == [[sum(pieces[0])] * B, [sum(pieces[1])] * B]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ragged_appends(device, dtype):
    """num_tokens appends only the first num_tokens[b] rows of each batch row."""
    L, B, Hkv, D, cap = 1, 3, 2, 128, 200
    store = a2ats_core.KVStore(L, B, Hkv, D, cap, dtype)
    rows_k = [[] for _ in range(B)]
    rows_v = [[] for _ in range(B)]
    for t, num in [(7, [7, 0, 3]), (1, [1, 1, 0]), (20, [0, 20, 11]), (4, [2, 4, 4])]:
        k, v = torch.randn(B, Hkv, t, D).to(dtype), torch.randn(B, Hkv, t, D).to(dtype)
        num_tokens = torch.tensor(num, dtype=torch.int32)
        store.append(0, k.to(device), v.to(device), num_tokens=num_tokens)
        for b in range(B):
            rows_k[b].append(k[b, :, : num[b]])
            rows_v[b].append(v[b, :, : num[b]])
    sync(device)
    lens = [sum(r.shape[1] for r in rows_k[b]) for b in range(B)]
    assert store.lengths().tolist() == [lens]
    assert lens == [10, 25, 18]
    padded_k = torch.zeros(B, Hkv, max(lens), D, dtype=dtype)
    padded_v = torch.zeros(B, Hkv, max(lens), D, dtype=dtype)
    for b in range(B):
        padded_k[b, :, : lens[b]] = torch.cat(rows_k[b], 1)
        padded_v[b, :, : lens[b]] = torch.cat(rows_v[b], 1)
    kmax = 30
    indices, counts = random_selection(B, Hkv, kmax, lens)
    out_k = torch.zeros(B, Hkv, kmax, D, dtype=dtype, device=device)
    out_v = torch.zeros(B, Hkv, kmax, D, dtype=dtype, device=device)
    store.gather(0, indices.to(device), counts.to(device), out_k, out_v)
    sync(device)
    check_gathered(out_k, torch.zeros_like(out_k), padded_k, indices, counts)
    check_gathered(out_v, torch.zeros_like(out_v), padded_v, indices, counts)
    # Every stored row, in order: the exact concatenation of what was appended.
    all_idx = torch.arange(max(lens), dtype=torch.int32).expand(B, Hkv, max(lens)).contiguous()
    all_cnt = torch.tensor(lens, dtype=torch.int32)[:, None].expand(B, Hkv).contiguous()
    full_k = torch.zeros(B, Hkv, max(lens), D, dtype=dtype, device=device)
    full_v = torch.zeros_like(full_k)
    store.gather(0, all_idx.to(device), all_cnt.to(device), full_k, full_v)
    sync(device)
    assert torch.equal(bits(full_k), bits(padded_k)) and torch.equal(bits(full_v), bits(padded_v))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_strided_sources_and_outputs(device, dtype):
    L, B, Hkv, D, cap, t = 1, 2, 3, 64, 64, 40
    store = a2ats_core.KVStore(L, B, Hkv, D, cap, dtype)
    k_dense = torch.randn(B, Hkv, t, D).to(dtype)
    v_dense = torch.randn(B, Hkv, t, D).to(dtype)
    k_base = torch.randn(B, t, Hkv, D).to(dtype)  # k: (B, t, Hkv, D) transposed
    k_base.transpose(1, 2).copy_(k_dense)
    v_base = torch.randn(B, 2 * Hkv, 2 * t, D + 8).to(dtype)  # v: every other head and token, padded rows
    v_base[:, ::2, ::2, :D] = v_dense
    k = k_base.to(device).transpose(1, 2)
    v = v_base.to(device)[:, ::2, ::2, :D]
    assert not k.is_contiguous() and not v.is_contiguous()
    store.append(0, k[:, :, :25], v[:, :, :25])
    store.append(0, k[:, :, 25:], v[:, :, 25:])
    kmax = 50
    indices, counts = random_selection(B, Hkv, kmax, [t] * B)
    idx_base = torch.full((B, Hkv, kmax + 3), -9, dtype=torch.int32)
    idx_base[..., 2 : 2 + kmax] = indices
    cnt_base = counts.t().contiguous()  # counts as a transposed (Hkv, B) array
    ok_base = torch.randn(B, Hkv, kmax + 4, D + 8).to(dtype)
    ov_base = torch.randn(B, kmax, Hkv, D).to(dtype)
    ok_before, ov_before = ok_base.clone(), ov_base.clone()
    ok_based, ov_based = ok_base.to(device), ov_base.to(device)
    out_k = ok_based[:, :, 2 : 2 + kmax, :D]
    out_v = ov_based.transpose(1, 2)
    idx = idx_base.to(device)[..., 2 : 2 + kmax]
    cnt = cnt_base.to(device).t()
    assert not idx.is_contiguous() and not cnt.is_contiguous() and not out_k.is_contiguous()
    store.gather(0, idx, cnt, out_k, out_v)
    sync(device)
    check_gathered(out_k, ok_before[:, :, 2 : 2 + kmax, :D], k_dense, indices, counts)
    check_gathered(out_v, ov_before.transpose(1, 2), v_dense, indices, counts)
    # Nothing outside the output views was written.
    outside = torch.ones(ok_base.shape, dtype=torch.bool)
    outside[:, :, 2 : 2 + kmax, :D] = False
    assert torch.equal(bits(ok_based.cpu()[outside]), bits(ok_before[outside]))


def test_threads_agree(device):
    """threads=1 and threads=3 stores give bit-identical results (and match the reference)."""
    L, B, Hkv, D, cap = 1, 2, 4, 128, 3000
    stores = [a2ats_core.KVStore(L, B, Hkv, D, cap, torch.bfloat16, threads=n) for n in (1, 3)]
    assert [s.num_threads for s in stores] == [1, 3]
    k = torch.randn(B, Hkv, cap, D).to(torch.bfloat16)
    v = torch.randn(B, Hkv, cap, D).to(torch.bfloat16)
    for s in stores:
        s.append(0, k.to(device), v.to(device))
    kmax = 1100  # several gather chunks per row
    indices, counts = random_selection(B, Hkv, kmax, [cap] * B)
    outs = []
    for s in stores:
        out_k = torch.zeros(B, Hkv, kmax, D, dtype=torch.bfloat16, device=device)
        out_v = torch.zeros_like(out_k)
        s.gather(0, indices.to(device), counts.to(device), out_k, out_v)
        sync(device)
        check_gathered(out_k, torch.zeros_like(out_k), k, indices, counts)
        check_gathered(out_v, torch.zeros_like(out_v), v, indices, counts)
        outs.append((bits(out_k), bits(out_v)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_concurrent_python_threads():
    """Several Python threads gathering from one store at once see whole, correct results."""
    B, Hkv, D, cap = 2, 2, 64, 500
    store = a2ats_core.KVStore(1, B, Hkv, D, cap, "float16", threads=2)
    k = torch.randn(B, Hkv, cap, D).half()
    v = torch.randn(B, Hkv, cap, D).half()
    store.append(0, k, v)
    selections = [random_selection(B, Hkv, 300, [cap] * B) for _ in range(8)]

    def work(sel):
        out_k = torch.zeros(B, Hkv, 300, D, dtype=torch.float16)
        out_v = torch.zeros_like(out_k)
        for _ in range(5):
            store.gather(0, sel[0], sel[1], out_k, out_v)
        return out_k, out_v

    # A lock-order deadlock would hang the whole process with the GIL held; the watchdog turns
    # that into a crash with every thread's traceback instead of a silent hang.
    faulthandler.dump_traceback_later(120, exit=True)
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(work, selections))
    finally:
        faulthandler.cancel_dump_traceback_later()
    for (indices, counts), (out_k, out_v) in zip(selections, results):
        check_gathered(out_k, torch.zeros_like(out_k), k, indices, counts)
        check_gathered(out_v, torch.zeros_like(out_v), v, indices, counts)


_HAND_OFFS = """
import faulthandler, random, threading, time
import torch, a2ats_core
faulthandler.dump_traceback_later(120, exit=True)  # a lost wake-up hangs; this makes it a failure
B, Hkv, D, cap = 2, 3, 64, 400
store = a2ats_core.KVStore(1, B, Hkv, D, cap, "float32", threads=3)
k, v = torch.randn(B, Hkv, cap, D), torch.randn(B, Hkv, cap, D)
store.append(0, k, v)
indices = torch.randint(0, cap, (B, Hkv, 300), dtype=torch.int32)
counts = torch.full((B, Hkv), 300, dtype=torch.int32)
want = k.gather(2, indices.long()[..., None].expand(-1, -1, -1, D))
failures = []

def run(seed):
    rng = random.Random(seed)
    out_k, out_v = torch.empty(B, Hkv, 300, D), torch.empty(B, Hkv, 300, D)
    for _ in range(1500):
        # Gaps from none to past the workers' 40 us spin: hand-offs to spinning and to sleeping threads.
        gap = rng.choice([0.0, 0.0, 10e-6, 30e-6, 60e-6, 200e-6])
        if gap:
            end = time.perf_counter() + gap
            while time.perf_counter() < end:
                pass
        out_k.fill_(float("nan"))
        store.gather(0, indices, counts, out_k, out_v)
        if not torch.equal(out_k, want):
            failures.append(seed)
            return

threads = [threading.Thread(target=run, args=(seed,)) for seed in range(2)]
for t in threads: t.start()
for t in threads: t.join()
print("failures", failures)
"""


def test_pool_hand_offs_to_spinning_and_sleeping_threads():
    """Thousands of small loops, split over every thread (A2ATS_MIN_CHUNK_OPS=1), with gaps on
    both sides of the spin window and from two Python threads at once: each one completes, whole."""
    env = dict(os.environ, A2ATS_MIN_CHUNK_OPS="1")
    result = subprocess.run([sys.executable, "-c", _HAND_OFFS], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "failures []", result.stdout[-2000:]


def test_reset_and_layers(device):
    L, B, Hkv, D, cap = 3, 2, 1, 64, 16
    store = a2ats_core.KVStore(L, B, Hkv, D, cap, torch.float32)
    nbytes = store.nbytes
    k1, v1 = torch.randn(B, Hkv, 10, D), torch.randn(B, Hkv, 10, D)
    store.append(1, k1.to(device), v1.to(device))
    sync(device)
    assert store.lengths().tolist() == [[0, 0], [10, 10], [0, 0]]  # layers are independent
    store.reset()
    assert store.lengths().tolist() == [[0] * B] * L
    assert store.nbytes == nbytes
    # After a reset, the full capacity is available again and rows restart at 0.
    k2, v2 = torch.randn(B, Hkv, cap, D), torch.randn(B, Hkv, cap, D)
    store.append(1, k2.to(device), v2.to(device))
    sync(device)
    assert store.lengths().tolist() == [[0, 0], [cap, cap], [0, 0]]
    indices = torch.arange(cap, dtype=torch.int32).flip(0).expand(B, Hkv, cap).contiguous()
    counts = torch.full((B, Hkv), cap, dtype=torch.int32)
    out_k = torch.zeros(B, Hkv, cap, D, device=device)
    out_v = torch.zeros_like(out_k)
    store.gather(1, indices.to(device), counts.to(device), out_k, out_v)
    sync(device)
    assert torch.equal(out_k.cpu(), k2.flip(2)) and torch.equal(out_v.cpu(), v2.flip(2))
    # Layer 0 is empty after the reset: any index there is out of range.
    with pytest.raises(ValueError, match="indices"):
        store.gather(
            0,
            indices[..., :1].contiguous().to(device),
            torch.ones(B, Hkv, dtype=torch.int32).to(device),
            out_k[:, :, :1],
            out_v[:, :, :1],
        )
        sync(device)


def test_pinned_flag():
    cuda_usable = a2ats_core.built_with_cuda() and a2ats_core.cuda_device_count() > 0
    store = a2ats_core.KVStore(1, 1, 2, 64, 32, "bfloat16", pinned=True)
    if not cuda_usable:
        assert store.pinned is False  # falls back to ordinary memory
    assert a2ats_core.KVStore(1, 1, 2, 64, 32, "bfloat16", pinned=False).pinned is False
    # Either way the store works.
    k = torch.randn(1, 2, 32, 64).bfloat16()
    store.append(0, k, k)
    out = torch.zeros(1, 2, 3, 64, dtype=torch.bfloat16)
    store.gather(
        0,
        torch.tensor([[[31, 0, 5]] * 2], dtype=torch.int32),
        torch.tensor([[3, 2]], dtype=torch.int32),
        out,
        out.clone(),
    )
    assert torch.equal(bits(out[0, 0]), bits(k[0, 0, [31, 0, 5]]))
    assert torch.equal(bits(out[0, 1, :2]), bits(k[0, 1, [31, 0]])) and (out[0, 1, 2] == 0).all()


def test_numpy_arrays():
    B, Hkv, D = 2, 2, 64
    store = a2ats_core.KVStore(1, B, Hkv, D, 20, "float16")
    rng = np.random.default_rng(5)
    k = rng.standard_normal((B, Hkv, 12, D)).astype(np.float16)
    v = rng.standard_normal((B, Hkv, 12, D)).astype(np.float16)
    store.append(0, k, v)
    indices = np.array([[[11, 3, 0], [5, 5, 7]], [[1, 2, -1], [0, 0, 0]]], dtype=np.int32)
    counts = np.array([[3, 3], [2, 0]], dtype=np.int32)
    out_k = np.zeros((B, Hkv, 3, D), dtype=np.float16)
    out_v = np.zeros((B, Hkv, 3, D), dtype=np.float16)
    store.gather(0, indices, counts, out_k, out_v)
    assert np.array_equal(out_k[0, 0], k[0, 0, [11, 3, 0]]) and np.array_equal(out_v[0, 1], v[0, 1, [5, 5, 7]])
    assert np.array_equal(out_k[1, 0, :2], k[1, 0, [1, 2]]) and not out_k[1, 0, 2].any() and not out_k[1, 1].any()


@requires_cuda
def test_cuda_outputs_with_host_indices():
    """Gather into CUDA outputs with indices and counts on the host, from a host-appended store."""
    B, Hkv, D, cap = 2, 2, 128, 300
    store = a2ats_core.KVStore(1, B, Hkv, D, cap, torch.float16)
    k = torch.randn(B, Hkv, cap, D).half()
    v = torch.randn(B, Hkv, cap, D).half()
    store.append(0, k, v)
    indices, counts = random_selection(B, Hkv, 100, [cap] * B)
    out_k = torch.zeros(B, Hkv, 100, D, dtype=torch.float16, device="cuda")
    out_v = torch.zeros_like(out_k)
    store.gather(0, indices, counts, out_k, out_v)
    torch.cuda.synchronize()
    check_gathered(out_k, torch.zeros_like(out_k), k, indices, counts)
    check_gathered(out_v, torch.zeros_like(out_v), v, indices, counts)


# ------------------------------------------------------------------------------ KVStore.attend


def reference_attend(keys, values, q, indices, counts, scale):
    """reference.attend over reference.gather's rows, the first counts[b, g] of them valid."""
    valid = torch.arange(indices.shape[-1])[None, None, :] < counts.long()[..., None]
    return reference.attend(
        q, reference.gather(keys, indices, counts), reference.gather(values, indices, counts), valid, scale=scale
    )


def check_attend(out, lse, ref_out, ref_lse):
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "lse must be -inf exactly where no row is selected"
    assert torch.all(lse[empty] < 0)
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "heads without rows must give zeros"
    # The kernel and the reference both compute in float32 from the same stored values; they
    # differ by summation order and the exp polynomial only (making its r^2 coefficient 0.501
    # instead of 0.5 fails this). Rounding a logit of size L moves
    # its weight by about L * 6e-8, hence the tolerance grows with the logits (lse ~ the largest).
    logit_size = max(1.0, float(ref_lse[~empty].abs().max())) if (~empty).any() else 1.0
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=3e-6 * logit_size)
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], rtol=1e-6, atol=2e-6)


@pytest.mark.every_isa
@pytest.mark.parametrize("D", [64, 128, 36])
@pytest.mark.parametrize("G", [1, 3, 7])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_attend_matches_reference(dtype, G, D):
    """Ragged lengths, counts from 0 to Kmax across several 128-row chunks, garbage past counts,
    repeated and unsorted indices."""
    B, Hkv, cap, kmax = 3, 2, 700, 300
    torch.manual_seed(G * 1000 + D)
    store = a2ats_core.KVStore(2, B, Hkv, D, cap, dtype, pinned=False)
    lengths = [cap, 1, 411]
    keys = torch.randn(B, Hkv, cap, D).to(dtype)
    values = torch.randn(B, Hkv, cap, D).to(dtype)
    store.append(1, keys, values, num_tokens=torch.tensor(lengths, dtype=torch.int32))
    indices, counts = random_selection(B, Hkv, kmax, lengths)
    counts[2, 1] = 129  # one full chunk plus one row
    indices[2, 1, :129] = torch.randint(0, lengths[2], (129,), dtype=torch.int32)
    q = torch.randn(B, Hkv * G, D)
    scale = D**-0.5
    out, lse = store.attend(1, q, indices, counts, scale=scale)
    assert out.shape == (B, Hkv * G, D) and lse.shape == (B, Hkv * G)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    check_attend(out, lse, *reference_attend(keys, values, q, indices, counts, scale))


@pytest.mark.every_isa
def test_attend_strided_views_and_out():
    """q, indices and counts as strided views, results into strided out= views; peaked
    softmax (large scale) whose small terms underflow."""
    B, Hkv, G, D, cap = 2, 4, 4, 128, 5000
    store = a2ats_core.KVStore(1, B, Hkv, D, cap, torch.bfloat16, pinned=False)
    keys = torch.randn(B, Hkv, cap, D).bfloat16()
    values = torch.randn(B, Hkv, cap, D).bfloat16()
    store.append(0, keys, values)
    q = torch.randn(B, 2 * Hkv * G, D)[:, ::2]  # every other head: a strided view
    full = torch.sort(torch.rand(B, Hkv, 1100).argsort(-1)[..., :1000], -1).values.int()
    indices = full[..., 50:]  # (B, Hkv, 950), as the cache slices the sink off
    counts = torch.full((B, 2 * Hkv), 900, dtype=torch.int32)[:, ::2]
    out = torch.full((B, Hkv * G, 2 * D), 7.0)[..., :D]
    lse = torch.full((B, 2 * Hkv * G), 7.0)[:, 3 : 3 + Hkv * G]
    for scale in (0.088, 3.0):
        result = store.attend(0, q, indices, counts, scale=scale, out=out, out_lse=lse)
        assert result[0] is out and result[1] is lse
        check_attend(out, lse, *reference_attend(keys, values, q, indices, counts, scale))


@pytest.mark.every_isa
def test_attend_merges_with_other_rows():
    """attend over two disjoint selections, merged by reference.merge_attention, equals attend
    over their union: how the cache combines the middle rows with the resident ones."""
    B, Hkv, G, D, cap = 2, 2, 3, 64, 400
    store = a2ats_core.KVStore(1, B, Hkv, D, cap, torch.float32, pinned=False)
    keys, values = torch.randn(B, Hkv, cap, D), torch.randn(B, Hkv, cap, D)
    store.append(0, keys, values)
    perm = torch.randperm(cap)
    part_a = torch.sort(perm[:150]).values.int().expand(B, Hkv, 150).contiguous()
    part_b = torch.sort(perm[150:260]).values.int().expand(B, Hkv, 110).contiguous()
    union = torch.cat([part_a, part_b], -1)
    q = torch.randn(B, Hkv * G, D)
    counts_a = torch.tensor([[150, 0], [150, 150]], dtype=torch.int32)
    counts_b = torch.tensor([[110, 110], [0, 110]], dtype=torch.int32)
    out_a, lse_a = store.attend(0, q, part_a, counts_a, scale=0.125)
    out_b, lse_b = store.attend(0, q, part_b, counts_b, scale=0.125)
    merged, merged_lse = reference.merge_attention(out_a, lse_a, out_b, lse_b)
    valid = torch.cat([torch.arange(150) < counts_a[..., None], torch.arange(110) < counts_b[..., None]], -1)
    ref_out, ref_lse = reference.attend(
        q,
        keys.gather(2, union.long()[..., None].expand(-1, -1, -1, D)),
        values.gather(2, union.long()[..., None].expand(-1, -1, -1, D)),
        valid,
        scale=0.125,
    )
    torch.testing.assert_close(merged, ref_out, rtol=1e-5, atol=3e-6)
    torch.testing.assert_close(merged_lse, ref_lse, rtol=1e-6, atol=2e-6)


def test_attend_threads_agree():
    """One thread and several give the same bits: chunk states merge in a fixed order."""
    B, Hkv, G, D, cap = 1, 2, 4, 128, 3000
    keys, values = torch.randn(B, Hkv, cap, D), torch.randn(B, Hkv, cap, D)
    indices = torch.sort(torch.randperm(cap)[:2000]).values.int().expand(B, Hkv, 2000).contiguous()
    counts = torch.tensor([[2000, 1500]], dtype=torch.int32)
    q = torch.randn(B, Hkv * G, D)
    results = []
    for threads in (1, 3):
        store = a2ats_core.KVStore(1, B, Hkv, D, cap, torch.float32, pinned=False, threads=threads)
        store.append(0, keys, values)
        results.append(store.attend(0, q, indices, counts, scale=0.1))
    assert torch.equal(bits(results[0][0]), bits(results[1][0]))
    assert torch.equal(bits(results[0][1]), bits(results[1][1]))


# ------------------------------------------------------------- slot-indexed use (vLLM's pages)


def reference_write_slots(keys, values, lengths, layer, slots, k, v):
    """A batch-1 store's rows (L, 1, Hkv, cap, D) after write_slots: row i at slot slots[i]."""
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            keys[layer, 0, :, slot] = k[i]
            values[layer, 0, :, slot] = v[i]
            lengths[layer] = max(lengths[layer], slot + 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_write_slots_then_attend_and_gather_by_slot_lists(dtype):
    """Rows written at scattered slots (skipped -1s, a later write over a reused slot, strided
    sources) read back by slot lists for N queries at once: gather and attend equal the
    reference over the same rows, for every query row."""
    L, Hkv, G, D, cap, N = 2, 2, 3, 64, 300, 4
    torch.manual_seed(7)
    store = a2ats_core.KVStore(L, 1, Hkv, D, cap, dtype, pinned=False, threads=2)
    keys, values = torch.zeros(L, 1, Hkv, cap, D, dtype=dtype), torch.zeros(L, 1, Hkv, cap, D, dtype=dtype)
    lengths = [0] * L
    writes = [
        (1, torch.tensor([5, -1, 130, 17, 299, 0], dtype=torch.int64)),
        (1, torch.randperm(128)[:50].to(torch.int64) + 128),  # a block reused: slots overwritten
        (0, torch.arange(40, dtype=torch.int64) * 7),
    ]
    for layer, slots in writes:
        wide_k = torch.randn(len(slots), Hkv + 1, D).to(dtype)  # strided source: a head slice
        k, v = wide_k[:, 1:], torch.randn(len(slots), Hkv, D).to(dtype)
        store.write_slots(layer, slots, k, v)
        reference_write_slots(keys, values, lengths, layer, slots, k, v)
    assert store.lengths().tolist() == [[lengths[0]], [lengths[1]]] == [[274], [300]]
    layer = 1
    written = torch.unique(torch.cat([s for l, s in writes if l == layer]))
    written = written[written >= 0].to(torch.int32)
    kmax = 60
    indices = written[torch.randint(0, len(written), (N, Hkv, kmax))]
    counts = torch.tensor([[kmax, 0], [1, 33], [59, kmax], [12, 12]], dtype=torch.int32)
    # gather: N query rows from one batch-1 store
    out_k = torch.zeros(N, Hkv, kmax, D, dtype=dtype)
    out_v = torch.zeros_like(out_k)
    store.gather(layer, indices, counts, out_k, out_v)
    rows_k = keys[layer].expand(N, -1, -1, -1)
    rows_v = values[layer].expand(N, -1, -1, -1)
    check_gathered(out_k, torch.zeros_like(out_k), rows_k, indices, counts)
    check_gathered(out_v, torch.zeros_like(out_v), rows_v, indices, counts)
    # attend: each of the N queries over its own slot list
    q = torch.randn(N, Hkv * G, D)
    out, lse = store.attend(layer, q, indices, counts, scale=D**-0.5)
    assert out.shape == (N, Hkv * G, D) and lse.shape == (N, Hkv * G)
    check_attend(out, lse, *reference_attend(rows_k, rows_v, q, indices, counts, D**-0.5))


def test_write_slots_refuses_bad_slots_and_keeps_rows():
    L, Hkv, D, cap = 1, 2, 16, 64
    store = a2ats_core.KVStore(L, 1, Hkv, D, cap, torch.float32, pinned=False)
    k, v = torch.randn(3, Hkv, D), torch.randn(3, Hkv, D)
    store.write_slots(0, torch.tensor([3, 9, 1]), k, v)
    before = torch.zeros(1, Hkv, 3, D), torch.zeros(1, Hkv, 3, D)
    indices = torch.tensor([3, 9, 1], dtype=torch.int32).expand(1, Hkv, 3).contiguous()
    counts = torch.full((1, Hkv), 3, dtype=torch.int32)
    store.gather(0, indices, counts, *before)
    bad = [
        (torch.tensor([2, 64, 5]), ValueError, r"slots\[1\] = 64.*capacity 64"),
        (torch.tensor([2, 5, 2]), ValueError, r"slot 2 .*twice"),
        (torch.tensor([2, 5, 7], dtype=torch.int32), TypeError, "slots"),
        (torch.tensor([2, 5]), ValueError, r"k must have shape"),
    ]
    for slots, error, pattern in bad:
        with pytest.raises(error, match=pattern):
            store.write_slots(0, slots, torch.full_like(k, 9.0), torch.full_like(v, 9.0))
    with pytest.raises(ValueError, match="layer"):
        store.write_slots(1, torch.tensor([0, 1, 2]), k, v)
    assert store.lengths().tolist() == [[10]]
    after = torch.zeros(1, Hkv, 3, D), torch.zeros(1, Hkv, 3, D)
    store.gather(0, indices, counts, *after)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1]), "a refused write changed rows"
    assert torch.equal(after[0][0].transpose(0, 1), k[[0, 1, 2]])
    # Several query rows need a batch-1 store: a batch-2 store still takes exactly its batch.
    two = a2ats_core.KVStore(1, 2, Hkv, D, cap, torch.float32, pinned=False)
    with pytest.raises(ValueError, match="batch of the store"):
        two.attend(0, torch.randn(3, Hkv, D), indices.expand(3, -1, -1).contiguous(), counts.expand(3, -1).contiguous(),
                   scale=1.0)  # fmt: skip
