"""Stage tokenize: each split's prompts and answers as GPT-2 token ids."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from gpt2_instruct.batching import TokenizedSplit
from gpt2_instruct.data import SPLITS, Entry, format_prompt, load_entries
from gpt2_instruct.io import atomic_dir, write_json
from gpt2_instruct.params import TokenizeParams
from gpt2_instruct.stages import log
from gpt2_instruct.tokenizer import load_tokenizer

GPT2_CONTEXT = 1024  # positions of every published GPT-2 size


def tokenize_entries(
    entries: list[Entry], tokenizer: Any, style: str
) -> tuple[list[list[int]], list[int]]:
    """Token ids of prompt + output, and how many leading ids belong to the prompt.

    The whole text is encoded at once (as the reference does) so the ids are
    exactly what the model sees; the prompt length is the longest prefix shared
    with the prompt's own encoding, which is the prompt's length unless BPE
    merges across the boundary.
    """
    examples, prompt_lengths = [], []
    for entry in entries:
        prompt = format_prompt(entry, style)
        full = tokenizer.encode(prompt + entry.output)
        prompt_ids = tokenizer.encode(prompt)
        shared = 0
        for a, b in zip(full, prompt_ids, strict=False):
            if a != b:
                break
            shared += 1
        examples.append(full)
        prompt_lengths.append(shared)
    return examples, prompt_lengths


def _length_stats(lengths: list[int]) -> dict[str, float]:
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "mean": round(statistics.fmean(ordered), 2),
        "p95": ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)],
        "max": ordered[-1],
    }


def tokenize(
    params: TokenizeParams, prepared: Path, encoding_dir: Path, out_dir: Path, metrics: Path
) -> dict[str, Any]:
    """Encode each split; full length statistics go to meta.json, headline figures to metrics."""
    tokenizer = load_tokenizer(encoding_dir)
    report: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    with atomic_dir(out_dir) as tmp:
        for name in SPLITS:
            entries = load_entries(prepared / f"{name}.json")
            examples, prompt_lengths = tokenize_entries(entries, tokenizer, params.prompt_style)
            TokenizedSplit.from_lists(examples, prompt_lengths).save(tmp / f"{name}.safetensors")
            lengths = [len(e) + 1 for e in examples]  # + the EOS the collate appends
            stats[name] = {
                "length": _length_stats(lengths),
                "prompt_length": _length_stats(prompt_lengths),
            }
            report[f"{name}_tokens"] = sum(lengths)
            report[f"{name}_max_length"] = max(lengths)
            too_long = [i for i, n in enumerate(lengths) if n > GPT2_CONTEXT]
            report[f"{name}_over_context"] = len(too_long)
            if too_long:  # not fatal: training cuts them and keeps their EOS target
                log(
                    f"tokenize: WARNING: {prepared / f'{name}.json'}: {len(too_long)} entries "
                    f"longer than GPT-2's {GPT2_CONTEXT}-token context will be cut in training "
                    f"(entries {too_long[:10]}{' ...' if len(too_long) > 10 else ''})"
                )
        meta = {
            "prompt_style": params.prompt_style,
            "eot_id": tokenizer.eot_id,
            "vocab_size": tokenizer.vocab_size,
            "stats": stats,
        }
        write_json(tmp / "meta.json", meta)
    write_json(metrics, report)
    log(f"tokenize ({params.prompt_style}): {json.dumps(stats)}")
    return report
