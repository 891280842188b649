"""Stage evaluate: score the answers (losses, overlap metrics, an optional judge) and plot them."""

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
from gpt2_instruct.stages import log


@torch.inference_mode()
def response_losses(
    model: GPTModel, split: TokenizedSplit, *, pad_id: int, batch_size: int, limit: int
) -> list[float]:
    """Mean cross-entropy of each example's response tokens (and its EOS), in order."""
    model.eval()
    device = model.tok_emb.weight.device
    losses: list[float] = []
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
    return losses


def evaluate(
    params: EvaluateParams,
    responses: Path,
    model_dir: Path,
    tokenized: Path,
    metrics: Path,
    per_entry_csv: Path,
    plots_dir: Path,
) -> dict[str, Any]:
    """Score every answer: its loss under the model, overlap with the reference, a judge.

    The offline scores need no server; the judge (``params.judge``) is optional. Each
    entry's judge score, failure reason (``judge_error``) and raw reply go to the per-entry
    CSV, the counts to the metrics. When a judge is set but scored no entry at all, the
    offline metrics, CSV and plots are still written, and then ``JudgeError`` is raised
    (the stage exits 1), so DVC does not cache the run as a success and a later
    ``dvc repro`` with the server up judges again. A partly scored run succeeds.
    """
    if params.judge.enabled:  # its settings were checked with the rest of params.yaml
        from gpt2_instruct.judge import check_environment

        check_environment(params.judge)  # an unusable API key fails before any work
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
        model, test, pad_id=tokenizer.eot_id, batch_size=params.batch_size, limit=len(entries)
    )
    rows, summary = evaluation.score_entries(entries, losses)
    summary = dict(summary)

    plots_dir.mkdir(parents=True, exist_ok=True)
    judged_nothing = None
    if params.judge.enabled:
        from gpt2_instruct.judge import JudgeError, judge_entries

        judged, judge_summary = judge_entries(entries, params.judge, progress=True)
        verdicts = {verdict["index"]: verdict for verdict in judged}
        for row in rows:
            verdict = verdicts.get(row["index"], {})
            row["judge_score"] = verdict.get("score")
            row["judge_error"] = verdict.get("error") or ""
            row["judge_reply"] = verdict.get("reply", "")
        summary.update(judge_summary)
        if judge_summary["judge_count"] == 0:
            judged_nothing = JudgeError(
                f"the judge scored none of the {len(entries)} entries, so the stage fails "
                f"(offline metrics written to {metrics}): {judge_summary['judge_error']}"
            )
        scores = [row["judge_score"] for row in rows if row["judge_score"] is not None]
        if scores:
            plots.plot_score_histogram(
                scores, plots_dir / "judge_histogram.png", label="judge score (0-100)"
            )

    evaluation.write_per_entry_csv(per_entry_csv, rows)
    rouge = [row["rougeL"] for row in rows]
    plots.plot_score_histogram(rouge, plots_dir / "rougeL_histogram.png", label="ROUGE-L F1")
    plots.plot_per_entry_scores(rouge, plots_dir / "rougeL_per_entry.png", label="ROUGE-L F1")
    write_json(metrics, summary)
    log(f"evaluate: {json.dumps(summary)}")
    if judged_nothing is not None:
        raise judged_nothing
    return summary
