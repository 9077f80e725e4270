"""Batched ancestral sampling with a KV cache, accumulating ``log q`` as it samples.

Training samples must come from pure ancestral sampling (temperature 1, no top-k, no top-p):
importance weights ``P/q`` need the true ``log q``. :func:`check_ancestral` refuses anything
else. Evaluation may warp; ``Samples.log_q`` is then the log-prob under the warped sampler,
which is what was actually sampled from.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, StaticCache
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from dmtune.prompts import Contexts

# How many tokens between checks that every sequence has ended: each check is a host-device
# sync, so on a GPU we do not want one per token.
_DONE_CHECK_EVERY = 4


def cache_argument(model: PreTrainedModel) -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` from transformers 5.x on
    (where ``past_key_values`` is deprecated), ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    parameters = inspect.signature(base.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def compile_decode_step(model: PreTrainedModel) -> Callable[..., object]:
    """``model``'s forward compiled for the sampler's one-token decode steps (``torch.compile``,
    static shapes). :func:`sample` runs it with a ``StaticCache`` and keeps ended rows in the
    batch, so every step of a batch has the same shapes and it compiles once per batch size;
    the prompt's forward stays eager. It pays on a GPU, where a decode step is launch-bound; on
    2 CPU cores it does not (README, "Speed, memory and scale")."""
    return torch.compile(model, dynamic=False)


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

    def select(self, rows: torch.Tensor) -> Samples:
        """The samples at ``rows``, their columns cut to the longest of them (a micro-batch)."""
        rows = rows.to(self.tokens.device)
        mask = self.mask[rows]
        width = max(int(mask.sum(-1).max()), 1) if len(rows) else 0
        prompt_mask = self.prompt_mask[rows]
        # left padding that none of these prompts needs is dropped too
        start = int((prompt_mask.sum(0) == 0).long().cumprod(0).sum())
        contexts = None
        if self.contexts is not None:
            index = self.contexts.index[rows]
            prompts = tuple(self.contexts.prompts[i] for i in rows.tolist())
            contexts = Contexts(prompts, index, self.contexts.n_groups)
        return Samples(
            self.prompt_ids[rows, start:],
            prompt_mask[:, start:],
            self.tokens[rows, :width],
            mask[:, :width],
            self.log_q[rows],
            [self.texts[i] for i in rows.tolist()],
            contexts,
        )


def join_samples(parts: list[Samples], filler_id: int) -> Samples:
    """One batch of several, in order: prompts re-padded on the left, tokens on the right."""
    if len(parts) == 1:
        return parts[0]

    def pad(tensors: list[torch.Tensor], value: int, left: bool) -> torch.Tensor:
        width = max(t.shape[1] for t in tensors)
        padded = []
        for t in tensors:
            fill = t.new_full((t.shape[0], width - t.shape[1]), value)
            padded.append(torch.cat([fill, t] if left else [t, fill], 1))
        return torch.cat(padded)

    contexts = None
    if parts[0].contexts is not None:
        contexts = Contexts(
            tuple(p for part in parts for p in part.contexts.prompts),
            torch.cat([part.contexts.index for part in parts]),
            parts[0].contexts.n_groups,
        )
    return Samples(
        pad([p.prompt_ids for p in parts], filler_id, left=True),
        pad([p.prompt_mask for p in parts], 0, left=True),
        pad([p.tokens for p in parts], filler_id, left=False),
        pad([p.mask for p in parts], 0, left=False),
        torch.cat([p.log_q for p in parts]),
        [text for p in parts for text in p.texts],
        contexts,
    )


def micro_batches(samples: Samples, size: int) -> list[torch.Tensor]:
    """Rows of ``samples`` in groups of at most ``size`` (0: all), shortest sequences first, so
    that each group cut to its own longest sequence carries little padding."""
    n = len(samples)
    size = n if size <= 0 else size
    order = samples.mask.sum(-1).argsort(stable=True)
    return list(order.split(size))


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


def draw_tokens(logits: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``logits`` (batch, vocab) by inversion of the CDF, and its log-prob.

    ``uniforms`` (batch,) in [0, 1) pick the token: the first whose cumulative mass exceeds
    ``u × total``. One random number per row instead of one per vocabulary entry
    (``torch.multinomial`` draws an exponential per entry, the bulk of a small model's decode
    step on a CPU); one exp and one cumsum over the vocabulary. The log-prob is
    ``logit − max − log Σ exp(logit − max)``, the exact log-softmax of the drawn token.
    A row with NaN or infinite logits is drawn uniformly and gets a NaN log-prob: sampling goes
    on, and the trainer skips the step.
    """
    top = logits.amax(-1, keepdim=True)
    weights = (logits - top).exp_().nan_to_num_(nan=1.0)  # in [0, 1]; 1 at the largest logit
    log_total = weights.sum(-1, keepdim=True).log()
    cdf = weights.cumsum_(-1)
    total = cdf[:, -1:]
    # u × total can round up to total; just below it, the draw still lands on a token of mass
    threshold = torch.minimum(
        uniforms[:, None].to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total))
    )
    token = torch.searchsorted(cdf, threshold, right=True)
    log_prob = (logits.gather(-1, token) - top - log_total).squeeze(-1)
    return token.squeeze(-1), log_prob


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    decoding: Decoding,
    filler_id: int,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    decode_step: Callable[..., object] | None = None,
) -> Samples:
    """Draw one continuation per prompt row, with the model's KV cache.

    One forward over the prompts, then one single-token forward per new token; the log-prob
    of each drawn token under the sampling distribution is added to ``log_q`` as we go, so no
    scoring pass is needed for the proposal. Rows that have ended (EOS) leave the batch and its
    KV cache, so the model only runs on live sequences. The random numbers are fixed up front,
    one per row and position (``uniforms``, (batch, max_new_tokens), drawn from ``generator``
    when not given): a row's draws do not depend on which rows share its batch, so sampling a
    batch whole or in micro-batches gives the same samples.

    ``decode_step`` (:func:`compile_decode_step` of ``model``) runs the decode steps instead of
    ``model``, on a ``StaticCache`` (batch, heads, prompt + max_new_tokens, head_dim): fixed
    shapes, so ended rows stay in the batch (their draws are discarded, as above) instead of
    leaving it. The distribution and ``log q`` (the log-softmax of the logits the step computed)
    are the same; the samples too, up to draws that float rounding moves across a CDF step.
    """
    batch, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    eos = tokenizer.eos_token_id
    max_new = decoding.max_new_tokens
    if uniforms is None:
        uniforms = torch.rand(
            (batch, max_new), generator=generator, dtype=torch.float64, device=device
        )

    tokens = torch.full((batch, max_new), filler_id, dtype=torch.long, device=device)
    mask = torch.zeros((batch, max_new), dtype=torch.long, device=device)
    log_q = torch.zeros(batch, dtype=torch.promote_types(model.dtype, torch.float32), device=device)
    attention = torch.cat(
        [prompt_mask, torch.ones((batch, max_new), dtype=prompt_mask.dtype, device=device)], 1
    )
    positions = position_ids_from_mask(attention)  # (batch, prompt_len + max_new)
    rows = torch.arange(batch, device=device)  # the batch row of each sequence still running
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    # a CPU syncs for free; a GPU checks for ended rows every few tokens
    check_every = 1 if device.type == "cpu" else _DONE_CHECK_EVERY

    static = decode_step is not None
    if static:  # its mask always spans the whole cache; positions not yet written are causal
        cache = StaticCache(config=model.config, max_cache_len=prompt_len + max_new)
    else:
        cache = DynamicCache(config=model.config)
    forward = model if decode_step is None else decode_step
    with_cache = {cache_argument(model): cache, "use_cache": True}
    out = model(
        input_ids=prompt_ids,
        attention_mask=attention if static else prompt_mask,
        position_ids=positions[:, :prompt_len],
        logits_to_keep=1,
        **with_cache,
    )
    length = 0
    for t in range(max_new):
        logits = warp_logits(at_least_float32(out.logits[:, -1]), decoding)  # (rows, vocab)
        token, log_prob = draw_tokens(logits, uniforms[rows, t])
        token = torch.where(alive, token, filler_id)
        tokens[rows, t] = token
        mask[rows, t] = alive.long()
        log_q[rows] += torch.where(alive, log_prob, 0.0)
        alive = alive & (token != eos)
        length = t + 1
        if t + 1 == max_new:
            break
        if (t + 1) % check_every == 0:
            running = int(alive.sum())
            if running == 0:
                break
            if running < len(rows) and not static:  # drop the ended rows: batch and cache
                keep = alive.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                rows, alive, token = rows[keep], alive[keep], token[keep]
                attention, positions = attention[keep], positions[keep]
        column = prompt_len + t  # where the token just drawn sits
        out = forward(
            input_ids=token[:, None],
            attention_mask=attention if static else attention[:, : column + 1],
            position_ids=positions[:, column : column + 1],
            **with_cache,
        )
    tokens, mask = tokens[:, :length], mask[:, :length]
    return Samples(
        prompt_ids, prompt_mask, tokens, mask, log_q, decode_texts(tokenizer, tokens, mask)
    )
