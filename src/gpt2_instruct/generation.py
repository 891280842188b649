"""Batched decoding with a pre-allocated key/value cache.

Prompts of different lengths are left-padded; padding is masked out of
attention by position and every row gets position ids that start at 0 on its
first real token, so a batched answer is the answer the prompt would get
alone. Rows that emit ``<|endoftext|>`` are dropped from the batch, so finished
answers cost nothing more. Greedy decoding of an fp32 model on a CPU with native
bf16 finds each token through ``ScreenedArgmax`` instead of the full head: the
same token, the first maximal fp32 logit, for less work.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gpt2_instruct.model import GPTModel, KVCache, linear

# bf16 keeps 8 significant bits: rounding to nearest moves a value by at most 2^-8 of it.
_BF16_UNIT = 2.0**-8


@dataclass(frozen=True)
class SamplingConfig:
    """Greedy when ``temperature`` is 0; otherwise temperature / top-k / top-p sampling."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 123

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or null, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or null, got {self.top_p}")


def _next_tokens(
    logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Choose one token per row from last-position logits (B, V)."""
    if sampling.temperature == 0.0:
        # The first maximal index, as argmax gives it; torch's max kernel is ~2.5x faster
        # on (32, 50257) logits here.
        return logits.max(dim=-1).indices
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already cover top_p (keeps at least one).
        drop = cumulative - sorted_logits.softmax(dim=-1) >= sampling.top_p
        logits = logits.scatter(1, sorted_idx, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


@functools.cache
def _fast_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 / AMX); elsewhere it is slow."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe()) if probe is not None else False


class ScreenedArgmax:
    """Greedy tokens of an fp32 head, found through a bf16 screen of the vocabulary.

    The head (V x C) is a decode step's largest product: a quarter of a gpt2 step at 32
    rows. A bf16 copy of the weight gives every logit to within a proven bound, which
    rules out almost the whole vocabulary; only the tokens it cannot rule out get their
    logits in fp32, and the first maximal one among those is the first maximal fp32
    logit. The error terms, per logit ``w . h`` of a weight row ``w`` and hidden ``h``:
    rounding w and h to bf16 moves each product by at most (2u + u^2) |w_k||h_k| (u =
    2^-8); fp32 sums of C terms, in any order (the screen's and the fp32 head's own), add
    at most C 2^-24 sum |w_k||h_k| each; sum |w_k||h_k| <= |w|_2 |h|_2 (Cauchy-Schwarz);
    the screen's result, rounded to bf16, moves by at most 2^-8 of itself (bounded through
    the screen's maximum, so that very negative logits do not widen the margin). The fp32
    logits of the chosen candidates may differ from a full (B, V) product's in the last
    bit (another summation order), as any two fp32 products of different shapes may.

    How much the bound rules out depends on the weights (measured here on random ones,
    whose logits screen well: ~40 candidates of 50,257). Where it rules out less than
    7/8 of the vocabulary the full fp32 head decides, and after ``max_fallbacks`` such
    steps the screen is no longer tried, so a head it does not suit costs a few screens.
    """

    max_fallbacks = 3

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight  # (V, C) fp32
        self.weight_bf16 = weight.to(torch.bfloat16)
        self.max_row_norm = float(weight.norm(dim=1).max())
        C = weight.shape[1]
        # 1% on top covers the rounding of the norms and of the bounds themselves.
        self.product_error = 1.01 * ((2 * _BF16_UNIT + _BF16_UNIT**2) + 2 * C * 2.0**-24)
        self.result_error = 1.01 * _BF16_UNIT / (1 - _BF16_UNIT)
        self.fallbacks = 0

    @classmethod
    def for_model(cls, model: GPTModel) -> ScreenedArgmax | None:
        """The screen of ``model``'s head, or None where it does not pay or does not apply."""
        weight = model.out_head_weight
        usable = weight.device.type == "cpu" and weight.dtype == torch.float32
        if not usable or model.head_lora is not None or not _fast_bf16_matmul():
            return None
        return cls(weight.detach())

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Token ids (B,) of the first maximal fp32 logit for final hidden states (B, C)."""
        h = hidden.float()
        if self.fallbacks >= self.max_fallbacks:
            return self._first_maximal(h, self.weight)
        screened = torch.mm(self.weight_bf16, h.to(torch.bfloat16).t()).float()  # (V, B)
        high = screened.amax(dim=0)  # (B,); fp32 holds every bf16 value exactly
        # |screened - fp32| <= product + r |screened| for every logit. The fp32 maximum
        # (at most `high` on the screen) therefore screens at high - margin or more, where
        # |screened| <= |high| + (high - screened) turns r |screened| into terms of high.
        product = self.product_error * self.max_row_norm * h.norm(dim=1)
        product = product + 1e-30  # bf16 products flush subnormals to zero
        r = self.result_error
        margin = (2 * product + 2 * r * high.abs()) / (1 - r)
        # The last term covers the fp32 rounding of this arithmetic itself.
        threshold = high - margin - 2.0**-20 * (high.abs() + margin)
        candidates = ((screened - threshold).amax(dim=1) >= 0).nonzero().squeeze(1)
        worth_it = 0 < candidates.numel() <= len(screened) // 8
        if not worth_it or not bool(torch.isfinite(threshold).all()):
            self.fallbacks += 1
            return self._first_maximal(h, self.weight)  # no screen worth its cost
        return candidates[self._first_maximal(h, self.weight[candidates])]

    @staticmethod
    def _first_maximal(h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Index of the first maximal fp32 logit over ``rows`` (n, C), per hidden state."""
        return linear(h, rows).max(dim=-1).indices  # max(dim).indices: argmax's first index


@torch.inference_mode()
def generate(
    model: GPTModel,
    prompts: Sequence[Sequence[int]],
    *,
    eos_id: int,
    sampling: SamplingConfig = SamplingConfig(),
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt, without the prompt and without the final EOS.

    A row stops at its first ``eos_id`` or after ``max_new_tokens``. A prompt
    longer than the context allows is cut from the left so that it and
    ``max_new_tokens`` fit. ``on_token(row, token)`` streams tokens as they come.
    """
    if not prompts:
        return []
    model.eval()
    config = model.config
    max_new = sampling.max_new_tokens
    if max_new >= config.context_length:
        raise ValueError(
            f"max_new_tokens ({max_new}) must be below the context length ({config.context_length})"
        )
    keep = config.context_length - max_new
    prompts = [list(p)[-keep:] for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.tok_emb.weight.device
    dtype = model.tok_emb.weight.dtype
    B, width = len(prompts), max(len(p) for p in prompts)

    idx = torch.zeros(B, width, dtype=torch.long, device=device)  # padding: masked out
    valid = torch.zeros(B, width, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        idx[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
        valid[row, width - len(prompt) :] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, width)

    cache = KVCache(config, B, width + max_new, device=device, dtype=dtype)
    cache.key_valid[:, :width] = valid
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    # Padding queries attend to themselves only, so no row of the mask is empty.
    mask = (causal & valid[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)
    hidden = model.hidden_states(idx, position_ids=positions, cache=cache, attn_mask=mask[:, None])

    generator = None
    if sampling.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    screen = ScreenedArgmax.for_model(model) if sampling.temperature == 0 else None

    def next_tokens(last_hidden: torch.Tensor) -> torch.Tensor:  # (B, C) -> (B,)
        if screen is not None:
            return screen(last_hidden)
        return _next_tokens(model.head(last_hidden), sampling, generator)

    outputs: list[list[int]] = [[] for _ in range(B)]
    rows = torch.arange(B, device=device)  # original row of each live batch row
    next_pos = positions[:, -1] + 1
    for step in range(max_new):
        tokens = next_tokens(hidden[:, -1])
        done = tokens == eos_id
        for row, token, finished in zip(rows.tolist(), tokens.tolist(), done.tolist(), strict=True):
            if not finished:
                outputs[row].append(token)
                if on_token is not None:
                    on_token(row, token)
        if step == max_new - 1:
            break
        if done.any():
            alive = ~done
            if not alive.any():
                break
            rows, tokens, next_pos = rows[alive], tokens[alive], next_pos[alive]
            cache.keep_rows(alive)
        cache.key_valid[:, cache.length] = True
        step_mask = cache.key_valid[:, None, None, : cache.length + 1]  # (B, 1, 1, T)
        hidden = model.hidden_states(
            tokens[:, None], position_ids=next_pos[:, None], cache=cache, attn_mask=step_mask
        )
        next_pos = next_pos + 1
    return outputs


@torch.inference_mode()
def generate_uncached(
    model: GPTModel, prompt: Sequence[int], *, eos_id: int, max_new_tokens: int
) -> list[int]:
    """Greedy decoding that recomputes the whole context for every token.

    The reference's algorithm, kept as the ground truth that the cached,
    batched decoder is tested against.
    """
    model.eval()
    device = model.tok_emb.weight.device
    idx = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.config.context_length :])[:, -1]
        token = int(logits.argmax(dim=-1).item())
        if token == eos_id:
            break
        out.append(token)
        idx = torch.cat([idx, torch.tensor([[token]], device=device)], dim=1)
    return out
