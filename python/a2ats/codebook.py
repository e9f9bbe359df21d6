"""Query-aware codebooks and their safetensors files.

A codebook serves one model. Per retrieval layer and KV head g it holds the Cholesky factor
``L`` of the normalised query second moment ``H = E[q_wᵀ q_w] = L Lᵀ``, its inverse, and the
k-means centroids of the whitened pre-RoPE keys ``k_pre L``, split into M subspaces:

* code of a key: per subspace m, ``argmin_c ‖(k_pre L)_m − centroids[g, m, c]‖``;
* dual query: ``q' = q_w L⁻ᵀ`` so that ``q' · (k_pre L) = q_w · k_pre``;
* approximate score: ``Σ_m q'_m · centroids[g, m, code_m]`` (divided by sqrt(D) at run time).

File layout (safetensors, all tensors f32):

* ``rope.inv_freq`` (R/2,): the RoPE inverse frequencies used for WRoPE;
* ``layers.{l}.centroids`` (Hkv, M, C, D/M), ``layers.{l}.chol`` and ``layers.{l}.chol_inv``
  (Hkv, D, D), for each retrieval layer l;
* metadata key ``a2ats``: JSON with the format version, model type/name, layer/head/head-dim
  counts, RoPE parameters, the WRoPE distance b, C, M, calibration facts, the key-projection
  fingerprint, the quality report, and a SHA-256 checksum over the tensors and the metadata.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from typing import Any, Mapping

import torch

import a2ats_core

from .models import ModelLayout, RopeSpec, describe_model, fingerprints_match, key_projection_fingerprint

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "CodebookError",
    "CodebookMismatchError",
    "Codebook",
    "model_metadata",
]

FORMAT = "a2ats-codebook"
FORMAT_VERSION = 1
METADATA_KEY = "a2ats"
# Codes are stored as int16 by the kernels.
MAX_CENTROIDS = 1 << 15
MAX_WROPE_DISTANCE = 1 << 24  # WRoPE distances beyond any model's context


# Who takes a budget: each query head (the paper's; a KV head reads its heads' union) or each KV head.
BUDGET_PER = ("query_head", "kv_head")


def budget_tokens(topk: float | int, length: int) -> int:
    """The budget rule: tokens each query head selects at context ``length``. A float topk is a
    share of the length (``int(topk * length)``, the paper's ratio), an int an absolute count."""
    return int(topk * length) if isinstance(topk, float) else int(topk)


def wrope_bins(bins, *, window: int, capacity: int, distance: int) -> tuple[list[int], list[int]]:
    """The WRoPE distance bins of a scoring query: ``(wrope_distances (NB,), bin_edges (NB - 1,))``,
    as :class:`a2ats_core.Pipeline` and ``lut_scores`` take them.

    A token at distance d from the current one (d = 0 is the current token) is in bin
    #{bin_edges <= d} and is scored as if it sat ``wrope_distances[bin]`` positions back.
    ``bins``: 1 (the paper's WRoPE) scores every token at ``distance``, the codebook's b; an int
    N > 1 makes N bins whose edges are log-spaced from ``window`` (nearer tokens are always
    attended) to ``capacity``; a sequence of ascending ints gives the edges themselves. A bin's
    distance is the geometric mean of its bounds, the first bin starting at ``window`` and the
    last ending at ``capacity``. Raises ValueError naming ``bins`` when the edges are not
    ascending positive ints (N log-spaced edges collide when capacity / window is small)."""
    if isinstance(bins, bool):
        raise ValueError(f"bins must be an int >= 1 or a sequence of ascending edges, got {bins!r}")
    if isinstance(bins, int):
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if bins == 1:
            return [int(distance)], []
        ratio = capacity / window
        edges = [round(window * ratio ** (j / bins)) for j in range(1, bins)]
    else:
        try:
            edges = [int(edge) for edge in bins]
        except (TypeError, ValueError):
            raise ValueError(f"bins must be an int >= 1 or a sequence of ascending edges, got {bins!r}") from None
        if any(edge != original for edge, original in zip(edges, bins)):
            raise ValueError(f"bins edges must be ints, got {list(bins)!r}")
        if not edges:
            return [int(distance)], []
    if edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(
            f"bins: the edges {edges} (window {window}, capacity {capacity}) must be strictly ascending ints >= 1; "
            "use fewer bins or give the edges"
        )
    bounds = [max(1, min(window, edges[0]))] + edges + [max(capacity, edges[-1] + 1)]
    distances = [round(math.sqrt(lo * hi)) for lo, hi in zip(bounds, bounds[1:])]
    return distances, edges


class CodebookError(ValueError):
    """A codebook file is unreadable, truncated, corrupted or inconsistent."""


class CodebookMismatchError(CodebookError):
    """A codebook was built for a different model than the one it is used with."""


def model_metadata(layout: ModelLayout) -> dict[str, Any]:
    """The ``model`` section of codebook metadata for ``layout``."""
    return {
        "model_type": layout.model_type,
        "model_name": layout.model_name,
        "num_layers": layout.num_layers,
        "num_q_heads": layout.num_q_heads,
        "num_kv_heads": layout.num_kv_heads,
        "head_dim": layout.head_dim,
        "layers": list(layout.layers),
    }


def _tensor_names(layers) -> list[str]:
    names = ["rope.inv_freq"]
    for layer in layers:
        names += [f"layers.{layer}.centroids", f"layers.{layer}.chol", f"layers.{layer}.chol_inv"]
    return names


def _checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> str:
    digest = hashlib.sha256()
    body = {key: value for key, value in metadata.items() if key != "checksum"}
    digest.update(json.dumps(body, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


class Codebook:
    """Per-layer centroids and whitening factors for one model (see the module docstring).

    ``centroids[l]`` (Hkv, M, C, D/M), ``chol[l]`` and ``chol_inv[l]`` (Hkv, D, D), all f32;
    ``inv_freq`` (R/2,) f32; ``metadata`` a JSON-able dict (format described in the module).
    """

    def __init__(
        self,
        centroids: Mapping[int, torch.Tensor],
        chol: Mapping[int, torch.Tensor],
        chol_inv: Mapping[int, torch.Tensor],
        inv_freq: torch.Tensor,
        metadata: Mapping[str, Any],
    ):
        self.centroids = {int(k): v for k, v in sorted(centroids.items())}
        self.chol = {int(k): v for k, v in sorted(chol.items())}
        self.chol_inv = {int(k): v for k, v in sorted(chol_inv.items())}
        self.inv_freq = inv_freq
        self.metadata = copy.deepcopy(dict(metadata))
        self._check_consistent()

    # -- description -------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.centroids)

    @property
    def num_kv_heads(self) -> int:
        return int(self.metadata["model"]["num_kv_heads"])

    @property
    def num_q_heads(self) -> int:
        return int(self.metadata["model"]["num_q_heads"])

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return int(self.metadata["model"]["head_dim"])

    @property
    def num_centroids(self) -> int:
        return int(self.metadata["num_centroids"])

    @property
    def num_subspaces(self) -> int:
        return int(self.metadata["num_subspaces"])

    @property
    def wrope_distance(self) -> int:
        """The WRoPE distance b far tokens are scored at."""
        return int(self.metadata["wrope_distance"])

    @property
    def bins(self) -> tuple[list[int], list[int]]:
        """``(wrope_distances, bin_edges)`` the query moment was fitted for (calibrate(bins=N));
        one distance b and no edges for a codebook without bins, older files included."""
        bins = self.metadata.get("wrope_bins")
        if not bins:
            return [self.wrope_distance], []
        return [int(d) for d in bins["distances"]], [int(e) for e in bins["edges"]]

    def scoring_bins(
        self, bins=None, *, window: int, capacity: int, wrope_distance: int | None = None
    ) -> tuple[list[int], list[int]]:
        """``(wrope_distances, bin_edges)`` to score with: :attr:`bins` when neither ``bins`` nor
        ``wrope_distance`` is given, else :func:`wrope_bins` of ``bins`` (1 when None) around
        ``wrope_distance`` (the codebook's b when None). Raises ValueError naming bins."""
        if bins is None and wrope_distance is None:
            return self.bins
        distance = self.wrope_distance if wrope_distance is None else wrope_distance
        return wrope_bins(1 if bins is None else bins, window=window, capacity=capacity, distance=distance)

    @property
    def ablation(self) -> str | None:
        """None for an A²ATS codebook; "no-wrope" or "no-query-awareness" for the ablations
        ``a2ats eval`` compares (fitted on post-RoPE keys, or with L = I)."""
        settings = self.metadata.get("calibration", {}).get("settings", {})
        if not settings.get("wrope", True):
            return "no-wrope"
        if not settings.get("query_aware", True):
            return "no-query-awareness"
        return None

    @property
    def rope(self) -> RopeSpec:
        rope = self.metadata["rope"]
        return RopeSpec(
            inv_freq=self.inv_freq.detach().float().cpu(),
            attention_scaling=float(rope["attention_scaling"]),
            rope_type=str(rope["rope_type"]),
            interleaved=bool(rope["interleaved"]),
        )

    @property
    def quality(self) -> dict[str, Any] | None:
        return self.metadata.get("quality")

    def __repr__(self) -> str:
        model = self.metadata.get("model", {})
        return (
            f"Codebook({model.get('model_name')!r}, layers={len(self.layers)}, "
            f"Hkv={self.num_kv_heads}, D={self.head_dim}, C={self.num_centroids}, "
            f"M={self.num_subspaces}, b={self.wrope_distance})"
        )

    def _check_consistent(self) -> None:
        meta = self.metadata
        if meta.get("format") != FORMAT:
            raise CodebookError(f"not an a2ats codebook (format {meta.get('format')!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise CodebookError(
                f"codebook format version {meta.get('format_version')!r} is not "
                f"supported (this a2ats reads version {FORMAT_VERSION})"
            )
        try:
            hkv, d = self.num_kv_heads, self.head_dim
            c, m = self.num_centroids, self.num_subspaces
            layers = [int(layer) for layer in meta["model"]["layers"]]
            rotary_dim = int(meta["rope"]["rotary_dim"])
            wrope_distance = meta["wrope_distance"]
        except (KeyError, TypeError, ValueError) as error:
            raise CodebookError(f"codebook metadata is incomplete: {error!r}") from None
        if list(self.layers) != layers or set(self.chol) != set(layers) or set(self.chol_inv) != set(layers):
            raise CodebookError(f"codebook tensors cover layers {list(self.layers)} but the metadata lists {layers}")
        if m < 1 or d % m:
            raise CodebookError(f"{m} subspaces do not divide head dim {d}")
        expected = {"centroids": (hkv, m, c, d // m), "chol": (hkv, d, d), "chol_inv": (hkv, d, d)}
        for layer in layers:
            for kind, shape in expected.items():
                tensor = getattr(self, kind)[layer]
                if tuple(tensor.shape) != shape or tensor.dtype != torch.float32:
                    raise CodebookError(
                        f"layers.{layer}.{kind}: expected f32 {shape}, found "
                        f"{str(tensor.dtype).replace('torch.', '')} "
                        f"{tuple(tensor.shape)}"
                    )
                if not bool(torch.isfinite(tensor).all()):
                    raise CodebookError(f"layers.{layer}.{kind} holds non-finite values")
            # L must be a Cholesky factor (lower-triangular, positive diagonal) and chol_inv its
            # inverse: the scores are q L^-T . c, so a forged pair would rank tokens silently wrong.
            chol, chol_inv = self.chol[layer], self.chol_inv[layer]
            if not torch.equal(chol, chol.tril()) or not bool((torch.diagonal(chol, 0, 1, 2) > 0).all()):
                raise CodebookError(
                    f"layers.{layer}.chol is not a Cholesky factor (lower-triangular with a positive diagonal)"
                )
            error = float((chol @ chol_inv - torch.eye(d)).abs().max())
            if not error <= 1e-3:
                raise CodebookError(f"layers.{layer}.chol_inv is not the inverse of chol (|L L^-1 - I| = {error:.3g})")
        if (
            isinstance(wrope_distance, bool)
            or not isinstance(wrope_distance, int)
            or not 0 <= wrope_distance <= MAX_WROPE_DISTANCE
        ):
            raise CodebookError(
                f"wrope_distance (the WRoPE distance b) must be an int in [0, "
                f"{MAX_WROPE_DISTANCE}], found {wrope_distance!r}"
            )
        bins = meta.get("wrope_bins")
        if bins is not None:
            try:
                distances, edges = [int(d) for d in bins["distances"]], [int(e) for e in bins["edges"]]
            except (KeyError, TypeError, ValueError) as error:
                raise CodebookError(f"wrope_bins metadata is incomplete: {error!r}") from None
            if (
                len(distances) != len(edges) + 1
                or any(b <= a for a, b in zip(edges, edges[1:]))
                or min(edges, default=1) < 1
            ):
                raise CodebookError(
                    f"wrope_bins: {len(distances)} distances need {len(distances) - 1} ascending edges >= 1, "
                    f"found {edges}"
                )
        if tuple(self.inv_freq.shape) != (rotary_dim // 2,):
            raise CodebookError(f"rope.inv_freq: expected ({rotary_dim // 2},), found {tuple(self.inv_freq.shape)}")

    # -- the maths ---------------------------------------------------------------------------
    def whiten_keys(self, layer: int, k_pre: torch.Tensor) -> torch.Tensor:
        """``k_pre L`` per KV head: k_pre (B, Hkv, T, D) pre-RoPE keys -> (B, Hkv, T, D) f32."""
        chol = self.chol[layer].to(k_pre.device)
        return torch.einsum("bgtd,gde->bgte", k_pre.float(), chol)

    def dual_queries(self, layer: int, q_w: torch.Tensor) -> torch.Tensor:
        """``q_w L⁻ᵀ`` with L of each query head's KV head.

        q_w (B, Hq, D) or distance-binned (B, Hq, NB, D), WRoPE queries -> same shape, f32.
        """
        chol_inv = self.chol_inv[layer].to(q_w.device)  # (Hkv, D, D)
        per_q_head = chol_inv.repeat_interleave(self.group_size, dim=0)  # (Hq, D, D)
        if q_w.dim() == 3:
            return torch.einsum("bhd,hed->bhe", q_w.float(), per_q_head)
        return torch.einsum("bhnd,hed->bhne", q_w.float(), per_q_head)

    def encode(self, layer: int, k_pre: torch.Tensor) -> torch.Tensor:
        """Codes (B, Hkv, T, M) int16 of pre-RoPE keys k_pre (B, Hkv, T, D)."""
        return a2ats_core.vq_encode(
            self.whiten_keys(layer, k_pre).contiguous(), self.centroids[layer].to(k_pre.device).contiguous()
        )

    def encode_keys(self, layer: int, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Codes (B, Hkv, T, M) int16 of post-RoPE keys (B, Hkv, T, D) at positions (B, T): rotated
        back to pre-RoPE form, whitened, nearest centroid (the pipeline's prefill, as single ops)."""
        k_pre = a2ats_core.rotary(keys, (-positions).to(torch.int64), self.inv_freq.to(keys.device).float())
        return self.encode(layer, k_pre)

    def wrope_dual_queries(
        self, layer: int, query: torch.Tensor, positions: torch.Tensor, wrope_distances: int | list[int]
    ) -> torch.Tensor:
        """Scoring queries for post-RoPE queries (B, Hq, D) at positions (B,): moved to each WRoPE
        distance b_j, R(b_j - m) q, then into the dual space of their KV head. One distance (an
        int or a list of one) gives (B, Hq, D) f32; NB > 1 distances (the bins of
        :func:`wrope_bins`) give (B, Hq, NB, D) f32, what ``lut_scores`` takes with bin_edges."""
        distances = [wrope_distances] if isinstance(wrope_distances, int) else list(wrope_distances)
        num_bins = len(distances)
        rotate_by = torch.tensor(distances, device=query.device)[None] - positions.to(query.device)[:, None]
        q_w = a2ats_core.rotary(
            query[:, :, None].expand(-1, -1, num_bins, -1).contiguous(),
            rotate_by.to(torch.int64),
            self.inv_freq.to(query.device).float(),
        )
        return self.dual_queries(layer, q_w[:, :, 0] if num_bins == 1 else q_w).contiguous()

    def reconstruct_keys(self, layer: int, codes: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE keys ``ĉ L⁻¹`` (B, Hkv, T, D) f32 the codes (B, Hkv, T, M) stand for."""
        centroids = self.centroids[layer].to(codes.device)  # (Hkv, M, C, D/M)
        hkv, m, _, dsub = centroids.shape
        b, _, t, _ = codes.shape
        index = codes.long().permute(0, 1, 3, 2)  # (B, Hkv, M, T)
        picked = (
            centroids[None].expand(b, hkv, m, -1, dsub).gather(3, index[..., None].expand(b, hkv, m, t, dsub))
        )  # (B, Hkv, M, T, D/M)
        whitened = picked.permute(0, 1, 3, 2, 4).reshape(b, hkv, t, m * dsub)
        return torch.einsum("bgtd,gde->bgte", whitened, self.chol_inv[layer].to(codes.device))

    def kv_heads(self, start: int, stop: int) -> "Codebook":
        """The codebook of KV heads [start, stop) and their query heads: a tensor-parallel rank's
        share (its tensors are views of this one's)."""
        if not 0 <= start < stop <= self.num_kv_heads:
            raise ValueError(f"KV heads [{start}, {stop}) are not within the codebook's {self.num_kv_heads}")
        metadata = copy.deepcopy(self.metadata)
        metadata["model"]["num_kv_heads"] = stop - start
        metadata["model"]["num_q_heads"] = (stop - start) * self.group_size
        pick = lambda tensors: {l: t[start:stop] for l, t in tensors.items()}  # noqa: E731
        return Codebook(pick(self.centroids), pick(self.chol), pick(self.chol_inv), self.inv_freq, metadata)

    def to(self, device: str | torch.device) -> "Codebook":
        """A copy with every tensor on ``device``."""
        move = lambda tensors: {k: v.to(device) for k, v in tensors.items()}  # noqa: E731
        return Codebook(
            move(self.centroids), move(self.chol), move(self.chol_inv), self.inv_freq.to(device), self.metadata
        )

    # -- files -------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The named tensors of the file format, on the CPU."""
        tensors = {"rope.inv_freq": self.inv_freq}
        for layer in self.layers:
            tensors[f"layers.{layer}.centroids"] = self.centroids[layer]
            tensors[f"layers.{layer}.chol"] = self.chol[layer]
            tensors[f"layers.{layer}.chol_inv"] = self.chol_inv[layer]
        return {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in tensors.items()}

    def save(self, path: str | os.PathLike) -> None:
        """Write the codebook as a safetensors file whose metadata carries a fresh checksum; the
        object itself is left as it is."""
        from safetensors.torch import save_file

        tensors = self.tensors()
        # Canonical JSON first (int keys become strings, tuples lists) so the checksum computed
        # here equals the one recomputed from the parsed file.
        metadata = json.loads(json.dumps({k: v for k, v in self.metadata.items() if k != "checksum"}))
        metadata["checksum"] = _checksum(tensors, metadata)
        save_file(tensors, os.fspath(path), metadata={METADATA_KEY: json.dumps(metadata)})

    @classmethod
    def load(cls, path: str | os.PathLike, model=None, *, device: str | torch.device = "cpu") -> "Codebook":
        """Read a codebook file, verify it, and, given ``model``, check it belongs to it.

        Raises :class:`CodebookError` for a truncated, corrupted or foreign file and
        :class:`CodebookMismatchError` when it was built for another model.
        """
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no codebook file at {path}")
        try:
            with safe_open(path, framework="pt", device="cpu") as handle:
                raw = (handle.metadata() or {}).get(METADATA_KEY)
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:  # safetensors raises its own error types for bad files
            raise CodebookError(f"{path}: not a readable safetensors file (truncated or corrupted?): {error}") from None
        if raw is None:
            raise CodebookError(f"{path}: a safetensors file without a2ats codebook metadata")
        try:
            metadata = json.loads(raw)
        except json.JSONDecodeError as error:
            raise CodebookError(f"{path}: corrupted codebook metadata: {error}") from None
        try:
            layers = [int(layer) for layer in metadata["model"]["layers"]]
        except (KeyError, TypeError, ValueError):
            raise CodebookError(f"{path}: codebook metadata lists no layers") from None
        missing = sorted(set(_tensor_names(layers)) - set(tensors))
        extra = sorted(set(tensors) - set(_tensor_names(layers)))
        if missing or extra:
            raise CodebookError(f"{path}: tensors missing {missing[:4]} / unexpected {extra[:4]}")
        if metadata.get("checksum") != _checksum(tensors, metadata):
            raise CodebookError(f"{path}: checksum mismatch, the file is corrupted")
        # Files written before the WRoPE distance had one name (the checksum covers the file as read).
        calibration = metadata.get("calibration")
        settings = calibration.get("settings") if isinstance(calibration, dict) else None
        for holder in (metadata, settings):
            if isinstance(holder, dict) and "relative_position" in holder and "wrope_distance" not in holder:
                holder["wrope_distance"] = holder.pop("relative_position")
        try:
            codebook = cls(
                {l: tensors[f"layers.{l}.centroids"] for l in layers},
                {l: tensors[f"layers.{l}.chol"] for l in layers},
                {l: tensors[f"layers.{l}.chol_inv"] for l in layers},
                tensors["rope.inv_freq"],
                metadata,
            )
        except CodebookError as error:
            raise CodebookError(f"{path}: {error}") from None
        if model is not None:
            codebook.check_compatible(model)
        return codebook if str(device) == "cpu" else codebook.to(device)

    def check_compatible(self, model) -> None:
        """Raise :class:`CodebookMismatchError` unless this codebook was built for ``model``.

        Compares model type, layer/head/head-dim counts, retrieval layers, RoPE parameters and
        the key-projection fingerprint. The model name is not compared: it depends on how the
        model was loaded (path, alias), the fingerprint identifies the weights instead.
        """
        layout = describe_model(model)
        try:
            self._compare(model, layout)
        except CodebookError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as error:  # a forged or damaged metadata entry
            raise CodebookError(f"codebook metadata is incomplete or malformed: {error!r}") from None

    def _compare(self, model, layout) -> None:
        want = self.metadata["model"]
        have = model_metadata(layout)
        problems = []
        for key in ("model_type", "num_layers", "num_q_heads", "num_kv_heads", "head_dim", "layers"):
            if want[key] != have[key]:
                problems.append(f"{key}: codebook {want[key]!r}, model {have[key]!r}")
        rope_want, rope_have = self.metadata["rope"], layout.rope.to_metadata()
        for key in ("rope_type", "rotary_dim", "interleaved"):
            if rope_want[key] != rope_have[key]:
                problems.append(f"rope {key}: codebook {rope_want[key]!r}, model {rope_have[key]!r}")
        if not math.isclose(rope_want["attention_scaling"], rope_have["attention_scaling"], rel_tol=1e-6):
            problems.append(
                f"rope attention_scaling: codebook {rope_want['attention_scaling']}, "
                f"model {rope_have['attention_scaling']}"
            )
        # 1e-2: a model cast with .to(bfloat16) rounds its inv_freq buffer (~4e-3); another
        # rope_theta or scaling factor moves most frequencies far more.
        if self.inv_freq.shape == layout.rope.inv_freq.shape:
            if not torch.allclose(self.inv_freq.cpu(), layout.rope.inv_freq, rtol=1e-2, atol=0):
                problems.append("rope inv_freq differs (another rope_theta or scaling)")
        if not problems:
            bad = fingerprints_match(self.metadata["fingerprint"], key_projection_fingerprint(model, layout.layers))
            if bad:
                problems.append(
                    "key-projection weights differ (fingerprint mismatch in layers "
                    f"{[layout.layers[i] for i in bad if i < len(layout.layers)][:8]})"
                )
        if problems:
            raise CodebookMismatchError(
                f"this codebook was built for {want.get('model_name')!r} ({want['model_type']}) "
                f"and does not match the given model ({have['model_name']!r}): "
                + "; ".join(problems)
                + ". Run `a2ats calibrate` for this model."
            )
