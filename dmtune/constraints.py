"""Features ``φ(x)``, pointwise constraints ``b(x) ∈ {0, 1}`` and rewards ``r(x)``.

A feature maps a batch of samples to one number per sample, (batch,) on the samples' device.
The same feature serves as a pointwise constraint (values in {0, 1}), a distributional one
(its moment is matched) or a reward: the role is chosen in the target, not here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from dmtune.sampling import Samples


class Feature(Protocol):
    """Anything with a name that scores a batch of samples: (batch,) floats."""

    name: str

    def __call__(self, samples: Samples) -> torch.Tensor: ...


@dataclass(frozen=True)
class TokenPresent:
    """1 when token ``token_id`` occurs among the generated tokens (EOS counted), else 0."""

    token_id: int
    name: str

    def __call__(self, samples: Samples) -> torch.Tensor:
        hit = (samples.tokens == self.token_id) & samples.mask.bool()
        return hit.any(-1).float()


@dataclass(frozen=True)
class TokenCount:
    """How many times ``token_id`` occurs among the generated tokens (a non-binary feature)."""

    token_id: int
    name: str

    def __call__(self, samples: Samples) -> torch.Tensor:
        return ((samples.tokens == self.token_id) & samples.mask.bool()).sum(-1).float()


@dataclass(frozen=True)
class WordsPresent:
    """1 when any of ``words`` occurs in the text as a whole word (case-insensitive), else 0."""

    words: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        if not self.words:
            raise ValueError(f"feature {self.name!r}: the word list is empty")

    @property
    def pattern(self) -> re.Pattern[str]:
        alternatives = "|".join(re.escape(w) for w in self.words)
        return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def __call__(self, samples: Samples) -> torch.Tensor:
        pattern = self.pattern
        hits = [1.0 if pattern.search(text) else 0.0 for text in samples.texts]
        return torch.tensor(hits, device=samples.tokens.device)


def token_id_of(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of a single vocabulary entry, or a clear error naming what exists."""
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        shown = ", ".join(sorted(vocab)[:20])
        raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary ({len(vocab)} entries: {shown}, ...)")
    return vocab[token]
