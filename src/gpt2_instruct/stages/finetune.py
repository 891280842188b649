"""Stage finetune: train on the tokenized splits; write the model, its log, plot and metrics."""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Any

import torch
from dvclive import Live

from gpt2_instruct import distributed, hf_folder, plots
from gpt2_instruct.batching import TokenizedSplit, read_meta
from gpt2_instruct.fingerprint import digest_dir
from gpt2_instruct.io import atomic_dir, atomic_open, sha256_file, write_json
from gpt2_instruct.params import FetchParams, FinetuneParams, ParamsError, SamplingParams, to_dict
from gpt2_instruct.stages import log
from gpt2_instruct.training import Trainer
from gpt2_instruct.weights import CONFIG_KEY, WeightsError, load_model

LOG_FIELDS = (
    "step",
    "epoch",
    "tokens_seen",
    "train_loss",
    "val_loss",
    "batch_loss",
    "lr",
    "grad_norm",
    "seconds",
)


def _configure_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def _log_live(live: Live, row: dict[str, float]) -> None:
    """One evaluation row as DVCLive metrics at the row's optimizer step."""
    live.step = int(row["step"])
    live.log_metric("train/loss", row["train_loss"])
    live.log_metric("val/loss", row["val_loss"])
    for name in ("lr", "grad_norm"):  # None: no clipping, or the final evaluation's row
        if row.get(name) is not None:
            live.log_metric(name, row[name])
    live.log_metric("tokens_seen", row["tokens_seen"])
    live.log_metric("tokens_per_second", row["tokens_seen"] / max(row["seconds"], 1e-9))
    live.next_step()


def finetune(
    params: FinetuneParams,
    tokenized: Path,
    base_model: Path,
    encoding_dir: Path,
    model_out: Path,
    checkpoints: Path,
    metrics: Path,
    log_tsv: Path,
    loss_plot: Path,
    live_dir: Path,
    *,
    max_new_tokens: int = SamplingParams.max_new_tokens,
    fetch: FetchParams | None = None,
) -> dict[str, Any]:
    """Fine-tune, logging live to DVCLive; write the model, the loss log, plot and metrics.

    Under torchrun (``finetune.distributed``) every rank trains its share of each
    batch; rank 0 alone logs and writes, the others return an empty report. The model
    folder is complete for ``transformers`` too (``hf_folder``): ``max_new_tokens`` (the
    generate stage's) goes to its ``generation_config.json``, and ``fetch`` (the params
    that fetched ``base_model``) lets its model card name the base model.
    """
    _configure_threads(params.threads)
    meta = read_meta(tokenized / "meta.json")
    train = TokenizedSplit.load(tokenized / "train.safetensors", vocab_size=meta["vocab_size"])
    val = TokenizedSplit.load(tokenized / "val.safetensors", vocab_size=meta["vocab_size"])
    model = load_model(base_model, dropout=params.dropout)
    if model.config.vocab_size < meta["vocab_size"]:
        raise WeightsError(f"{base_model}: vocabulary smaller than the tokenizer's")
    if params.lora.rank > model.config.n_embd:  # params.py checks it for hub/random models
        raise ParamsError(
            f"finetune.lora.rank ({params.lora.rank}) must be at most the width of the base "
            f"model in {base_model} (n_embd {model.config.n_embd})"
        )
    if params.tie_embeddings and not model.config.tie_embeddings:
        raise WeightsError(
            f"{base_model}: has a separate output head (lm_head.weight), but "
            "finetune.tie_embeddings is true and tying would discard it; set it to false"
        )
    inputs = {  # what, beside the params, decides the weights learned (resume binds to it)
        "train_data": sha256_file(tokenized / "train.safetensors"),
        "val_data": sha256_file(tokenized / "val.safetensors"),
        "prompt_style": meta["prompt_style"],
        "pad_id": meta["eot_id"],
        "base_model": digest_dir(base_model),
    }
    max_length = min(params.max_length, model.config.context_length)
    if max_length != params.max_length:
        params = dataclasses.replace(params, max_length=max_length)

    with distributed.process_group(params.distributed, params.device) as world:
        trainer = Trainer(
            model,
            train,
            val,
            params,
            pad_id=meta["eot_id"],
            checkpoint_dir=checkpoints,
            world=world,
            inputs=inputs,
        )
        if world.is_main:
            checkpoints.mkdir(parents=True, exist_ok=True)  # a DVC output even when empty
        if trainer.load_checkpoint() and world.is_main:
            log(f"finetune: resumed from {checkpoints} at step {trainer.state.step}")
        if not world.is_main:
            trainer.train()
            trainer.finish()
            return {}
        with Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False) as live:
            for row in trainer.state.log:  # a resumed run re-logs what it restored
                _log_live(live, row)
            trainer.on_log = lambda row: _log_live(live, row)
            state = trainer.train()
            trainer.finish()
            # The final weights' losses (the model exported, its card and metrics), logged
            # too unless the last step was an evaluation step, so the curves reach the end.
            train_loss, val_loss = trainer.evaluate()
            if not state.log or state.log[-1]["step"] != state.step:
                row = state.log_row(
                    len(trainer.order), train_loss=train_loss, val_loss=val_loss,
                    batch_loss=None, lr=None, grad_norm=None,
                )  # fmt: skip
                state.log.append(row)
                _log_live(live, row)
    # The process group is gone: rank 0 writes the outputs while the other ranks exit.

    with atomic_open(log_tsv) as handle:
        writer = csv.DictWriter(handle, LOG_FIELDS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(state.log)
    plots.plot_losses(state.log, loss_plot, title="Fine-tuning loss")

    extra = {
        CONFIG_KEY: {
            "prompt_style": meta["prompt_style"],
            "finetune": to_dict(params),
            "base_model": str(base_model),
        }
    }
    exported = trainer.export_model()
    results = {  # the model card's and the metrics'
        "steps": state.step,
        "epochs": round(state.step / len(trainer.order), 4),
        "train_loss": train_loss,
        "val_loss": val_loss,
        "tokens_seen": state.tokens_seen,
    }
    card = hf_folder.Training(
        base=hf_folder.describe_base(base_model, fetch),
        data={"train": inputs["train_data"], "val": inputs["val_data"]},
        params=to_dict(params),
        results=results,
    )
    with atomic_dir(model_out) as tmp:
        hf_folder.write_model_folder(
            exported,
            tmp,
            encoding_dir=encoding_dir,
            prompt_style=meta["prompt_style"],
            max_new_tokens=max_new_tokens,
            training=card,
            extra_config=extra,
        )
    trainer.remove_checkpoint()

    report = {
        **results,
        "target_tokens": state.target_tokens,
        "train_seconds": round(state.seconds, 2),
        "tokens_per_second": round(state.tokens_seen / max(state.seconds, 1e-9), 1),
        "parameters": model.num_parameters(),
        "trainable_parameters": trainer.trainable_parameters,
    }
    write_json(metrics, report)
    log(f"finetune: {report}")
    return report


def read_tsv(path: Path) -> list[dict[str, str]]:
    """Rows of a TSV written by this stage (for tests and notebooks)."""
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")), delimiter="\t"))
