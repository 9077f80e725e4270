"""Sequence log-probs and the sampler against the enumerated truth."""

from __future__ import annotations

import pytest
import torch
from conftest import TOY_MAX_NEW_TOKENS

from dmtune.exact import ExactSpace, enumerate_sequences, space_size
from dmtune.lm import encode_prompts, filler_token_id, sequence_log_probs
from dmtune.sampling import Decoding, check_ancestral, compile_decode_step, sample


def _index_of(space: ExactSpace, tokens: torch.Tensor, filler: int) -> torch.Tensor:
    """Row of each sampled sequence in the enumerated space."""
    width = space.samples.tokens.shape[1]
    index = {tuple(row): i for i, row in enumerate(space.samples.tokens.tolist())}
    padded = [tuple(row + [filler] * (width - len(row))) for row in tokens.tolist()]
    return torch.tensor([index[row] for row in padded])


@pytest.mark.parametrize("max_new_tokens", [1, 3, 4])
def test_enumerated_probabilities_sum_to_one(toy, max_new_tokens):
    model, tokenizer = toy
    space = ExactSpace(model, tokenizer, max_new_tokens)
    assert len(space) == space_size(5, max_new_tokens)
    with torch.no_grad():
        total = space.log_probs(model).exp().sum().item()
    assert total == pytest.approx(1.0, abs=1e-10)


def test_probabilities_sum_to_one_after_a_prompt(toy):
    model, tokenizer = toy
    space = ExactSpace(model, tokenizer, 3, prompt="b c")
    with torch.no_grad():
        assert space.log_probs(model).exp().sum().item() == pytest.approx(1.0, abs=1e-10)


def test_eos_is_counted_and_truncation_is_its_own_outcome(toy):
    model, tokenizer = toy
    tokens, mask = enumerate_sequences(5, eos_id=0, max_new_tokens=2, filler_id=1)
    rows = {tuple(t[m.bool()].tolist()) for t, m in zip(tokens, mask)}
    assert (0,) in rows and (2, 0) in rows and (2, 3) in rows  # EOS kept; a cut sequence has no EOS
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [""], 1)
    eos_row = torch.tensor([[2, 0]])
    cut_row = torch.tensor([[2, 0]])
    with torch.no_grad():
        with_eos = sequence_log_probs(
            model, prompt_ids, prompt_mask, eos_row, torch.tensor([[1, 1]])
        )
        prefix = sequence_log_probs(model, prompt_ids, prompt_mask, cut_row, torch.tensor([[1, 0]]))
        logits = model(input_ids=torch.tensor([[0, 2]])).logits[0, -1].log_softmax(-1)
    assert (with_eos - prefix).item() == pytest.approx(logits[0].item(), abs=1e-10)
    assert with_eos.item() < prefix.item()


def test_filler_is_never_eos(toy):
    _, tokenizer = toy
    assert filler_token_id(tokenizer, 5) != tokenizer.eos_token_id


def test_left_padding_does_not_change_log_probs(toy):
    model, tokenizer = toy
    filler = filler_token_id(tokenizer, 5)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, ["a b c", "a"], filler)
    assert prompt_mask[1].tolist() == [0, 0, 1, 1]
    tokens, mask = torch.tensor([[2, 0], [2, 0]]), torch.ones(2, 2, dtype=torch.long)
    with torch.no_grad():
        batched = sequence_log_probs(model, prompt_ids, prompt_mask, tokens, mask)
        alone_ids, alone_mask = encode_prompts(tokenizer, ["a"], filler)
        alone = sequence_log_probs(model, alone_ids, alone_mask, tokens[:1], mask[:1])
    assert batched[1].item() == pytest.approx(alone.item(), abs=1e-10)


def test_sampler_log_q_equals_exact_log_prob_and_frequencies_match(toy, space):
    model, tokenizer = toy
    filler = filler_token_id(tokenizer, 5)
    n = 20_000
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [""] * n, filler)
    generator = torch.Generator().manual_seed(0)
    samples = sample(
        model, tokenizer, prompt_ids, prompt_mask, Decoding(TOY_MAX_NEW_TOKENS), filler, generator
    )
    with torch.no_grad():
        exact = space.log_probs(model)
    rows = _index_of(space, samples.tokens, filler)
    assert torch.allclose(samples.log_q.double(), exact[rows], atol=1e-5)
    counts = torch.bincount(rows, minlength=len(space)).double()
    # TV of 20k draws over 341 outcomes
    assert 0.5 * (counts / n - exact.exp()).abs().sum().item() < 0.05
    # Pearson's χ² against the enumerated probabilities: mean df = 340, sd √(2 df) ≈ 26
    expected = n * exact.exp()
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    df = len(space) - 1
    assert chi2 < df + 6 * (2 * df) ** 0.5, chi2


def test_warped_decoding_is_refused_for_training():
    check_ancestral(Decoding())
    for warped in (Decoding(temperature=0.7), Decoding(top_k=5), Decoding(top_p=0.9)):
        with pytest.raises(ValueError, match="ancestral"):
            check_ancestral(warped)


def test_warped_sampler_reports_its_own_log_q(toy):
    model, tokenizer = toy
    filler = filler_token_id(tokenizer, 5)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [""] * 2000, filler)
    decoding = Decoding(max_new_tokens=1, top_k=2)
    samples = sample(
        model, tokenizer, prompt_ids, prompt_mask, decoding, filler,
        torch.Generator().manual_seed(0),
    )
    assert samples.tokens.unique().numel() == 2
    with torch.no_grad():
        top2 = model(input_ids=torch.tensor([[0]])).logits[0, -1].topk(2)
    expected = top2.values.log_softmax(-1)
    for token, log_q in zip(samples.tokens[:20, 0].tolist(), samples.log_q[:20].tolist()):
        assert log_q == pytest.approx(expected[top2.indices.tolist().index(token)].item(), abs=1e-5)


def test_compiled_decode_step_gives_the_eager_samples_and_exact_log_q(toy, space):
    """train.compile_sampler: a static KV cache, ended rows kept, decode steps compiled once;
    left-padded prompts of several lengths."""
    model, tokenizer = toy
    filler = filler_token_id(tokenizer, 5)
    n = 512
    prompts = ["", "a b", "c"] * (n // 3) + [""] * (n % 3)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, filler)
    uniforms = torch.rand((n, TOY_MAX_NEW_TOKENS), generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64)
    decoding = Decoding(TOY_MAX_NEW_TOKENS)
    eager = sample(model, tokenizer, prompt_ids, prompt_mask, decoding, filler, uniforms=uniforms)
    step = compile_decode_step(model)
    compiled = sample(
        model, tokenizer, prompt_ids, prompt_mask, decoding, filler, uniforms=uniforms,
        decode_step=step,
    )
    assert torch.equal(compiled.mask, eager.mask)
    assert torch.equal(compiled.tokens * compiled.mask, eager.tokens * eager.mask)
    assert torch.allclose(compiled.log_q, eager.log_q, atol=1e-10)
    with torch.no_grad():
        exact = space.log_probs(model)  # of continuations of the empty prompt
    unprompted = torch.tensor([p == "" for p in prompts])
    tokens = compiled.tokens.masked_fill(compiled.mask == 0, filler)[unprompted]
    rows = _index_of(space, tokens, filler)
    assert torch.allclose(compiled.log_q[unprompted], exact[rows], atol=1e-5)
    # a second batch of the same size reuses the compiled step
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = sample(
            model, tokenizer, prompt_ids, prompt_mask, decoding, filler, uniforms=uniforms,
            decode_step=step,
        )
    assert torch.equal(again.tokens, compiled.tokens)
