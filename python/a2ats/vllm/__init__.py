"""A²ATS inside vLLM: a ``vllm.general_plugins`` entry point that registers the attention backend.

Usage (CPU; the engine picks the backend itself)::

    llm = vllm.LLM(model_dir, additional_config={"a2ats": {"codebook": PATH, "topk": 0.03,
                                                           "sink": 8, "window": 64}},
                   num_gpu_blocks_override=N)  # N from `python -m a2ats.vllm size ...`

Without an ``"a2ats"`` entry the engine runs exactly as stock. The plugin imports nothing of
vLLM until vLLM calls :func:`register` in each of its processes.
"""

from .settings import CONFIG_KEY, A2ATSVllmConfigError, VllmSettings, blocks_for_budget, parse_settings, store_bytes

__all__ = [
    "CONFIG_KEY",
    "A2ATSVllmConfigError",
    "VllmSettings",
    "blocks_for_budget",
    "parse_settings",
    "register",
    "store_bytes",
]

CPU_BACKEND = "a2ats.vllm.backend.A2ATSCPUBackend"


def register() -> None:
    """The entry point: on a CPU platform, put A²ATS's backend in place of vLLM's ``CPU_ATTN``
    (it delegates to it when A²ATS is not configured)."""
    import os

    from vllm.logger import init_logger
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    logger = init_logger(f"vllm.{__name__}")  # vLLM configures only its own logger tree
    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
        logger.info("a2ats: attention backend %s registered as CPU_ATTN (pid %d)", CPU_BACKEND, os.getpid())
    else:
        logger.warning(
            "a2ats: the vLLM backend runs on CPU platforms only so far; %s runs stock attention",
            type(current_platform).__name__,
        )
