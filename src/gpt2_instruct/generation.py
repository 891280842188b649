"""Batched decoding with a pre-allocated key/value cache.

Prompts of different lengths are left-padded; padding is masked out of
attention by position and every row gets position ids that start at 0 on its
first real token, so a batched answer is the answer the prompt would get
alone. Rows that emit ``<|endoftext|>`` are dropped from the batch, so finished
answers cost nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from gpt2_instruct.model import GPTModel, KVCache
from gpt2_instruct.params import SamplingParams

#: How answers are decoded (greedy when ``temperature`` is 0): ``params.SamplingParams``,
#: whose defaults and checks ``generate``'s params and the command line share;
#: ``params.GenerateParams`` is one, so the generate stage passes its params as they are.
SamplingConfig = SamplingParams
_DEFAULT_SAMPLING = SamplingParams()  # greedy, 256 new tokens at most


def _next_tokens(
    logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None
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


@torch.inference_mode()
def generate(
    model: GPTModel,
    prompts: Sequence[Sequence[int]],
    *,
    eos_id: int,
    sampling: SamplingParams = _DEFAULT_SAMPLING,
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

    def next_tokens(last_hidden: torch.Tensor) -> torch.Tensor:  # (B, C) -> (B,)
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
