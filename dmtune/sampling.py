"""Batched ancestral sampling with a KV cache, accumulating ``log q`` as it samples.

Training samples must come from pure ancestral sampling (temperature 1, no top-k, no top-p):
importance weights ``P/q`` need the true ``log q``. :func:`check_ancestral` refuses anything
else. Evaluation may warp; ``Samples.log_q`` is then the log-prob under the warped sampler,
which is what was actually sampled from.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from dmtune.prompts import Contexts

# How many tokens between checks that every sequence has ended: each check is a host-device
# sync, so on a GPU we do not want one per token.
_DONE_CHECK_EVERY = 4


def cache_argument(model: PreTrainedModel) -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` from transformers 5.x on
    (where ``past_key_values`` is deprecated), ``past_key_values`` before."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: 0 at each row's first real token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are promoted before log-softmax; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass(frozen=True)
class Decoding:
    """How tokens are drawn. The defaults are ancestral sampling."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    @property
    def is_ancestral(self) -> bool:
        return self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0


def check_ancestral(decoding: Decoding) -> None:
    """Raise when training would sample with a warped distribution."""
    if not decoding.is_ancestral:
        raise ValueError(
            f"training samples must be drawn ancestrally (temperature=1, top_k=0, top_p=1); got "
            f"temperature={decoding.temperature}, top_k={decoding.top_k}, top_p={decoding.top_p}: "
            "a warped sampler makes log q wrong and biases every importance weight"
        )


@dataclass
class Samples:
    """A batch of continuations of ``prompt_ids``.

    tokens, mask: (batch, seq); mask is 1 on generated tokens up to and including EOS.
    log_q: (batch,) log-prob of each sequence under the sampler (EOS included).
    contexts: with several prompts, which prompt each row continues (None: one prompt for all).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    log_q: torch.Tensor
    texts: list[str]
    contexts: Contexts | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]


def warp_logits(logits: torch.Tensor, decoding: Decoding) -> torch.Tensor:
    """Apply temperature, top-k and top-p to (batch, vocab) logits."""
    if decoding.temperature != 1.0:
        logits = logits / decoding.temperature
    if decoding.top_k > 0:
        kth = torch.topk(logits, min(decoding.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if decoding.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked before it already cover top_p
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= decoding.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def decode_texts(
    tokenizer: PreTrainedTokenizerBase, tokens: torch.Tensor, mask: torch.Tensor
) -> list[str]:
    """Texts of the generated tokens, EOS and padding left out."""
    eos = tokenizer.eos_token_id
    rows = [
        [t for t, m in zip(row, keep) if m and t != eos]
        for row, keep in zip(tokens.tolist(), mask.tolist())
    ]
    return tokenizer.batch_decode(rows, skip_special_tokens=False)


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    decoding: Decoding,
    filler_id: int,
    generator: torch.Generator | None = None,
) -> Samples:
    """Draw one continuation per prompt row, with the model's KV cache.

    One forward over the prompts, then one single-token forward per new token; the log-prob
    of each drawn token under the sampling distribution is added to ``log_q`` as we go, so no
    scoring pass is needed for the proposal.
    """
    batch, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    eos = tokenizer.eos_token_id
    max_new = decoding.max_new_tokens

    tokens = torch.full((batch, max_new), filler_id, dtype=torch.long, device=device)
    mask = torch.zeros((batch, max_new), dtype=torch.long, device=device)
    log_q = torch.zeros(batch, dtype=torch.promote_types(model.dtype, torch.float32), device=device)
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    attention = torch.cat(
        [prompt_mask, torch.ones((batch, max_new), dtype=prompt_mask.dtype, device=device)], 1
    )
    positions = position_ids_from_mask(attention)  # (batch, prompt_len + max_new)

    cache = DynamicCache(config=model.config)
    with_cache = {cache_argument(model): cache, "use_cache": True}
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=positions[:, :prompt_len],
        logits_to_keep=1,
        **with_cache,
    )
    length = 0
    for t in range(max_new):
        logits = warp_logits(at_least_float32(out.logits[:, -1]), decoding)  # (batch, vocab)
        logp = logits.log_softmax(-1)
        # A diverged model's row (NaN or inf logits) is NaN throughout after log-softmax: draw it
        # uniformly so that sampling goes on; its log q becomes NaN and the trainer skips the step.
        probs = logp.exp().nan_to_num_(nan=1.0)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token = torch.where(alive, token, filler_id)
        log_q += torch.where(alive, logp.gather(-1, token[:, None]).squeeze(-1), 0.0)
        tokens[:, t] = token
        mask[:, t] = alive.long()
        alive = alive & (token != eos)
        length = t + 1
        if t + 1 == max_new or ((t + 1) % _DONE_CHECK_EVERY == 0 and not alive.any()):
            break
        column = prompt_len + t  # where the token just drawn sits
        out = model(
            input_ids=token[:, None],
            attention_mask=attention[:, : column + 1],
            position_ids=positions[:, column : column + 1],
            **with_cache,
        )
    tokens, mask = tokens[:, :length], mask[:, :length]
    return Samples(
        prompt_ids, prompt_mask, tokens, mask, log_q, decode_texts(tokenizer, tokens, mask)
    )
