"""A²ATS inside transformers on the real SmolLM2-135M: exactness at full budget, budgets,
ragged batches, errors that leave the cache intact."""

import gc
import math
import pydoc_data.topics
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import a2ats
from a2ats import reference
from a2ats.models import decoder_layers

from tiny_models import tiny_codebook, tiny_model

PROMPT_LENGTHS = (1000, 700)  # batch 2, unequal: row 1 is left-padded


@pytest.fixture(scope="module")
def batch(smollm2):
    """Real text, two prompts of different lengths, left-padded as generate() expects."""
    _, tokenizer = smollm2
    text = " ".join(list(pydoc_data.topics.topics.values())[:40])
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    width = max(PROMPT_LENGTHS)
    input_ids = torch.full((2, width), tokenizer.eos_token_id or 0, dtype=torch.long)
    attention_mask = torch.zeros(2, width, dtype=torch.long)
    for row, length in enumerate(PROMPT_LENGTHS):
        start = 500 * row
        input_ids[row, width - length :] = ids[start : start + length]
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask


def _prefill(model, cache, input_ids, attention_mask):
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            **a2ats.cache_kwargs(model, cache),
            use_cache=True,
        )
    return out.logits[:, -1].float()


def _decode(model, cache, attention_mask, steps):
    """`steps` decode steps feeding fixed tokens after a prefill with ``attention_mask``."""
    next_positions = attention_mask.sum(1, keepdim=True) - 1
    logits = []
    with torch.no_grad():
        for step in range(steps):
            token = torch.tensor([[1000 + step], [2000 + step]])
            attention_mask = torch.cat([attention_mask, torch.ones(2, 1, dtype=torch.long)], 1)
            next_positions = next_positions + 1
            out = model(
                input_ids=token,
                attention_mask=attention_mask,
                position_ids=next_positions,
                **a2ats.cache_kwargs(model, cache),
                use_cache=True,
            )
            logits.append(out.logits[:, -1].float())
    return logits


def _forward_steps(model, cache, input_ids, attention_mask, steps=3):
    """Prefill then `steps` decode steps; returns last-token logits per step."""
    return [_prefill(model, cache, input_ids, attention_mask)] + _decode(model, cache, attention_mask, steps)


def test_full_budget_equals_dense_attention(smollm2, small_codebook, batch):
    model, _ = smollm2
    input_ids, attention_mask = batch
    dense = _forward_steps(model, DynamicCache(config=model.config), input_ids, attention_mask)
    cache = a2ats.A2ATSCache(model, small_codebook, a2ats.A2ATSConfig(topk=1.0, capacity=1100))
    ours = _forward_steps(model, cache, input_ids, attention_mask)
    for step, (want, got) in enumerate(zip(dense, ours)):
        scale = want.abs().max().item()
        assert (want - got).abs().max().item() <= 1e-4 * scale, f"step {step}"
    summary = cache.summary()
    assert summary["rows_read_share"] == 1.0
    assert cache.store.lengths()[0].tolist() == [PROMPT_LENGTHS[0] + 3, PROMPT_LENGTHS[1] + 3]


def test_full_budget_greedy_generation_is_identical(smollm2, small_codebook, batch):
    model, _ = smollm2
    input_ids, attention_mask = batch
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        dense = model.generate(**kwargs)
        ours = model.generate(
            **kwargs, **a2ats.cache_kwargs(model, a2ats.A2ATSCache(model, small_codebook, a2ats.A2ATSConfig(topk=1.0)))
        )
    assert torch.equal(dense, ours)


@pytest.mark.parametrize("sink, window", [(8, 4), (0, 1), (3, 16)])
def test_full_budget_short_prompts_equal_dense_attention(smollm2, small_codebook, sink, window):
    """Prompts shorter than sink + window; the ring of resident window rows wraps while decoding."""
    model, _ = smollm2
    input_ids = torch.tensor([[504, 3458, 314, 260, 2099, 28], [0, 0, 0, 504, 3458, 314]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    dense = _forward_steps(model, DynamicCache(config=model.config), input_ids, attention_mask, steps=20)
    config = a2ats.A2ATSConfig(topk=1.0, sink=sink, window=window, capacity=64)
    ours = _forward_steps(model, a2ats.A2ATSCache(model, small_codebook, config), input_ids, attention_mask, steps=20)
    for step, (want, got) in enumerate(zip(dense, ours)):
        assert (want - got).abs().max().item() <= 1e-4 * want.abs().max().item(), f"step {step}"


def _check_selection(cache, layer_idx, query, positions, indices, counts):
    """The native selection of one decode step against reference scores, robust to ties.

    query (B, Hq, 1, D) post-RoPE, positions (B, 1), indices (B, Hkv, Kmax), counts (B, Hkv).
    Every row holds its sink and window; each query head's candidates scoring clearly above its
    k-th reference score are selected, and every selected candidate is within round-off of the
    k-th score of some head of its group.
    """
    layer, book, config = cache.retrieval[layer_idx], cache.codebook, cache.config
    lengths = torch.from_numpy(cache.steps.lengths()[layer.store_layer]).to(torch.int32)
    length = int(lengths.max())
    k, group = config.budget(length), book.group_size
    # The WRoPE query of each distance bin j, moved to distance wrope_distances[j].
    distances = torch.tensor(cache.wrope_distances)
    num_bins = len(distances)
    q_w = reference.rotary(query.expand(-1, -1, num_bins, -1), distances[None] - positions, book.inv_freq.float())
    q_dual = book.dual_queries(layer_idx, q_w if num_bins > 1 else q_w[:, :, 0])  # q_w L^-T
    edges = torch.tensor(cache.bin_edges, dtype=torch.int32) if num_bins > 1 else None
    codes = _codes(cache, layer)[:, :, :length]
    scores = reference.lut_scores(q_dual, book.centroids[layer_idx], codes, lengths, bin_edges=edges)
    for b, n in enumerate(lengths.tolist()):
        lo, hi = config.sink, n - config.window
        assert hi - lo > k, "the budget must leave candidates out"
        for g in range(book.num_kv_heads):
            chosen = indices[b, g, : counts[b, g]].long()
            assert torch.equal(chosen, chosen.unique())  # ascending, no duplicates
            middle = chosen[(chosen >= lo) & (chosen < hi)]
            assert set(range(lo)) | set(range(hi, n)) == set(chosen.tolist()) - set(middle.tolist())
            head_scores = scores[b, g * group : (g + 1) * group, lo:hi]  # (G, candidates)
            kth = head_scores.topk(k, -1).values[:, -1:]  # (G, 1)
            slack = 1e-4 * head_scores.abs().max()
            must = ((head_scores > kth + slack).any(0)).nonzero().flatten() + lo
            assert set(must.tolist()) <= set(middle.tolist())
            assert (head_scores[:, middle - lo] >= kth - slack).any(0).all()
            assert middle.numel() <= group * k


def _codes(cache, layer):
    """Codes (B, Hkv, capacity, M) int16 that the cache keeps for ``layer``."""
    return torch.from_numpy(cache.steps.pipeline.codes(layer.store_layer))


def _attention_over(cache, layer_idx, query, indices, counts):
    """Attention output (B, 1, Hq, D) over the given rows of the store, in plain torch."""
    layer, book = cache.retrieval[layer_idx], cache.codebook
    lengths = torch.from_numpy(cache.steps.lengths()[layer.store_layer])
    batch, length = lengths.numel(), int(lengths.max())
    everything = torch.arange(length, dtype=torch.int32).expand(batch, book.num_kv_heads, length).contiguous()
    all_k = torch.zeros(batch, book.num_kv_heads, length, book.head_dim, dtype=query.dtype)
    all_v = torch.zeros_like(all_k)
    stored = lengths[:, None].expand(-1, book.num_kv_heads).to(torch.int32).contiguous()
    cache.store.gather(layer.store_layer, everything, stored, all_k, all_v)
    rows_k = reference.gather(all_k, indices, counts).float()
    rows_v = reference.gather(all_v, indices, counts).float()
    q = query.reshape(batch, book.num_kv_heads, book.group_size, -1).float()
    logits = torch.einsum("bgqd,bgkd->bgqk", q, rows_k) / book.head_dim**0.5
    valid = torch.arange(indices.shape[-1])[None, None] < counts[..., None]
    probs = torch.softmax(logits.masked_fill(~valid[:, :, None], float("-inf")), -1)
    out = torch.einsum("bgqk,bgkd->bgqd", probs, rows_v)
    return out.reshape(batch, book.num_q_heads, 1, -1).transpose(1, 2)


@pytest.mark.parametrize("bins", [1, 4, (100, 300)], ids=["1bin", "4bins", "edges"])
def test_partial_budget_step_selects_and_attends_like_the_reference(smollm2, small_codebook, batch, bins):
    """At 3%: the selection is a valid top-k under the reference scores (of each token's
    distance bin), and the output is exact attention over the selected rows."""
    model, _ = smollm2
    input_ids, attention_mask = batch
    config = a2ats.A2ATSConfig(topk=0.03, sink=5, window=24, capacity=1100, bins=bins)
    cache = a2ats.A2ATSCache(model, small_codebook, config)
    assert len(cache.wrope_distances) == (bins if isinstance(bins, int) else len(bins) + 1)
    _prefill(model, cache, input_ids, attention_mask)
    steps, seen = cache.steps, {}
    decode = steps.decode

    def recording_decode(layer, query, keys, values, positions, scale):
        out = decode(layer, query, keys, values, positions, scale)
        selection = tuple(torch.from_numpy(a) for a in steps.pipeline.last_selection())
        seen[list(cache.retrieval)[layer]] = (query.detach().clone(), positions[:, None].clone(), out, *selection)
        return out

    steps.decode = recording_decode
    for layer_idx in (0, 7, 29):
        seen.clear()
        _decode(model, cache, attention_mask, steps=1)
        attention_mask = torch.cat([attention_mask, torch.ones(2, 1, dtype=torch.long)], 1)
        query, positions, got, indices, counts = seen[layer_idx]
        _check_selection(cache, layer_idx, query, positions, indices, counts)
        want = _attention_over(cache, layer_idx, query, indices, counts)
        torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-5)
    summary = cache.summary()
    assert summary["decode_path"] == "a2ats_core.Pipeline (cpu)"
    assert 0 < summary["rows_fetched_share"] < summary["rows_read_share"]


def test_small_budget_reads_few_rows(smollm2, small_codebook, batch):
    model, _ = smollm2
    input_ids, attention_mask = batch
    shares = {}
    for budget_per in ["query_head", "kv_head"]:
        config = a2ats.A2ATSConfig(topk=0.03, budget_per=budget_per, capacity=1100)
        cache = a2ats.A2ATSCache(model, small_codebook, config)
        _prefill(model, cache, input_ids, attention_mask)
        _decode(model, cache, attention_mask, steps=2)
        summary = cache.summary()
        assert summary["decode_steps"] == 2
        shares[budget_per] = summary["rows_fetched_share"]
        # 3 query heads x 3% + 8 sink + 64 window of ~850 tokens: well under a fifth of the rows.
        assert 0.05 < summary["rows_read_share"] < 0.2
    # Per KV head the middle rows are the budget itself (k = int(3% of the length) per step);
    # the union of three heads' 3% reads more.
    assert 0.02 < shares["kv_head"] <= 0.04  # one k for the batch: 3% of the longest row
    assert shares["query_head"] > 1.3 * shares["kv_head"]


def test_capacity_overflow_fails_before_work_and_keeps_the_cache(smollm2, small_codebook, batch):
    model, _ = smollm2
    input_ids, attention_mask = batch
    cache = a2ats.A2ATSCache(model, small_codebook, a2ats.A2ATSConfig(topk=0.03, capacity=max(PROMPT_LENGTHS)))
    _prefill(model, cache, input_ids, attention_mask)
    before = cache.store.lengths().copy()
    mask = torch.cat([attention_mask, torch.ones(2, 1, dtype=torch.long)], 1)
    with pytest.raises(ValueError, match="capacity"), torch.no_grad():
        model(
            input_ids=torch.tensor([[5], [6]]),
            attention_mask=mask,
            position_ids=torch.tensor([[1000], [700]]),
            **a2ats.cache_kwargs(model, cache),
            use_cache=True,
        )
    assert (cache.store.lengths() == before).all()


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(topk=0.0), ValueError),
        (dict(topk=1.5), ValueError),
        (dict(topk=-1), ValueError),
        (dict(topk="3%"), TypeError),
        (dict(window=0), ValueError),
        (dict(sink=-1), ValueError),
        (dict(capacity=0), ValueError),
        (dict(wrope_distance=0), ValueError),
        (dict(budget_per="kv"), ValueError),
        (dict(bins=0), ValueError),
        (dict(bins=(300, 100)), ValueError),
        (dict(bins=(0, 100)), ValueError),
        (dict(bins=(10.5,)), ValueError),
        (dict(bins="four"), ValueError),
    ],
)
def test_config_rejects_bad_values(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        a2ats.A2ATSConfig(**kwargs)


def test_wrope_bins_are_log_spaced_from_the_window_to_the_capacity():
    from a2ats.codebook import wrope_bins

    assert wrope_bins(1, window=64, capacity=4096, distance=1024) == ([1024], [])
    assert wrope_bins((), window=64, capacity=4096, distance=1024) == ([1024], [])
    distances, edges = wrope_bins(3, window=64, capacity=4096, distance=1024)
    assert edges == [256, 1024]  # 64 · 64^(1/3), 64 · 64^(2/3)
    assert distances == [128, 512, 2048]  # geometric means of [64, 256), [256, 1024), [1024, 4096)
    assert wrope_bins([100, 300], window=64, capacity=1100, distance=9) == ([80, 173, 574], [100, 300])
    with pytest.raises(ValueError, match="bins.*strictly ascending"):
        wrope_bins(16, window=64, capacity=72, distance=1024)  # log-spaced edges collide


def test_bins_the_capacity_does_not_fit_are_refused(smollm2, small_codebook):
    model, _ = smollm2
    with pytest.raises(ValueError, match="bins"):
        a2ats.A2ATSCache(model, small_codebook, a2ats.A2ATSConfig(bins=16, window=64, capacity=72))


def test_cache_rejects_wrong_codebook_type(smollm2):
    model, _ = smollm2
    with pytest.raises(TypeError, match="codebook"):
        a2ats.A2ATSCache(model, object())


# -- other architectures, errors, long runs (tiny random models) ---------------------------------


def _tiny_setup(smollm2, kind, **overrides):
    """A tiny random model of ``kind`` (SmolLM2's vocabulary) and a codebook calibrated for it."""
    _, tokenizer = smollm2
    model = tiny_model(kind, vocab_size=49152, **overrides)
    return model, tiny_codebook(model, tokenizer)


@pytest.mark.parametrize("kind", ["qwen3", "mistral", "gemma3", "llama-yarn"])
def test_other_architectures_full_budget_equal_dense_attention(smollm2, kind):
    """Qwen3 (q/k norms), Mistral, Gemma 3 (sliding layers keep their own cache), YaRN RoPE."""
    model, codebook = _tiny_setup(smollm2, kind)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(49152, (2, 40), generator=generator)
    attention_mask = torch.ones(2, 40, dtype=torch.long)
    attention_mask[1, :9] = 0  # left padding
    dense = _forward_steps(model, DynamicCache(config=model.config), input_ids, attention_mask, steps=5)
    cache = a2ats.A2ATSCache(model, codebook, a2ats.A2ATSConfig(topk=1.0, sink=2, window=4, capacity=64))
    ours = _forward_steps(model, cache, input_ids, attention_mask, steps=5)
    for step, (want, got) in enumerate(zip(dense, ours)):
        assert (want - got).abs().max().item() <= 1e-4 * want.abs().max().item(), f"step {step}"
    assert sorted(cache.retrieval) == list(codebook.layers)
    if kind == "gemma3":
        assert list(codebook.layers) == [1, 3]  # the global layers; sliding ones stay dense


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_models_full_budget_equal_dense_attention(smollm2, dtype):
    """A model in float16 or bfloat16 stores 16-bit rows; with a budget covering every token the
    decode step gives dense attention's logits, up to the dtype's rounding."""
    model, codebook = _tiny_setup(smollm2, "llama")
    model = model.to(dtype)
    input_ids = torch.randint(49152, (2, 40), generator=torch.Generator().manual_seed(4))
    attention_mask = torch.ones(2, 40, dtype=torch.long)
    attention_mask[0, :7] = 0  # left padding
    dense = _forward_steps(model, DynamicCache(config=model.config), input_ids, attention_mask, steps=4)
    cache = a2ats.A2ATSCache(model, codebook, a2ats.A2ATSConfig(topk=1.0, sink=2, window=4, capacity=64))
    ours = _forward_steps(model, cache, input_ids, attention_mask, steps=4)
    assert cache.store.dtype == str(dtype).removeprefix("torch.")
    tolerance = {torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for step, (want, got) in enumerate(zip(dense, ours)):
        assert (want - got).abs().max().item() <= tolerance * want.abs().max().item(), f"step {step}"


def test_statistics_cost_no_sync_and_timing_is_opt_in(smollm2):
    """Row counters add up without reading back per layer; the attention part is timed where that
    is free (CPU) unless turned off, and only when asked on a GPU (time_attention)."""
    model, codebook = _tiny_setup(smollm2, "llama")
    input_ids = torch.randint(49152, (2, 30), generator=torch.Generator().manual_seed(5))
    attention_mask = torch.ones(2, 30, dtype=torch.long)
    for timing in (None, False):
        cache = a2ats.A2ATSCache(model, codebook, a2ats.A2ATSConfig(topk=2, sink=2, window=4, capacity=40))
        cache.time_attention = timing
        _forward_steps(model, cache, input_ids, attention_mask, steps=3)
        summary = cache.summary()
        assert summary["decode_steps"] == 3 and 0 < summary["rows_read_share"] < 1, timing
        timed = summary["attention_seconds_per_step"]
        assert (timed > 0) if timing is None else math.isnan(timed), timing
        cache.reset_stats()
        assert cache.summary()["decode_steps"] == 0


def test_reset_forgets_the_previous_prompt(smollm2):
    """After reset() the next prompt is answered from its own rows alone, cycle after cycle (the
    store used to keep the old rows: a full budget answered with the previous prompt's text and
    the fourth cycle overflowed the capacity)."""
    model, codebook = _tiny_setup(smollm2, "llama")
    generator = torch.Generator().manual_seed(2)
    config = a2ats.A2ATSConfig(topk=1.0, sink=2, window=4, capacity=50)
    cache = a2ats.A2ATSCache(model, codebook, config)
    for cycle in range(5):
        input_ids = torch.randint(49152, (2, 40), generator=generator)
        attention_mask = torch.ones(2, 40, dtype=torch.long)
        fresh = _forward_steps(model, a2ats.A2ATSCache(model, codebook, config), input_ids, attention_mask, steps=3)
        reused = _forward_steps(model, cache, input_ids, attention_mask, steps=3)
        for want, got in zip(fresh, reused):
            assert torch.equal(want, got), f"cycle {cycle}"
        assert cache.store.lengths()[0].tolist() == [43, 43]
        cache.reset()
        assert cache.get_seq_length() == 0 and cache.store.lengths().sum() == 0


class _Interrupt(Exception):
    """Stands for KeyboardInterrupt, which pytest would take for the user's."""


def test_a_step_interrupted_mid_model_is_refused_until_reset(smollm2):
    """A decode stopped between two layers leaves them holding different rows; the next step says
    so (it used to fail with an unrelated tensor-size error), and reset() makes the cache whole.
    Inside a layer there is no such point: the native step validates, then changes, in one call."""
    model, codebook = _tiny_setup(smollm2, "llama")
    config = a2ats.A2ATSConfig(topk=1.0, sink=2, window=4, capacity=64)
    input_ids = torch.randint(49152, (2, 30), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones(2, 30, dtype=torch.long)
    cache = a2ats.A2ATSCache(model, codebook, config)
    _prefill(model, cache, input_ids, attention_mask)

    def stop(module, args, kwargs):
        raise _Interrupt

    handle = decoder_layers(model)[1].register_forward_pre_hook(stop, with_kwargs=True)
    with pytest.raises(_Interrupt):
        _decode(model, cache, attention_mask, steps=1)
    handle.remove()
    with pytest.raises(RuntimeError, match="half-applied step.*reset"):
        _decode(model, cache, attention_mask, steps=1)
    cache.reset()
    fresh = _forward_steps(model, a2ats.A2ATSCache(model, codebook, config), input_ids, attention_mask, steps=2)
    again = _forward_steps(model, cache, input_ids, attention_mask, steps=2)
    for want, got in zip(fresh, again):
        assert torch.equal(want, got)


def test_unsupported_models_and_inputs_fail_before_any_work(smollm2, small_codebook):
    from transformers import AutoModelForCausalLM, GPT2Config

    from a2ats.codebook import CodebookMismatchError

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256))
    with pytest.raises(ValueError, match="no rotary position embedding"):
        a2ats.A2ATSCache(gpt2, small_codebook)
    llama, codebook = _tiny_setup(smollm2, "llama")
    with pytest.raises(CodebookMismatchError):
        a2ats.A2ATSCache(llama, small_codebook)  # SmolLM2's codebook for another model
    with pytest.raises(TypeError, match="model dtype torch.float64"):
        a2ats.A2ATSCache(llama.to(torch.float64), codebook)
    llama.to(torch.float32)
    with pytest.raises(TypeError, match="codebook"):
        a2ats.A2ATSCache(llama, {"centroids": None})
    # A prompt longer than the store: refused before the store holds anything.
    cache = a2ats.A2ATSCache(llama, codebook, a2ats.A2ATSConfig(capacity=16))
    with pytest.raises(ValueError, match="capacity"), torch.no_grad():
        llama(input_ids=torch.arange(20)[None] + 5, **a2ats.cache_kwargs(llama, cache), use_cache=True)
    assert (cache.store.lengths() == 0).all()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc (Linux)")
def test_memory_stays_flat_over_2000_decode_steps(smollm2):
    model, codebook = _tiny_setup(smollm2, "llama")
    steps, prompt = 2000, 64
    cache = a2ats.A2ATSCache(model, codebook, a2ats.A2ATSConfig(topk=0.03, sink=4, window=16, capacity=prompt + steps))
    token = torch.tensor([[17], [23]])
    resident = {}
    with torch.inference_mode():
        model(
            input_ids=torch.arange(2 * prompt).view(2, prompt) + 100, **a2ats.cache_kwargs(model, cache), use_cache=True
        )
        for step in range(steps):
            out = model(
                input_ids=token,
                position_ids=torch.full((2, 1), prompt + step),
                **a2ats.cache_kwargs(model, cache),
                use_cache=True,
            )
            token = out.logits[:, -1:].argmax(-1)
            if step + 1 in (200, steps):
                gc.collect()
                resident[step + 1] = (_resident_bytes(), len(gc.get_objects()))
    assert cache.store.lengths()[0].tolist() == [prompt + steps] * 2
    assert cache.summary()["decode_steps"] == steps
    # Everything per step is preallocated or reused. Between step 200 and step 2000 a buffer
    # leaked per step would add megabytes of RSS, and any object kept per step (a tensor, a
    # stats record) would add 1,800 live objects; allow allocator and interpreter noise.
    (bytes_early, objects_early), (bytes_late, objects_late) = resident[200], resident[steps]
    assert bytes_late - bytes_early < 4 * 2**20, resident
    assert objects_late - objects_early < 500, resident
