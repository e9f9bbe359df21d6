"""The CUDA kernels and launchers of cuda/*.cu, executed on the CPU.

cuda/emu/run.sh compiles the .cu sources with g++ against a small emulation of the CUDA runtime
and device intrinsics (one OS thread per CUDA thread, std::barrier for __syncthreads and warp
collectives, blocks run one after another) and checks every launcher against the CPU kernels:
rotary, vq_encode, lut_scores (binned, global-table path, bad codes), select_topk (ties, NaN,
multi-tile rows, short rows) and the KVStore append/gather path with many staging chunks. It
needs no GPU, so it gives the CUDA code execution coverage where no GPU is available; it cannot
catch what only hardware shows (timing, the memory model, real streams and events).
Set A2ATS_SKIP_EMULATED_CUDA=1 to skip it (it takes about a minute).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cuda" / "emu" / "run.sh"


def _skip_reason() -> str | None:
    if os.environ.get("A2ATS_SKIP_EMULATED_CUDA"):
        return "A2ATS_SKIP_EMULATED_CUDA is set"
    if not SCRIPT.exists():
        return f"{SCRIPT} not found (tests run outside the source tree)"
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None or shutil.which("bash") is None:
        return f"needs bash and a C++20 compiler ({cxx})"
    try:
        version = subprocess.run([cxx, "-dumpversion"], capture_output=True, text=True, timeout=30).stdout
        if "g++" in cxx and int(re.match(r"\d+", version).group()) < 11:
            return f"{cxx} {version.strip()} lacks std::barrier (needs g++ >= 11)"
    except Exception as exc:  # noqa: BLE001 - any probe failure means we cannot build
        return f"could not run {cxx}: {exc}"
    return None


@pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
def test_cuda_kernels_emulated(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-20000:]
    assert "all emulated CUDA checks passed" in proc.stdout, output[-20000:]
