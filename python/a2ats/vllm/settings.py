"""The ``"a2ats"`` entry of vLLM's ``additional_config``, checked, and the host-store sizing rule.

vllm-free: the backend, the sizing CLI and the tests use it alike.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

CONFIG_KEY = "a2ats"
GiB = 1 << 30


class A2ATSVllmConfigError(ValueError):
    """A bad ``additional_config["a2ats"]`` (vLLM only logs plugin errors, so these are raised
    where the engine cannot go on without them: in every engine process that builds the model)."""


@dataclass(frozen=True)
class VllmSettings:
    """What ``additional_config={"a2ats": {...}}`` asks for.

    codebook: path of the model's codebook file (``a2ats calibrate``).
    topk, sink, window, budget_per, bins: as in :class:`a2ats.A2ATSConfig` (bins None: the
        codebook's; N bins are log-spaced from the window to the engine's max_model_len).
    host_memory_gb: the most the host K/V store of one engine process may take; the engine's
        block count must fit it (``python -m a2ats.vllm size`` prints the matching
        ``num_gpu_blocks_override``).
    threads: the store's threads (0 = one per core).
    """

    codebook: str
    topk: float | int = 0.03
    sink: int = 8
    window: int = 64
    budget_per: str = "query_head"
    bins: int | tuple[int, ...] | None = None
    host_memory_gb: float = 8.0
    threads: int = 0

    def attention_config(self):
        """The :class:`a2ats.A2ATSConfig` that carries the same budget (checks it, too)."""
        from ..cache import A2ATSConfig

        return A2ATSConfig(
            topk=self.topk,
            sink=self.sink,
            window=self.window,
            budget_per=self.budget_per,
            bins=self.bins,
            threads=self.threads,
        )

    @property
    def host_memory_bytes(self) -> int:
        return int(self.host_memory_gb * GiB)


_FIELDS = ("codebook", "topk", "sink", "window", "budget_per", "bins", "host_memory_gb", "threads")


def parse_settings(additional_config: Mapping[str, Any] | None) -> VllmSettings | None:
    """The settings in ``additional_config``, or None when it has no ``"a2ats"`` entry (stock vLLM).

    Raises :class:`A2ATSVllmConfigError` naming the key for anything else that is wrong.
    """
    if not additional_config or CONFIG_KEY not in additional_config:
        return None
    entry = additional_config[CONFIG_KEY]
    where = f'additional_config["{CONFIG_KEY}"]'
    if not isinstance(entry, Mapping):
        raise A2ATSVllmConfigError(f"{where} must be a dict, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise A2ATSVllmConfigError(f"{where} has unknown keys {unknown}; known: {list(_FIELDS)}")
    if "codebook" not in entry:
        raise A2ATSVllmConfigError(f'{where}["codebook"] is required: the path of the model\'s codebook file')
    codebook = entry["codebook"]
    if not isinstance(codebook, (str, os.PathLike)) or not os.path.isfile(codebook):
        raise A2ATSVllmConfigError(f'{where}["codebook"] = {codebook!r} is not a file')
    host = entry.get("host_memory_gb", VllmSettings.host_memory_gb)
    if isinstance(host, bool) or not isinstance(host, (int, float)) or not math.isfinite(host) or host <= 0:
        raise A2ATSVllmConfigError(f'{where}["host_memory_gb"] must be a positive number, got {host!r}')
    fields = {**dict(entry), "codebook": os.fspath(codebook), "host_memory_gb": float(host)}
    if isinstance(fields.get("bins"), list):  # JSON gives lists; the settings stay hashable
        fields["bins"] = tuple(fields["bins"])
    settings = VllmSettings(**fields)
    try:
        settings.attention_config()
    except (TypeError, ValueError) as error:
        raise A2ATSVllmConfigError(f"{where}: {error}") from None
    return settings


def store_bytes(num_slots: int, *, num_layers: int, num_kv_heads: int, head_dim: int, element_size: int) -> int:
    """Bytes of the host K/V store for ``num_slots`` engine slots (K and V, every layer)."""
    return 2 * num_slots * num_layers * num_kv_heads * head_dim * element_size


def blocks_for_budget(
    host_memory_bytes: int,
    *,
    block_size: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    element_size: int,
) -> int:
    """The most engine blocks whose host rows fit ``host_memory_bytes`` (per engine process)."""
    per_block = store_bytes(
        block_size, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, element_size=element_size
    )
    return host_memory_bytes // per_block
