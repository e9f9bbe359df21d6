"""Shared fixtures for the a2ats_core tests.

Every kernel test takes the ``device`` fixture: "cpu" always, "cuda" when the extension was
built with CUDA, sees a device, and torch can use it (otherwise that parameter is skipped with
the reason). CPU and CUDA implementations must pass the very same tests.
"""
from __future__ import annotations

import a2ats_core
import pytest
import torch


def _cuda_skip_reason() -> str | None:
    if not a2ats_core.built_with_cuda():
        return "a2ats_core was built without CUDA (built_with_cuda() is False)"
    if a2ats_core.cuda_device_count() == 0:
        return "a2ats_core sees no CUDA device (cuda_device_count() == 0)"
    if not torch.cuda.is_available():
        return "torch cannot use CUDA (torch.cuda.is_available() is False)"
    return None


CUDA_SKIP_REASON = _cuda_skip_reason()
HAS_CUDA = CUDA_SKIP_REASON is None

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason=str(CUDA_SKIP_REASON))),
]

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=str(CUDA_SKIP_REASON))


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """The device the native kernel runs on ("cpu" or "cuda")."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    """Deterministic random inputs for every test."""
    torch.manual_seed(1234)
    yield


def pytest_report_header(config):
    return (f"a2ats_core {a2ats_core.__version__}: built_with_cuda={a2ats_core.built_with_cuda()}, "
            f"cuda_device_count={a2ats_core.cuda_device_count()}, cpu threads={a2ats_core.num_threads()}; "
            f"cuda tests: {'run' if HAS_CUDA else 'skipped (' + str(CUDA_SKIP_REASON) + ')'}")


# The real SmolLM2-135M and one small-preset codebook for it, shared by every test file that
# needs them: loading takes ~20 s and calibrating ~1 min on two cores.
@pytest.fixture(scope="session")
def smollm2():
    from a2ats.models import load_model

    return load_model("smollm2")


@pytest.fixture(scope="session")
def small_codebook(smollm2):
    from a2ats.calibrate import calibrate

    model, tokenizer = smollm2
    return calibrate(model, tokenizer, preset="small", progress=False)
