"""Decode throughput, dense attention vs A²ATS, measured in one run on the same model and context.

    python bench/bench_decode.py                      # CPU: scaled-down Llama + SmolLM2
    python bench/bench_decode.py --contexts 32768 --batches 1

For each model, context length T and batch B, both caches are filled with the same T rows per
layer (random keys and values: prefilling 32k tokens densely would take an hour on a 2-core CPU
and does not change what a decode step costs), then each decodes the same tokens for --steps
steps. Reported per configuration:

* end to end: decode tokens per second (B x steps / wall time), dense and A²ATS, and the ratio;
* the attention part alone, per decode step summed over layers: dense SDPA over the whole
  cache vs A²ATS (encode + append + score + select + rows read from the host store + exact
  attention), and the ratio;
* bytes the attention part reads per step: dense reads every K and V row; A²ATS reads the
  int16 codes of every row plus the attended rows. The share is A²ATS / dense.

Models: "random" is a Llama built from a config with random weights: the Llama-3.1-8B shape on
CUDA, on CPU the same attention geometry (32 query / 8 KV heads, head dim 128) with 4 layers and
a narrow MLP; "smollm2" is the real SmolLM2-135M with the codebook ``a2ats demo`` caches (built
here when missing, small preset on CPU). On CUDA, a batch one side cannot fit is reported as OOM.
Results also go to bench/results/decode.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import a2ats  # before torch: it sets OMP_WAIT_POLICY=PASSIVE unless set (see a2ats/__init__.py)
from a2ats.cache import attention_timer
from a2ats.calibration import calibrate
from a2ats.codebook import BUDGET_PER
from a2ats.demo import load_or_calibrate
from a2ats.models import describe_model, load_model

RESULTS = Path(__file__).resolve().parent / "results"


def random_llama(device: torch.device) -> tuple[torch.nn.Module, str]:
    """Random-weight Llama: 8B shape on CUDA, its attention geometry with 4 layers on CPU."""
    if device.type == "cuda":
        config = LlamaConfig(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=128256,
            max_position_embeddings=131072,
            rope_theta=500000.0,
        )
        dtype, name = torch.bfloat16, "random Llama-3.1-8B shape"
    else:
        config = LlamaConfig(
            hidden_size=1024,
            intermediate_size=2048,
            num_hidden_layers=4,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=4096,
            max_position_embeddings=131072,
            rope_theta=500000.0,
        )
        dtype, name = torch.float32, "random Llama, 4 layers, Hq=32 Hkv=8 D=128"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    model.a2ats_model_name = name
    return model, name


def random_codebook(model, device: torch.device):
    """A real (small) calibration of the random model: its keys are as random as its weights."""
    ids = torch.randint(model.config.vocab_size, (1, 4096))

    class IdsTokenizer:
        bos_token_id = None

        def __call__(self, document, add_special_tokens=False, verbose=False):
            return {"input_ids": ids[0].tolist()}

    return calibrate(
        model,
        IdsTokenizer(),
        preset="small",
        texts=["ids"],
        num_tokens=4096,
        holdout_tokens=0,
        num_centroids=256,
        chunk_len=1024,
        baseline=False,
        progress=False,
        device=device,
    )


def filled_caches(model, codebook, config: a2ats.A2ATSConfig, batch: int, length: int):
    """A dense cache and an A²ATS cache holding the same ``length`` random rows per layer."""
    layout = describe_model(model)
    param = next(model.parameters())
    generator = torch.Generator(device=param.device).manual_seed(length + batch)
    dense = DynamicCache(config=model.config)
    shape = (batch, layout.num_kv_heads, length, layout.head_dim)
    for layer in range(layout.num_layers):
        keys = torch.randn(shape, generator=generator, device=param.device, dtype=param.dtype)
        values = torch.randn(shape, generator=generator, device=param.device, dtype=param.dtype)
        dense.update(keys, values, layer)
    ours = a2ats.A2ATSCache.from_dense(model, codebook, dense, config)
    return dense, ours


def decode(model, cache, batch: int, length: int, steps: int) -> float:
    """Wall seconds of ``steps`` single-token forwards (after one warm-up step)."""
    device = next(model.parameters()).device
    tokens = torch.arange(batch, device=device)[:, None] + 7
    position = length

    def step() -> None:
        nonlocal position
        model(
            input_ids=tokens,
            position_ids=torch.full((batch, 1), position, device=device),
            **a2ats.cache_kwargs(model, cache),
            use_cache=True,
        )
        position += 1

    with torch.inference_mode():
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - started


def read_bandwidth(device: torch.device) -> float:
    """Bytes per second this machine reads now: the best of five sums over 1 GiB (float32)."""
    big = torch.ones(2**28, device=device)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        big.sum().item()
        best = min(best, time.perf_counter() - started)
    return big.numel() * 4 / best


def write_csv(rows: list[dict], path: str | Path) -> None:
    """One CSV row per measured configuration (the keys of the first row as columns)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def native_calls_per_layer(layers: int) -> float:
    """Native calls a retrieval layer makes per decode step: the Pipeline's decode, plus the
    step's one plan() shared by all layers (CPU and CUDA alike)."""
    return 1 + 1 / layers


def measure(model, name, codebook, length, batch, steps, topk, budget_per="query_head") -> dict:
    layout = describe_model(model)
    elem = next(model.parameters()).element_size()
    config = a2ats.A2ATSConfig(topk=topk, budget_per=budget_per, capacity=length + steps + 2)
    dense, ours = filled_caches(model, codebook, config, batch, length)
    attention_timer.reset()
    attention_timer.enabled = True
    try:
        dense_seconds = decode(model, dense, batch, length, steps)
    finally:
        attention_timer.enabled = False
    # The warm-up step is timed too: per step = total / (steps + 1) calls per layer.
    dense_attention = attention_timer.seconds / (attention_timer.calls / len(layout.layers))
    del dense
    ours.reset_stats()
    ours.time_attention = True
    ours_seconds = decode(model, ours, batch, length, steps)
    summary = ours.summary()
    layers, kv = len(layout.layers), layout.num_kv_heads
    row_bytes = layout.head_dim * elem * 2  # one K row and one V row
    mean_length = length + 1 + steps / 2
    dense_bytes = layers * batch * kv * mean_length * row_bytes
    read_rows = summary["rows_read_share"] * batch * kv * mean_length * layers
    # Rows attended, codes scored, and each layer's centroid table (float32), which every step's
    # lookup tables are built from: at short contexts and large C that table outweighs the rows.
    centroid_bytes = layers * kv * codebook.num_centroids * layout.head_dim * 4
    ours_bytes = read_rows * row_bytes + layers * batch * kv * mean_length * codebook.num_subspaces * 2 + centroid_bytes
    return {
        "model": name,
        "device": str(next(model.parameters()).device),
        "context": length,
        "batch": batch,
        "steps": steps,
        "topk": topk,
        "budget_per": budget_per,
        "dense_tok_s": batch * steps / dense_seconds,
        "a2ats_tok_s": batch * steps / ours_seconds,
        "throughput_ratio": dense_seconds / ours_seconds,
        "dense_attention_ms": dense_attention * 1e3,
        "a2ats_attention_ms": summary["attention_seconds_per_step"] * 1e3,
        "attention_speedup": dense_attention / summary["attention_seconds_per_step"],
        "dense_attention_MB": dense_bytes / 1e6,
        "a2ats_attention_MB": ours_bytes / 1e6,
        "bytes_share": ours_bytes / dense_bytes,
        "rows_read_share": summary["rows_read_share"],
        "a2ats_read_GBps": ours_bytes / summary["attention_seconds_per_step"] / 1e9,
        "decode_path": summary["decode_path"],
        "native_calls_per_layer_step": native_calls_per_layer(layers),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["random", "smollm2"], choices=["random", "smollm2"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[4096, 16384, 32768])
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="default: 1 4 on CPU; 1 4 16 64 on CUDA")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps")
    parser.add_argument("--topk", type=float, default=0.03)
    parser.add_argument(
        "--budget-per",
        default=BUDGET_PER[0],
        choices=BUDGET_PER,
        help="A2ATSConfig.budget_per: topk per query head (united per KV head) or per KV head",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--csv", default=str(RESULTS / "decode.csv"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batches = args.batches or ([1, 4, 16, 64] if device.type == "cuda" else [1, 4])
    print(
        f"{torch.get_num_threads()} CPU threads (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}), "
        f"device {device}; each row: dense and A²ATS "
        f"decode the same {args.steps} steps over the same cached rows"
    )
    bandwidth = read_bandwidth(device)
    print(f"machine read bandwidth now (sum over 1 GiB): {bandwidth / 1e9:.1f} GB/s")
    header = (
        f"{'model':42} {'T':>6} {'B':>3} | {'tok/s dense':>11} {'A²ATS':>8} {'ratio':>6} | "
        f"{'attn ms dense':>13} {'A²ATS':>8} {'speed-up':>8} | {'MB read dense':>13} "
        f"{'A²ATS':>8} {'share':>6} | {'A²ATS GB/s':>10} {'of peak':>7} | calls/layer"
    )
    rows = []
    for which in args.models:
        if which == "random":
            model, name = random_llama(device)
            codebook = random_codebook(model, device)
        else:
            model, tokenizer = load_model(
                "smollm2", device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32
            )
            name = "SmolLM2-135M"
            codebook = load_or_calibrate(
                model, tokenizer, "default" if device.type == "cuda" else "small", progress=False
            )
        print(header)
        for length in args.contexts:
            for batch in batches:
                try:
                    row = measure(model, name, codebook, length, batch, args.steps, args.topk, args.budget_per)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    print(f"{name:42} {length:>6} {batch:>3} | OOM")
                    continue
                rows.append(row)
                print(
                    f"{name:42} {length:>6} {batch:>3} | {row['dense_tok_s']:>11.2f} "
                    f"{row['a2ats_tok_s']:>8.2f} {row['throughput_ratio']:>5.2f}x | "
                    f"{row['dense_attention_ms']:>13.2f} {row['a2ats_attention_ms']:>8.2f} "
                    f"{row['attention_speedup']:>7.2f}x | {row['dense_attention_MB']:>13.1f} "
                    f"{row['a2ats_attention_MB']:>8.1f} {row['bytes_share']:>6.1%} | "
                    f"{row['a2ats_read_GBps']:>10.2f} {row['a2ats_read_GBps'] * 1e9 / bandwidth:>7.1%} | "
                    f"{row['native_calls_per_layer_step']:.2f} ({row['decode_path']})",
                    flush=True,
                )
                row["machine_read_GBps"] = bandwidth / 1e9
        del model
    if rows:
        write_csv(rows, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
