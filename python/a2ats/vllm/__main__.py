"""``python -m a2ats.vllm size MODEL_DIR --host-memory-gb N``: the engine block count whose host
K/V rows fit a host-memory budget, as the ``--num-gpu-blocks-override`` to pass to vLLM.

Reads only the model's config.json. The budget is per engine process (each tensor-parallel rank
holds the rows of its own KV heads)."""

from __future__ import annotations

import argparse
import sys

import torch

from .settings import GiB, blocks_for_budget, store_bytes

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def size_report(
    model_dir: str, host_memory_gb: float, *, tensor_parallel_size: int = 1, block_size: int = 128, dtype="auto"
) -> tuple[int, str]:
    """(blocks, a description) for ``model_dir``'s geometry; raises ValueError for bad values."""
    from transformers import AutoConfig

    if host_memory_gb <= 0:
        raise ValueError(f"--host-memory-gb must be > 0, got {host_memory_gb}")
    if tensor_parallel_size < 1 or block_size < 1:
        raise ValueError("--tensor-parallel-size and --block-size must be >= 1")
    config = AutoConfig.from_pretrained(model_dir)
    text = config.get_text_config()
    num_q_heads = text.num_attention_heads
    num_kv_heads = getattr(text, "num_key_value_heads", None) or num_q_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_q_heads
    if dtype == "auto":
        dtype = str(getattr(text, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
        dtype = dtype.replace("torch.", "")
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}")
    element_size = torch.empty((), dtype=_DTYPES[dtype]).element_size()
    per_rank_heads = max(1, num_kv_heads // tensor_parallel_size)
    geometry = dict(
        num_layers=text.num_hidden_layers, num_kv_heads=per_rank_heads, head_dim=head_dim, element_size=element_size
    )
    blocks = blocks_for_budget(int(host_memory_gb * GiB), block_size=block_size, **geometry)
    used = store_bytes(blocks * block_size, **geometry)
    description = (
        f"{blocks} blocks x {block_size} tokens = {blocks * block_size} tokens in flight; host K/V store "
        f"{used / GiB:.2f} GiB per rank ({text.num_hidden_layers} layers x {per_rank_heads} KV heads x "
        f"{head_dim} x {dtype}, K and V) of {host_memory_gb:g} GiB"
    )
    return blocks, description


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m a2ats.vllm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    size = commands.add_parser("size", help="print the --num-gpu-blocks-override for a host-memory budget")
    size.add_argument("model_dir")
    size.add_argument("--host-memory-gb", type=float, required=True, help="host memory for K/V rows, per rank")
    size.add_argument("--tensor-parallel-size", type=int, default=1)
    size.add_argument("--block-size", type=int, default=128, help="vLLM's block size (CPU default 128)")
    size.add_argument("--dtype", default="auto", help="the model dtype vLLM runs (auto: the config's)")
    args = parser.parse_args(argv)
    try:
        blocks, description = size_report(
            args.model_dir,
            args.host_memory_gb,
            tensor_parallel_size=args.tensor_parallel_size,
            block_size=args.block_size,
            dtype=args.dtype,
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"--num-gpu-blocks-override {blocks}")
    print(description, file=sys.stderr)
    print(f'and in additional_config: {{"a2ats": {{..., "host_memory_gb": {args.host_memory_gb:g}}}}}', file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
