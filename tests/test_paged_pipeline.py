"""a2ats_core.PagedPipeline, the decode step over a serving engine's paged codes (what the vLLM
backend runs), against the composition of the reference ops on the same rows in token order."""

from __future__ import annotations

import pytest
import torch

import a2ats_core

from kernel_helpers import PagedEngine as Engine
from kernel_helpers import random_codebook

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("G", [1, 3, 7])
@pytest.mark.parametrize("prompts", [[40], [40, 5, 70, 1, 12]], ids=["N1", "N5-ragged"])
@pytest.mark.parametrize("bins", ["1bin", "3bins"])
@pytest.mark.parametrize("budget_per", ["query_head", "kv_head"])
def test_paged_decode_equals_the_composition_of_the_reference_ops(dtype, G, prompts, bins, budget_per):
    distances, edges = ((64,), ()) if bins == "1bin" else ((16, 40, 100), (12, 30))
    engine = Engine(prompts, G=G, dtype=dtype, budget_per=budget_per, distances=distances, edges=edges)
    engine.prefill()
    for layer in range(engine.L):  # the codes the engine holds are the reference's (up to near ties)
        got, want = engine.token_codes(layer), engine.ref.codes[layer]
        assert int((got != want).sum()) <= 1 + 0.02 * got.numel()
    for step in range(3):
        lengths = engine.ref.lengths[0] + 1  # after this step's token
        k = int(0.1 * int(lengths.max())) + step  # one k for all: the reference selects with one
        for layer in range(engine.L):
            q, keys, values = engine.step_inputs()
            positions = lengths.long() - 1
            for request in range(len(prompts)):
                engine.write(layer, request, keys[request], values[request], positions[request : request + 1])
            out = engine.pipe.decode(
                layer,
                q,
                engine.codes[layer],
                lengths.to(torch.int32),
                engine.block_table,
                torch.full((len(prompts),), k, dtype=torch.int32),
                scale=0.25,
            )
            assert out.dtype == dtype and out.shape == q.shape
            codes = engine.token_codes(layer)  # includes the new token's code
            selection = tuple(torch.from_numpy(a) for a in engine.pipe.last_selection())
            want, counts = engine.ref.decode(
                layer, q, keys, values, positions, k, 0.25, codes=codes, selection=selection
            )
            torch.testing.assert_close(out.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])
            if budget_per == "kv_head":  # rows read = the budget (plus sink and window)
                middle = (lengths - engine.sink - engine.window).clamp(min=0)
                resident = torch.minimum(lengths, torch.tensor(engine.sink + engine.window))
                assert torch.equal(
                    counts, (torch.minimum(middle, torch.tensor(k)) + resident)[:, None].expand_as(counts)
                )


def test_each_request_selects_its_own_budget_whatever_shares_the_step():
    """Per-request k: a request's output and selection are the same bits alone or batched."""
    engine = Engine([60, 33, 90])
    engine.prefill()
    lengths = (engine.ref.lengths[0] + 1).to(torch.int32)
    q, keys, values = engine.step_inputs()
    for request in range(3):
        engine.write(0, request, keys[request], values[request], lengths[request : request + 1].long() - 1)
    budgets = torch.tensor([2, 7, 0], dtype=torch.int32)
    together = engine.pipe.decode(0, q, engine.codes[0], lengths, engine.block_table, budgets, scale=0.3)
    indices, counts = engine.pipe.last_selection()
    for request in range(3):
        rows = slice(request, request + 1)
        alone = engine.pipe.decode(
            0, q[rows], engine.codes[0], lengths[rows], engine.block_table[rows], budgets[rows], scale=0.3
        )
        assert torch.equal(alone, together[rows])
        indices_alone, counts_alone = engine.pipe.last_selection()
        assert (counts_alone == counts[rows]).all()
        for g in range(engine.Hkv):
            n = int(counts[request, g])
            assert (indices_alone[0, g, :n] == indices[request, g, :n]).all()
    middle = counts.sum(1) - engine.Hkv * (engine.sink + engine.window)
    assert middle[2] == 0 and (middle[:2] > 0).all() and middle[1] > middle[0]
    stats = engine.pipe.stats()
    assert stats["decode_calls"] == 4 and stats["rows_cached"] == 2 * int(lengths.sum()) * engine.Hkv


def test_no_requests_and_bad_input_are_refused_clearly():
    engine = Engine([20, 9])
    engine.prefill()
    q, keys, values = engine.step_inputs()
    empty = engine.pipe.decode(
        0,
        q[:0],
        engine.codes[0],
        torch.zeros(0, dtype=torch.int32),
        engine.block_table[:0],
        torch.zeros(0, dtype=torch.int32),
        scale=1.0,
    )
    assert empty.shape == (0, engine.Hkv * engine.G, engine.D)
    lengths = torch.tensor([21, 10], dtype=torch.int32)
    budgets = torch.tensor([2, 2], dtype=torch.int32)
    before = engine.codes.clone()
    cases = [
        (dict(lengths=torch.tensor([21, 10**6], dtype=torch.int32)), "lengths\\[1\\] = 1000000 must be in"),
        (dict(lengths=lengths.long()), "lengths"),
        (dict(k=torch.tensor([2, -1], dtype=torch.int32)), "k\\[1\\] must be in"),
        (dict(block_table=engine.block_table.long()), "block_table"),
        (dict(codes=engine.codes[0].to(torch.int32)), "codes"),
        (dict(codes=engine.codes[0][:, :1]), "codes"),
        (dict(q=q.float() if q.dtype != torch.float32 else q.double()), "q"),
        (dict(layer=2), "layer must be in \\[0, 2\\)"),
    ]
    for change, message in cases:
        args = dict(layer=0, q=q, codes=engine.codes[0], lengths=lengths, block_table=engine.block_table, k=budgets)
        args.update(change)
        with pytest.raises((ValueError, TypeError), match=message):
            engine.pipe.decode(
                args["layer"], args["q"], args["codes"], args["lengths"], args["block_table"], args["k"], scale=1.0
            )
    # A block table naming a block the codes do not have.
    bad_table = engine.block_table.clone()
    bad_table[0, 0] = engine.codes.shape[1] + 5
    with pytest.raises(ValueError, match="block"):
        engine.pipe.decode(0, q, engine.codes[0], lengths, bad_table, budgets, scale=1.0)
    # encode: a slot past the codes, refused before any code is written.
    k = keys[0].transpose(0, 1).contiguous()
    with pytest.raises(ValueError, match="slots\\[0\\] = .* is past the codes"):
        engine.pipe.encode(0, k, torch.tensor([5]), torch.tensor([10**6]), engine.codes[0])
    assert torch.equal(engine.codes, before)
    with pytest.raises(ValueError, match="slot-indexed"):
        a2ats_core.PagedPipeline(
            a2ats_core.KVStore(2, 2, 2, 16, 64, torch.float32),
            num_q_heads=6,
            inv_freq=torch.ones(8),
            chol=torch.eye(16).expand(2, 2, 16, 16).contiguous(),
            chol_inv=torch.eye(16).expand(2, 2, 16, 16).contiguous(),
            centroids=torch.zeros(2, 2, 1, 4, 16),
            sink=4,
            window=8,
            wrope_distances=[64],
        )


CUDA = a2ats_core.built_with_cuda() and a2ats_core.cuda_device_count() > 0 and torch.cuda.is_available()


def test_the_device_is_parsed_as_the_pipelines_and_refused_clearly():
    assert Engine([10]).pipe.device == "cpu"
    chol, chol_inv, centroids, inv_freq = random_codebook(2, 2, 16, 2, 16, torch.Generator().manual_seed(1))
    store = a2ats_core.KVStore(2, 1, 2, 16, 64, torch.float32)
    good = dict(
        num_q_heads=6, inv_freq=inv_freq, chol=chol, chol_inv=chol_inv, centroids=centroids, sink=4, window=8,
        wrope_distances=[64],
    )  # fmt: skip
    for bad in ["tpu", "gpu:0"]:
        with pytest.raises(ValueError, match="device must be"):
            a2ats_core.PagedPipeline(store, **good, device=bad)
    if not CUDA:  # a CUDA build without a device, or a build without CUDA: refused, not crashed
        with pytest.raises(ValueError, match=r"\bdevice\b"):
            a2ats_core.PagedPipeline(store, **good, device="cuda")
    for cpu in [None, "cpu", torch.device("cpu")]:
        assert a2ats_core.PagedPipeline(store, **good, device=cpu).device == "cpu"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA build of a2ats_core, a CUDA device and torch with CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("G", [1, 3, 7])
@pytest.mark.parametrize("prompts", [[40], [40, 5, 70, 1, 12]], ids=["N1", "N5-ragged"])
@pytest.mark.parametrize("bins", ["1bin", "3bins"])
@pytest.mark.parametrize("budget_per", ["query_head", "kv_head"])
def test_cuda_paged_pipeline_equals_the_cpu_one(dtype, G, prompts, bins, budget_per):
    """The CUDA twin against the CPU PagedPipeline on the same engine: rows written by slot from
    the GPU, codes encoded there, per-request budgets (0, partial, every token)."""
    distances, edges = ((64,), ()) if bins == "1bin" else ((16, 40, 100), (12, 30))
    args = dict(G=G, dtype=dtype, budget_per=budget_per, distances=distances, edges=edges)
    cpu, dev = Engine(prompts, **args), Engine(prompts, **args, device="cuda")
    assert dev.pipe.device.startswith("cuda")
    cpu.prefill()
    dev.prefill()
    assert torch.equal(dev.codes.cpu(), cpu.codes)
    assert (dev.store.lengths() == cpu.store.lengths()).all()
    for step in range(3):
        lengths = (cpu.ref.lengths[0] + 1).to(torch.int32)
        budgets = torch.tensor([(0, 3, 1000)[(i + step) % 3] for i in range(len(prompts))], dtype=torch.int32)
        for layer in range(cpu.L):
            q, keys, values = cpu.step_inputs()
            dev.step_inputs()  # the same draws, so both engines stay in step
            for request in range(len(prompts)):
                token = lengths[request : request + 1].long() - 1
                cpu.write(layer, request, keys[request], values[request], token)
                dev.write(layer, request, keys[request], values[request], token)
            want = cpu.pipe.decode(layer, q, cpu.codes[layer], lengths, cpu.block_table, budgets, scale=0.25)
            got = dev.pipe.decode(layer, q.cuda(), dev.codes[layer], lengths, dev.block_table, budgets, scale=0.25)
            assert got.device.type == "cuda" and got.dtype == dtype
            torch.testing.assert_close(got.cpu().float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])
            assert torch.equal(dev.codes[layer].cpu(), cpu.codes[layer])
            for a, b in zip(dev.pipe.last_selection(), cpu.pipe.last_selection()):
                assert (a == b).all()
        cpu.ref.lengths += 1
    assert dev.pipe.stats() == cpu.pipe.stats()
