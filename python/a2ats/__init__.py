"""a2ats: A²ATS long-context decoding with an offloaded KV cache.

The native kernels live in the ``a2ats_core`` extension module; this package holds the
pure-PyTorch reference (:mod:`a2ats.reference`) and the orchestration built on the kernels.
The names below are imported on first use, so ``import a2ats`` does not import transformers.
"""
__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    "Codebook": "codebook",
    "CodebookError": "codebook",
    "CodebookMismatchError": "codebook",
    "CalibrationSettings": "calibrate",
    "PRESETS": "calibrate",
    "A2ATSConfig": "cache",
    "A2ATSCache": "cache",
    "load_model": "models",
    "describe_model": "models",
    "ModelNotAvailableError": "models",
}

__all__ = ["__version__", "calibrate", *_LAZY]


def __getattr__(name):
    if name == "calibrate":
        # The submodule a2ats.calibrate is callable (it forwards to calibrate.calibrate), so
        # `a2ats.calibrate(model, tokenizer)` works whichever of the two the name is bound to.
        import importlib

        return importlib.import_module(".calibrate", __name__)
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
