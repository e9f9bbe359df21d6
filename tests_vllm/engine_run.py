"""Runs one vllm.LLM engine for the vLLM tests and prints what it generated as one JSON line.

Usage: python engine_run.py SPEC.json, SPEC = {"model": dir, "llm": {LLM kwargs}, "batches":
[[prompt, ...], ...], "max_tokens": n, "inspect": bool}; a prompt is a list of token ids or a
string. Each batch is one generate() call, in order (so a later batch can hit the prefix cache).
A script of its own because the engine spawns processes (hence the __main__ guard) and so that
a failing configuration's error output can be read whole.
"""

import json
import os
import sys

MARK = "A2ATS_ENGINE_RESULT "


def inspect_worker(worker):
    """What the tests check inside an engine process (runs there, via collective_rpc)."""
    import torch
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from a2ats.vllm import backend

    state = backend._RUNTIME
    caches = worker.model_runner.kv_caches
    caches = list(caches.values()) if isinstance(caches, dict) else list(caches)
    report = {
        "pid": os.getpid(),
        "cpu_attn_path": AttentionBackendEnum.CPU_ATTN.get_path(),
        "kv_cache": [
            {"shape": list(c.shape), "dtype": str(c.dtype), "nbytes": c.numel() * c.element_size()} for c in caches
        ],
        "a2ats": state is not None,
    }
    if state is not None and state.store is not None:
        store = state.store
        report.update(
            store_nbytes=store.nbytes,
            store_capacity=store.capacity,
            store_lengths=store.lengths().tolist(),
            store_kv_heads=store.num_kv_heads,
            store_head_dim=store.head_dim,
            num_subspaces=state.num_subspaces,
            codebook_kv_heads=state.codebook.num_kv_heads,
            block_size=state.block_size,
        )
    del torch
    return report


def main(spec_path: str) -> None:
    with open(spec_path) as handle:
        spec = json.load(handle)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(spec["model"], **spec["llm"])
    params = SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=0, detokenize=False)
    batches, cached = [], []
    for batch in spec["batches"]:
        prompts = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in batch]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        batches.append([list(out.outputs[0].token_ids) for out in outputs])
        cached.append([out.num_cached_tokens or 0 for out in outputs])
    result = {"batches": batches, "cached_tokens": cached}
    if spec.get("inspect"):
        result["workers"] = llm.collective_rpc(inspect_worker)
    print(MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    main(sys.argv[1])
