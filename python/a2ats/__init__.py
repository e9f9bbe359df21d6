"""a2ats: A²ATS long-context decoding with an offloaded KV cache.

The native kernels live in the ``a2ats_core`` extension module; this package holds the
pure-PyTorch reference (:mod:`a2ats.reference`) and the orchestration built on the kernels.
The names below are imported on first use, so ``import a2ats`` does not import transformers.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# On a CPU, a decode step alternates many times per token between torch ops and a2ats_core's
# own thread pool. torch's OpenMP threads spin for a while after each of its parallel regions,
# on the very cores the pool then needs: on 2 cores that made A²ATS attention 1.8x slower
# (bench/bench_decode.py), while passive waiting left torch's dense decode as fast. The policy
# is read when torch loads, so it applies only if torch is not loaded yet and the user has not
# chosen one; otherwise set OMP_WAIT_POLICY=PASSIVE in the environment (see README).
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# public name -> submodule that defines it
_LAZY = {
    "Codebook": "codebook",
    "CodebookError": "codebook",
    "CodebookMismatchError": "codebook",
    "calibrate": "calibration",
    "CalibrationSettings": "presets",
    "PRESETS": "presets",
    "A2ATSConfig": "cache",
    "A2ATSCache": "cache",
    "load_model": "models",
    "describe_model": "models",
    "ModelNotAvailableError": "models",
    "load_or_calibrate": "demo",
    "needle_prompt": "demo",
    "cache_kwargs": "compat",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
