"""Features ``φ(x)``, pointwise constraints ``b(x) ∈ {0, 1}`` and rewards ``r(x)``.

A feature maps a batch of samples to one number per sample, (batch,) on the samples' device.
The same feature serves as a pointwise constraint (values in {0, 1}), a distributional one
(its moment is matched) or a reward: the role is chosen in the target, not here.

:data:`FEATURE_KINDS` maps the ``kind`` of a constraint config to a constructor, and
:func:`build_feature` builds one from a config, checking its parameters and that the prior's
tokenizer can write every word the feature looks for (a feature the policy can never satisfy
would make every importance weight zero).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from dmtune.sampling import Samples
from dmtune.scorers import (
    SCORER_KINDS,
    classifier_feature,
    python_feature,
    reward_model_feature,
)

# VADER's compound score above this counts as clearly positive (VADER's authors use 0.05 for
# "positive at all"; 0.5 keeps about 5% of the tiny prior's samples).
DEFAULT_SENTIMENT_THRESHOLD = 0.5
_SHOWN_VOCABULARY = 20  # vocabulary entries an error message lists
_SHOWN_WORDS = 5  # unproducible words an error message lists

# Topic word lists, lowercase, matched as whole words. Written for dmtune: common words that
# mark a text as being about the topic, favouring words with one dominant sense.
WORD_LISTS: dict[str, tuple[str, ...]] = {
    "science": (
        "science", "sciences", "scientist", "scientists", "scientific", "research", "researcher",
        "researchers", "experiment", "experiments", "laboratory", "lab", "theory", "hypothesis",
        "physics", "physicist", "chemistry", "chemist", "chemical", "biology", "biologist",
        "astronomy", "astronomer", "geology", "mathematics", "mathematician", "equation", "atom",
        "atoms", "molecule", "molecules", "cell", "cells", "gene", "genes", "dna", "protein",
        "evolution", "species", "energy", "gravity", "electron", "particle", "particles", "quantum",
        "planet", "planets", "galaxy", "universe", "orbit", "telescope", "microscope",
        "measurement", "observation", "evidence", "discovery", "element", "oxygen", "carbon",
        "bacteria", "virus", "fossil", "climate", "neuron",
    ),
    "politics": (
        "politics", "political", "politician", "politicians", "government", "governments",
        "election", "elections", "elected", "vote", "votes", "voter", "voters", "voting", "ballot",
        "president", "presidential", "senator", "senate", "congress", "congressman", "parliament",
        "minister", "governor", "mayor", "democracy", "democratic", "democrat", "democrats",
        "republican", "republicans", "campaign", "candidate", "candidates", "legislation",
        "legislature", "policy", "policies", "tax", "taxes", "constitution", "citizen", "citizens",
        "diplomat", "diplomacy", "treaty", "liberal", "conservative", "referendum", "regime",
        "dictator", "lobbyist", "socialism", "socialist", "capitalism", "communism", "communist",
        "federal", "administration", "bureaucracy", "bureaucrat", "embassy", "sanctions", "veto",
    ),
    "sports": (
        "sport", "sports", "team", "teams", "player", "players", "coach", "athlete", "athletes",
        "football", "soccer", "baseball", "basketball", "tennis", "golf", "hockey", "cricket",
        "rugby", "boxing", "wrestling", "cycling", "swimming", "skiing", "marathon", "olympic",
        "olympics", "championship", "champion", "champions", "league", "tournament", "stadium",
        "referee", "umpire", "goal", "goals", "scored", "touchdown", "inning", "quarterback",
        "pitcher", "medal", "trophy", "playoff", "playoffs", "sprint", "racing", "halftime",
    ),
    "religion": (
        "religion", "religions", "religious", "god", "gods", "faith", "church", "churches",
        "temple", "mosque", "synagogue", "prayer", "prayers", "pray", "bible", "biblical",
        "scripture", "gospel", "jesus", "christ", "christian", "christians", "christianity",
        "islam", "muslim", "muslims", "jewish", "judaism", "hindu", "buddhist", "buddhism",
        "buddha", "priest", "pastor", "monk", "saint", "holy", "sacred", "heaven", "hell", "soul",
        "sin", "sins", "salvation", "worship", "divine", "angel", "angels", "prophet", "spiritual",
        "sermon", "clergy", "bishop", "pope", "theology", "allah",
    ),
    "computers": (
        "computer", "computers", "computing", "software", "hardware", "program", "programs",
        "programming", "programmer", "programmers", "code", "coding", "algorithm", "algorithms",
        "database", "internet", "network", "server", "servers", "processor", "cpu", "memory",
        "disk", "keyboard", "laptop", "byte", "bytes", "binary", "compiler", "kernel", "linux",
        "unix", "bug", "bugs", "debug", "debugging", "website", "web", "email", "browser",
        "download", "digital", "electronic", "robot", "chip", "silicon", "terminal", "password",
        "encryption", "hacker", "online", "spreadsheet", "graphics", "emacs", "java", "python",
    ),
}

# Words that mention a woman or a man, for the GDC paper's gender constraints (2012.11635).
FEMALE_WORDS: tuple[str, ...] = (
    "she", "her", "hers", "herself", "woman", "women", "girl", "girls", "lady", "ladies",
    "female", "females", "feminine", "mother", "mothers", "mom", "mum", "daughter", "daughters",
    "sister", "sisters", "wife", "wives", "aunt", "niece", "grandmother", "grandma", "queen",
    "princess", "bride", "girlfriend", "actress", "heroine", "widow", "goddess", "madam", "mrs",
    "ms",
)
MALE_WORDS: tuple[str, ...] = (
    "he", "him", "his", "himself", "man", "men", "boy", "boys", "gentleman", "gentlemen",
    "male", "males", "masculine", "father", "fathers", "dad", "daddy", "son", "sons", "brother",
    "brothers", "husband", "husbands", "uncle", "nephew", "grandfather", "grandpa", "king",
    "prince", "groom", "boyfriend", "actor", "widower", "lad", "sir", "mr",
)


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
        blank = [w for w in self.words if not isinstance(w, str) or not w.strip()]
        if blank:
            raise ValueError(
                f"feature {self.name!r}: words must be non-empty strings, got {blank!r}"
            )

    @property
    def pattern(self) -> re.Pattern[str]:
        # re caches compiled patterns, so rebuilding it per call costs a dict look-up
        alternatives = "|".join(re.escape(w) for w in self.words)
        return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def __call__(self, samples: Samples) -> torch.Tensor:
        pattern = self.pattern
        hits = [1.0 if pattern.search(text) else 0.0 for text in samples.texts]
        return torch.tensor(hits, device=samples.tokens.device)


@functools.cache
def _sentiment_analyzer() -> Any:
    """VADER's analyser, built once per process (it loads its lexicon from disk)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def compound_sentiment(texts: Iterable[str], device: str | torch.device = "cpu") -> torch.Tensor:
    """VADER's compound sentiment score of each text, in [-1, 1]: (batch,) float32."""
    analyzer = _sentiment_analyzer()
    scores = [analyzer.polarity_scores(text)["compound"] for text in texts]
    return torch.tensor(scores, dtype=torch.float32, device=device)


@dataclass(frozen=True)
class Sentiment:
    """1 when VADER's compound score of the text exceeds ``threshold``, else 0."""

    name: str
    threshold: float = DEFAULT_SENTIMENT_THRESHOLD

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold < 1.0:
            raise ValueError(
                f"feature {self.name!r}: sentiment threshold {self.threshold} is outside [-1, 1), "
                "the range of VADER's compound score"
            )

    def __call__(self, samples: Samples) -> torch.Tensor:
        return (compound_sentiment(samples.texts, samples.tokens.device) > self.threshold).float()


@dataclass(frozen=True)
class SentimentScore:
    """VADER's compound sentiment score of the text, in [-1, 1]: a reward."""

    name: str

    def __call__(self, samples: Samples) -> torch.Tensor:
        return compound_sentiment(samples.texts, samples.tokens.device)


def female_words(name: str) -> WordsPresent:
    """1 when the text mentions a woman (she, her, mother, ...; :data:`FEMALE_WORDS`)."""
    return WordsPresent(FEMALE_WORDS, name)


def male_words(name: str) -> WordsPresent:
    """1 when the text mentions a man (he, his, father, ...; :data:`MALE_WORDS`)."""
    return WordsPresent(MALE_WORDS, name)


def token_id_of(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of a single vocabulary entry, or a clear error naming what exists."""
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        shown = ", ".join(sorted(vocab)[:_SHOWN_VOCABULARY])
        raise ValueError(
            f"token {token!r} is not in the tokenizer's vocabulary "
            f"({len(vocab)} entries: {shown}, ...)"
        )
    return vocab[token]


def can_produce(tokenizer: PreTrainedTokenizerBase, word: str) -> bool:
    """Whether the tokenizer can write ``word`` after a space: encoding then decoding gives it back.

    Byte-level BPE writes anything; a word-level vocabulary fails (or maps to its unknown
    token) on a word it lacks. Case is ignored, as the word features ignore it.
    """
    try:
        ids = tokenizer.encode(" " + word, add_special_tokens=False)
    except Exception:  # tokenizers raises a bare Exception for a word-level miss without [UNK]
        return False
    decoded = tokenizer.decode(ids)
    return " ".join(decoded.split()).casefold() == " ".join(word.split()).casefold()


def check_producible(tokenizer: PreTrainedTokenizerBase, words: Iterable[str]) -> None:
    """Raise a one-line error naming the words the tokenizer cannot write, and its vocabulary."""
    missing = [w for w in words if not can_produce(tokenizer, w)]
    if not missing:
        return
    vocab = sorted(tokenizer.get_vocab())
    shown_vocab = ", ".join(vocab[:_SHOWN_VOCABULARY])
    if len(vocab) > _SHOWN_VOCABULARY:
        shown_vocab += ", ..."
    shown = ", ".join(repr(w) for w in missing[:_SHOWN_WORDS])
    more = f" (and {len(missing) - _SHOWN_WORDS} more)" if len(missing) > _SHOWN_WORDS else ""
    subject = f"word {shown}" if len(missing) == 1 else f"words {shown}{more}"
    raise ValueError(
        f"{subject} cannot be produced by the tokenizer of this prior "
        f"(vocabulary of {len(vocab)}: {shown_vocab})"
    )


# --- the registry: config kind -> constructor(name, tokenizer, **params) ---


def _sentiment(
    name: str, tokenizer: PreTrainedTokenizerBase, *, threshold: float = DEFAULT_SENTIMENT_THRESHOLD
) -> Feature:
    return Sentiment(name, float(threshold))


def _sentiment_score(name: str, tokenizer: PreTrainedTokenizerBase) -> Feature:
    return SentimentScore(name)


def _word(name: str, tokenizer: PreTrainedTokenizerBase, *, word: str) -> Feature:
    if not isinstance(word, str):
        raise ValueError(f"feature {name!r}: word must be a string, got {word!r}")
    return WordsPresent((word,), name)


def _wordlist(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    topic: str | None = None,
    words: Iterable[str] | None = None,
) -> Feature:
    if (topic is None) == (words is None):
        raise ValueError(
            f"feature {name!r}: give exactly one of topic ({', '.join(WORD_LISTS)}) or words"
        )
    if topic is not None:
        if topic not in WORD_LISTS:
            raise ValueError(
                f"feature {name!r}: unknown topic {topic!r}; valid topics: {', '.join(WORD_LISTS)}"
            )
        return WordsPresent(WORD_LISTS[topic], name)
    if isinstance(words, str):
        raise ValueError(
            f"feature {name!r}: words must be a list of strings, got the string {words!r}"
        )
    return WordsPresent(tuple(words), name)


def _female(name: str, tokenizer: PreTrainedTokenizerBase) -> Feature:
    return female_words(name)


def _male(name: str, tokenizer: PreTrainedTokenizerBase) -> Feature:
    return male_words(name)


def _token(name: str, tokenizer: PreTrainedTokenizerBase, *, token: str) -> Feature:
    return TokenPresent(token_id_of(tokenizer, token), name)


def _token_count(name: str, tokenizer: PreTrainedTokenizerBase, *, token: str) -> Feature:
    return TokenCount(token_id_of(tokenizer, token), name)


# kinds whose values are 0 or 1 (a rate: a distributional moment lies strictly inside (0, 1))
BINARY_KINDS = ("sentiment", "word", "wordlist", "female", "male", "token")
# kinds built only with the prior (they read its tokenizer) or that load a model or user code:
# their parameter names are checked with the config, their values when the run builds them
BUILT_WITH_THE_RUN = ("token", "token_count", *SCORER_KINDS)
FEATURE_KINDS: dict[str, Callable[..., Feature]] = {
    "sentiment": _sentiment,
    "sentiment_score": _sentiment_score,
    "word": _word,
    "wordlist": _wordlist,
    "female": _female,
    "male": _male,
    "token": _token,
    "token_count": _token_count,
    "classifier": classifier_feature,
    "reward_model": reward_model_feature,
    "python": python_feature,
}


def feature_params(kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (required, optional) parameter names of a feature kind."""
    parameters = [
        p
        for p in inspect.signature(FEATURE_KINDS[kind]).parameters.values()
        if p.kind is p.KEYWORD_ONLY
    ]
    required = tuple(p.name for p in parameters if p.default is p.empty)
    optional = tuple(p.name for p in parameters if p.default is not p.empty)
    return required, optional


def check_feature_params(name: str, kind: str, params: Mapping[str, Any]) -> None:
    """One-line ``ValueError`` for an unknown kind, or unknown or missing parameters."""
    if kind not in FEATURE_KINDS:
        raise ValueError(
            f"feature {name!r}: unknown kind {kind!r}; valid kinds: {', '.join(FEATURE_KINDS)}"
        )
    required, optional = feature_params(kind)
    valid = ", ".join((*required, *(f"{p} (optional)" for p in optional))) or "none"
    takes_any = any(  # a python scorer passes its other params to the function
        p.kind is p.VAR_KEYWORD for p in inspect.signature(FEATURE_KINDS[kind]).parameters.values()
    )
    unknown = [] if takes_any else sorted(set(params) - set(required) - set(optional))
    missing = [p for p in required if p not in params]
    if unknown or missing:
        problems = [f"unknown {', '.join(map(repr, unknown))}"] if unknown else []
        problems += [f"missing {', '.join(map(repr, missing))}"] if missing else []
        raise ValueError(
            f"feature {name!r} of kind {kind!r}: {'; '.join(problems)} parameter(s); "
            f"valid parameters: {valid}"
        )
    if kind not in BUILT_WITH_THE_RUN:  # values too: these kinds are cheap to build
        FEATURE_KINDS[kind](name, None, **params)


def build_feature(
    name: str, kind: str, params: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase
) -> Feature:
    """Build the feature a constraint config describes, or raise a one-line ``ValueError``.

    The parameters are checked against the kind's constructor, and every word a word feature
    looks for must be writable by ``tokenizer`` (see :func:`can_produce`).
    """
    check_feature_params(name, kind, params)
    feature = FEATURE_KINDS[kind](name, tokenizer, **params)
    if isinstance(feature, WordsPresent):
        check_producible(tokenizer, feature.words)
    return feature
