"""Features on real text: VADER sentiment, whole-word lists, gender words, and the config
registry."""

from __future__ import annotations

import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dmtune.constraints import (
    FEATURE_KINDS,
    FEMALE_WORDS,
    MALE_WORDS,
    WORD_LISTS,
    Sentiment,
    SentimentScore,
    TokenCount,
    TokenPresent,
    WordsPresent,
    build_feature,
    can_produce,
    compound_sentiment,
    feature_params,
)
from dmtune.priors import EOS_TOKEN, TINY_PRIOR_DIR, make_toy_tokenizer
from dmtune.sampling import Samples
from dmtune.scorers import SCORER_KINDS

POSITIVE = "What a wonderful, amazing day: I love it!"
NEGATIVE = "This is a terrible, awful mess and I hate it."
NEUTRAL = "The table is in the kitchen."
MIN_TOPIC_WORDS = 40
BPE_CORPUS = [
    POSITIVE, NEGATIVE, NEUTRAL, "She said her mother was a scientist.", "He voted in the election."
]


def make_samples(texts: list[str], tokens: torch.Tensor | None = None) -> Samples:
    """Samples whose only meaningful field is ``texts`` (word features read nothing else)."""
    n = len(texts)
    tokens = torch.zeros(n, 3, dtype=torch.long) if tokens is None else tokens
    return Samples(
        prompt_ids=torch.zeros(n, 1, dtype=torch.long),
        prompt_mask=torch.ones(n, 1, dtype=torch.long),
        tokens=tokens,
        mask=torch.ones_like(tokens),
        log_q=torch.zeros(n),
        texts=texts,
    )


@pytest.fixture(scope="module")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE like the tiny prior's, trained in-test on a few sentences."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(BPE_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN
    )


def real_tokenizers(bpe: PreTrainedTokenizerFast) -> list[PreTrainedTokenizerFast]:
    """The in-test BPE, plus the embedded tiny prior's tokenizer once it has been built."""
    found = [bpe]
    if (TINY_PRIOR_DIR / "tokenizer.json").is_file():
        found.append(AutoTokenizer.from_pretrained(str(TINY_PRIOR_DIR)))
    return found


def word_level_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer that knows every word of every built-in list."""
    everything = (
        {w for words in WORD_LISTS.values() for w in words} | set(FEMALE_WORDS) | set(MALE_WORDS)
    )
    return make_toy_tokenizer(tuple(sorted(everything)))


# --- sentiment ---


def test_sentiment_separates_clear_positive_negative_and_neutral_text():
    samples = make_samples([POSITIVE, NEGATIVE, NEUTRAL])
    scores = SentimentScore("vader")(samples)
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0.0
    assert Sentiment("positive")(samples).tolist() == [1.0, 0.0, 0.0]
    assert Sentiment("not_negative", threshold=-0.5)(samples).tolist() == [1.0, 0.0, 1.0]


def test_sentiment_threshold_outside_compound_range_is_refused():
    with pytest.raises(ValueError, match=r"threshold 1\.5 is outside \[-1, 1\)"):
        Sentiment("positive", threshold=1.5)


# --- words ---


def test_whole_word_matching_ignores_case_and_punctuation_but_not_longer_words():
    feature = WordsPresent(("amazing",), "amazing")
    texts = ["Amazing!", "it was AMAZING.", "amazingly good", "unamazing", "(amazing)", ""]
    assert feature(make_samples(texts)).tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]


def test_words_present_refuses_blank_words():
    with pytest.raises(ValueError, match="non-empty strings"):
        WordsPresent(("ok", " "), "bad")


@pytest.mark.parametrize("topic", sorted(WORD_LISTS))
def test_word_lists_are_long_lowercase_unique_single_words(topic):
    words = WORD_LISTS[topic]
    assert len(words) >= MIN_TOPIC_WORDS
    assert len(set(words)) == len(words)
    assert all(re.fullmatch(r"[a-z]+", w) for w in words), [
        w for w in words if not re.fullmatch(r"[a-z]+", w)
    ]


def test_science_and_politics_lists_exist_and_match_their_topic():
    science = build_feature("science", "wordlist", {"topic": "science"}, word_level_tokenizer())
    politics = build_feature("politics", "wordlist", {"topic": "politics"}, word_level_tokenizer())
    samples = make_samples(
        ["The physicist ran an experiment.", "The senator lost the election.", NEUTRAL]
    )
    assert science(samples).tolist() == [1.0, 0.0, 0.0]
    assert politics(samples).tolist() == [0.0, 1.0, 0.0]


# --- gender ---


def test_gender_features_find_female_and_male_mentions():
    tokenizer = word_level_tokenizer()
    female = build_feature("female", "female", {}, tokenizer)
    male = build_feature("male", "male", {}, tokenizer)
    texts = [
        "She went home.", "Her mother called.", "He went home.",
        "The herald arrived; the shepherd slept.", NEUTRAL,
    ]
    samples = make_samples(texts)
    assert female(samples).tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert male(samples).tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert not set(FEMALE_WORDS) & set(MALE_WORDS)


# --- every feature: shape, dtype, device ---


# the scorer kinds load a model or import user code; tests/test_scorers.py covers them
@pytest.mark.parametrize("kind", sorted(set(FEATURE_KINDS) - set(SCORER_KINDS)))
def test_every_kind_returns_one_float_per_sample_on_the_tokens_device(kind):
    tokenizer = word_level_tokenizer()
    params = {"word": {"word": "mother"}, "wordlist": {"topic": "science"},
              "token": {"token": "mother"}, "token_count": {"token": "mother"}}.get(kind, {})
    feature = build_feature(f"f_{kind}", kind, params, tokenizer)
    tokens = torch.tensor([[tokenizer.get_vocab()["mother"], 0, 0], [0, 0, 0]])
    values = feature(
        make_samples(["Her mother is a wonderful, amazing scientist!", NEUTRAL], tokens)
    )
    assert values.shape == (2,) and values.dtype == torch.float32 and values.device == tokens.device
    assert values[0] != values[1] or kind == "male"


def test_token_kinds_use_the_vocabulary_of_the_toy_tokenizer():
    toy = make_toy_tokenizer()
    assert build_feature("has_d", "token", {"token": "d"}, toy) == TokenPresent(4, "has_d")
    assert build_feature("n_a", "token_count", {"token": "a"}, toy) == TokenCount(1, "n_a")
    with pytest.raises(ValueError, match="token 'z' is not in the tokenizer's vocabulary"):
        build_feature("has_z", "token", {"token": "z"}, toy)


# --- build_feature errors: one line, naming the valid choices ---


def one_line_error(**kwargs) -> str:
    with pytest.raises(ValueError) as caught:
        build_feature(**kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_unknown_kind_names_every_valid_kind():
    message = one_line_error(name="x", kind="sentimnet", params={}, tokenizer=make_toy_tokenizer())
    assert "'sentimnet'" in message
    assert all(kind in message for kind in FEATURE_KINDS)


def test_bad_and_missing_params_name_the_valid_params():
    toy = make_toy_tokenizer()
    message = one_line_error(name="x", kind="word", params={"wrd": "a"}, tokenizer=toy)
    assert (
        "unknown 'wrd'" in message
        and "missing 'word'" in message
        and "valid parameters: word" in message
    )
    message = one_line_error(name="x", kind="sentiment", params={"treshold": 0.2}, tokenizer=toy)
    assert "'treshold'" in message and "threshold (optional)" in message
    message = one_line_error(name="x", kind="female", params={"words": ["she"]}, tokenizer=toy)
    assert "valid parameters: none" in message


def test_wordlist_needs_exactly_one_known_topic_or_a_list_of_words():
    toy = make_toy_tokenizer()
    message = one_line_error(name="x", kind="wordlist", params={"topic": "cooking"}, tokenizer=toy)
    assert "'cooking'" in message and all(topic in message for topic in WORD_LISTS)
    assert "exactly one" in one_line_error(name="x", kind="wordlist", params={}, tokenizer=toy)
    assert "list of strings" in one_line_error(
        name="x", kind="wordlist", params={"words": "a b"}, tokenizer=toy
    )
    assert build_feature("ab", "wordlist", {"words": ["a", "b"]}, toy) == WordsPresent(
        ("a", "b"), "ab"
    )


def test_a_word_the_toy_tokenizer_cannot_write_is_refused_with_its_vocabulary():
    toy = make_toy_tokenizer()
    message = one_line_error(name="x", kind="word", params={"word": "amazing"}, tokenizer=toy)
    assert message.startswith(
        "word 'amazing' cannot be produced by the tokenizer of this prior (vocabulary of 5:"
    )
    assert "<|endoftext|>, a, b, c, d" in message
    message = one_line_error(name="x", kind="female", params={}, tokenizer=toy)
    assert "words 'she', 'her'" in message and "more)" in message
    assert build_feature("has_b", "word", {"word": "b"}, toy) == WordsPresent(("b",), "has_b")


def test_byte_level_tokenizers_can_write_every_built_in_word(bpe_tokenizer):
    words = (
        {w for ws in WORD_LISTS.values() for w in ws}
        | set(FEMALE_WORDS)
        | set(MALE_WORDS)
        | {"Amazing"}
    )
    for tokenizer in real_tokenizers(bpe_tokenizer):
        assert all(can_produce(tokenizer, w) for w in words)
        feature = build_feature("science", "wordlist", {"topic": "science"}, tokenizer)
        assert feature(make_samples(["Data from the telescope."])).tolist() == [1.0]


def test_every_kind_documents_its_parameters():
    assert feature_params("wordlist") == ((), ("topic", "words"))
    assert feature_params("word") == (("word",), ())
    assert feature_params("sentiment") == ((), ("threshold",))


def test_compound_sentiment_of_no_text_is_empty():
    assert compound_sentiment([]).shape == (0,)
