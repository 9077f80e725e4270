"""A language model as dmtune uses it: prompts, sampling and sequence log-probabilities.

A sequence ``x`` is the generated continuation of a prompt. Its log-probability is the sum of
the token log-probs of the generated tokens, *including* the EOS token when one was generated;
a sequence cut at ``max_new_tokens`` without EOS is an outcome of its own (the probability of
its prefix). Which positions count is decided by a positional mask, never by comparing token
ids with a pad id (naver's disco masks EOS out when pad = eos, which un-normalises the
distribution).

:class:`LM` bundles what every sampler and scorer of a run shares — tokenizer, prompt, filler
id, mixed precision — so that the prior, the policy and the proposal (the same architecture)
are sampled and scored through one object.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from dmtune import lora, sharding
from dmtune.distributed import World
from dmtune.lora import using
from dmtune.prompts import Contexts, PromptSet
from dmtune.sampling import (
    Decoding,
    Samples,
    at_least_float32,
    compile_decode_step,
    join_samples,
    micro_batches,
    position_ids_from_mask,
    sample,
)
from dmtune.sharding import unsharded

HALF_DTYPES = (torch.bfloat16, torch.float16)


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A detached copy that takes no gradient (the prior, or a frozen proposal)."""
    clone = copy.deepcopy(model).eval()
    clone.requires_grad_(False)
    return clone


@dataclass
class Networks:
    """The prior ``a``, the policy ``π`` and (KL-adaptive DPG) the frozen proposal ``q`` of a run.

    Without LoRA, three networks: frozen copies of the prior and the proposal, and a float32
    policy that takes gradients. With LoRA (``model.lora.r > 0``), one: the prior's own network
    with a policy adapter (and a proposal adapter), the prior being it with adapters off
    (:mod:`dmtune.lora`). Checkpoints hold :meth:`state` of each, adapters only with LoRA;
    :meth:`shard` splits the three networks over the ranks of an FSDP run.
    """

    prior: Any
    policy: Any
    proposal: Any | None
    lora: bool

    @classmethod
    def build(cls, prior: PreTrainedModel, lora_options: Any, proposal: bool) -> Networks:
        """From the prior (modified in place with LoRA); ``lora_options``: model.lora or None."""
        if lora_options is None or lora_options.r <= 0:
            # A half-precision prior (device.dtype=bfloat16/float16) runs under autocast, but
            # the policy keeps float32 weights (a float64 prior's: float64): AdamW steps of lr
            # ~1e-5 are below bfloat16's resolution (2^-8 relative) and would round away in
            # half-precision weights.
            # eval mode: no dropout, so π is the same distribution we sample from and score
            policy = frozen_copy(prior).requires_grad_(True)
            if policy.dtype in HALF_DTYPES:
                policy.float()
            copied = frozen_copy(policy) if proposal else None
            return cls(frozen_copy(prior), policy, copied, lora=False)
        # one network: ``prior`` gets adapters (in place); float32 adapters on its weights
        policy = lora.wrap(prior, lora_options, proposal=proposal)
        view = lora.AdapterView(policy, lora.PROPOSAL) if proposal else None
        return cls(lora.AdapterView(policy, None), policy, view, lora=True)

    def shard(self, world: World) -> None:
        """FSDP: each network's weights split over ``world``'s ranks (in place)."""
        if self.lora:
            raise ValueError(
                "device.strategy=fsdp with model.lora is not supported: LoRA's trainable state "
                "is the adapters, small enough for device.strategy=ddp"
            )
        for network in (self.prior, self.policy, self.proposal):
            if network is not None:
                world.shard(network)

    def state(self, which: str) -> dict[str, torch.Tensor]:
        """What a checkpoint holds of ``which`` ("policy" or "proposal"): whole tensors, also
        of a sharded network (on rank 0; a collective)."""
        if not self.lora:
            return sharding.model_state(getattr(self, which))
        return lora.adapter_state(self.policy, self._adapter(which))

    def load(self, which: str, state: dict[str, torch.Tensor]) -> None:
        if not self.lora:
            sharding.load_model_state(getattr(self, which), state)
        else:
            lora.load_adapter_state(self.policy, state, self._adapter(which))

    def copy_policy_to_proposal(self) -> None:
        """KL-adaptive DPG's swap: q ← π."""
        if self.lora:
            lora.copy_adapter(self.policy, lora.POLICY, lora.PROPOSAL)
        else:
            self.proposal.load_state_dict(self.policy.state_dict())

    @staticmethod
    def _adapter(which: str) -> str:
        return {"policy": lora.POLICY, "proposal": lora.PROPOSAL}[which]


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
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    filler_id: int,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise prompts after a BOS token, left-padded to a common length.

    Returns ``prompt_ids`` and ``prompt_mask``, both (batch, prompt_len). Left padding keeps
    every sequence's next token at the same column, which batched sampling needs.
    """
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    encoded = [
        [bos] + tokenizer.encode(p, add_special_tokens=False) if p else [bos] for p in prompts
    ]
    width = max(len(ids) for ids in encoded)
    prompt_ids = torch.full((len(prompts), width), filler_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        prompt_ids[row, width - len(ids) :] = torch.tensor(ids)
        prompt_mask[row, width - len(ids) :] = 1
    return prompt_ids.to(device), prompt_mask.to(device)


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
    # (batch, seq, vocab): logits[:, t] predicts tokens[:, t]
    logits = at_least_float32(out.logits[:, :-1])
    logp = -F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none").view_as(
        tokens
    )
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


@dataclass
class LM:
    """A causal LM with its tokenizer and prompt: ``.sample(n)`` and ``.log_probs(samples)``.

    ``model`` is the default network; every method takes another one of the same architecture
    (the policy or the proposal beside the prior) through ``model=``. A half-precision
    ``model`` sets ``compute_dtype``: matmuls then run under autocast, whatever the weights.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    prompt: str = ""  # every sample continues BOS + prompt, unless contexts are given
    prompts: PromptSet | None = None  # the run's prompts (conditional targets), if any
    compute_dtype: torch.dtype = field(init=False)
    filler_id: int = field(init=False)
    _prompts: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(
        init=False, default_factory=dict, repr=False
    )
    # each network's compiled decode step (train.compile_sampler), compiled on first use
    _decode_steps: dict[torch.nn.Module, Callable[..., object]] = field(
        init=False, default_factory=dict, repr=False
    )

    def __post_init__(self) -> None:
        self.compute_dtype = self.model.dtype
        self.filler_id = filler_token_id(self.tokenizer, self.model.config.vocab_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def autocast(self) -> AbstractContextManager:
        """Mixed precision when the model is half precision (float32 weights, half matmuls)."""
        if self.compute_dtype in HALF_DTYPES:
            return torch.autocast(self.device.type, dtype=self.compute_dtype)
        return nullcontext()

    def encode_prompts(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_ids, prompt_mask) of ``n`` copies of the prompt, both (n, prompt_len); cached."""
        if n not in self._prompts:
            self._prompts[n] = encode_prompts(
                self.tokenizer, [self.prompt] * n, self.filler_id, self.device
            )
        return self._prompts[n]

    def draw_contexts(self, n: int, generator: torch.Generator) -> Contexts | None:
        """The prompts of a batch of ``n`` samples (None when the run has one prompt)."""
        return None if self.prompts is None else self.prompts.draw(n, generator)

    def prompt_length(self) -> int:
        """Tokens (BOS included) of the longest prompt."""
        if self.prompts is None:
            return self.encode_prompts(1)[0].shape[1]
        bos = 1
        encoded = self.tokenizer(list(self.prompts.prompts), add_special_tokens=False)
        return bos + max(len(ids) for ids in encoded["input_ids"])

    @torch.no_grad()
    def sample(
        self,
        n: int,
        decoding: Decoding,
        generator: torch.Generator | None = None,
        *,
        model: PreTrainedModel | None = None,
        contexts: Contexts | None = None,
        micro_batch_size: int = 0,
        compile: bool = False,
    ) -> Samples:
        """``n`` continuations drawn from ``model`` (default: this LM's), of the prompt or, with
        ``contexts``, of each row's prompt; ``micro_batch_size`` rows at a time (0: all at once,
        the same samples either way). ``compile``: decode steps through the network's compiled
        forward and a static KV cache (:func:`dmtune.sampling.compile_decode_step`)."""
        if contexts is None:
            prompt_ids, prompt_mask = self.encode_prompts(n)
        else:
            if len(contexts) != n:
                raise ValueError(f"{len(contexts)} contexts for {n} samples")
            prompt_ids, prompt_mask = encode_prompts(
                self.tokenizer, list(contexts.prompts), self.filler_id, self.device
            )
        uniforms = torch.rand(
            (n, decoding.max_new_tokens), generator=generator, dtype=torch.float64,
            device=self.device,
        )
        parts = []
        with self.autocast(), using(model or self.model) as network, unsharded(network):
            decode_step = None
            if compile:
                if network not in self._decode_steps:
                    self._decode_steps[network] = compile_decode_step(network)
                decode_step = self._decode_steps[network]
            for rows in torch.arange(n, device=self.device).split(micro_batch_size or n):
                parts.append(
                    sample(
                        network,
                        self.tokenizer,
                        prompt_ids[rows],
                        prompt_mask[rows],
                        decoding,
                        self.filler_id,
                        uniforms=uniforms[rows],
                        decode_step=decode_step,
                    )
                )
        samples = join_samples(parts, self.filler_id)
        if contexts is not None:
            samples.contexts = contexts.to(samples.tokens.device)
        return samples

    def log_probs(
        self,
        samples: Samples,
        *,
        model: PreTrainedModel | None = None,
        micro_batch_size: int = 0,
    ) -> torch.Tensor:
        """``log model(x | prompt)`` of each sample, (batch,), at least float32; grad if enabled.

        With ``micro_batch_size``, without grad, the forward passes take that many samples at
        a time, each cut to its longest sequence: full-vocabulary logits exist for one
        micro-batch only. (With grad, :meth:`backward` is the micro-batched pass.)
        """
        if micro_batch_size and not torch.is_grad_enabled():
            with unsharded(model or self.model):  # gathered once for every micro-batch
                parts = [
                    (rows, self.log_probs(samples.select(rows), model=model))
                    for rows in micro_batches(samples, micro_batch_size)
                ]
            values = parts[0][1].new_empty(len(samples))
            for rows, part in parts:
                values[rows] = part
            return values
        with self.autocast(), using(model or self.model) as network, unsharded(network):
            log_probs = sequence_log_probs(
                network,
                samples.prompt_ids,
                samples.prompt_mask,
                samples.tokens,
                samples.mask,
            )
        return log_probs.float() if log_probs.dtype in HALF_DTYPES else log_probs

    def backward(
        self,
        samples: Samples,
        weights: torch.Tensor,
        *,
        model: PreTrainedModel,
        micro_batch_size: int = 0,
    ) -> None:
        """Accumulate ``∇ Σ_i weights_i · log model(x_i)`` into ``model``'s gradients, one
        micro-batch of samples at a time (shortest first, each cut to its longest sequence).

        A loss that depends on the parameters only through the sequence log-probs has the
        gradient ``Σ_i (∂loss/∂log π_i) ∇ log π_i``: with those partials as ``weights`` this is
        the whole batch's gradient, while memory holds one micro-batch's activations. A DDP
        ``model`` syncs gradients over ranks once, in the last micro-batch's backward.
        """
        batches = micro_batches(samples, micro_batch_size)
        for i, rows in enumerate(batches):
            last = i == len(batches) - 1
            with nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
                part = self.log_probs(samples.select(rows), model=model)
                (weights[rows].to(part.dtype) * part).sum().backward()
