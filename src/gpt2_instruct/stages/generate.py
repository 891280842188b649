"""Stage generate: answer every test entry with the fine-tuned model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gpt2_instruct.data import Entry, extract_response, format_prompt, load_entries
from gpt2_instruct.devices import resolve_device
from gpt2_instruct.generation import generate
from gpt2_instruct.io import write_json
from gpt2_instruct.model_dir import load_instruct_model
from gpt2_instruct.params import GenerateParams, ParamsError
from gpt2_instruct.progress import progress_bar
from gpt2_instruct.stages import log

ALPACA_RESPONSE_HEADER = "\n\n### Response:\n"


def generation_prompt(entry: Entry, style: str, response_header_in_prompt: bool) -> str:
    """The prompt the model answers; the reference leaves Alpaca's response header out."""
    prompt = format_prompt(entry, style)
    if style == "alpaca" and not response_header_in_prompt:
        prompt = prompt.removesuffix(ALPACA_RESPONSE_HEADER)
    return prompt


def generate_responses(
    params: GenerateParams, model_dir: Path, test_json: Path, out: Path, metrics: Path
) -> dict[str, Any]:
    """Answer every test entry; batches are formed from prompts of similar length.

    The metrics say how many answers ended with ``<|endoftext|>`` and how many were cut
    at ``max_new_tokens``: a fine-tune that never learned to stop shows there at once.
    Progress (answers done, ETA) goes to stderr (:func:`gpt2_instruct.progress.progress_bar`);
    the ETA is rough at first, as batches go from short prompts to long ones.
    """
    entries = load_entries(test_json)  # checked before the model loads
    device = resolve_device(params.device)
    model, tokenizer, style = load_instruct_model(model_dir, device=device)
    context = model.config.context_length
    if params.max_new_tokens >= context:  # params.py checks it for hub/random models
        raise ParamsError(
            f"generate.max_new_tokens ({params.max_new_tokens}) must be below the context "
            f"length of the model in {model_dir} ({context})"
        )
    if params.limit is not None:
        entries = entries[: params.limit]
    prompts = [
        tokenizer.encode(generation_prompt(e, style, params.response_header_in_prompt))
        for e in entries
    ]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[int, str] = {}
    answer_tokens: list[int] = []
    started = time.perf_counter()
    with progress_bar(len(entries), "generate", "answer") as bar:
        for start in range(0, len(order), params.batch_size):
            batch = order[start : start + params.batch_size]
            outputs = generate(  # params are SamplingParams: the sampling knobs as they are
                model, [prompts[i] for i in batch], eos_id=tokenizer.eot_id, sampling=params
            )
            for i, ids in zip(batch, outputs, strict=True):
                answer_tokens.append(len(ids))
                text = tokenizer.decode(ids)
                answers[i] = extract_response(text, style, params.response_extraction)
            bar.update(len(batch))
    seconds = time.perf_counter() - started
    results = [{**e.to_dict(), "model_response": answers[i]} for i, e in enumerate(entries)]
    write_json(out, results, indent=4)
    # generate() drops the EOS: an answer that stopped is shorter than max_new_tokens.
    cut = sum(n == params.max_new_tokens for n in answer_tokens)
    new_tokens = sum(answer_tokens)
    report = {
        "answers": len(entries),
        "stopped_at_eos": len(entries) - cut,
        "cut_at_max_new_tokens": cut,
        "mean_answer_tokens": round(new_tokens / max(len(entries), 1), 2),
        "new_tokens": new_tokens,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(new_tokens / max(seconds, 1e-9), 1),
    }
    write_json(metrics, report)
    log(f"generate: {report}")
    return report
