"""Native a2ats_core kernels vs their pure-PyTorch reference, timed in one run.

    python bench/bench_kernels.py [--sizes 8192 32768 131072] [--device cpu|cuda] [--csv FILE]

Shapes follow a Llama-3-8B layer: Hq = 32, Hkv = 8, D = 128, C = 4096 (M = 1), batch 1,
a 3% token budget, sink 8, window 64. Each op runs on identical inputs natively and through
python/a2ats/reference.py; the table gives the median time of each, the speed-up, and the
bytes the native op must move per second as a fraction of this machine's copy bandwidth,
measured in the same run (a large tensor copy), because shared machines are noisy.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch

import a2ats_core
from a2ats import reference

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, NUM_CENTROIDS = 32, 8, 128, 4096
SINK, WINDOW, BUDGET = 8, 64, 0.03
ENCODE_TOKENS = 1024  # vq_encode is timed on one prefill chunk: the full context would take minutes on a CPU


def timer(device: str):
    """Returns time_fn(fn, reps) -> median seconds, synchronising CUDA when needed."""

    def time_fn(fn, reps):
        fn()  # warm-up: first-touch allocations, lazy init
        samples = []
        for _ in range(reps):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    return time_fn


def copy_bandwidth(device: str, time_fn) -> float:
    """Bytes per second of a plain 256 MiB tensor copy, counting reads and writes like the ops do."""
    src = torch.empty(64 << 20, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), 5)
    return 2 * src.numel() * 4 / seconds


def bench_size(T: int, device: str, time_fn, reps: int):
    g = torch.Generator().manual_seed(T)
    k = max(1, int(BUDGET * T))
    group = NUM_Q_HEADS // NUM_KV_HEADS
    centroids = torch.randn(NUM_KV_HEADS, 1, NUM_CENTROIDS, HEAD_DIM, generator=g).to(device)
    codes = torch.randint(0, NUM_CENTROIDS, (1, NUM_KV_HEADS, T, 1), generator=g, dtype=torch.int16).to(device)
    q = torch.randn(1, NUM_Q_HEADS, HEAD_DIM, generator=g).to(device)
    lengths = torch.tensor([T], dtype=torch.int32, device=device)
    scores = a2ats_core.lut_scores(q, centroids, codes, lengths)
    keys = torch.randn(1, NUM_KV_HEADS, T, HEAD_DIM, generator=g).to(device=device, dtype=torch.float16)
    positions = torch.arange(T, device=device)[None].neg()
    inv_freq = (1.0 / 500000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)).to(device)
    enc_x = torch.randn(1, NUM_KV_HEADS, min(T, ENCODE_TOKENS), HEAD_DIM, generator=g).to(device)
    topk = dict(group_size=group, sink=SINK, window=WINDOW)

    # The decode loop reuses its output buffers (out=), as A2ATSCache does; fresh 4 MiB outputs
    # per call would mostly time page faults.
    scores_out = torch.empty(1, NUM_Q_HEADS, T, device=device)
    indices_out = torch.empty(1, NUM_KV_HEADS, group * k + SINK + WINDOW, dtype=torch.int32, device=device)
    counts_out = torch.empty(1, NUM_KV_HEADS, dtype=torch.int32, device=device)

    def native_select():
        s = a2ats_core.lut_scores(q, centroids, codes, lengths, out=scores_out)
        return a2ats_core.select_topk(s, k, lengths, **topk, out_indices=indices_out, out_counts=counts_out)

    def reference_select():
        s = reference.lut_scores(q, centroids, codes, lengths)
        return reference.select_topk(s, k, lengths, **topk)

    sel_idx, sel_cnt = native_select()
    f32, i16, i32 = 4, 2, 4
    cases = [
        # (op, tokens, native fn, reference fn, bytes the op must move)
        (
            "rotary (unrotate keys, f16)",
            T,
            lambda: a2ats_core.rotary(keys, positions, inv_freq),
            lambda: reference.rotary(keys, positions, inv_freq),
            2 * keys.numel() * 2,
        ),
        (
            "vq_encode",
            enc_x.shape[2],
            lambda: a2ats_core.vq_encode(enc_x, centroids),
            lambda: reference.vq_encode(enc_x, centroids),
            enc_x.numel() * f32 + enc_x.shape[2] * NUM_KV_HEADS * i16,
        ),
        (
            "lut_scores",
            T,
            lambda: a2ats_core.lut_scores(q, centroids, codes, lengths, out=scores_out),
            lambda: reference.lut_scores(q, centroids, codes, lengths),
            codes.numel() * i16 + centroids.numel() * f32 + NUM_Q_HEADS * T * f32,
        ),
        (
            "select_topk",
            T,
            lambda: a2ats_core.select_topk(scores, k, lengths, **topk, out_indices=indices_out, out_counts=counts_out),
            lambda: reference.select_topk(scores, k, lengths, **topk),
            NUM_Q_HEADS * T * f32 + sel_idx.numel() * i32,
        ),
        (
            "lut_scores + select_topk",
            T,
            native_select,
            reference_select,
            codes.numel() * i16 + centroids.numel() * f32 + 2 * NUM_Q_HEADS * T * f32 + sel_idx.numel() * i32,
        ),
    ]
    if device == "cpu":
        store = a2ats_core.KVStore(1, 1, NUM_KV_HEADS, HEAD_DIM, T, torch.float16, pinned=False)
        values = torch.randn(1, NUM_KV_HEADS, T, HEAD_DIM, generator=g).half()
        store.append(0, keys, values)
        out_k = torch.empty(1, NUM_KV_HEADS, sel_idx.shape[2], HEAD_DIM, dtype=torch.float16)
        out_v = torch.empty_like(out_k)
        rows = int(sel_cnt.sum())
        cases.append(
            (
                "KVStore.gather (K+V, f16)",
                T,
                lambda: store.gather(0, sel_idx, sel_cnt, out_k, out_v),
                lambda: (reference.gather(keys, sel_idx, sel_cnt), reference.gather(values, sel_idx, sel_cnt)),
                2 * 2 * rows * HEAD_DIM * 2,
            )
        )  # read + write of K and V rows
        # The same rows through torch.index_select over the flattened store, the fastest torch
        # gather of whole rows: "speed-up" is then gather's against it.
        flat = torch.cat([g_ * T + sel_idx[0, g_, : int(sel_cnt[0, g_])].long() for g_ in range(NUM_KV_HEADS)])
        keys_flat, values_flat = keys.reshape(-1, HEAD_DIM), values.reshape(-1, HEAD_DIM)
        sel_k, sel_v = (
            torch.empty(rows, HEAD_DIM, dtype=torch.float16),
            torch.empty(rows, HEAD_DIM, dtype=torch.float16),
        )
        cases.append(
            (
                "KVStore.gather vs torch.index_select",
                T,
                lambda: store.gather(0, sel_idx, sel_cnt, out_k, out_v),
                lambda: (
                    torch.index_select(keys_flat, 0, flat, out=sel_k),
                    torch.index_select(values_flat, 0, flat, out=sel_v),
                ),
                2 * 2 * rows * HEAD_DIM * 2,
            )
        )
        valid = torch.arange(sel_idx.shape[2]) < sel_cnt[..., None]
        scale = HEAD_DIM**-0.5
        cases.append(
            (
                "KVStore.attend (K+V, f16)",
                T,
                lambda: store.attend(0, q, sel_idx, sel_cnt, scale=scale),
                lambda: reference.attend(
                    q,
                    reference.gather(keys, sel_idx, sel_cnt),
                    reference.gather(values, sel_idx, sel_cnt),
                    valid,
                    scale=scale,
                ),
                2 * rows * HEAD_DIM * 2,
            )
        )  # K and V rows read once, in place
    results = []
    for op, tokens, native, ref, nbytes in cases:
        t_native = time_fn(native, reps)
        t_ref = time_fn(ref, max(1, reps // 3) if T >= 131072 else reps)
        results.append(
            dict(
                op=op,
                T=T,
                tokens=tokens,
                native_ms=t_native * 1e3,
                torch_ms=t_ref * 1e3,
                speedup=t_ref / t_native,
                bytes=nbytes,
                gbps=nbytes / t_native / 1e9,
            )
        )
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--csv", default=None, help="write the rows here (default bench/results/kernels_<device>.csv)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not (torch.cuda.is_available() and a2ats_core.cuda_device_count() > 0):
        sys.exit("--device cuda needs a GPU, a CUDA build of torch and a2ats_core built with CUDA")
    time_fn = timer(args.device)
    bandwidth = copy_bandwidth(args.device, time_fn)
    print(
        f"device {args.device}; a2ats_core {a2ats_core.__version__} with {a2ats_core.num_threads()} threads, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    )
    print(f"copy bandwidth (256 MiB tensor copy, same run): {bandwidth / 1e9:.1f} GB/s\n")
    header = f"{'op':<38}{'T':>8}{'native ms':>11}{'torch ms':>11}{'speed-up':>10}{'GB/s':>8}{'of copy':>9}"
    print(header)
    print("-" * len(header))
    rows = []
    for T in args.sizes:
        for r in bench_size(T, args.device, time_fn, args.reps):
            r["copy_fraction"] = r["gbps"] * 1e9 / bandwidth
            r["copy_gbps"] = bandwidth / 1e9
            r["device"] = args.device
            rows.append(r)
            label = r["op"] if r["tokens"] == T else f"{r['op']} [{r['tokens']} tok]"
            print(
                f"{label:<38}{T:>8}{r['native_ms']:>11.3f}{r['torch_ms']:>11.3f}{r['speedup']:>9.1f}x"
                f"{r['gbps']:>8.1f}{r['copy_fraction']:>8.0%}"
            )
        print()
    path = args.csv or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"kernels_{args.device}.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
