"""Tiny random-weight causal LMs of the architectures A²ATS serves, shared by the tests."""

import torch


def tiny_model(kind: str, **overrides):
    """A small random-weight causal LM of the given architecture."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, PhiConfig, Qwen3Config

    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    common.update(overrides)
    if kind == "qwen3":
        config = Qwen3Config(head_dim=32, **common)
    elif kind == "gemma3":
        common["num_hidden_layers"] = 4
        config = Gemma3TextConfig(
            head_dim=32,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            **common,
        )
    elif kind == "phi":
        config = PhiConfig(partial_rotary_factor=0.5, **common)
    elif kind == "llama-yarn":
        config = LlamaConfig(
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "rope_theta": 10000.0,
                "original_max_position_embeddings": 128,
            },
            **common,
        )
    elif kind == "mistral":
        config = MistralConfig(**{"head_dim": 32, "sliding_window": None, **common})
    elif kind == "llama":
        config = LlamaConfig(**common)
    else:
        raise AssertionError(kind)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_codebook(model, tokenizer):
    """A codebook for a tiny model, calibrated in seconds (16 centroids from 512 tokens)."""
    from a2ats.calibration import calibrate

    return calibrate(
        model,
        tokenizer,
        num_centroids=16,
        num_tokens=512,
        holdout_tokens=0,
        chunk_len=256,
        baseline=False,
        progress=False,
    )
