"""A²ATS inside transformers on the real SmolLM2-135M: exactness at full budget, budgets,
ragged batches, errors that leave the cache intact."""
import pydoc_data.topics

import pytest
import torch
from transformers import DynamicCache

import a2ats

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
        input_ids[row, width - length:] = ids[start:start + length]
        attention_mask[row, width - length:] = 1
    return input_ids, attention_mask


def _prefill(model, cache, input_ids, attention_mask):
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                    use_cache=True)
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
            out = model(input_ids=token, attention_mask=attention_mask, position_ids=next_positions, cache=cache,
                        use_cache=True)
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
        ours = model.generate(**kwargs, cache=a2ats.A2ATSCache(model, small_codebook, a2ats.A2ATSConfig(topk=1.0)))
    assert torch.equal(dense, ours)


def test_small_budget_reads_few_rows(smollm2, small_codebook, batch):
    model, _ = smollm2
    input_ids, attention_mask = batch
    cache = a2ats.A2ATSCache(model, small_codebook, a2ats.A2ATSConfig(topk=0.03, capacity=1100))
    _prefill(model, cache, input_ids, attention_mask)
    # Gather buffers are reused between steps; stale NaN bytes past the selected rows must not leak.
    for buffer in cache.rows_buffers(2, 2048):
        buffer.fill_(float("nan"))
    logits = _decode(model, cache, attention_mask, steps=2)
    assert all(torch.isfinite(step).all() for step in logits)
    summary = cache.summary()
    # 3 query heads x 3% + 8 sink + 64 window of ~850 tokens: well under a fifth of the rows.
    assert 0.05 < summary["rows_read_share"] < 0.2
    assert summary["decode_steps"] == 2


def test_capacity_overflow_fails_before_work_and_keeps_the_cache(smollm2, small_codebook, batch):
    model, _ = smollm2
    input_ids, attention_mask = batch
    cache = a2ats.A2ATSCache(model, small_codebook, a2ats.A2ATSConfig(topk=0.03, capacity=max(PROMPT_LENGTHS)))
    _prefill(model, cache, input_ids, attention_mask)
    before = cache.store.lengths().copy()
    mask = torch.cat([attention_mask, torch.ones(2, 1, dtype=torch.long)], 1)
    with pytest.raises(ValueError, match="capacity"), torch.no_grad():
        model(input_ids=torch.tensor([[5], [6]]), attention_mask=mask, position_ids=torch.tensor([[1000], [700]]),
              cache=cache, use_cache=True)
    assert (cache.store.lengths() == before).all()


@pytest.mark.parametrize("kwargs, error", [
    (dict(topk=0.0), ValueError), (dict(topk=1.5), ValueError), (dict(topk=-1), ValueError),
    (dict(topk="3%"), TypeError), (dict(window=0), ValueError), (dict(sink=-1), ValueError),
    (dict(capacity=0), ValueError), (dict(wrope_position=0), ValueError),
])
def test_config_rejects_bad_values(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        a2ats.A2ATSConfig(**kwargs)


def test_cache_rejects_wrong_codebook_type(smollm2):
    model, _ = smollm2
    with pytest.raises(TypeError, match="codebook"):
        a2ats.A2ATSCache(model, object())
