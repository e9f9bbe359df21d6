"""Calibration settings and presets, torch-free so that ``a2ats --help`` stays fast.

:mod:`a2ats.calibration` re-exports everything here; the command line reads the presets from this
module to describe them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = ["MAX_CENTROIDS", "CalibrationSettings", "PRESETS", "resolve_settings"]

# Codes are int16: at most 2**15 centroids per subspace (the same bound as a2ats.codebook's).
MAX_CENTROIDS = 1 << 15


@dataclass(frozen=True)
class CalibrationSettings:
    """Everything that shapes a codebook besides the model and the text.

    ``num_tokens``/``holdout_tokens`` count tokens fed to the model (BOS included);
    ``chunk_len`` is capped at the model's context; ``tol``: Lloyd iterations stop when the
    mean squared centroid shift is <= tol · (mean per-dimension variance of the points).
    """

    num_centroids: int = 4096
    num_subspaces: int = 1
    num_tokens: int = 65536
    holdout_tokens: int = 8192
    chunk_len: int = 2048
    wrope_distance: int = 2048
    # WRoPE distance bins the query moment H is fitted for (1: every query at wrope_distance; N:
    # the bins a2ats.codebook.wrope_bins lays out from a 64-token window to the model's context).
    bins: int = 1
    max_iter: int = 300
    tol: float = 1e-4
    seed: int = 0
    chol_eps: float = 1e-6
    baseline: bool = True  # also fit plain k-means, for the quality report
    # Ablations for ``a2ats eval`` (A2ATSCache accepts only the full method): without query
    # awareness, L = I (plain k-means on the pre-RoPE keys); without WRoPE, the codebook is fitted
    # on post-RoPE keys with H from the queries at their own positions.
    query_aware: bool = True
    wrope: bool = True

    def validate(self, head_dim: int | None = None) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        if not isinstance(self.num_centroids, int) or not 1 <= self.num_centroids <= MAX_CENTROIDS:
            raise ValueError(
                f"num_centroids (C) must be an integer in [1, {MAX_CENTROIDS}] "
                f"(codes are int16), got {self.num_centroids!r}"
            )
        if not isinstance(self.num_subspaces, int) or self.num_subspaces < 1:
            raise ValueError(f"num_subspaces (M) must be a positive integer, got {self.num_subspaces!r}")
        if head_dim is not None and head_dim % self.num_subspaces:
            raise ValueError(f"num_subspaces (M) = {self.num_subspaces} must divide the head dim {head_dim}")
        if self.num_tokens < self.num_centroids:
            raise ValueError(
                f"num_tokens = {self.num_tokens} is fewer than num_centroids = "
                f"{self.num_centroids}; k-means needs at least one key per centroid"
            )
        if self.holdout_tokens < 0:
            raise ValueError(f"holdout_tokens must be >= 0, got {self.holdout_tokens}")
        if self.chunk_len < 2:
            raise ValueError(f"chunk_len must be >= 2, got {self.chunk_len}")
        if self.wrope_distance < 0:
            raise ValueError(f"wrope_distance (b) must be >= 0, got {self.wrope_distance}")
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or not 1 <= self.bins <= 64:
            raise ValueError(f"bins must be an int in [1, 64], got {self.bins!r}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        if not self.tol >= 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")
        if not self.chol_eps > 0:
            raise ValueError(f"chol_eps must be > 0, got {self.chol_eps}")


# "default" is the paper's setting (C = 4096 on the whole head vector, M = 1); k-means at that
# size wants a GPU or an hour of CPU. "small" is for quick runs and tests on CPU: 1024 centroids
# from 16k tokens (about three minutes for SmolLM2-135M on two cores), with a coarser fit. It
# was 256 centroids from 8k tokens until that lost the demo's answer at 1k and 8k tokens: the
# heads that copy a number digit by digit put over 0.9 of their attention on one token, which
# exact WRoPE scores rank first but 256 centroids ranked 36th (1k, k = 30) and 498th (8k,
# k = 245). 512 centroids from 16k tokens also kept every answer of the demo's 24 prompts
# (1k-8k, seeds 0-5); 1024 leaves more margin.
PRESETS: dict[str, CalibrationSettings] = {
    "default": CalibrationSettings(),
    "small": CalibrationSettings(
        num_centroids=1024, num_tokens=16384, holdout_tokens=2048, chunk_len=1024, max_iter=100
    ),
}


# Settings added after codebooks were first written, with the value older files were made with:
# a cached codebook without them still matches its preset.
ADDED_SETTINGS = {"bins": 1}


def resolve_settings(preset: str = "default", **overrides: Any) -> CalibrationSettings:
    """The preset with the given fields replaced; ``None`` values keep the preset's."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    names = {f.name for f in fields(CalibrationSettings)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown calibration settings {unknown}; known: {sorted(names)}")
    settings = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    settings.validate()
    return settings
