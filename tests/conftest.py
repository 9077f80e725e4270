"""Shared fixtures: the toy prior in float64 and its enumerated sequence space."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dmtune.exact import ExactSpace  # noqa: E402
from dmtune.priors import make_toy_prior  # noqa: E402

TOY_MAX_NEW_TOKENS = 4


@pytest.fixture(scope="session")
def toy():
    """(prior, tokenizer) in float64, so exact identities hold to ~1e-12."""
    model, tokenizer = make_toy_prior(seed=0)
    return model.double(), tokenizer


@pytest.fixture(scope="session")
def toy_policy(toy):
    """A policy different from the prior: the same architecture, another seed."""
    model, _ = make_toy_prior(seed=1)
    return model.double()


@pytest.fixture(scope="session")
def space(toy):
    model, tokenizer = toy
    return ExactSpace(model, tokenizer, TOY_MAX_NEW_TOKENS)
