"""Greedy generation throughput: our batched KV-cache decoder vs Hugging Face ``generate``.

The first N test prompts (the pipeline's generation prompts: alpaca, without
the response header; synthetic when the data is absent) are sorted by length
and cut into batches of B, as ``pipeline.generate_responses`` does. Both models
hold the same random weights and decode the same batches greedily:

* ours: ``generation.generate`` (left padding, pre-allocated KV cache);
* HF: ``model.generate(input_ids, attention_mask, max_new_tokens=M,
  do_sample=False, eos_token_id=50256, pad_token_id=50256)`` on left-padded
  tensors built here (no tokenizer involved).

Random weights rarely emit EOS, so both usually decode all M tokens: the same
work for both. New tokens count up to (excluding) a row's first EOS. Each model
decodes one untimed warm-up batch first; then the batches alternate between
the models, so a change of machine load hits both alike.

Correctness on the first ``--check`` prompts: our batched answer equals
``generate_uncached`` (plain greedy that recomputes the whole context; compared
on the first ``--check-tokens`` tokens, as it is slow) and equals HF's greedy
tokens (all M).

    python bench/generate.py --model gpt2 --prompts 16 --max-new-tokens 64 --batch-size 16
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from common import (
    base_parser,
    build_model,
    hf_attn_implementation,
    load_data,
    load_hf_model,
    log,
    machine_info,
    peak_rss_gb,
    print_result,
    resolve_device,
    set_malloc,
    set_threads,
    timed,
)

from gpt2_instruct.generation import SamplingConfig, generate, generate_uncached
from gpt2_instruct.weights import save_model

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}  # tf32: CUDA


def length_batches(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices sorted by length, in batches (``pipeline.generate_responses``' order)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def left_padded(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def until_eos(tokens: Sequence[int], eos_id: int) -> list[int]:
    tokens = list(tokens)
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


@torch.inference_mode()
def hf_generate(
    model: Any, prompts: Sequence[Sequence[int]], *, eos_id: int, max_new_tokens: int
) -> list[list[int]]:
    device = next(model.parameters()).device
    ids, mask = left_padded(prompts, eos_id, device)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return [until_eos(row, eos_id) for row in out[:, ids.shape[1] :].tolist()]


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """First position where the token lists differ (a length difference counts), or None."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run_interleaved(
    fns: dict[str, Any],
    prompts: Sequence[Sequence[int]],
    batches: list[list[int]],
    device: torch.device,
) -> dict[str, tuple[float, list[list[int]]]]:
    """Decode every batch with each model in turn; {name: (seconds, answers in prompt order)}.

    Batches alternate between the models, so a change in machine load during the
    run hits both alike. Each model first decodes an untimed warm-up batch.
    """
    for fn in fns.values():
        fn([prompts[i] for i in batches[0]][:2], 2)
    seconds = dict.fromkeys(fns, 0.0)
    answers: dict[str, list[list[int]]] = {name: [[] for _ in prompts] for name in fns}
    for number, batch in enumerate(batches, start=1):
        for name, fn in fns.items():
            spent, outputs = timed(
                lambda fn=fn, batch=batch: fn([prompts[i] for i in batch], None), device
            )
            seconds[name] += spent
            for i, tokens in zip(batch, outputs, strict=True):
                answers[name][i] = tokens
            log(f"{name}: batch {number}/{len(batches)} ({len(batch)} prompts) {spent:.2f} s")
    return {name: (seconds[name], answers[name]) for name in fns}


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16, help="test prompts to answer")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--batch-size", type=int, default=16, help="prompts per batch (pipeline default: 16)"
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="weights dtype")
    parser.add_argument("--check", type=int, default=3, help="prompts checked for identity")
    parser.add_argument(
        "--check-tokens",
        type=int,
        default=32,
        help="tokens compared with generate_uncached (it recomputes everything per token)",
    )
    args = parser.parse_args()
    if min(args.prompts, args.max_new_tokens, args.batch_size) < 1:
        parser.error("--prompts, --max-new-tokens and --batch-size must be >= 1")

    device = resolve_device(args.device)
    if args.dtype == "tf32" and device.type != "cuda":
        parser.error("--dtype tf32 is a CUDA matmul mode (fp32 weights, TF32 products)")
    threads = set_threads(args.threads)
    malloc = set_malloc(args.system_malloc, args.dtype, device)
    data = load_data(args.data_dir, synthetic=args.synthetic)
    eos = data.pad_id
    prompts = data.test_prompts[: args.prompts]
    if len(prompts) < args.prompts:
        log(f"only {len(prompts)} test prompts available")
    batches = length_batches(prompts, args.batch_size)
    dtype = DTYPES[args.dtype]
    max_new = args.max_new_tokens

    model = build_model(args.model, args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        save_model(model, Path(tmp))
        hf = load_hf_model(Path(tmp), device, training=False).to(dtype)
    model = model.to(device=device, dtype=dtype).eval()

    def ours_fn(batch: list[list[int]], limit: int | None) -> list[list[int]]:
        sampling = SamplingConfig(max_new_tokens=limit or max_new)
        return generate(model, batch, eos_id=eos, sampling=sampling)

    def hf_fn(batch: list[list[int]], limit: int | None) -> list[list[int]]:
        return hf_generate(hf, batch, eos_id=eos, max_new_tokens=limit or max_new)

    runs = run_interleaved({"ours": ours_fn, "hf": hf_fn}, prompts, batches, device)
    (ours_s, ours_answers), (hf_s, hf_answers) = runs["ours"], runs["hf"]
    ours_tokens = sum(len(a) for a in ours_answers)
    hf_tokens = sum(len(a) for a in hf_answers)

    check_tokens = min(args.check_tokens, max_new)
    identical_uncached, identical_hf = True, True
    mismatches: list[dict[str, Any]] = []
    for i in range(min(args.check, len(prompts))):
        log(f"check: prompt {i} vs generate_uncached ({check_tokens} tokens) and HF")
        uncached = generate_uncached(model, prompts[i], eos_id=eos, max_new_tokens=check_tokens)
        pos = first_difference(ours_answers[i][:check_tokens], uncached)
        if pos is not None:
            identical_uncached = False
            mismatches.append({"prompt": i, "against": "uncached", "first_diff": pos})
            print(
                f"MISMATCH prompt {i} vs generate_uncached at new token {pos}: "
                f"ours {ours_answers[i][pos : pos + 5]} uncached {uncached[pos : pos + 5]}"
            )
        pos = first_difference(ours_answers[i], hf_answers[i])
        if pos is not None:
            identical_hf = False
            mismatches.append({"prompt": i, "against": "hf", "first_diff": pos})
            print(
                f"MISMATCH prompt {i} vs HF at new token {pos}: "
                f"ours {ours_answers[i][pos : pos + 5]} hf {hf_answers[i][pos : pos + 5]}"
            )

    ours_tps = ours_tokens / ours_s
    hf_tps = hf_tokens / hf_s
    result: dict[str, Any] = {
        "benchmark": "generate",
        "ours_tokens_per_s": ours_tps,
        "hf_tokens_per_s": hf_tps,
        "ratio_tokens_per_s": ours_tps / hf_tps,
        "identical_to_uncached": identical_uncached,
        "identical_to_hf": identical_hf,
        "ours_seconds": ours_s,
        "hf_seconds": hf_s,
        "ours_new_tokens": ours_tokens,
        "hf_new_tokens": hf_tokens,
        "mismatches": mismatches,
        "checked_prompts": min(args.check, len(prompts)),
        "check_tokens_uncached": check_tokens,
        "model": args.model,
        "dtype": args.dtype,
        "prompts": len(prompts),
        "max_new_tokens": max_new,
        "batch_size": args.batch_size,
        "batches": len(batches),
        "prompt_tokens_mean": sum(len(p) for p in prompts) / len(prompts),
        "data": data.source,
        "hf_attn_implementation": hf_attn_implementation(hf),
        "threads": threads,
        "peak_rss_gb": peak_rss_gb(),
        **machine_info(device),
        "malloc": malloc,
    }
    print_result(result)


if __name__ == "__main__":
    main()
