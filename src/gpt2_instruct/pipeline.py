"""What each DVC stage does, given its params section and its paths.

The scripts in ``stages/`` only parse paths and call one function here, so the
stages can be run, tested and reused without DVC.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from dvclive import Live

from gpt2_instruct import distributed, evaluation, plots
from gpt2_instruct.batching import TokenizedSplit, collate
from gpt2_instruct.cli import load_instruct_model
from gpt2_instruct.data import (
    DataError,
    Entry,
    extract_response,
    find_duplicates,
    format_prompt,
    load_entries,
    overlap,
    split_entries,
    write_entries,
)
from gpt2_instruct.devices import resolve_device
from gpt2_instruct.download import fetch, local_path
from gpt2_instruct.generation import SamplingConfig, generate
from gpt2_instruct.io import atomic_dir, atomic_open, write_json
from gpt2_instruct.model import GPT2_CONFIGS, GPTConfig, GPTModel
from gpt2_instruct.params import (
    DownloadParams,
    EvaluateParams,
    FetchParams,
    FinetuneParams,
    GenerateParams,
    PrepareParams,
    TokenizeParams,
    to_dict,
)
from gpt2_instruct.tokenizer import BPE_SHA256, ENCODER_JSON, VOCAB_BPE, load_tokenizer
from gpt2_instruct.training import Trainer
from gpt2_instruct.weights import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    WeightsError,
    load_model,
    save_model,
)

SPLITS = ("train", "val", "test")
CONFIG_KEY = "gpt2_instruct"  # our extra section in the model's config.json
ALPACA_RESPONSE_HEADER = "\n\n### Response:\n"
GPT2_CONTEXT = 1024  # positions of every published GPT-2 size
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


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ download
def download(params: DownloadParams, out: Path) -> None:
    fetch(
        params.url,
        out,
        sha256=params.sha256,
        timeout=params.timeout,
        retries=params.retries,
        progress=True,
    )
    _log(f"download: {params.url} -> {out} ({out.stat().st_size:,} bytes)")


# ------------------------------------------------------------------- prepare
def prepare(params: PrepareParams, raw: Path, out_dir: Path, metrics: Path) -> dict[str, Any]:
    """Validate, split and write train/val/test; report duplicates and overlap (not fatal)."""
    entries = load_entries(raw)
    try:
        split = split_entries(
            entries,
            train_fraction=params.train_fraction,
            test_fraction=params.test_fraction,
            shuffle=params.shuffle,
            seed=params.seed,
        )
    except ValueError as err:  # e.g. too few entries for a non-empty test split
        raise DataError(f"{raw}: {err}") from err
    with atomic_dir(out_dir) as tmp:
        for name in SPLITS:
            write_entries(tmp / f"{name}.json", getattr(split, name))
    report = {
        "entries": len(entries),
        **{f"{name}_entries": len(getattr(split, name)) for name in SPLITS},
        "duplicate_pairs": len(find_duplicates(entries)),
        "test_prompts_seen_in_train": overlap(split.train, split.test),
        "val_prompts_seen_in_train": overlap(split.train, split.val),
    }
    write_json(metrics, report)
    _log(f"prepare: {report}")
    return report


# ------------------------------------------------------------------ tokenize
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
                _log(
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
    _log(f"tokenize ({params.prompt_style}): {json.dumps(stats)}")
    return report


# ---------------------------------------------------------------- fetch_gpt2
def _join(source: str, name: str) -> str:
    path = local_path(source)
    return str(path / name) if path is not None else f"{source.rstrip('/')}/{name}"


def fetch_gpt2(params: FetchParams, encoding_out: Path, model_out: Path) -> None:
    """BPE files (sha256-pinned) and the base model as safetensors + config.json."""
    with atomic_dir(encoding_out) as tmp:
        for name in (ENCODER_JSON, VOCAB_BPE):
            fetch(
                _join(params.bpe_source, name),
                tmp / name,
                sha256=BPE_SHA256[name],
                timeout=params.timeout,
                retries=params.retries,
            )
    tokenizer = load_tokenizer(encoding_out)

    with atomic_dir(model_out) as tmp:
        if params.source == "random":
            cfg = params.random
            torch.manual_seed(cfg.seed)
            model = GPTModel(
                GPTConfig(
                    vocab_size=tokenizer.vocab_size,
                    context_length=cfg.context_length,
                    n_embd=cfg.n_embd,
                    n_layer=cfg.n_layer,
                    n_head=cfg.n_head,
                )
            )
            save_model(model, tmp, extra_config={CONFIG_KEY: {"random_init": True}})
            source = "random model"
            _log(
                "fetch_gpt2: WARNING: randomly initialised model, NOT pre-trained GPT-2 "
                f"({model.num_parameters():,} parameters) - for smoke tests and CI only"
            )
        else:
            if params.source == "hub":
                base = f"{params.hub_url.rstrip('/')}/openai-community/{params.model}"
                base = f"{base}/resolve/{params.revision}"
            else:
                base = str(params.local_dir)
            source = base
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                fetch(
                    _join(base, name),
                    tmp / name,
                    timeout=params.timeout,
                    retries=params.retries,
                    progress=True,
                )
            model = load_model(tmp)  # checks every tensor name and shape against config.json
            expected = GPT2_CONFIGS[params.model]
            shape = (model.config.n_layer, model.config.n_embd)
            if params.source == "hub" and shape != (expected.n_layer, expected.n_embd):
                raise WeightsError(f"{base}: checkpoint does not have the shape of {params.model}")
            _log(f"fetch_gpt2: {base} ({model.num_parameters():,} parameters)")
        if model.config.vocab_size < tokenizer.vocab_size:
            raise WeightsError(
                f"{source}: "
                f"{model.config.vocab_size} token embeddings, fewer than the tokenizer's "
                f"{tokenizer.vocab_size} tokens"
            )


# ------------------------------------------------------------------ finetune
def _configure_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def _log_live(live: Live, row: dict[str, float]) -> None:
    """One evaluation row as DVCLive metrics at the row's optimizer step."""
    live.step = int(row["step"])
    live.log_metric("train/loss", row["train_loss"])
    live.log_metric("val/loss", row["val_loss"])
    live.log_metric("lr", row["lr"])
    if row.get("grad_norm") is not None:
        live.log_metric("grad_norm", row["grad_norm"])
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
) -> dict[str, Any]:
    """Fine-tune, logging live to DVCLive; write the model, the loss log, plot and metrics.

    Under torchrun (``finetune.distributed``) every rank trains its share of each
    batch; rank 0 alone logs and writes, the others return an empty report.
    """
    _configure_threads(params.threads)
    meta = json.loads((tokenized / "meta.json").read_text(encoding="utf-8"))
    train = TokenizedSplit.load(tokenized / "train.safetensors")
    val = TokenizedSplit.load(tokenized / "val.safetensors")
    model = load_model(base_model, dropout=params.dropout)
    if model.config.vocab_size < meta["vocab_size"]:
        raise WeightsError(f"{base_model}: vocabulary smaller than the tokenizer's")
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
        )
        if world.is_main:
            checkpoints.mkdir(parents=True, exist_ok=True)  # a DVC output even when empty
        if trainer.load_checkpoint() and world.is_main:
            _log(f"finetune: resumed from {checkpoints} at step {trainer.state.step}")
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
    with atomic_dir(model_out) as tmp:
        save_model(trainer.export_model(), tmp, extra_config=extra)
        for name in (ENCODER_JSON, VOCAB_BPE):
            shutil.copyfile(encoding_dir / name, tmp / name)
    trainer.remove_checkpoint()

    train_loss, val_loss = trainer.evaluate()
    report = {
        "steps": state.step,
        "epochs": round(state.step / len(trainer.order), 4),
        "train_loss": train_loss,
        "val_loss": val_loss,
        "tokens_seen": state.tokens_seen,
        "target_tokens": state.target_tokens,
        "train_seconds": round(state.seconds, 2),
        "tokens_per_second": round(state.tokens_seen / max(state.seconds, 1e-9), 1),
        "parameters": model.num_parameters(),
        "trainable_parameters": trainer.trainable_parameters,
    }
    write_json(metrics, report)
    _log(f"finetune: {report}")
    return report


# ------------------------------------------------------------------ generate
def generation_prompt(entry: Entry, style: str, response_header_in_prompt: bool) -> str:
    """The prompt the model answers; the reference leaves Alpaca's response header out."""
    prompt = format_prompt(entry, style)
    if style == "alpaca" and not response_header_in_prompt:
        prompt = prompt.removesuffix(ALPACA_RESPONSE_HEADER)
    return prompt


def generate_responses(params: GenerateParams, model_dir: Path, test_json: Path, out: Path) -> None:
    """Answer every test entry; batches are formed from prompts of similar length."""
    device = resolve_device(params.device)
    model, tokenizer, style = load_instruct_model(model_dir, device=device)
    entries = load_entries(test_json)
    if params.limit is not None:
        entries = entries[: params.limit]
    prompts = [
        tokenizer.encode(generation_prompt(e, style, params.response_header_in_prompt))
        for e in entries
    ]
    sampling = SamplingConfig(
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        seed=params.seed,
    )
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[int, str] = {}
    started = time.perf_counter()
    new_tokens = 0
    for start in range(0, len(order), params.batch_size):
        batch = order[start : start + params.batch_size]
        outputs = generate(
            model, [prompts[i] for i in batch], eos_id=tokenizer.eot_id, sampling=sampling
        )
        for i, ids in zip(batch, outputs, strict=True):
            new_tokens += len(ids)
            answers[i] = extract_response(tokenizer.decode(ids), style)
        _log(f"generate: {len(answers)}/{len(entries)} answers")
    seconds = time.perf_counter() - started
    results = [{**e.to_dict(), "model_response": answers[i]} for i, e in enumerate(entries)]
    write_json(out, results, indent=4)
    _log(
        f"generate: {new_tokens} new tokens in {seconds:.1f} s "
        f"({new_tokens / max(seconds, 1e-9):.1f} tokens/s)"
    )


# ------------------------------------------------------------------ evaluate
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
    entries = json.loads(responses.read_text(encoding="utf-8"))
    device = resolve_device(params.device)
    model, tokenizer, _ = load_instruct_model(model_dir, device=device)
    test = TokenizedSplit.load(tokenized / "test.safetensors")
    if len(entries) > len(test):
        raise ValueError(f"{responses}: {len(entries)} entries but the test split has {len(test)}")
    losses = response_losses(
        model, test, pad_id=tokenizer.eot_id, batch_size=params.batch_size, limit=len(entries)
    )
    rows, summary = evaluation.score_entries(entries, losses)
    summary = dict(summary)

    plots_dir.mkdir(parents=True, exist_ok=True)
    if params.judge.backend != "none":
        from gpt2_instruct.judge import JudgeConfig, judge_entries

        judge_cfg = JudgeConfig(
            backend=params.judge.backend,
            model=params.judge.model,
            url=params.judge.url,
            timeout=params.judge.timeout,
            retries=params.judge.retries,
            template=params.judge.template,
            api_key_env=params.judge.api_key_env,
        )
        judged, judge_summary = judge_entries(entries, judge_cfg, progress=True)
        verdicts = {verdict["index"]: verdict for verdict in judged}  # may stop early
        for row in rows:
            verdict = verdicts.get(row["index"], {})
            row["judge_score"] = verdict.get("score")
            row["judge_reply"] = verdict.get("reply", "")
        summary.update(judge_summary)
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
    _log(f"evaluate: {json.dumps(summary)}")
    return summary


def read_tsv(path: Path) -> list[dict[str, str]]:
    """Rows of a TSV written by this module (for tests and notebooks)."""
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")), delimiter="\t"))
