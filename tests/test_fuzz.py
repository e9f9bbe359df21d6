"""The seeded binding fuzzer (tests/fuzz_bindings.py): run in a child process, so that a crash
fails this test instead of ending pytest; plus proof that it catches each kind of defect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import a2ats_core

import fuzz_bindings

FUZZER = Path(__file__).with_name("fuzz_bindings.py")


@pytest.mark.parametrize("seed", [0, 1])
def test_every_binding_survives_fuzzing(request, seed):
    calls = 10_000 if request.config.getoption("--long") else 250
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(FUZZER.parent), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, str(FUZZER), "--calls", str(calls), "--seed", str(seed)],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    assert result.returncode == 0, (
        f"fuzzer exited {result.returncode} (negative: killed by that signal)\n"
        f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["failures"] == 0
    for name, counts in summary["calls"].items():
        assert counts["valid"] + counts["invalid"] == calls, name
        assert counts["valid"] > calls // 10 and counts["invalid"] > calls // 10, (name, counts)


def _wrap(monkeypatch, name, wrapper):
    original = getattr(a2ats_core, name)
    monkeypatch.setattr(a2ats_core, name, lambda *args, **kwargs: wrapper(original, *args, **kwargs))


def _scribble_then_call(original, *args, **kwargs):
    """Writes into out= first, then validates: the partial-write defect."""
    out = kwargs.get("out")
    if out is not None and hasattr(out, "fill_") and out.numel():
        out.view(-1)[0] = 0
    return original(*args, **kwargs)


def _anonymous_errors(original, *args, **kwargs):
    try:
        return original(*args, **kwargs)
    except ValueError:
        raise ValueError("bad input") from None


def _accept_everything(original, *args, **kwargs):
    try:
        return original(*args, **kwargs)
    except (TypeError, ValueError):
        return None


def _wrong_scores(original, *args, **kwargs):
    return original(*args, **kwargs) + 1e-2


@pytest.mark.parametrize(
    "defect, binding, wrapper, message",
    [
        ("partial write", "lut_scores", _scribble_then_call, "changed out"),
        ("error naming nothing", "select_topk", _anonymous_errors, "names none of"),
        ("invalid call accepted", "vq_encode", _accept_everything, "was accepted"),
        ("wrong result", "lut_scores", _wrong_scores, ""),
    ],
)
def test_the_fuzzer_catches(monkeypatch, capsys, defect, binding, wrapper, message):
    _wrap(monkeypatch, binding, wrapper)
    assert fuzz_bindings.main(["--calls", "60", "--seed", "3"]) == 1, defect
    err = capsys.readouterr().err
    assert binding in err and message in err, err
