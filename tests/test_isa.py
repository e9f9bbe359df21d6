"""ISA levels of the CPU kernels: A2ATS_ISA, a2ats_core.isa / supported_isas / set_isa.

The kernels themselves are checked at every level by the ``every_isa`` tests (conftest.py);
here, that the level is chosen, reported and refused as documented.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

import a2ats_core

LEVELS = ["baseline", "avx2", "avx512"]
# CPU flags (as /proc/cpuinfo spells them) of GCC's x86-64-v3 and x86-64-v4 levels.
V3_FLAGS = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
V4_FLAGS = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


@pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64"),
    reason="the clones exist on x86-64 Linux (elsewhere only baseline)",
)
def test_supported_levels_follow_the_cpu_flags():
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    expected = ["baseline"]
    if V3_FLAGS <= flags:
        expected.append("avx2")
        if V4_FLAGS <= flags:
            expected.append("avx512")
    assert a2ats_core.supported_isas() == expected
    assert a2ats_core.isa() == expected[-1] or os.environ.get("A2ATS_ISA")


def test_set_isa_switches_and_refuses(isa):
    supported = a2ats_core.supported_isas()
    previous = a2ats_core.isa()
    try:
        for level in LEVELS:
            if level in supported:
                a2ats_core.set_isa(level)
                assert a2ats_core.isa() == level
            else:
                with pytest.raises(ValueError, match=f"{level} is not supported.*supported: {', '.join(supported)}"):
                    a2ats_core.set_isa(level)
                assert a2ats_core.isa() in supported  # unchanged by the refusal
        with pytest.raises(ValueError, match='isa must be baseline, avx2 or avx512, got "sse4"'):
            a2ats_core.set_isa("sse4")
        with pytest.raises(TypeError):
            a2ats_core.set_isa(2)
    finally:
        a2ats_core.set_isa(previous)
    assert a2ats_core.isa() == previous


@pytest.mark.parametrize("level", LEVELS)
def test_a2ats_isa_picks_or_refuses_at_import(level):
    result = run_python("import a2ats_core; print(a2ats_core.isa())", A2ATS_ISA=level)
    if level in a2ats_core.supported_isas():
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == level
    else:
        assert result.returncode != 0
        assert f"ImportError: A2ATS_ISA={level} is not supported" in result.stderr


def test_unknown_a2ats_isa_refuses_the_import():
    result = run_python("import a2ats_core", A2ATS_ISA="avx1024")
    assert result.returncode != 0
    assert 'ImportError: A2ATS_ISA must be baseline, avx2 or avx512, got "avx1024"' in result.stderr


def test_empty_a2ats_isa_means_the_default():
    result = run_python("import a2ats_core; print(a2ats_core.isa())", A2ATS_ISA="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == a2ats_core.supported_isas()[-1]
