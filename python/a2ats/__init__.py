"""a2ats: A²ATS long-context decoding with an offloaded KV cache.

The native kernels live in the ``a2ats_core`` extension module; this package holds the
pure-PyTorch reference (:mod:`a2ats.reference`) and the orchestration built on the kernels.
"""
__version__ = "0.1.0"
