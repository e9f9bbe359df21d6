"""a2ats_core.Pipeline, the fused decode step, against the composition of the reference ops."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import a2ats_core
from a2ats import reference

from kernel_helpers import ReferencePipeline, random_codebook

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make(
    L=2,
    B=3,
    Hkv=2,
    G=3,
    D=16,
    M=1,
    C=16,
    capacity=96,
    dtype=torch.float32,
    sink=4,
    window=8,
    distances=(64,),
    edges=(),
    seed=0,
    budget_per="query_head",
):
    generator = torch.Generator().manual_seed(seed)
    book = random_codebook(L, Hkv, D, M, C, generator)
    store = a2ats_core.KVStore(L, B, Hkv, D, capacity, dtype)
    pipe = a2ats_core.Pipeline(
        store,
        num_q_heads=Hkv * G,
        inv_freq=book[3],
        chol=book[0],
        chol_inv=book[1],
        centroids=book[2],
        sink=sink,
        window=window,
        wrope_distances=list(distances),
        bin_edges=list(edges),
        budget_per=budget_per,
    )
    assert pipe.budget_per == budget_per
    ref = ReferencePipeline(
        L, B, Hkv * G, Hkv, D, capacity, dtype, book, sink, window, list(distances), list(edges), budget_per
    )
    return pipe, ref, generator


def prefill_both(pipe, ref, generator, prompt_lengths, dtype):
    L, B, Hkv, D = ref.L, ref.B, ref.Hkv, ref.D
    t = max(prompt_lengths)
    counts = torch.tensor(prompt_lengths, dtype=torch.int32)
    for layer in range(L):
        keys = torch.randn(B, Hkv, t, D, generator=generator).to(dtype)
        values = torch.randn(B, Hkv, t, D, generator=generator).to(dtype)
        positions = torch.arange(t).expand(B, t).contiguous()
        pipe.prefill(layer, keys, values, positions, num_tokens=counts)
        ref.append(layer, keys, values, positions, prompt_lengths)


def check_codes(pipe, ref, layer):
    got = torch.from_numpy(pipe.codes(layer))
    for b in range(ref.B):
        n = int(ref.lengths[layer, b])
        mismatches = int((got[b, :, :n] != ref.codes[layer, b, :, :n]).sum())
        assert mismatches <= 1 + 0.02 * max(1, got[b, :, :n].numel()), f"{mismatches} codes differ, row {b}"
    return got


def run_steps(pipe, ref, generator, dtype, steps, budget, scale=0.25):
    """`steps` decode steps; per step and layer the pipeline's output equals the reference's."""
    B, Hq, Hkv, D = ref.B, ref.Hq, ref.Hkv, ref.D
    outputs = []
    for _ in range(steps):
        length = int(ref.lengths[0].max()) + 1
        k = budget(length)
        pipe.plan(k)
        positions = ref.lengths[0].long() + 3  # positions need not equal lengths (left padding)
        for layer in range(ref.L):
            q = torch.randn(B, Hq, D, generator=generator).to(dtype)
            keys = torch.randn(B, Hkv, 1, D, generator=generator).to(dtype)
            values = torch.randn(B, Hkv, 1, D, generator=generator).to(dtype)
            out = pipe.decode(layer, q, keys, values, positions, scale=scale)
            codes = check_codes(pipe, ref, layer)
            selection = tuple(torch.from_numpy(a) for a in pipe.last_selection())
            want, _ = ref.decode(layer, q, keys, values, positions, k, scale, codes=codes, selection=selection)
            torch.testing.assert_close(out.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])
            outputs.append(out)
    assert (pipe.store.lengths() == ref.lengths.numpy()).all()
    return outputs


@pytest.mark.every_isa
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("G", [1, 3, 7])
@pytest.mark.parametrize("prompts", [[40], [40, 17, 60], [3, 90, 12, 55, 1]], ids=["B1", "B3-ragged", "B5-ragged"])
@pytest.mark.parametrize("bins", [((64,), ()), ((8, 24, 64), (16, 40))], ids=["1bin", "3bins"])
@pytest.mark.parametrize("budget_per", ["query_head", "kv_head"])
def test_decode_equals_the_composition_of_the_reference_ops(dtype, G, prompts, bins, budget_per):
    pipe, ref, generator = make(
        B=len(prompts), G=G, dtype=dtype, distances=bins[0], edges=bins[1], capacity=128, budget_per=budget_per
    )
    prefill_both(pipe, ref, generator, prompts, dtype)
    run_steps(pipe, ref, generator, dtype, steps=3, budget=lambda n: max(1, int(0.1 * n)))


@pytest.mark.parametrize("budget", ["zero", "full"])
@pytest.mark.parametrize("prompts", [[2, 5], [30, 11]], ids=["shorter-than-sink+window", "longer"])
@pytest.mark.parametrize("budget_per", ["query_head", "kv_head"])
def test_budgets_zero_and_covering_everything(budget, prompts, budget_per):
    """Budget 0 attends sink and window only; a budget covering every token is dense attention."""
    dtype = torch.float32
    pipe, ref, generator = make(B=2, G=3, dtype=dtype, capacity=64, budget_per=budget_per)
    prefill_both(pipe, ref, generator, prompts, dtype)
    k = (lambda n: 0) if budget == "zero" else (lambda n: 1000)
    before = pipe.stats()
    run_steps(pipe, ref, generator, dtype, steps=2, budget=k)
    stats = pipe.stats()
    read = stats["rows_read"] - before["rows_read"]
    if budget == "full":
        # Every stored row of every (layer, batch row, KV head) at both steps.
        expected = sum(ref.Hkv * (n + s) for n in prompts for s in (1, 2)) * ref.L
        assert read == expected and stats["rows_cached"] - before["rows_cached"] == expected
        # Dense attention over all rows, independently of the selection.
        q = torch.randn(2, 6, 16, generator=generator)
        keys = torch.randn(2, 2, 1, 16, generator=generator)
        pipe.plan(1000)
        positions = ref.lengths[0].long()
        out = pipe.decode(0, q, keys, keys, positions, scale=0.3)
        ref.append(0, keys, keys, positions[:, None], [1, 1])
        for b in range(2):
            n = int(ref.lengths[0, b])
            valid = torch.ones(1, 2, n, dtype=torch.bool)
            dense, _ = reference.attend(
                q[b : b + 1], ref.k[0, b : b + 1, :, :n], ref.v[0, b : b + 1, :, :n], valid, scale=0.3
            )
            torch.testing.assert_close(out[b : b + 1], dense, rtol=2e-5, atol=2e-5)
    else:
        expected = sum(ref.Hkv * min(n + s, 4 + 8) for n in prompts for s in (1, 2)) * ref.L
        assert read == expected and stats["rows_fetched"] == before["rows_fetched"]


@pytest.mark.parametrize("G", [3, 7])
def test_a_kv_head_budget_reads_k_middle_rows_per_kv_head(G):
    """budget_per="kv_head": rows read are the budget (k per KV head), where the union of the
    query heads' top k reads more, up to G k."""
    k, prompts, steps = 5, [90, 40, 20], 3
    fetched = {}
    for budget_per in ["query_head", "kv_head"]:
        pipe, ref, generator = make(B=3, G=G, capacity=128, budget_per=budget_per)
        prefill_both(pipe, ref, generator, prompts, torch.float32)
        run_steps(pipe, ref, generator, torch.float32, steps=steps, budget=lambda n: k)
        fetched[budget_per] = pipe.stats()["rows_fetched"]
        indices, counts = pipe.last_selection()
        assert indices.shape[2] == (k if budget_per == "kv_head" else G * k) + 4 + 8  # sink 4, window 8
    # Every row has more than k middle candidates at every step: exactly k per KV head and layer.
    assert fetched["kv_head"] == steps * ref.L * ref.B * ref.Hkv * k
    assert fetched["query_head"] > fetched["kv_head"]


def test_budget_per_is_checked():
    with pytest.raises(ValueError, match='budget_per must be "query_head" or "kv_head", got "kv"'):
        make(budget_per="kv")


def test_steps_must_be_planned_and_whole():
    pipe, ref, generator = make(L=3, B=2, G=1, capacity=40)
    prefill_both(pipe, ref, generator, [10, 10], torch.float32)
    q = torch.randn(2, 2, 16)
    kv = torch.randn(2, 2, 1, 16)
    positions = torch.tensor([10, 10])
    with pytest.raises(ValueError, match="plan"):
        pipe.decode(0, q, kv, kv, positions, scale=1.0)
    pipe.plan(2)
    pipe.decode(0, q, kv, kv, positions, scale=1.0)
    with pytest.raises(ValueError, match="already decoded"):
        pipe.decode(0, q, kv, kv, positions, scale=1.0)
    # The step stops after layer 0 (an exception in the model): the next plan refuses.
    with pytest.raises(ValueError, match="different rows.*reset"):
        pipe.plan(2)
    with pytest.raises(ValueError, match="prefill during a planned decode step"):
        pipe.prefill(1, kv, kv, positions[:, None])
    pipe.reset()
    assert (pipe.store.lengths() == 0).all()
    prefill_both(
        pipe,
        ReferencePipeline(
            3, 2, 2, 2, 16, 40, torch.float32, (ref.chol, ref.chol_inv, ref.centroids, ref.inv_freq), 4, 8, [64], []
        ),
        generator,
        [5, 7],
        torch.float32,
    )
    pipe.plan(1)
    for layer in range(3):
        pipe.decode(layer, q, kv, kv, torch.tensor([5, 7]), scale=1.0)
    assert pipe.store.lengths().tolist() == [[6, 8]] * 3


def test_the_store_belongs_to_the_pipeline():
    pipe, _, _ = make(L=1, B=1, G=1)
    kv = torch.zeros(1, 2, 1, 16)
    with pytest.raises(ValueError, match="belongs to a Pipeline"):
        pipe.store.append(0, kv, kv)
    with pytest.raises(ValueError, match="belongs to a Pipeline"):
        pipe.store.reset()
    book = random_codebook(1, 2, 16, 1, 16, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="another Pipeline"):
        a2ats_core.Pipeline(
            pipe.store,
            num_q_heads=2,
            inv_freq=book[3],
            chol=book[0],
            chol_inv=book[1],
            centroids=book[2],
            sink=1,
            window=1,
            wrope_distances=[8],
        )
    # Gone with its pipeline: the store is an ordinary one again.
    store = pipe.store
    del pipe
    gc.collect()
    store.append(0, kv, kv)
    assert store.lengths().tolist() == [[1]]
    # A store that already holds rows has no codes for them: refused.
    with pytest.raises(ValueError, match="store must be empty"):
        a2ats_core.Pipeline(
            store,
            num_q_heads=2,
            inv_freq=book[3],
            chol=book[0],
            chol_inv=book[1],
            centroids=book[2],
            sink=1,
            window=1,
            wrope_distances=[8],
        )
    store.reset()
    a2ats_core.Pipeline(
        store,
        num_q_heads=2,
        inv_freq=book[3],
        chol=book[0],
        chol_inv=book[1],
        centroids=book[2],
        sink=1,
        window=1,
        wrope_distances=[8],
    )


def test_last_selection_is_the_last_decode_s_even_after_a_larger_plan():
    pipe, ref, generator = make(L=1, B=2, G=3, capacity=64, sink=4, window=8)
    prefill_both(pipe, ref, generator, [30, 20], torch.float32)
    with pytest.raises(ValueError, match="no decode"):
        pipe.last_selection()
    pipe.plan(2)
    pipe.decode(
        0, torch.randn(2, 6, 16), torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16), torch.tensor([30, 20]), scale=0.5
    )
    pipe.plan(50)  # a larger Kmax planned, nothing decoded with it yet
    indices, counts = pipe.last_selection()
    assert indices.shape == (2, 2, 3 * 2 + 4 + 8) and (counts <= indices.shape[2]).all()


def test_bad_arguments_name_themselves_and_change_nothing():
    pipe, ref, generator = make(L=1, B=2, G=3, capacity=32)
    prefill_both(pipe, ref, generator, [10, 12], torch.float32)
    snapshot = pipe.store.lengths().copy(), pipe.codes(0).copy()
    q, kv, positions = torch.randn(2, 6, 16), torch.randn(2, 2, 1, 16), torch.tensor([10, 12])
    pipe.plan(2)
    cases = [
        ("q", TypeError, dict(q=q.half())),
        ("q", ValueError, dict(q=q[:, :5])),
        ("k", ValueError, dict(k=torch.randn(2, 2, 2, 16))),
        ("v", TypeError, dict(v=kv.double())),
        ("positions", TypeError, dict(positions=positions.int())),
        ("positions", ValueError, dict(positions=positions[:1])),
        ("scale", ValueError, dict(scale=float("nan"))),
        ("out", ValueError, dict(out=q)),
        ("layer", ValueError, dict(layer=1)),
    ]
    for name, error, change in cases:
        args = dict(layer=0, q=q, k=kv, v=kv, positions=positions, scale=0.5) | change
        with pytest.raises(error, match=rf"\b{name}\b"):
            pipe.decode(args.pop("layer"), args.pop("q"), args.pop("k"), args.pop("v"), args.pop("positions"), **args)
        assert (pipe.store.lengths() == snapshot[0]).all() and (pipe.codes(0) == snapshot[1]).all(), name
    with pytest.raises(ValueError, match=r"\bk\b"):
        pipe.plan(-1)
    book = random_codebook(1, 2, 16, 1, 16, torch.Generator().manual_seed(0))
    store = a2ats_core.KVStore(1, 1, 2, 16, 8, "float32")
    good = dict(
        num_q_heads=2,
        inv_freq=book[3],
        chol=book[0],
        chol_inv=book[1],
        centroids=book[2],
        sink=1,
        window=1,
        wrope_distances=[8],
    )
    for name, change in [
        ("num_q_heads", dict(num_q_heads=3)),
        ("num_q_heads", dict(num_q_heads=2**17)),
        ("chol", dict(chol=book[0][:, :1])),
        ("centroids", dict(centroids=book[2][..., :3])),
        ("inv_freq", dict(inv_freq=torch.ones(9))),
        ("window", dict(window=0)),
        ("bin_edges", dict(bin_edges=[1])),
        ("wrope_distances", dict(wrope_distances=[])),
    ]:
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            a2ats_core.Pipeline(store, **(good | change))
    a2ats_core.Pipeline(store, **good)  # the store was not taken by the failed constructions
    wide = a2ats_core.KVStore(1, 1, 1, 1026, 8, "float32")
    wide_book = random_codebook(1, 1, 1026, 1, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="head_dim"):
        a2ats_core.Pipeline(
            wide,
            num_q_heads=1,
            inv_freq=wide_book[3],
            chol=wide_book[0],
            chol_inv=wide_book[1],
            centroids=wide_book[2],
            sink=1,
            window=1,
            wrope_distances=[8],
        )


_DETERMINISM = textwrap.dedent("""
    import hashlib, sys, threading, time
    sys.path.insert(0, {tests!r})
    import torch
    from test_pipeline import make, prefill_both
    busy = sys.argv[1] == "busy"
    stop = False
    def burn():
        while not stop:
            sum(i * i for i in range(10000))
    burners = [threading.Thread(target=burn) for _ in range(3 if busy else 0)]
    for t in burners: t.start()
    pipe, ref, generator = make(B=3, G=3, D=64, C=256, capacity=4200, dtype=torch.bfloat16, seed=5)
    prefill_both(pipe, ref, generator, [4000, 2500, 3100], torch.bfloat16)
    digest = hashlib.sha256()
    for step in range(3):
        pipe.plan(120)
        for layer in range(2):
            q = torch.randn(3, 6, 64, generator=generator).bfloat16()
            kv = torch.randn(3, 2, 1, 64, generator=generator).bfloat16()
            out = pipe.decode(layer, q, kv, kv, torch.tensor([4000, 2500, 3100]) + step, scale=0.125)
            digest.update(out.view(torch.int16).numpy().tobytes())
    stop = True
    for t in burners: t.join()
    print(digest.hexdigest())
""")


def test_outputs_are_bit_identical_whatever_the_threads_and_load():
    script = _DETERMINISM.format(tests=os.path.dirname(__file__))
    digests = {}
    # A2ATS_MIN_CHUNK_OPS=1 splits every loop, however small: with the default grain a decode
    # step this size runs inline and the thread count would not reach it.
    for threads, load, grain in [
        ("1", "quiet", ""),
        ("2", "quiet", "1"),
        ("3", "quiet", "1"),
        ("2", "busy", "1"),
        ("2", "quiet", ""),
    ]:
        env = dict(os.environ, A2ATS_NUM_THREADS=threads, OMP_NUM_THREADS=threads, A2ATS_MIN_CHUNK_OPS=grain)
        result = subprocess.run(
            [sys.executable, "-c", script, load], capture_output=True, text=True, env=env, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        digests[(threads, load, grain)] = result.stdout.strip().splitlines()[-1]
    assert len(set(digests.values())) == 1, digests


def test_the_selection_check_refuses_a_wrong_selection():
    """check_selection (above) is what holds the pipeline's choice of rows to the reference."""
    pipe, ref, generator = make(B=1, G=3, C=4096, capacity=64)
    prefill_both(pipe, ref, generator, [50], torch.float32)
    pipe.plan(3)
    q, kv, positions = torch.randn(1, 6, 16), torch.randn(1, 2, 1, 16), torch.tensor([50])
    pipe.decode(0, q, kv, kv, positions, scale=0.25)
    indices, counts = (torch.from_numpy(a) for a in pipe.last_selection())
    codes = check_codes(pipe, ref, 0)
    wrong = indices.clone()
    middle = [t for t in range(4, 43) if t not in set(indices[0, 0, : int(counts[0, 0])].tolist())]
    wrong[0, 0, 4] = middle[0]  # swap one selected middle row for an unselected one
    wrong[0, 0, : int(counts[0, 0])] = wrong[0, 0, : int(counts[0, 0])].sort().values
    with pytest.raises(AssertionError, match="not a top-3 selection"):
        ref.decode(0, q, kv, kv, positions, 3, 0.25, codes=codes, selection=(wrong, counts))


CUDA = a2ats_core.built_with_cuda() and a2ats_core.cuda_device_count() > 0 and torch.cuda.is_available()


def test_device_argument_is_checked():
    book = random_codebook(1, 2, 16, 1, 16, torch.Generator().manual_seed(0))
    good = dict(
        num_q_heads=2,
        inv_freq=book[3],
        chol=book[0],
        chol_inv=book[1],
        centroids=book[2],
        sink=1,
        window=1,
        wrope_distances=[8],
    )
    store = a2ats_core.KVStore(1, 1, 2, 16, 8, "float32")
    for bad in ["tpu", "cuda:x", "cuda:", "cudax"]:
        with pytest.raises(ValueError, match=r"\bdevice\b"):
            a2ats_core.Pipeline(store, **good, device=bad)
    if not CUDA:  # a CUDA build without a device, or a build without CUDA: refused, not crashed
        with pytest.raises(ValueError, match=r"\bdevice\b"):
            a2ats_core.Pipeline(store, **good, device="cuda")
    for cpu in [None, "cpu", torch.device("cpu")]:
        pipe = a2ats_core.Pipeline(store, **good, device=cpu)  # the failed constructions left the store free
        assert pipe.device == "cpu"
        del pipe
        gc.collect()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA build of a2ats_core, a CUDA device and torch with CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("G", [1, 3, 7])
@pytest.mark.parametrize("prompts", [[40], [40, 3, 60], [3, 90, 12, 55, 1]], ids=["B1", "B3-ragged", "B5-ragged"])
@pytest.mark.parametrize("bins", [((64,), ()), ((8, 24, 64), (16, 40))], ids=["1bin", "3bins"])
@pytest.mark.parametrize("k", [0, 3, 1000], ids=["k0", "k3", "kall"])
def test_cuda_pipeline_equals_the_cpu_pipeline(dtype, G, prompts, bins, k):
    """The CUDA twin, step by step against the CPU pipeline on the same rows and codebook."""
    L, Hkv, D, capacity, sink, window = 2, 2, 16, 128, 4, 8
    B = len(prompts)
    generator = torch.Generator().manual_seed(5)
    book = random_codebook(L, Hkv, D, 1, 16, generator)
    common = dict(
        num_q_heads=Hkv * G,
        inv_freq=book[3],
        chol=book[0],
        chol_inv=book[1],
        centroids=book[2],
        sink=sink,
        window=window,
        wrope_distances=list(bins[0]),
        bin_edges=list(bins[1]),
    )
    cpu = a2ats_core.Pipeline(a2ats_core.KVStore(L, B, Hkv, D, capacity, dtype), **common)
    dev = a2ats_core.Pipeline(a2ats_core.KVStore(L, B, Hkv, D, capacity, dtype), **common, device="cuda")
    t = max(prompts)
    counts = torch.tensor(prompts, dtype=torch.int32)
    positions = torch.arange(t).expand(B, t).contiguous()
    for layer in range(L):
        keys, values = (torch.randn(B, Hkv, t, D, generator=generator).to(dtype) for _ in range(2))
        cpu.prefill(layer, keys, values, positions, num_tokens=counts)
        dev.prefill(layer, keys.cuda(), values.cuda(), positions.cuda(), num_tokens=counts)
    for _ in range(3):
        cpu.plan(k)
        dev.plan(k)
        step_positions = torch.from_numpy(cpu.store.lengths()[0]).long() + 3
        for layer in range(L):
            q = torch.randn(B, Hkv * G, D, generator=generator).to(dtype)
            keys, values = (torch.randn(B, Hkv, 1, D, generator=generator).to(dtype) for _ in range(2))
            want = cpu.decode(layer, q, keys, values, step_positions, scale=0.25)
            got = dev.decode(layer, q.cuda(), keys.cuda(), values.cuda(), step_positions.cuda(), scale=0.25)
            assert got.device.type == "cuda"
            torch.testing.assert_close(got.cpu().float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])
            lengths = cpu.store.lengths()[layer]
            for b in range(B):
                n = int(lengths[b])
                mismatches = int((dev.codes(layer)[b, :, :n] != cpu.codes(layer)[b, :, :n]).sum())
                assert mismatches <= 1 + 0.02 * Hkv * n
            indices, counts_ = dev.last_selection()
            assert indices.shape == (B, Hkv, G * k) and (counts_ <= G * k).all()
            for b in range(B):
                for g in range(Hkv):
                    middle = indices[b, g, : counts_[b, g]]
                    assert ((middle >= sink) & (middle < lengths[b] - window)).all()
    assert cpu.stats() == dev.stats()
    assert (cpu.store.lengths() == dev.store.lengths()).all()
