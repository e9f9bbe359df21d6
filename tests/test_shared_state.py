"""The conftest check that keeps tests from changing the session's model, codebook and torch settings."""

import torch


def test_shared_state_check_sees_what_a_test_leaves_behind():
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import leaked_state, shared_state

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    before = shared_state(model)
    assert leaked_state(before, shared_state(model)) == []
    with torch.no_grad():
        model.model.norm.weight.add_(0)  # an in-place write, even of the same values
    assert [leak.split(":")[0] for leak in leaked_state(before, shared_state(model))] == ["model_tensors"]
    model.eval()
    model.config.rope_theta_extra = 1
    assert [leak.split(":")[0] for leak in leaked_state(before, shared_state(model))] == [
        "model_tensors",
        "model_training",
        "model_config",
    ]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert "torch" in leaked_state(before, shared_state(model))[0]
    finally:
        torch.set_num_threads(threads)
