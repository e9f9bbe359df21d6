"""The command line: fast help, every refusal before any work, --quick with explicit options."""

import argparse
import json
import subprocess
import sys

import pytest

import a2ats.cli as cli
from a2ats.cli import main, topk_value

# -- help and version ------------------------------------------------------------------------------

HELP_ARGVS = [["--help"], ["--version"], ["calibrate", "--help"], ["demo", "--help"], ["eval", "--help"]]


def test_help_and_version_import_neither_torch_nor_transformers():
    """Each help text in a fresh interpreter: exit 0, and none of the heavy modules imported
    (they take seconds to import; help must not wait for them)."""
    script = """
import contextlib, io, json, sys
from a2ats.cli import main
report = []
for argv in json.loads(sys.argv[1]):
    before = set(sys.modules)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(argv)
    heavy = sorted(m for m in ("torch", "transformers", "a2ats_core", "numpy", "safetensors") if m in sys.modules)
    report.append({"argv": argv, "code": code, "heavy": heavy, "chars": len(out.getvalue())})
print(json.dumps(report))
"""
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(HELP_ARGVS)], capture_output=True, text=True, timeout=60, check=True
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for entry in report:
        assert entry["code"] == 0 and entry["chars"] > 10, entry
        assert entry["heavy"] == [], entry


def _subparsers():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


@pytest.mark.parametrize("command", ["calibrate", "demo", "eval"])
def test_every_option_with_a_default_shows_it(command):
    parser = _subparsers()[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            continue
        assert "default" in formatter._get_help_string(action), action.option_strings
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text


def test_budget_is_called_topk_everywhere():
    """One word for the budget: --topk in demo and eval (eval keeps --budgets as an alias), topk in
    A2ATSConfig."""
    commands = _subparsers()
    assert "--topk" in commands["demo"].format_help()
    eval_args = commands["eval"].parse_args(["--budgets", "0.03"])
    assert eval_args.topk == [0.03] and commands["eval"].parse_args(["--topk", "64"]).topk == [64]


@pytest.mark.parametrize("text, value", [("0.03", 0.03), ("3%", 0.03), ("128", 128), ("1", 1), ("1.0", 1.0)])
def test_topk_values(text, value):
    assert topk_value(text) == value and type(topk_value(text)) is type(value)


# -- refusals: each one before the model is loaded ---------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything loads model weights or calibrates."""
    import a2ats.calibration
    import a2ats.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(a2ats.models, "load_model", refuse)
    monkeypatch.setattr(a2ats.calibration, "calibrate", refuse)


@pytest.fixture(scope="module")
def smollm2_facts():
    args = argparse.Namespace(model="smollm2", gguf_file=None)
    return cli._model_facts(args)


@pytest.fixture
def cached_facts(monkeypatch, smollm2_facts):
    """The model's config facts, read once per module (reading a GGUF header takes seconds)."""
    real = cli._model_facts
    monkeypatch.setattr(cli, "_model_facts", lambda args: smollm2_facts if args.model == "smollm2" else real(args))


def test_model_facts_come_from_the_config_without_weights(no_model_load, smollm2_facts):
    assert smollm2_facts.max_positions == 8192 and smollm2_facts.head_dim == 64
    assert smollm2_facts.name == "SmolLM2-135M-Instruct"


INTERNAL = ("_budget", "num_centroids", "num_tokens", "Traceback", "args.", "_run")

REFUSALS = [
    # argument values, refused while parsing
    (["demo", "--topk", "0"], "argument --topk: 0 tokens would leave only the sink and window rows"),
    (["demo", "--topk", "-1"], "argument --topk: a token count must be >= 1, got -1"),
    (["demo", "--topk", "1.5"], "argument --topk: a share must be in (0, 1]"),
    (["demo", "--topk", "abc"], "argument --topk: expected a share of the context like 0.03"),
    (["demo", "--topk", "nan"], "argument --topk: a share must be in (0, 1]"),
    (["demo", "--window", "-1"], "argument --window: must be >= 1, got -1"),
    (["demo", "--window", "0"], "argument --window: must be >= 1, got 0"),
    (["demo", "--sink", "-5"], "argument --sink: must be >= 0, got -5"),
    (["demo", "--context", "100"], "argument --context: must be >= 256, got 100"),
    (["demo", "--context", "4k"], "argument --context: expected a whole number, got '4k'"),
    (["demo", "--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
    (["demo", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["demo", "--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (["demo", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["eval", "--budgets", "0"], "argument --topk/--budgets: 0 tokens would leave only the sink and window"),
    (["eval", "--topk", "0.03", "2.0"], "argument --topk/--budgets: a share must be in (0, 1]"),
    (["eval", "--samples", "0"], "argument --samples: must be >= 1, got 0"),
    (["eval", "--lengths", "100"], "argument --lengths: must be >= 256, got 100"),
    (["eval", "--sink", "-1"], "argument --sink: must be >= 0, got -1"),
    (["eval", "--tasks", "nope"], "argument --tasks: invalid choice: 'nope'"),
    (["eval", "--bins", "1", "0"], "argument --bins: must be in [1, 64], got 0"),
    (["demo", "--bins", "65"], "argument --bins: must be in [1, 64], got 65"),
    (["calibrate", "-C", "0"], "argument -C/--centroids: must be in [1, 32768], got 0"),
    (["calibrate", "-C", "40000"], "argument -C/--centroids: must be in [1, 32768], got 40000"),
    (["calibrate", "-M", "0"], "argument -M/--subspaces: must be >= 1, got 0"),
    (["calibrate", "--holdout-tokens", "-1"], "argument --holdout-tokens: must be >= 0, got -1"),
    (["calibrate", "--chunk-len", "1"], "argument --chunk-len: must be >= 2, got 1"),
    (["calibrate", "--max-iter", "0"], "argument --max-iter: must be >= 1, got 0"),
    (["calibrate", "--tol", "-1"], "argument --tol: must be a finite number >= 0.0, got -1"),
    (["calibrate", "--wrope-distance", "-3"], "argument --wrope-distance: must be >= 0, got -3"),
    # values that fit apart but not together, or not the files and devices there are
    (
        ["calibrate", "--preset", "small", "--tokens", "100"],
        "--tokens 100 is fewer than the 1024 centroids (--centroids, or the 'small' preset's)",
    ),
    (["calibrate", "-C", "64", "--tokens", "32"], "--tokens 32 is fewer than the 64 centroids"),
    (["calibrate", "--text", "/no/such/file.txt"], "--text /no/such/file.txt: no such file"),
    (["calibrate", "-o", "/no/such/dir/book.safetensors"], "--output /no/such/dir/book.safetensors: the directory"),
    (["calibrate", "--device", "gpu"], "--device 'gpu' is not a device; use cpu, cuda or cuda:N"),
    (["demo", "--model-device", "gpu"], "--model-device 'gpu' is not a device; use cpu, cuda or cuda:N"),
    (["demo", "--model-device", "mps"], "--model-device mps: A²ATS runs on cpu or cuda"),
    (["demo", "--codebook", "/no/such.safetensors"], "--codebook /no/such.safetensors: no such file"),
    (["eval", "--codebook", "/no/such.safetensors"], "--codebook /no/such.safetensors: no such file"),
    (["eval", "--model-device", "cuda"], "--model-device cuda: a2ats eval runs on the CPU"),
    (["demo", "--model", "/no/such/model"], "model '/no/such/model' is neither 'smollm2', a local directory"),
    # the model's context, from its config
    (
        ["demo", "--context", "100000"],
        "--context 100000 plus 12 answer tokens (--max-new-tokens) is past SmolLM2-135M-Instruct's context of 8192 "
        "tokens (max_position_embeddings in its config); pass --context 8180 or less",
    ),
    (["demo", "--context", "8192", "--max-new-tokens", "2"], "pass --context 8190 or less"),
    (
        ["eval", "--lengths", "2048", "100000"],
        "--lengths 100000 plus 48 answer tokens (the longest task answer) is past SmolLM2-135M-Instruct's context "
        "of 8192 tokens (max_position_embeddings in its config); pass --lengths 8144 or less",
    ),
    (
        ["calibrate", "--preset", "small", "-M", "5"],
        "--subspaces 5 does not divide SmolLM2-135M-Instruct's head dim 64",
    ),
]


@pytest.mark.parametrize("argv, message", REFUSALS, ids=[" ".join(argv) for argv, _ in REFUSALS])
def test_refusals_come_before_any_work_in_one_line(argv, message, no_model_load, cached_facts, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert err.splitlines()[-1].startswith((f"a2ats {argv[0]}: error: ", f"a2ats {argv[0]}: error: argument")), err
    assert not any(name in err for name in INTERNAL), err


def test_cuda_refused_where_torch_has_no_gpu(no_model_load, cached_facts, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, flag in (
        (["demo", "--model-device", "cuda"], "--model-device"),
        (["calibrate", "--device", "cuda:0"], "--device"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{flag} cuda" in err and "sees no CUDA device here" in err and f"use {flag} cpu" in err, err
        assert len(err.strip().splitlines()) == 1


def test_cuda_refused_when_built_without_cuda_kernels(no_model_load, cached_facts, capsys, monkeypatch):
    import torch

    import a2ats_core

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(a2ats_core, "built_with_cuda", lambda: False)
    assert main(["demo", "--model-device", "cuda"]) == 2
    assert "built without its CUDA kernels" in capsys.readouterr().err
    assert main(["demo", "--model-device", "cuda:3"]) == 2
    assert "torch sees 1 CUDA device(s), numbered from 0" in capsys.readouterr().err
    # Without --model-device, the demo runs on the CPU and says why.
    assert cli._check_device("--model-device", None, needs_kernels=True) == "cpu"
    assert "built without its CUDA kernels; running on the CPU" in capsys.readouterr().err


def test_eval_prompts_longer_than_asked_are_checked_against_the_context(no_model_load, cached_facts, capsys):
    """cwe's word lists come out ~15% longer than asked at 8k: refused, with a length that fits."""
    assert main(["eval", "--lengths", "8100", "--tasks", "cwe", "niah_facts"]) == 2
    err = capsys.readouterr().err
    assert "--lengths 8100 (task cwe's prompt comes to" in err and "pass --lengths" in err, err
    suggested = int(err.split("pass --lengths ")[1].split()[0])
    assert 6500 < suggested < 8100
    args = argparse.Namespace(lengths=[suggested], samples=1, haystack="repeat", model="smollm2", gguf_file=None)
    cli._check_eval_prompts(args, cli._model_facts(args), ["cwe"])  # the suggestion fits


def test_eval_answer_tokens_cover_every_task(smollm2):
    from a2ats.evaluation.tasks import TASKS, make_sample

    _, tokenizer = smollm2
    longest = max(make_sample(task, tokenizer, 512, seed=0).max_new_tokens for task in TASKS)
    assert cli.EVAL_ANSWER_TOKENS == longest


# -- eval --quick ---------------------------------------------------------------------------------------


def _eval_args(argv):
    args = _subparsers()["eval"].parse_args(argv)
    cli._eval_settings(args)
    return args


def test_quick_sets_what_is_not_given_and_explicit_options_win():
    quick = _eval_args(["--quick"])
    assert (quick.lengths, quick.topk, quick.samples) == ([2048], [0.015, 0.03, 0.06], 1)
    mixed = _eval_args(["--quick", "--budgets", "0.1", "--lengths", "1024", "--samples", "2"])
    assert (mixed.lengths, mixed.topk, mixed.samples) == ([1024], [0.1], 2)
    plain = _eval_args([])
    assert (plain.lengths, plain.topk, plain.samples) == ([4096], [0.015, 0.03, 0.06], 1)


def test_eval_says_which_codebooks_it_calibrates_first(smollm2, cached_facts, capsys, monkeypatch, tmp_path):
    import a2ats.demo

    monkeypatch.setenv("A2ATS_CACHE", str(tmp_path))
    monkeypatch.setattr(cli, "_load_model", lambda args, device: smollm2)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(a2ats.demo, "load_or_calibrate", stop)
    with pytest.raises(Stop):
        main(["eval", "--quick", "-q"])
    out = capsys.readouterr().out
    assert (
        "first, once: calibrating 3 codebook(s) with the 'small' preset for a2ats, a2ats-no-wrope, a2ats-no-qa" in out
    ), out
    assert "--methods without the ablations skips theirs" in out
    with pytest.raises(Stop):
        main(["eval", "--quick", "-q", "--methods", "dense", "a2ats"])
    out = capsys.readouterr().out
    assert "calibrating 1 codebook(s)" in out and "ablations" not in out


def test_eval_compares_bin_counts_and_reports_far_recall(
    smollm2, small_codebook, cached_facts, capsys, monkeypatch, tmp_path
):
    """--bins 1 4: one A²ATS selector per count, in the table with the far recall; --budget-per
    with both: each budget per query head and per KV head, the latter at equal rows read."""
    monkeypatch.setattr(cli, "_load_model", lambda args, device: smollm2)
    path = tmp_path / "smollm2.a2ats.safetensors"
    small_codebook.save(path)
    argv = ["eval", "-q", "--tasks", "niah_single_number", "--lengths", "512", "--topk", "0.03"]
    argv += ["--methods", "oracle", "a2ats", "--bins", "1", "4", "--codebook", str(path), "-o", str(tmp_path / "out")]
    argv += ["--budget-per", "query_head", "kv_head"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "far recall" in out
    rows = {
        (line.split()[0], line.split()[1]): line.split()
        for line in out.splitlines()
        if line.startswith(("oracle", "a2ats"))
    }
    names = {"oracle", "a2ats", "a2ats-4bins"}
    assert set(rows) == {(name, budget) for name in names for budget in ("3.0%", "3.0%/kv")}, out
    far_recall = {key: float(row[4]) for key, row in rows.items()}
    for (name, budget), value in far_recall.items():
        assert 0 < value <= far_recall[("oracle", budget)] + 1e-6, out
    rows_read = {key: float(row[5].rstrip("%")) for key, row in rows.items()}
    assert len({rows_read[(name, "3.0%/kv")] for name in names}) == 1, out  # equal rows read
    assert all(rows_read[(name, "3.0%/kv")] < rows_read[(name, "3.0%")] for name in names), out


def test_eval_budget_per_choices_are_the_codebooks():
    from a2ats.codebook import BUDGET_PER

    assert cli.BUDGET_PER == BUDGET_PER
