"""The vLLM attention backend: vLLM's CPU backend, with A²ATS when ``additional_config`` asks.

On CPU vLLM always selects its ``CPU_ATTN`` backend, so the plugin registers this class under
that member. Without an ``"a2ats"`` entry every method is the CPU backend's own; with one, the
engine's paged cache holds only the codes and :class:`RankRuntime` does the attention.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from .runtime import RankRuntime, load_rank_codebook
from .settings import A2ATSVllmConfigError, parse_settings

_RUNTIME: RankRuntime | None = None


def _check_engine(config) -> None:
    """Refuse engine features A²ATS does not serve (raised in every engine process)."""
    problems = []
    if getattr(config, "speculative_config", None) is not None:
        problems.append("speculative decoding")
    if getattr(config, "kv_transfer_config", None) is not None:
        problems.append("disaggregated prefill (kv_transfer_config)")
    cache_dtype = getattr(config.cache_config, "cache_dtype", "auto")
    if cache_dtype != "auto":
        problems.append(f"kv_cache_dtype={cache_dtype!r} (the cache holds codes; K/V keep the model's dtype)")
    model_config = config.model_config
    if getattr(model_config, "use_mla", False):
        problems.append("MLA")
    if model_config.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        problems.append(f"dtype {model_config.dtype}")
    if problems:
        raise A2ATSVllmConfigError("a2ats does not support " + ", ".join(problems))


def runtime() -> RankRuntime | None:
    """This process's A²ATS state, made on first use under the engine's config (the model's
    layers are built under it); None without an ``"a2ats"`` entry. Where no config is current
    (vLLM asks for the cache spec outside that scope) it is the state the model was built with."""
    global _RUNTIME
    config = get_current_vllm_config_or_none()
    if config is None:
        return _RUNTIME
    settings = parse_settings(config.additional_config)
    if settings is None:
        return None
    if _RUNTIME is None or _RUNTIME.settings != settings:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        _check_engine(config)
        model_config = config.model_config
        codebook = load_rank_codebook(
            settings,
            model_config.hf_config,
            model_config.model,
            get_tensor_model_parallel_rank(),
            get_tensor_model_parallel_world_size(),
        )
        num_layers = model_config.hf_config.get_text_config().num_hidden_layers
        _RUNTIME = RankRuntime(settings, codebook, num_layers, model_config.dtype, model_config.max_model_len)
    return _RUNTIME


class A2ATSCPUBackend(CPUAttentionBackend):
    """vLLM's CPU backend, plus A²ATS when configured (registered as ``CPU_ATTN``)."""

    @classmethod
    def customize_spec(cls, spec):
        state = runtime()
        if state is None:
            return super().customize_spec(spec)
        # M int16 codes per KV head per token: the page is (Hkv, block_size, M) int16.
        return replace(spec, dtype=torch.int16, state_content_bytes=2 * state.num_subspaces)

    @staticmethod
    def get_impl_cls():
        return A2ATSCPUImpl


def _layer_index(layer) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer.layer_name)


class A2ATSCPUImpl(CPUAttentionBackendImpl):
    """The CPU backend's implementation, or A²ATS's when configured."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes,
        sliding_window,
        kv_cache_dtype: str,
        logits_soft_cap=None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name=None,
        sinks=None,
    ) -> None:
        super().__init__(
            num_heads,
            head_size,
            scale,
            num_kv_heads,
            alibi_slopes,
            sliding_window,
            kv_cache_dtype,
            logits_soft_cap,
            attn_type,
            kv_sharing_target_layer_name,
            sinks,
        )
        config = get_current_vllm_config_or_none()
        self.a2ats = None
        if config is None or parse_settings(config.additional_config) is None:
            return
        # What the layer itself asks for is refused first, before the codebook is even read.
        problems = []
        if attn_type != AttentionType.DECODER:
            problems.append(f"attention type {attn_type}")
        if alibi_slopes is not None:
            problems.append("ALiBi")
        if sliding_window is not None:
            problems.append("sliding-window attention")
        if logits_soft_cap:
            problems.append("logit soft-capping")
        if sinks is not None:
            problems.append("attention sinks")
        if kv_sharing_target_layer_name is not None:
            problems.append("KV sharing between layers")
        if problems:
            raise A2ATSVllmConfigError("a2ats does not support " + ", ".join(problems))
        self.a2ats = runtime()
        self.a2ats.check_layer(num_heads, num_kv_heads, head_size)

    def forward(
        self,
        layer,
        query,
        key,
        value,
        kv_cache,
        attn_metadata,
        output,
        output_scale=None,
        output_block_scale=None,
    ):
        if self.a2ats is None:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("a2ats does not fuse output quantization")
        if attn_metadata is None:  # the engine's warm-up run
            return output
        num_tokens = attn_metadata.num_actual_tokens
        step = self.a2ats.step_requests(attn_metadata)
        out = output[:num_tokens].view(num_tokens, self.num_heads, self.head_size)
        self.a2ats.attend(
            _layer_index(layer),
            query[:num_tokens],
            key[:num_tokens],
            kv_cache,
            step,
            attn_metadata.slot_mapping,
            self.scale,
            out,
        )
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if self.a2ats is None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        self.a2ats.write(_layer_index(layer), key, value, slot_mapping, kv_cache)
