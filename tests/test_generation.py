"""Cached, batched decoding gives exactly what plain greedy decoding gives."""

from __future__ import annotations

import pytest
import torch

from gpt2_instruct.generation import (
    SamplingConfig,
    generate,
    generate_uncached,
)
from gpt2_instruct.model import GPTConfig, GPTModel, KVCache

CONFIG = GPTConfig(vocab_size=53, context_length=40, n_embd=24, n_layer=2, n_head=3)
EOS = 52


@pytest.fixture(scope="module")
def model() -> GPTModel:
    torch.manual_seed(3)
    model = GPTModel(CONFIG).eval()
    with torch.no_grad():
        # At init the tied head makes each token predict itself; larger block weights and
        # position embeddings give varied greedy paths that exercise positions and masks.
        for name, param in model.named_parameters():
            if param.dim() == 2 and "emb" not in name:
                param.mul_(30)
        model.pos_emb.weight.mul_(10)
    return model


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15, 16, 17]]


def test_batched_cached_greedy_equals_uncached(model: GPTModel) -> None:
    batched = generate(model, PROMPTS, eos_id=EOS, sampling=SamplingConfig(max_new_tokens=12))
    for prompt, got in zip(PROMPTS, batched, strict=True):
        assert got == generate_uncached(model, prompt, eos_id=EOS, max_new_tokens=12)
        assert len(set(got)) > 2  # not a degenerate repeat


def test_twelve_rows_decode_like_one(model: GPTModel) -> None:
    """At 8 to 32 rows the decode step's products run weight-first (``cpu.linear``);
    as rows finish the batch falls below 8 and they run as F.linear again."""
    prompts = [[(t * 7 + shift) % 50 for t in p] for shift in range(3) for p in PROMPTS]
    free = generate(model, prompts, eos_id=-1, sampling=SamplingConfig(max_new_tokens=12))
    eos = free[0][3]  # ends some rows early, so the batch shrinks below 8 on the way
    batched = generate(model, prompts, eos_id=eos, sampling=SamplingConfig(max_new_tokens=12))
    assert sum(len(row) < 12 for row in batched) >= 5
    for prompt, got in zip(prompts, batched, strict=True):
        assert got == generate_uncached(model, prompt, eos_id=eos, max_new_tokens=12)


def test_rows_stop_at_their_own_eos(model: GPTModel) -> None:
    free = generate(model, PROMPTS, eos_id=-1, sampling=SamplingConfig(max_new_tokens=10))
    # End of text: a token prompt 1 produces that some other row never produces.
    eos = next(t for t in free[1][1:] if any(t not in row for row in free))
    stopped = generate(model, PROMPTS, eos_id=eos, sampling=SamplingConfig(max_new_tokens=10))
    assert stopped[1] == free[1][: free[1].index(eos)]
    for prompt, got in zip(PROMPTS, stopped, strict=True):
        assert got == generate_uncached(model, prompt, eos_id=eos, max_new_tokens=10)
    assert any(len(row) == 10 for row in stopped)  # the others ran on


def test_unwritten_cache_slots_are_never_read(
    model: GPTModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache is not zeroed: NaN in every slot before it is written changes nothing,
    also when finished rows leave the batch and the rest move up."""
    free = generate(model, PROMPTS, eos_id=-1, sampling=SamplingConfig(max_new_tokens=10))
    eos = free[2][3]  # row 2 stops after 3 tokens (earlier if it emits it sooner)
    original_init = KVCache.__init__

    def poisoned_init(self: KVCache, *args: object, **kwargs: object) -> None:
        original_init(self, *args, **kwargs)  # type: ignore[arg-type]
        self.keys.fill_(float("nan"))
        self.values.fill_(float("nan"))

    monkeypatch.setattr(KVCache, "__init__", poisoned_init)
    stopped = generate(model, PROMPTS, eos_id=eos, sampling=SamplingConfig(max_new_tokens=10))
    assert len(stopped[2]) <= 3 and any(len(row) == 10 for row in stopped)
    for prompt, got in zip(PROMPTS, stopped, strict=True):
        assert got == generate_uncached(model, prompt, eos_id=eos, max_new_tokens=10)


def test_streaming_callback_sees_every_token_in_order(model: GPTModel) -> None:
    seen: dict[int, list[int]] = {}
    out = generate(
        model,
        PROMPTS[:2],
        eos_id=EOS,
        sampling=SamplingConfig(max_new_tokens=6),
        on_token=lambda row, token: seen.setdefault(row, []).append(token),
    )
    assert [seen.get(0, []), seen.get(1, [])] == out


def test_long_prompt_is_cut_from_the_left(model: GPTModel) -> None:
    long_prompt = list(range(50)) * 1  # longer than the 40-token context
    long_prompt = [t % 50 for t in long_prompt]
    out = generate(model, [long_prompt], eos_id=EOS, sampling=SamplingConfig(max_new_tokens=5))
    kept = long_prompt[-(CONFIG.context_length - 5) :]
    assert out[0] == generate_uncached(model, kept, eos_id=EOS, max_new_tokens=5)
    with pytest.raises(ValueError, match="context length"):
        generate(model, [[1]], eos_id=EOS, sampling=SamplingConfig(max_new_tokens=40))


def test_sampling_is_seeded_and_top_k_one_is_greedy(model: GPTModel) -> None:
    def sample(**kwargs: float | int) -> list[list[int]]:
        sampling = SamplingConfig(max_new_tokens=8, **kwargs)
        return generate(model, PROMPTS, eos_id=EOS, sampling=sampling)

    greedy = sample()
    assert sample(temperature=1.0, seed=1) == sample(temperature=1.0, seed=1)
    assert sample(temperature=1.0, seed=1) != sample(temperature=1.0, seed=2)
    assert sample(temperature=5.0, top_k=1) == greedy
    assert sample(temperature=5.0, top_p=1e-6) == greedy


def test_top_k_restricts_choices(model: GPTModel) -> None:
    # With top_k=3 every sampled token is among the 3 most likely at its step.
    prompt = [1, 2, 3]
    out = generate(
        model,
        [prompt],
        eos_id=-1,
        sampling=SamplingConfig(max_new_tokens=6, temperature=3.0, top_k=3, seed=7),
    )[0]
    context = list(prompt)
    with torch.no_grad():
        for token in out:
            top3 = model(torch.tensor([context]))[0, -1].topk(3).indices.tolist()
            assert token in top3
            context.append(token)


def test_invalid_sampling_rejected() -> None:
    for kwargs in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"top_k": 0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            SamplingConfig(**kwargs)


def test_batched_greedy_decoding_of_a_large_vocabulary_equals_uncached() -> None:
    """16 rows over 3000 tokens with sharp logits: every batched token is the uncached one."""
    torch.manual_seed(5)
    config = GPTConfig(vocab_size=3000, context_length=40, n_embd=32, n_layer=2, n_head=4)
    big = GPTModel(config).eval()
    with torch.no_grad():
        for name, param in big.named_parameters():
            if param.dim() == 2 and "emb" not in name:
                param.mul_(20)
    prompts = [[(17 * i + 5 * j) % 3000 for j in range(2 + i % 5)] for i in range(16)]
    batched = generate(big, prompts, eos_id=-1, sampling=SamplingConfig(max_new_tokens=10))
    for prompt, got in zip(prompts, batched, strict=True):
        assert got == generate_uncached(big, prompt, eos_id=-1, max_new_tokens=10)
        assert len(set(got)) > 2
