"""Prompts (contexts ``c``) for conditional targets: loading them and drawing a step's contexts.

A prompt source is a text file (one prompt per line), a JSONL file (the prompt under
``field``), or a Hugging Face ``datasets`` dataset (a hub name, a directory saved with
``save_to_disk``, or a local ``.json``/``.csv``/``.parquet`` file; column ``field``, split
``split``). Each training step draws ``batch_size / samples_per_prompt`` prompts and samples
each of them ``samples_per_prompt`` times: :class:`Contexts` says which samples share a prompt,
which the per-context ``log Ẑ_c`` and baselines of CDPG (arXiv 2112.00791) need.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BUILTIN = "builtin:"
BUILTIN_DIR = Path(__file__).parent / "assets" / "prompts"
DATASET_FILE_SUFFIXES = {".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Contexts:
    """The prompts of one batch: ``prompts[i]`` is sample i's prompt, ``index[i]`` its group.

    index: (batch,) long, in ``0 .. n_groups − 1``; every group holds the same number of samples
    (``samples_per_prompt``), so a mean over samples is a mean over contexts.
    """

    prompts: tuple[str, ...]
    index: torch.Tensor
    n_groups: int

    def __len__(self) -> int:
        return len(self.prompts)

    def to(self, device: torch.device | str) -> Contexts:
        return Contexts(self.prompts, self.index.to(device), self.n_groups)


def check_prompt_batch(batch_size: int, samples_per_prompt: int) -> None:
    """A step needs whole prompts of at least 2 samples each (``log Ẑ_c`` and leave-one-out
    baselines come from a prompt's own samples)."""
    if samples_per_prompt < 2:
        raise ValueError(
            f"train.samples_per_prompt={samples_per_prompt} must be at least 2: "
            "each prompt's log Ẑ_c and baselines come from its own samples"
        )
    if batch_size % samples_per_prompt:
        raise ValueError(
            f"train.batch_size={batch_size} is not a multiple of "
            f"train.samples_per_prompt={samples_per_prompt}"
        )


def check_prompt_files(config: Any) -> None:
    """Read the prompt files a ``train`` config names when they are plain files (cheap: before
    any model loads); datasets are read when the run builds."""
    for key, source in (("prompts", config.prompts), ("eval_prompts", config.eval_prompts)):
        if source is None:
            continue
        path = Path(_resolve(source))
        if path.suffix in (".txt", ".jsonl"):
            try:
                load_prompts(source, config.prompt_field)
            except ValueError as error:
                raise ValueError(f"train.{key}={source}: {error}") from None


def _resolve(source: str) -> str:
    """``builtin:NAME`` → the shipped file's path; anything else unchanged."""
    return str(BUILTIN_DIR / source[len(BUILTIN) :]) if source.startswith(BUILTIN) else source


def join_contexts(parts: list[Contexts]) -> Contexts:
    """The contexts of several batches as one (group indices offset batch after batch)."""
    offsets = [0]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + part.n_groups)
    return Contexts(
        tuple(p for part in parts for p in part.prompts),
        torch.cat([part.index + offset for part, offset in zip(parts, offsets)]),
        offsets[-1] + parts[-1].n_groups,
    )


def repeat_prompts(prompts: list[str], samples_per_prompt: int) -> Contexts:
    """Each prompt ``samples_per_prompt`` times in a row, one group per prompt."""
    index = torch.arange(len(prompts)).repeat_interleave(samples_per_prompt)
    return Contexts(
        tuple(p for p in prompts for _ in range(samples_per_prompt)), index, len(prompts)
    )


@dataclass(frozen=True)
class PromptSet:
    """The prompts of a run and how many samples each drawn prompt gets."""

    prompts: tuple[str, ...]
    samples_per_prompt: int
    source: str = ""

    def __len__(self) -> int:
        return len(self.prompts)

    def draw(
        self, batch_size: int, generator: torch.Generator, samples_per_prompt: int | None = None
    ) -> Contexts:
        """``batch_size / samples_per_prompt`` prompts, without replacement within the batch
        when there are enough, each repeated ``samples_per_prompt`` times."""
        per_prompt = samples_per_prompt or self.samples_per_prompt
        n_groups = batch_size // per_prompt
        if n_groups <= len(self.prompts):
            chosen = torch.randperm(len(self.prompts), generator=generator)[:n_groups]
        else:
            chosen = torch.randint(len(self.prompts), (n_groups,), generator=generator)
        return repeat_prompts([self.prompts[i] for i in chosen.tolist()], per_prompt)

    def all(self, samples_per_prompt: int | None = None) -> Contexts:
        """Every prompt, in order (exact mode, evaluation over the whole set)."""
        return repeat_prompts(list(self.prompts), samples_per_prompt or self.samples_per_prompt)


def prompt_set(config: Any, evaluation: bool = False) -> PromptSet | None:
    """The prompts a ``train`` config names (None without ``train.prompts``); with
    ``evaluation``, its held-out prompts (``eval_prompts`` / ``eval_split``) when it has any."""
    source, split = config.prompts, config.prompt_split
    if source is None:
        return None
    check_prompt_batch(config.batch_size, config.samples_per_prompt)
    if evaluation:
        source, split = config.eval_prompts or source, config.eval_split or split
    prompts = load_prompts(source, config.prompt_field, split)
    return PromptSet(tuple(prompts), config.samples_per_prompt, source)


def load_prompts(source: str, field: str = "prompt", split: str = "train") -> list[str]:
    """The prompts of ``source``; one line saying what is wrong when they cannot be read.

    ``builtin:NAME`` is a prompts file shipped with dmtune (``dmtune/assets/prompts/NAME``).
    """
    source = _resolve(source)
    path = Path(source).expanduser()
    if path.suffix == ".txt":
        prompts = _read_text(path)
    elif path.suffix == ".jsonl":
        prompts = _read_jsonl(path, field)
    else:
        prompts = _read_dataset(source, path, field, split)
    if not prompts:
        raise ValueError(f"prompts {source!r}: no prompts found (empty file, column or split)")
    return prompts


def _read_text(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"prompts file {str(path)!r} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()]


def _read_jsonl(path: Path, field: str) -> list[str]:
    if not path.is_file():
        raise ValueError(f"prompts file {str(path)!r} does not exist")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON object ({error.msg})") from None
        if not isinstance(row, dict) or field not in row:
            keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(
                f"{path}:{number}: no field {field!r} (set train.prompt_field; keys: {keys})"
            )
        prompts.append(_as_prompt(row[field], f"{path}:{number}", field))
    return prompts


def _read_dataset(source: str, path: Path, field: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"prompts {source!r} is not a .txt or .jsonl file; reading a dataset needs the "
            "datasets package: pip install 'dmtune[datasets]'"
        ) from None
    datasets.disable_progress_bars()
    try:
        if path.is_dir() and any(
            (path / name).exists() for name in ("dataset_dict.json", "dataset_info.json")
        ):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = _split_of(loaded, split, source)
        elif path.suffix in DATASET_FILE_SUFFIXES:
            if not path.is_file():
                raise ValueError(f"prompts file {str(path)!r} does not exist")
            loaded = datasets.load_dataset(
                DATASET_FILE_SUFFIXES[path.suffix], data_files=str(path), split="train"
            )
        else:
            loaded = datasets.load_dataset(source, split=split)
    except ValueError as error:
        if str(error).startswith(("prompts", "no split")):
            raise
        raise ValueError(f"prompts {source!r}: {_first_line(error)}") from None
    except Exception as error:  # noqa: BLE001 - datasets' many errors: one line each
        raise ValueError(
            f"prompts {source!r}: cannot load it as a dataset ({type(error).__name__}: "
            f"{_first_line(error)}); give a .txt, a .jsonl, a local dataset or a hub name"
        ) from None
    if field not in loaded.column_names:
        raise ValueError(
            f"prompts {source!r}: no column {field!r} (set train.prompt_field; columns: "
            f"{', '.join(loaded.column_names)})"
        )
    return [_as_prompt(value, source, field) for value in loaded[field]]


def _split_of(loaded, split: str, source: str):
    if split not in loaded:
        raise ValueError(
            f"prompts {source!r}: no split {split!r} (set train.prompt_split; splits: "
            f"{', '.join(loaded)})"
        )
    return loaded[split]


def _as_prompt(value: object, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {field!r} is a {type(value).__name__}, not a string")
    return value


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
