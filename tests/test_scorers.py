"""Your own scorers as features: a real (tiny, random) BERT classifier and reward model, and a
Python function imported by path, through the feature API and the CLI."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
from typer.testing import CliRunner

from dmtune.cli import app
from dmtune.constraints import build_feature
from dmtune.jsonl import read_jsonl
from dmtune.sampling import Samples

runner = CliRunner()
WORDS = ["good", "bad", "day", "rain", "sun", "a", "b", "c", "d"]
TEXTS = ["good day", "bad rain", "sun", "a b c d a b c d", ""]
TOY = ["experiment=toy", "train.steps=2", "train.batch_size=16", "train.fit_samples=128",
       "device.threads=1", "logger=none", "constraint=none"]


def _samples(texts: list[str]) -> Samples:
    n = len(texts)
    empty = torch.zeros(n, 1, dtype=torch.long)
    return Samples(empty, empty, empty, empty, torch.zeros(n), texts)


def _save_bert(path: Path, num_labels: int) -> Path:
    """A seeded, randomly initialised BERT sequence classifier and its WordPiece tokenizer."""
    path.mkdir(parents=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    labels = {0: "NEGATIVE", 1: "POSITIVE"} if num_labels == 2 else {0: "SCORE"}
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=num_labels,
        id2label=labels, label2id={v: k for k, v in labels.items()}, initializer_range=0.5,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    return _save_bert(tmp_path_factory.mktemp("clf") / "model", num_labels=2)


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory) -> Path:
    return _save_bert(tmp_path_factory.mktemp("rm") / "model", num_labels=1)


def _reference_logits(path: Path, texts: list[str]) -> torch.Tensor:
    model = BertForSequenceClassification.from_pretrained(path).eval()
    tokenizer = BertTokenizerFast.from_pretrained(path)
    with torch.no_grad():
        return torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in texts])


def test_classifier_probability_and_logit_are_the_models_own(classifier_dir):
    logits = _reference_logits(classifier_dir, TEXTS)
    model = str(classifier_dir)
    prob = build_feature("pos", "classifier", {"model": model, "label": "POSITIVE"}, None)
    assert torch.allclose(prob(_samples(TEXTS)), logits.softmax(-1)[:, 1], atol=1e-5)
    by_index = build_feature(
        "neg", "classifier", {"model": model, "label": 0, "output": "logit", "batch_size": 2},
        None,
    )
    assert torch.allclose(by_index(_samples(TEXTS)), logits[:, 0], atol=1e-5)
    ranked = logits.softmax(-1)[:, 1].sort().values
    threshold = float(ranked[1:3].mean())  # between the 2nd and 3rd: two texts below, three above
    binary = build_feature(
        "pos", "classifier",
        {"model": model, "label": "POSITIVE", "output": "binary", "threshold": threshold},
        None,
    )
    expected = (logits.softmax(-1)[:, 1] > threshold).float()
    assert torch.equal(binary(_samples(TEXTS)), expected) and 0 < expected.sum() < len(TEXTS)


def test_reward_model_is_the_standardised_logit(reward_model_dir, classifier_dir):
    logits = _reference_logits(reward_model_dir, TEXTS)[:, 0]
    params = {"model": str(reward_model_dir), "mean": 0.5, "std": 2.0}
    reward = build_feature("r", "reward_model", params, None)
    assert torch.allclose(reward(_samples(TEXTS)), (logits - 0.5) / 2.0, atol=1e-5)
    with pytest.raises(ValueError, match="has 2 labels"):
        build_feature("r", "reward_model", {"model": str(classifier_dir)}, None)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"model": "/nowhere/model", "label": 1}, "is not a folder"),
        ({"label": 1, "output": "probability"}, "output='probability'"),
        ({"label": "HAPPY"}, "label='HAPPY' is not a label of the classifier (0=NEGATIVE, 1=POS"),
        ({"label": 7}, "label=7 is not a label"),
    ],
)
def test_bad_classifier_params_are_one_line(classifier_dir, params, message):
    with pytest.raises(ValueError, match=None) as error:
        build_feature("pos", "classifier", {"model": str(classifier_dir), **params}, None)
    assert message in str(error.value) and "\n" not in str(error.value)


SCORING = '''
import math

def has_a(texts, weight=1.0):
    return [weight * float("a" in text.split()) for text in texts]

def too_few(texts):
    return [1.0]

def not_numbers(texts):
    return ["yes"] * len(texts)

def nan(texts):
    return [math.nan] * len(texts)

def broken(texts):
    raise KeyError("oops")

NOT_CALLABLE = 3
'''


@pytest.fixture()
def scoring_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "my_scoring.py").write_text(textwrap.dedent(SCORING))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_scoring"


def _python_feature(tmp_path: Path, function: str, **params) -> list[str]:
    """Overrides selecting a constraint of your own (conf/constraint/mine.yaml) that scores with
    ``function``."""
    user = tmp_path / "conf"
    (user / "constraint").mkdir(parents=True, exist_ok=True)
    entries = ", ".join([f"function: '{function}'", *(f"{k}: {v}" for k, v in params.items())])
    (user / "constraint" / "mine.yaml").write_text(
        f"name: mine\nfeatures:\n  mine: {{kind: python, params: {{{entries}}}}}\n"
    )
    return ["constraint=mine", f"hydra.searchpath=[file://{user}]"]


def test_a_python_scorer_reaches_metrics_jsonl(scoring_module, tmp_path):
    run_dir = tmp_path / "run"
    mine = _python_feature(tmp_path, f"{scoring_module}:has_a", weight=1.0)
    result = runner.invoke(app, ["train", *TOY, *mine, f"hydra.run.dir={run_dir}"])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert all("constraint/mine" in row for row in rows) and 0 < rows[0]["constraint/mine"] < 1
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert all(s["mine"] == float("a" in s["text"].split()) for s in samples)


@pytest.mark.parametrize(
    "function, message",
    [
        ("no_such_module:f", "cannot import 'no_such_module'"),
        ("my_scoring:missing", "has no 'missing'"),
        ("my_scoring:NOT_CALLABLE", "is a int, not a function"),
        ("my_scoring", "write it as package.module:function"),
        ("my_scoring:too_few", "returned 1 values for"),
        ("my_scoring:not_numbers", "not numbers"),
        ("my_scoring:nan", "returned nan for text #0"),
        ("my_scoring:broken", "raised KeyError"),
    ],
)
def test_a_bad_python_scorer_is_one_line_and_leaves_no_run_dir(
    scoring_module, tmp_path, function, message
):
    run_dir = tmp_path / "run"
    mine = _python_feature(tmp_path, function)
    result = runner.invoke(app, ["train", *TOY, *mine, f"hydra.run.dir={run_dir}"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "'mine'" in lines[0], result.stderr
    assert not run_dir.exists()


MINE = """\
# mine: samples that contain the word a (a python scorer)
name: mine
features:
  has_a:
    kind: python
    params: {function: "my_scoring:has_a", weight: 1.0}
"""


def test_your_own_config_dir_composes_trains_lists_and_copies(scoring_module, tmp_path):
    user = tmp_path / "conf"
    (user / "constraint").mkdir(parents=True)
    (user / "constraint" / "mine.yaml").write_text(MINE)
    searchpath = f"hydra.searchpath=[file://{user}]"
    run_dir = tmp_path / "run"
    args = [*TOY[:-1], "constraint=mine", searchpath, f"hydra.run.dir={run_dir}"]
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    assert all("constraint/has_a" in row for row in read_jsonl(run_dir / "metrics.jsonl"))
    # resume finds the user's constraint again (the search path is saved with the run)
    resumed = runner.invoke(app, ["train", f"resume={run_dir}", "train.steps=3"])
    assert resumed.exit_code == 0, resumed.output
    listed = runner.invoke(app, ["ls", "constraint", "--config-dir", str(user)])
    assert listed.exit_code == 0 and "mine" in listed.stdout and "a python scorer" in listed.stdout
    assert "mine" not in runner.invoke(app, ["ls", "constraint"]).stdout
    typo = runner.invoke(app, ["train", *TOY[:-1], "constraint=mien", searchpath])
    assert typo.exit_code == 2 and "did you mean 'mine'" in typo.stderr
    copied = runner.invoke(app, ["cp", "constraint/sentiment", str(user)])
    copy = user / "constraint" / "my_sentiment.yaml"
    assert copied.exit_code == 0 and copy.is_file()
    copy.write_text(copy.read_text().replace("0.5", "0.25"))
    config = runner.invoke(app, ["config", "constraint=my_sentiment", searchpath])
    assert config.exit_code == 0 and "threshold: 0.25" in config.stdout
