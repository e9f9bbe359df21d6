"""The evaluation suite: tasks, the shared budget rule, each selector on hand-checkable cases,
and the harness end to end on the real SmolLM2."""

from collections import Counter

import pytest
import torch

import a2ats
from a2ats.evaluation import (
    A2ATS,
    TASKS,
    Budget,
    Dense,
    Oracle,
    PQCache,
    Quest,
    StreamingLLM,
    make_sample,
    run_sample,
    score_answer,
)
from a2ats.evaluation.harness import prompt_ids, selected_rows
from a2ats.evaluation.report import format_table, summarize
from a2ats.evaluation.selectors import page_bound_scores


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("haystack", ["repeat", "natural"])
def test_tasks_place_their_answers_and_are_deterministic(smollm2, task, haystack):
    _, tokenizer = smollm2
    sample = make_sample(task, tokenizer, 1024, haystack=haystack, seed=3)
    assert sample == make_sample(task, tokenizer, 1024, haystack=haystack, seed=3)
    assert sample != make_sample(task, tokenizer, 1024, haystack=haystack, seed=4)
    length = prompt_ids(tokenizer, sample).shape[1]
    assert 0.75 * 1024 < length < 1.25 * 1024, length
    if task.startswith("niah") or task == "vt":
        needles = [sample.message[offset:].split(".")[0] for offset in sample.needle_offsets]
        for value in sample.expected:  # every expected string sits in a needle
            assert any(value in needle for needle in needles), (value, needles)
        depths = [offset / len(sample.message) for offset in sample.needle_offsets]
        assert all(0.02 < depth < 0.98 for depth in depths)
    if task in ("niah_single_number", "niah_single_uuid", "niah_single_word"):
        assert len(sample.expected) == 1 and len(sample.needle_offsets) == 1
    if task == "niah_multikey":
        assert len(sample.expected) == 1 and len(sample.needle_offsets) == 4  # three distractors
    if task in ("niah_multivalue", "niah_multiquery"):
        assert len(set(sample.expected)) == 4
    if task == "niah_facts":  # the demo's prompt: four facts, the last one asked, always natural text
        from a2ats.demo import needle_prompt

        assert len(sample.needle_offsets) == 4 and sample.expected[0] in needles[-1]
        assert all(needle.startswith("Remember this: the secret number of the ") for needle in needles)
        demo = needle_prompt(tokenizer, 1024, num_facts=4, asked=-1, last_depth=0.75, seed=3)
        assert prompt_ids(tokenizer, sample).equal(demo.input_ids)
    if task == "vt":  # the chain is assigned in order through the text
        positions = [sample.message.index(f"VAR {name} =") for name in sample.expected]
        assert positions == sorted(positions)
    if task in ("cwe", "fwe"):
        listing = sample.message.split("\n")[1] if task == "cwe" else sample.message.split("... ")[1].split("\n")[0]
        words = [w for w in listing.split() if not w.rstrip(".").isdigit()]
        counts = Counter(words)
        threshold = min(counts[w] for w in sample.expected)
        assert all(count < threshold for word, count in counts.items() if word not in sample.expected)


def test_score_answer_is_rulers_share():
    assert score_answer("The numbers are 12 and 34.", ("12", "34")) == 1.0
    assert score_answer("only 12", ("12", "34")) == 0.5
    assert score_answer("Nothing", ("x1",)) == 0.0
    assert score_answer("APPLE pie", ("apple",)) == 1.0
    with pytest.raises(ValueError):
        score_answer("x", ())


def _keys(num_kv=2, length=300, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_kv, length, dim, generator=generator)


@pytest.mark.parametrize("selector", [StreamingLLM(), Oracle(), Quest(), Dense()], ids=lambda s: s.name)
@pytest.mark.parametrize("length", [5, 60, 300])
def test_budget_accounting_is_the_same_for_every_selector(selector, length):
    keys = _keys(length=length)
    query = torch.randn(6, 16)  # G = 3
    budget = Budget(0.05, sink=4, window=16)
    mask = selected_rows(selector, budget, 0, query, keys, length - 1)
    if selector.reads_all:
        assert mask.all()
        return
    assert mask[:, : min(4, length)].all() and mask[:, max(0, length - 16) :].all()  # sink and window
    k = int(0.05 * length) if selector.scores_tokens else 0
    middle = mask[:, 4 : max(4, length - 16)].sum(1)
    assert (middle <= 3 * k).all() and (middle <= max(0, length - 20)).all()
    if selector.scores_tokens and length - 20 > 3 * k:
        assert (middle >= k).all()
    if not selector.scores_tokens:
        assert (middle == 0).all()


@pytest.mark.parametrize("selector", [Oracle(), Quest()], ids=lambda s: s.name)
@pytest.mark.parametrize("length", [5, 60, 300])
def test_kv_head_budget_reads_exactly_the_budget(selector, length):
    keys = _keys(length=length, seed=1)
    query = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))  # G = 3
    budget = Budget(0.05, sink=4, window=16, per="kv_head")
    assert budget.label == "5.0%/kv"
    mask = selected_rows(selector, budget, 0, query, keys, length - 1)
    assert mask[:, : min(4, length)].all() and mask[:, max(0, length - 16) :].all()
    lo, hi = min(4, length), max(4, length - 16)
    k = min(int(0.05 * length), hi - lo)
    assert (mask[:, lo:hi].sum(1) == k).all()  # exactly k per KV head, not up to G * k
    # Independent reference: per token, the max over the G heads of each head's log softmax.
    if k:
        far = selector.scores(0, query, keys, length - 1)[:, lo:hi].double()
        combined = torch.log_softmax(far, -1).view(2, 3, -1).amax(1)
        expected = torch.zeros_like(mask[:, lo:hi])
        expected.scatter_(1, combined.topk(k, -1).indices, True)
        if selector.name == "oracle":  # ties are only possible in Quest's page bounds
            assert torch.equal(mask[:, lo:hi], expected)
        else:
            chosen = combined.masked_fill(~mask[:, lo:hi], float("inf")).amin(1)
            left = combined.masked_fill(mask[:, lo:hi], float("-inf")).amax(1)
            assert (chosen >= left).all()  # nothing left out scores above what was taken


def test_budget_refuses_an_unknown_per():
    with pytest.raises(ValueError, match="per must be one of query_head, kv_head"):
        Budget(0.03, per="token")


def test_oracle_selects_the_true_top_keys():
    keys = torch.zeros(1, 100, 4)
    keys[0, 50, 0] = 5.0
    keys[0, 70, 0] = 3.0
    mask = selected_rows(Oracle(), Budget(2, sink=0, window=1), 0, torch.tensor([[1.0, 0, 0, 0]]), keys, 99)
    assert mask[0].nonzero().flatten().tolist() == [50, 70, 99]


def test_quest_page_bounds_by_hand():
    # Two pages of 2 tokens, head dim 2: page 0 keys (1, -1), (3, 2); page 1 keys (-2, 4), (0, 0).
    keys = torch.tensor([[[1.0, -1.0], [3.0, 2.0], [-2.0, 4.0], [0.0, 0.0]]])
    query = torch.tensor([[1.0, -1.0]])
    # page 0: max(1*1, 1*3) + max(-1*-1, -1*2) = 3 + 1 = 4; page 1: max(-2, 0) + max(-4, 0) = 0
    scores = page_bound_scores(query, keys, page_size=2)
    assert scores.tolist() == [[4.0, 4.0, 0.0, 0.0]]
    # A partial last page: one token (5, 5) -> 5 - 5 = 0; its bound comes from itself only.
    keys3 = torch.tensor([[[1.0, -1.0], [3.0, 2.0], [5.0, 5.0]]])
    assert page_bound_scores(query, keys3, page_size=2).tolist() == [[4.0, 4.0, 0.0]]


def test_pqcache_codes_and_scores_by_hand():
    # Two tight clusters per subspace; with 2 centroids the centroids are the cluster means.
    keys = torch.zeros(1, 40, 4)
    keys[0, :20] = torch.tensor([1.0, 1.0, -2.0, 0.0])
    keys[0, 20:] = torch.tensor([-1.0, 0.0, 2.0, 2.0])
    keys[0, ::7] += 0.01
    selector = PQCache(num_subspaces=2, num_centroids=2, max_iter=50)
    selector.prefill(0, keys)
    query = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    scores = selector.scores(0, query, keys, 39)
    # q·ĉ / sqrt(D): first half 1 + 2 - 1 + 0 = 2, second half -1 + 0 + 1 - 2 = -2 (up to the jitter)
    torch.testing.assert_close(scores[0, :20].mean(), torch.tensor(2.0 / 2), atol=0.01, rtol=0)
    torch.testing.assert_close(scores[0, 20:].mean(), torch.tensor(-2.0 / 2), atol=0.01, rtol=0)
    selector.append(0, torch.tensor([[[-1.0, 0.0, 2.0, 2.0]]]), 40)
    assert selector.codes[0].shape == (1, 41, 2)
    assert torch.equal(selector.codes[0][0, 40], selector.codes[0][0, 25])


def test_harness_oracle_at_full_budget_equals_dense(smollm2, small_codebook):
    model, tokenizer = smollm2
    sample = make_sample("niah_single_number", tokenizer, 512, seed=1)
    full = [Budget(1.0, sink=4, window=8)]
    results = run_sample(
        model,
        tokenizer,
        sample,
        [
            (Dense(), full),
            (Oracle(), full),
            (A2ATS(small_codebook), [Budget(0.03, sink=4, window=8)]),
            (StreamingLLM(), full),
        ],
    )
    dense, oracle, ours, streaming = results
    assert oracle.answer == dense.answer
    assert oracle.recall == pytest.approx(1.0, abs=1e-5) and oracle.rows_read == 1.0
    assert oracle.far_recall == pytest.approx(1.0, abs=1e-5)
    assert dense.recall == pytest.approx(1.0, abs=1e-5)
    assert 0 < ours.rows_read < 0.2 and 0 < ours.recall <= 1
    # The far mass is the part a selection can lose: its share is below the total's, which
    # counts the always-read sink and window in full.
    assert 0 < ours.far_recall < ours.recall
    assert streaming.far_recall == pytest.approx(0.0, abs=1e-6)
    assert streaming.rows_read < ours.rows_read
    table = summarize(results)
    assert {row["method"] for row in table} == {"dense", "oracle", "a2ats", "streaming"}


@pytest.mark.parametrize("ablation", [None, "no-wrope", "no-query-awareness"])
def test_a2ats_selector_and_its_ablations_approximate_true_scores(smollm2, ablation):
    """Each codebook variant, through the A²ATS selector, ranks keys like the true q·k."""
    from transformers import DynamicCache

    from a2ats import A2ATSCache
    from a2ats.calibration import calibrate
    from a2ats.demo import ABLATIONS

    from tiny_models import tiny_model

    _, tokenizer = smollm2
    tiny = tiny_model("llama", vocab_size=49152)
    codebook = calibrate(
        tiny,
        tokenizer,
        num_centroids=64,
        num_tokens=2048,
        holdout_tokens=256,
        chunk_len=512,
        progress=False,
        **ABLATIONS.get(ablation, {}),
    )
    assert codebook.ablation == ablation
    assert 0 < codebook.quality["query_aware"] < 1  # the held-out report covers every variant
    if ablation == "no-query-awareness":
        assert torch.equal(codebook.chol[0][0], torch.eye(codebook.head_dim))
    if ablation is not None:
        with pytest.raises(ValueError, match="ablation"):
            A2ATSCache(tiny, codebook)
    selector = A2ATS(codebook)
    assert selector.name == {None: "a2ats", "no-wrope": "a2ats-no-wrope", "no-query-awareness": "a2ats-no-qa"}[ablation]
    ids = tokenizer("Attention is what you need, and keys are what you keep. " * 30, return_tensors="pt").input_ids
    cache = DynamicCache(config=tiny.config)
    with torch.no_grad():
        tiny(input_ids=ids, **a2ats.cache_kwargs(tiny, cache), use_cache=True)
    keys = cache.layers[1].keys[0]  # (Hkv, T, D) post-RoPE
    selector.prefill(1, keys)
    query = torch.randn(4, codebook.head_dim) * keys.std()
    true = torch.einsum("hd,htd->ht", query, keys.repeat_interleave(2, 0)) / codebook.head_dim**0.5
    approx = selector.scores(1, query, keys, keys.shape[1] - 1)
    if ablation == "no-wrope":  # scored as cached: the approximation is of the true scores
        correlation = torch.corrcoef(torch.stack([true.flatten(), approx.flatten()]))[0, 1]
        assert correlation > 0.5, correlation
    else:  # WRoPE: the approximation is of q_w · k_pre, the query moved to distance b
        from a2ats import reference

        position = keys.shape[1] - 1
        q_w = reference.rotary(
            query[None, :, None], torch.tensor([[codebook.wrope_distance - position]]), codebook.inv_freq
        )[0, :, 0]
        k_pre = reference.rotary(keys[None], -torch.arange(keys.shape[1])[None], codebook.inv_freq)[0]
        true = torch.einsum("hd,htd->ht", q_w, k_pre.repeat_interleave(2, 0)) / codebook.head_dim**0.5
        # 64 centroids for random (not the model's) queries: a loose fit, but far from the
        # ~0.1 of scores taken at the wrong positions.
        correlation = torch.corrcoef(torch.stack([true.flatten(), approx.flatten()]))[0, 1]
        assert correlation > 0.5, correlation


def test_binned_a2ats_selector_scores_each_token_at_its_bins_distance(small_codebook):
    """bins: each token's score is the one-distance score at its bin's distance."""
    selector = A2ATS(small_codebook, bins=(100, 300), window=64, capacity=1024)
    assert selector.name == "a2ats-3bins" and selector.wrope_distances == [80, 173, 554]
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(small_codebook.num_kv_heads, 500, small_codebook.head_dim, generator=generator)
    query = torch.randn(small_codebook.num_q_heads, small_codebook.head_dim, generator=generator)
    selector.prefill(0, keys)
    position = 499
    binned = selector.scores(0, query, keys, position)
    distance_from_current = position - torch.arange(500)
    for j, distance in enumerate(selector.wrope_distances):
        single = A2ATS(small_codebook, wrope_distance=distance)
        single.prefill(0, keys)
        expected = single.scores(0, query, keys, position)
        in_bin = (distance_from_current >= [0, 100, 300][j]) & (distance_from_current < [100, 300, 10**9][j])
        torch.testing.assert_close(binned[:, in_bin], expected[:, in_bin], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="bins"):
        A2ATS(small_codebook, bins=0)


def test_reports_summarize_and_write_csv_json_png(tmp_path):
    import json

    from a2ats.evaluation import RunResult, write_results

    def run(task, method, budget, score, recall, rows, far_recall=None):
        far_recall = recall - 0.1 if far_recall is None else far_recall
        return RunResult(task, method, budget, 2048, 0, "x", score, recall, far_recall, rows, 1.0)

    results = [
        run("vt", "dense", "all", 1.0, 1.0, 1.0),
        run("cwe", "dense", "all", 0.5, 1.0, 1.0),
        run("vt", "a2ats", "3.0%", 1.0, 0.9, 0.1),
        run("cwe", "a2ats", "3.0%", 0.0, 0.8, 0.1),
        run("vt", "a2ats", "1.5%", 0.0, 0.7, 0.05),
        run("cwe", "a2ats", "1.5%", 0.0, 0.7, 0.05, far_recall=float("nan")),  # no far tokens
    ]
    table = {(row["method"], row["budget"]): row for row in summarize(results)}
    assert table[("dense", "all")]["accuracy"] == 0.75 and table[("dense", "all")]["acc_cwe"] == 0.5
    assert table[("a2ats", "3.0%")]["recall"] == pytest.approx(0.85) and table[("a2ats", "1.5%")]["runs"] == 2
    assert table[("a2ats", "3.0%")]["far_recall"] == pytest.approx(0.75)
    assert table[("a2ats", "1.5%")]["far_recall"] == pytest.approx(0.6)  # the NaN run has none to count
    assert "far recall" in format_table(summarize(results))
    written = {path.name for path in write_results(results, tmp_path)}
    assert written == {"results.csv", "summary.json", "accuracy.png", "recall.png", "far_recall.png"}
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 7
    assert len(json.loads((tmp_path / "summary.json").read_text())) == 3
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
