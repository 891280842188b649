"""Stage evaluate: score the answers offline (losses, overlap metrics) and plot them.

No server is contacted here: the optional LLM judge is a stage of its own
(``gpt2_instruct.stages.judge``), so its failures are never cached as this stage's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gpt2_instruct import evaluation, plots
from gpt2_instruct.batching import TokenizedSplit, collate
from gpt2_instruct.data import DataError
from gpt2_instruct.devices import resolve_device
from gpt2_instruct.io import write_json
from gpt2_instruct.model import GPTModel
from gpt2_instruct.model_dir import load_instruct_model
from gpt2_instruct.params import EvaluateParams
from gpt2_instruct.progress import progress_bar
from gpt2_instruct.stages import log


@torch.inference_mode()
def response_losses(
    model: GPTModel,
    split: TokenizedSplit,
    *,
    pad_id: int,
    batch_size: int,
    limit: int,
    progress: bool = False,
) -> list[float]:
    """Mean cross-entropy of each example's response tokens (and its EOS), in order.

    ``progress``: a bar with an ETA on stderr, the slow part of the stage on a CPU.
    """
    model.eval()
    device = model.tok_emb.weight.device
    losses: list[float] = []
    with progress_bar(limit, "evaluate: response loss", "entry", enabled=progress) as bar:
        for start in range(0, limit, batch_size):
            indices = list(range(start, min(start + batch_size, limit)))
            inputs, targets = collate(
                [split[i] for i in indices],
                pad_id=pad_id,
                max_length=model.config.context_length,
                prompt_lengths=[int(split.prompt_lengths[i]) for i in indices],
            )
            inputs, targets = inputs.to(device), targets.to(device)
            per_token = model.token_losses(inputs, targets)
            counted = (targets != -100).sum(dim=1).clamp(min=1)
            losses.extend((per_token.sum(dim=1) / counted).tolist())
            bar.update(len(indices))
    return losses


def evaluate(
    params: EvaluateParams,
    responses: Path,
    model_dir: Path,
    tokenized: Path,
    metrics: Path,
    per_entry_csv: Path,
    plots_dir: Path,
    scores_csv: Path | None = None,
) -> dict[str, Any]:
    """Score every answer: its loss under the model and its overlap with the reference.

    Writes the metrics, the per-entry table (with the texts, to read the worst answers),
    the histogram PNG and, when ``scores_csv`` is given, the per-entry scores without
    text that dvc.yaml plots against the entry index (``dvc plots diff`` overlays runs).
    """
    entries = evaluation.load_responses(responses)  # checked before the model loads
    test = TokenizedSplit.load(tokenized / "test.safetensors")
    if len(entries) > len(test):
        raise DataError(
            f"{responses}: {len(entries)} entries but the test split has {len(test)} "
            f"({tokenized / 'test.safetensors'}): answers to other data? (rerun generate)"
        )
    device = resolve_device(params.device)
    model, tokenizer, _ = load_instruct_model(model_dir, device=device)
    test.check_ids(tokenized / "test.safetensors", model.config.vocab_size)
    losses = response_losses(
        model,
        test,
        pad_id=tokenizer.eot_id,
        batch_size=params.batch_size,
        limit=len(entries),
        progress=True,
    )
    rows, summary = evaluation.score_entries(entries, losses)

    evaluation.write_per_entry_csv(per_entry_csv, rows)
    if scores_csv is not None:
        evaluation.write_scores_csv(scores_csv, rows)
    rouge = [row["rougeL"] for row in rows]
    plots_dir.mkdir(parents=True, exist_ok=True)
    plots.plot_score_histogram(rouge, plots_dir / "rougeL_histogram.png", label="ROUGE-L F1")
    write_json(metrics, summary)
    log(f"evaluate: {json.dumps(summary)}")
    return dict(summary)
