"""Features computed by the user's own scorers: a Hugging Face classifier, a reward model, or a
Python function. Each scores decoded texts, one number per text, and serves as a pointwise
constraint, a distributional feature or a reward like the built-in kinds.

```yaml
constraint:
  features:
    positive:                        # a classifier's probability of one label, thresholded
      kind: classifier
      params: {model: path/or/hub-name, label: POSITIVE, output: binary, threshold: 0.5}
    helpful:                         # a single-logit reward model
      kind: reward_model
      role: reward
      params: {model: path/to/rm, mean: 0.0, std: 1.0}
    short:                           # any function texts -> numbers
      kind: python
      params: {function: mypackage.scoring:is_short, max_words: 12}
```

Every failure is one ``ValueError`` line naming the feature, the scorer and the bad value: a
model that cannot be loaded, an unknown label, a function that cannot be imported or is not
callable, or that returns the wrong number of values, non-numbers, NaN or infinities.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dmtune.sampling import Samples

OUTPUTS = ("prob", "logit", "binary")
DEFAULT_BATCH_SIZE = 64
DEFAULT_MAX_LENGTH = 512


def check_values(name: str, scorer: str, values: Any, n: int) -> torch.Tensor:
    """``values`` as a (n,) float tensor, or one line saying what is wrong with them."""
    try:
        tensor = torch.as_tensor(values, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        shown = repr(values)[:80]
        raise ValueError(f"feature {name!r}: {scorer} returned {shown}, not numbers") from None
    if tensor.numel() != n:
        raise ValueError(
            f"feature {name!r}: {scorer} returned {tensor.numel()} values for {n} texts"
        )
    bad = (~torch.isfinite(tensor)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"feature {name!r}: {scorer} returned {tensor[i].item()} for text #{i}; "
            "values must be finite numbers"
        )
    return tensor.float()


# --- a Python function ---


@dataclass(frozen=True)
class PythonScorer:
    """``function(texts, **kwargs)`` → one number per text; with prompts (``train.prompts``)
    also ``prompts=`` (one per text) when the function takes a ``prompts`` argument."""

    name: str
    path: str  # "package.module:function"
    function: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, samples: Samples) -> torch.Tensor:
        kwargs = dict(self.kwargs)
        if samples.contexts is not None and _takes_prompts(self.function):
            kwargs["prompts"] = list(samples.contexts.prompts)
        try:
            values = self.function(list(samples.texts), **kwargs)
        except Exception as error:  # noqa: BLE001 - the user's code: report it in one line
            raise ValueError(
                f"feature {self.name!r}: {self.path} raised {type(error).__name__}: {error}"
            ) from error
        values = check_values(self.name, self.path, values, len(samples))
        return values.to(samples.tokens.device)


def _takes_prompts(function: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return any(p.name == "prompts" or p.kind is p.VAR_KEYWORD for p in parameters)


def import_function(name: str, path: str) -> Callable[..., Any]:
    """The callable at ``package.module:attribute``, or one line saying why not."""
    module_name, _, attribute = str(path).partition(":")
    if not module_name or not attribute:
        raise ValueError(
            f"feature {name!r}: function={path!r}; write it as package.module:function"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"feature {name!r}: cannot import {module_name!r} for {path} ({error})"
        ) from None
    function = getattr(module, attribute, None)
    if function is None:
        raise ValueError(f"feature {name!r}: module {module_name!r} has no {attribute!r}")
    if not callable(function):
        raise ValueError(f"feature {name!r}: {path} is a {type(function).__name__}, not a function")
    return function


def python_feature(name: str, tokenizer: Any, *, function: str, **kwargs: Any) -> PythonScorer:
    """kind=python: ``function`` is ``package.module:name``; other params go to it as keywords."""
    return PythonScorer(name, str(function), import_function(name, function), dict(kwargs))


# --- a Hugging Face sequence classifier ---


@dataclass
class SequenceClassifier:
    """A ``AutoModelForSequenceClassification`` scoring texts in batches, in eval mode.

    output: ``prob`` (softmax probability of ``label``), ``logit`` (its logit) or ``binary``
    (1 when the probability exceeds ``threshold``); ``mean``/``std`` standardise the value.
    """

    name: str
    model: Any
    tokenizer: Any
    label_index: int
    output: str = "prob"
    threshold: float = 0.5
    batch_size: int = DEFAULT_BATCH_SIZE
    max_length: int = DEFAULT_MAX_LENGTH
    mean: float = 0.0
    std: float = 1.0

    @torch.no_grad()
    def __call__(self, samples: Samples) -> torch.Tensor:
        device = samples.tokens.device
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        texts = list(samples.texts)
        values = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(
                texts[start : start + self.batch_size], padding=True, truncation=True,
                max_length=self.max_length, return_tensors="pt",
            ).to(device)
            logits = self.model(**inputs).logits.float()  # (batch, labels)
            if self.output == "logit":
                values.append(logits[:, self.label_index])
            else:
                prob = logits.softmax(-1)[:, self.label_index]
                values.append(prob if self.output == "prob" else (prob > self.threshold).float())
        scores = torch.cat(values) if values else torch.zeros(0, device=device)
        return (scores - self.mean) / self.std


def load_classifier(name: str, model: str, trust_remote_code: bool) -> tuple[Any, Any]:
    """Model and tokenizer of a sequence classifier, in eval mode, or one line saying why not."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    local = Path(str(model)).expanduser()
    if str(model).startswith(("/", "./", "../", "~")) and not local.is_dir():
        raise ValueError(f"feature {name!r}: classifier {model!r} is not a folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model), trust_remote_code=trust_remote_code)
        network = AutoModelForSequenceClassification.from_pretrained(
            str(model), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"feature {name!r}: cannot load classifier {model!r} ({reason})") from None
    return network.eval().requires_grad_(False), tokenizer


def _label_index(name: str, model: Any, label: int | str) -> int:
    id2label = {int(i): str(text) for i, text in model.config.id2label.items()}
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise ValueError(f"feature {name!r}: label={label!r}; give a label name or index")
    if isinstance(label, int) and label in id2label:
        return label
    by_name = {text: i for i, text in id2label.items()}
    if label in by_name:
        return by_name[label]
    shown = ", ".join(f"{i}={text}" for i, text in sorted(id2label.items()))
    raise ValueError(
        f"feature {name!r}: label={label!r} is not a label of the classifier ({shown})"
    )


def _check_number(name: str, key: str, value: Any, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"feature {name!r}: {key}={value!r} must be a number")
    if low is not None and value <= low:
        raise ValueError(f"feature {name!r}: {key}={value!r} must be greater than {low:g}")
    return float(value)


def classifier_feature(
    name: str,
    tokenizer: Any,
    *,
    model: str,
    label: int | str,
    output: str = "prob",
    threshold: float = 0.5,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
    trust_remote_code: bool = False,
) -> SequenceClassifier:
    """kind=classifier: the probability, logit or thresholded probability of one label."""
    if output not in OUTPUTS:
        raise ValueError(f"feature {name!r}: output={output!r}; valid: {', '.join(OUTPUTS)}")
    _check_number(name, "threshold", threshold)
    network, classifier_tokenizer = load_classifier(name, model, bool(trust_remote_code))
    return SequenceClassifier(
        name, network, classifier_tokenizer, _label_index(name, network, label), output,
        float(threshold), int(batch_size), int(max_length),
    )


def reward_model_feature(
    name: str,
    tokenizer: Any,
    *,
    model: str,
    mean: float = 0.0,
    std: float = 1.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
    trust_remote_code: bool = False,
) -> SequenceClassifier:
    """kind=reward_model: a single-logit classifier's score, standardised: ``(r − mean) / std``."""
    mean, std = _check_number(name, "mean", mean), _check_number(name, "std", std, low=0.0)
    network, classifier_tokenizer = load_classifier(name, model, bool(trust_remote_code))
    if network.config.num_labels != 1:
        raise ValueError(
            f"feature {name!r}: a reward model has one output; {model!r} has "
            f"{network.config.num_labels} labels (use kind=classifier)"
        )
    return SequenceClassifier(
        name, network, classifier_tokenizer, label_index=0, output="logit",
        batch_size=int(batch_size), max_length=int(max_length), mean=mean, std=std,
    )


# the kinds this module adds to dmtune.constraints.FEATURE_KINDS
SCORER_KINDS = ("classifier", "reward_model", "python")
