"""The demo's prompt and one short end-to-end run on the real SmolLM2."""
import pytest

from a2ats.demo import codebook_cache_path, needle_prompt, run_demo


def test_needle_prompt_hides_every_fact_and_asks_the_last(smollm2):
    _, tokenizer = smollm2
    prompt = needle_prompt(tokenizer, 2048, num_facts=4, asked=-1, last_depth=0.75, seed=2)
    text = tokenizer.decode(prompt.input_ids[0])
    assert 0.85 * 2048 < prompt.input_ids.shape[1] < 1.1 * 2048
    places = [text.index(f"the secret number of the {colour} box is {number}.")
              for colour, number in prompt.facts.items()]
    assert places == sorted(places)  # in the order of their depths
    assert prompt.colour == list(prompt.facts)[-1] and prompt.answer == str(prompt.facts[prompt.colour])
    assert text.rstrip().endswith(f"The secret number of the {prompt.colour} box is")
    assert needle_prompt(tokenizer, 2048, seed=2).input_ids.equal(needle_prompt(tokenizer, 2048, seed=2).input_ids)
    with pytest.raises(ValueError, match="asked"):
        needle_prompt(tokenizer, 2048, num_facts=3, asked=3)


def test_demo_answers_and_reports(smollm2, small_codebook, capsys):
    model, tokenizer = smollm2
    figures = run_demo(model, tokenizer, small_codebook, num_tokens=1024, max_new_tokens=6)
    assert figures["dense_correct"] and figures["a2ats_correct"], figures
    assert 0 < figures["a2ats_rows_fetched_share"] < figures["a2ats_rows_read_share"] < 0.3
    out = capsys.readouterr().out
    for line in ("expected answer", "dense attention", "A²ATS top-3.0%", "KV rows attended", "KV cache:"):
        assert line in out


def test_codebook_cache_path_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("A2ATS_CACHE", str(tmp_path))
    assert codebook_cache_path("Some/Model 1", "small") == tmp_path / "Some-Model-1-small.a2ats.safetensors"
    assert codebook_cache_path("m", "small", "no-wrope").name == "m-small-no-wrope.a2ats.safetensors"
