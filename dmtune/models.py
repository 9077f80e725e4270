"""Priors, policies and proposals: loading, prompts and sequence log-probabilities.

A sequence ``x`` is the generated continuation of a prompt. Its log-probability is the sum of
the token log-probs of the generated tokens, *including* the EOS token when one was generated;
a sequence cut at ``max_new_tokens`` without EOS is an outcome of its own (the probability of
its prefix). Which positions count is decided by a positional mask, never by comparing token
ids with a pad id (naver's disco masks EOS out when pad = eos, which un-normalises the
distribution).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

ASSETS_DIR = Path(__file__).parent / "assets"
TINY_PRIOR_DIR = ASSETS_DIR / "tiny"


def load_causal_lm(
    name_or_path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load any Hugging Face causal LM and its tokenizer, in eval mode on ``device``."""
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {name_or_path!r} has no EOS token; dmtune needs one to end samples")
    return model.to(device).eval(), tokenizer


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A detached copy that takes no gradient (the prior, or a frozen proposal)."""
    clone = copy.deepcopy(model).eval()
    clone.requires_grad_(False)
    return clone


def filler_token_id(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> int:
    """The id written at positions the mask excludes (padding and after EOS).

    It only fills tensors: where a sequence ends is always read from the mask. We use the
    tokenizer's pad id when it is distinct from EOS and inside the model's vocabulary, else
    the smallest id that is not EOS (so that a filler can never be mistaken for an EOS).
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is not None and pad != eos and pad < vocab_size:
        return int(pad)
    return 1 if eos == 0 else 0


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], filler_id: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise prompts after a BOS token, left-padded to a common length.

    Returns ``prompt_ids`` and ``prompt_mask``, both (batch, prompt_len). Left padding keeps
    every sequence's next token at the same column, which batched sampling needs.
    """
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    encoded = [[bos] + tokenizer.encode(p, add_special_tokens=False) if p else [bos] for p in prompts]
    width = max(len(ids) for ids in encoded)
    prompt_ids = torch.full((len(prompts), width), filler_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        prompt_ids[row, width - len(ids):] = torch.tensor(ids)
        prompt_mask[row, width - len(ids):] = 1
    return prompt_ids.to(device), prompt_mask.to(device)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: 0 at each row's first real token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are promoted before log-softmax; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_log_probs(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Log-prob of each generated token under ``model``, zero where ``mask`` is 0.

    prompt_ids, prompt_mask: (batch, prompt_len), left-padded.
    tokens, mask: (batch, seq), right-padded; mask is 1 up to and including EOS.
    Returns (batch, seq). One forward pass; only the logits that predict generated tokens are
    materialised (``logits_to_keep``), so memory is batch × seq × vocab, not × prompt_len.
    """
    seq_len = tokens.shape[1]
    input_ids = torch.cat([prompt_ids, tokens], dim=1)
    # Positions after EOS are attended to by nothing before them (causal), so a full mask
    # over generated columns gives the same log-probs as the true one.
    attention = torch.cat([prompt_mask, torch.ones_like(tokens)], dim=1)
    out = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position_ids_from_mask(attention),
        logits_to_keep=seq_len + 1,
        use_cache=False,
    )
    logits = at_least_float32(out.logits[:, :-1])  # (batch, seq, vocab): logits[:, t] predicts tokens[:, t]
    logp = -F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none").view_as(tokens)
    return logp * mask


def sequence_log_probs(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """``log model(x | prompt)`` for each sequence, EOS included: (batch,)."""
    return token_log_probs(model, prompt_ids, prompt_mask, tokens, mask).sum(-1)
