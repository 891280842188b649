"""Stage dpo: preference-tune the instruction-fine-tuned model (off unless dpo.enabled).

Off (the default), the stage writes "not run" outputs in a moment, so ``dvc repro`` stays
the reference instruction run; ``dvc exp run -S dpo.enabled=true`` runs it. On, it fetches
the preference data (``dpo.data_url``, pinned by ``dpo.data_sha256``), validates it and
splits it as prepare splits the instruction data (the ``prepare`` params: the reference's
file holds the same 1,100 instructions in the same order, so the DPO test split is the SFT
test split), loads ``data/model`` once, computes the reference model's log-probabilities
with it (or reuses them, see below), then trains that same model as the policy.

The reference log-probabilities are a persistent DVC output
(``data/dpo/reference_logprobs.safetensors``): one pair of numbers per example and split,
stored with a key per split (sha256 of the model's weights, the examples' token ids, the pad
id, ``max_length`` and ``mask_prompt``). A run whose key matches reuses them (changing beta,
lr, the loss or the seed costs no reference pass); any other recomputes them. Cost: one
forward pass per example (1,100 pairs) before training. Saving: the reference keeps a second,
frozen copy of the model on the device for the whole run (gpt2-medium: 1.4 GB of fp32
weights) and runs it on every training and evaluation batch (half of all forward passes:
chosen and rejected, policy and reference); here the file is 9.5 KB.

Training is resumable (``dpo_checkpoint``): a checkpoint every ``dpo.checkpoint_every``
steps and at each epoch end goes to ``data/dpo/checkpoints`` (persistent, like finetune's),
and Ctrl-C finishes the step and writes one. A rerun resumes it only if it was made from
the same model folder, data, split, reference log-probs and learning params; otherwise one
line says what changed and the stale checkpoint is deleted. It is deleted once the model
is exported.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from dvclive import Live
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gpt2_instruct import dpo as prefs
from gpt2_instruct import dpo_plots, hf_folder
from gpt2_instruct.data import DataError, DataWarning
from gpt2_instruct.deadline import redact
from gpt2_instruct.devices import resolve_device
from gpt2_instruct.download import fetch
from gpt2_instruct.dpo_checkpoint import DpoCheckpoints
from gpt2_instruct.io import atomic_dir, atomic_open, atomic_path, sha256_file, write_json
from gpt2_instruct.lora import apply_lora, has_lora, merge_lora, trainable_parameters
from gpt2_instruct.model import GPTModel
from gpt2_instruct.model_dir import ModelDirError, load_instruct_model
from gpt2_instruct.params import DpoParams, ParamsError, PrepareParams, SamplingParams, to_dict
from gpt2_instruct.safe_json import JSONError, read_json
from gpt2_instruct.stages import log
from gpt2_instruct.weights import CONFIG_KEY, CONFIG_NAME, MAX_CONFIG_BYTES, WEIGHTS_NAME

SPLITS: tuple[str, ...] = ("train", "val", "test")
CACHE_FORMAT = "gpt2-instruct-dpo-reference-logprobs/1"
NOT_RUN = "DPO not run (dpo.enabled: false)"
SHOWN_WARNINGS = 20


def dpo(
    params: DpoParams,
    split_params: PrepareParams,
    model_dir: Path,
    model_out: Path,
    prepared: Path,
    reference_out: Path,
    metrics: Path,
    log_tsv: Path,
    plot: Path,
    live_dir: Path,
    *,
    checkpoints: Path | None = None,
    max_new_tokens: int = SamplingParams.max_new_tokens,
) -> dict[str, Any]:
    """Preference-tune ``model_dir`` into ``model_out`` and write the log, plot and metrics.

    ``checkpoints``: the directory of the resumable checkpoint (None: no checkpoints).
    """
    if checkpoints is not None:
        checkpoints.mkdir(parents=True, exist_ok=True)  # a DVC output even when empty
    if not params.enabled:
        return _not_run(model_out, prepared, reference_out, metrics, log_tsv, plot, live_dir)
    device = resolve_device(params.device)
    entries, data_sha256 = _load_data(params)
    splits = prefs.split_preferences(
        entries,
        train_fraction=split_params.train_fraction,
        test_fraction=split_params.test_fraction,
        shuffle=split_params.shuffle,
        seed=split_params.seed,
    )
    model, tokenizer, style = load_instruct_model(model_dir, device=device)
    if style != "alpaca":
        raise ModelDirError(
            f"model directory {model_dir}: trained with the {style!r} prompt, but DPO uses the "
            "reference's Alpaca prompt (tokenize.prompt_style: alpaca)"
        )
    if params.lora.rank > model.config.n_embd:
        raise ParamsError(
            f"dpo.lora.rank ({params.lora.rank}) must be at most the width of the model in "
            f"{model_dir} (n_embd {model.config.n_embd})"
        )
    if "head" in params.lora.targets and params.lora.rank and model.config.tie_embeddings:
        raise ParamsError(
            f"dpo.lora.targets has 'head', but the model in {model_dir} ties its head to the "
            "token embedding: such an adapter cannot be merged for export; leave 'head' out"
        )
    params = dataclasses.replace(
        params, max_length=min(params.max_length, model.config.context_length)
    )
    examples = {name: [prefs.encode_entry(e, tokenizer) for e in splits[name]] for name in SPLITS}
    _check_answers(entries, splits, examples, params)
    if len(examples["train"]) < params.batch_size:
        raise ParamsError(
            f"dpo.batch_size ({params.batch_size}) is larger than the training split "
            f"({len(examples['train'])} entries): no full batch to train on"
        )
    with atomic_dir(prepared) as tmp:
        for name in SPLITS:
            write_json(tmp / f"{name}.json", [e.to_dict() for e in splits[name]], indent=1)

    pad_id = tokenizer.eot_id
    started = time.perf_counter()
    reference, reused, reference_keys = _reference_logprobs(
        reference_out, model, examples, model_dir, params, pad_id=pad_id, device=device
    )
    reference_seconds = time.perf_counter() - started
    how = "reused" if reused else "computed"
    log(f"dpo: reference log-probs {how} in {reference_seconds:.1f} s")

    if params.lora.rank:
        torch.manual_seed(params.seed)  # the adapters' initialisation
        lora = params.lora
        apply_lora(
            model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets
        )
    trainable = trainable_parameters(model)
    resumable = DpoCheckpoints.for_stage(
        checkpoints, params, model_dir=model_dir, data_sha256=data_sha256, split=split_params,
        reference_keys=reference_keys, device=device, log=lambda line: log(f"dpo: {line}"),
    )  # fmt: skip
    with Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False) as live:
        try:
            run = prefs.train(
                model, examples, reference, params, pad_id=pad_id, device=device,
                on_log=lambda row: _log_live(live, row), checkpoints=resumable,
            )  # fmt: skip
        except FloatingPointError as err:  # a diverging run: most likely dpo.lr or dpo.beta
            raise ParamsError(f"dpo: {err}; lower dpo.lr (or change dpo.beta)") from None
    test = prefs.evaluate(
        model,
        examples["test"],
        reference["test"],
        prefs.first_batches(len(examples["test"]), params.batch_size, len(examples["test"])),
        params,
        pad_id=pad_id,
        device=device,
    )
    if has_lora(model):
        merge_lora(model)

    with atomic_open(log_tsv) as handle:
        writer = csv.DictWriter(handle, prefs.LOG_FIELDS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(run.log)
    dpo_plots.plot_dpo(run.log, plot)

    final = run.log[-1]
    report: dict[str, Any] = {
        "enabled": True,
        "loss_type": params.loss,
        "steps": run.step,
        "epochs": round(run.step / run.steps_per_epoch, 4),
        **{k: final[k] for k in prefs.LOG_FIELDS if k.startswith(("train_", "val_"))},
        **{f"test_{name}": value for name, value in test.items()},
        "tokens_seen": run.tokens_seen,
        "train_seconds": round(run.seconds, 2),
        "reference_logprobs": "reused" if reused else "computed",
        "reference_seconds": round(reference_seconds, 2),
        "entries": {name: len(splits[name]) for name in SPLITS},
        "data_sha256": data_sha256,
        "parameters": model.num_parameters(),
        "trainable_parameters": trainable,
    }
    _export(model, model_dir, model_out, params, report, max_new_tokens=max_new_tokens)
    resumable.remove()
    write_json(metrics, _finite(report))
    log(f"dpo: {report}")
    return report


# --- data --------------------------------------------------------------------------------------


def _load_data(params: DpoParams) -> tuple[list[prefs.PreferenceEntry], str]:
    """Fetch (pinned), read and validate the preference data; messages name ``data_url``."""
    shown = redact(params.data_url)
    with tempfile.TemporaryDirectory(prefix="dpo-data-") as tmp:
        path = fetch(params.data_url, Path(tmp) / "data.json", sha256=params.data_sha256)
        digest = sha256_file(path)
        try:
            raw = read_json(path)
        except JSONError as err:
            raise DataError(str(err).replace(str(path), shown)) from None
    warnings: list[DataWarning] = []
    entries = prefs.validate_preference_entries(raw, shown, warnings)
    for warning in warnings[:SHOWN_WARNINGS]:
        log(f"dpo: WARNING: {warning}")
    if len(warnings) > SHOWN_WARNINGS:
        log(f"dpo: WARNING: ... and {len(warnings) - SHOWN_WARNINGS} more warnings")
    log(f"dpo: {len(entries)} preference entries from {shown} (sha256 {digest})")
    return entries, digest


def _check_answers(
    entries: list[prefs.PreferenceEntry],
    splits: dict[str, list[prefs.PreferenceEntry]],
    examples: dict[str, list[prefs.PreferenceExample]],
    params: DpoParams,
) -> None:
    """Every answer must keep a token within ``max_length``: else its mean is 0 / 0 (NaN)."""
    position = {id(entry): index for index, entry in enumerate(entries)}
    for name in SPLITS:
        for entry, example in zip(splits[name], examples[name], strict=True):
            counts = prefs.selected_tokens(
                example, max_length=params.max_length, mask_prompt=params.mask_prompt
            )
            for field, count in zip(prefs.PREFERENCE_FIELDS, counts, strict=True):
                if not count:
                    raise DataError(
                        f"{redact(params.data_url)}: entry {position[id(entry)]}: field "
                        f"{field!r}: no token of the answer within dpo.max_length "
                        f"({params.max_length}) tokens: shorten the prompt or raise "
                        "dpo.max_length"
                    )


# --- the reference model's log-probabilities ------------------------------------------------


def _split_key(
    model_sha256: str, examples: list[prefs.PreferenceExample], params: DpoParams, pad_id: int
) -> str:
    """What decides one split's reference log-probs, as one sha256."""
    digest = hashlib.sha256()
    settings = {
        "model": model_sha256,
        "pad_id": pad_id,
        "max_length": params.max_length,
        "mask_prompt": params.mask_prompt,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for ex in examples:
        digest.update(json.dumps([len(ex.prompt), ex.chosen, ex.rejected]).encode())
    return digest.hexdigest()


def _read_cache(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The cache's metadata and tensors; empty when absent or unreadable (then recomputed)."""
    if not path.is_file():
        return {}, {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        log(f"dpo: {path} is unreadable ({err}); recomputing the reference log-probs")
        return {}, {}
    return (meta, tensors) if meta.get("format") == CACHE_FORMAT else ({}, {})


def _reference_logprobs(
    path: Path,
    model: GPTModel,
    examples: dict[str, list[prefs.PreferenceExample]],
    model_dir: Path,
    params: DpoParams,
    *,
    pad_id: int,
    device: torch.device,
) -> tuple[dict[str, prefs.ReferenceLogprobs], bool, dict[str, str]]:
    """Each split's reference log-probs: reused where the cache's key matches, else computed.

    Returns them, whether every split was reused, and each split's key; the file is
    rewritten when any was not reused.
    """
    model_sha256 = sha256_file(model_dir / WEIGHTS_NAME)
    meta, tensors = _read_cache(path)
    out: dict[str, prefs.ReferenceLogprobs] = {}
    keys: dict[str, str] = {}
    for name in SPLITS:
        keys[name] = _split_key(model_sha256, examples[name], params, pad_id)
        chosen, rejected = tensors.get(f"{name}.chosen"), tensors.get(f"{name}.rejected")
        if meta.get(f"{name}.key") == keys[name] and chosen is not None and rejected is not None:
            out[name] = prefs.ReferenceLogprobs(chosen, rejected)
            continue
        out[name] = prefs.reference_logprobs(
            model, examples[name], pad_id=pad_id, max_length=params.max_length,
            mask_prompt=params.mask_prompt, device=device,
        )  # fmt: skip
    reused = all(meta.get(f"{name}.key") == keys[name] for name in SPLITS)
    if not reused:
        saved = {f"{n}.{side}": getattr(out[n], side).contiguous() for n in SPLITS
                 for side in ("chosen", "rejected")}  # fmt: skip
        metadata = {"format": CACHE_FORMAT, **{f"{n}.key": keys[n] for n in SPLITS}}
        with atomic_path(path) as tmp:
            save_file(saved, tmp, metadata=metadata)
    return out, reused, keys


# --- outputs ---------------------------------------------------------------------------------


def _log_live(live: Live, row: dict[str, float]) -> None:
    """One evaluation row as DVCLive metrics at its optimizer step."""
    live.step = int(row["step"])
    for split in ("train", "val"):
        for name in prefs.SPLIT_FIGURES:
            live.log_metric(f"{split}/{name}", row[f"{split}_{name}"])
    live.log_metric("tokens_seen", row["tokens_seen"])
    live.next_step()


def _finite(report: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities as null: JSON has no such numbers."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in report.items()
    }


def _export(
    model: GPTModel,
    model_dir: Path,
    model_out: Path,
    params: DpoParams,
    report: dict[str, Any],
    *,
    max_new_tokens: int,
) -> None:
    """The same complete model folder as finetune's, its card saying what DPO did."""
    config = read_json(model_dir / CONFIG_NAME, max_bytes=MAX_CONFIG_BYTES)
    extra = config.get(CONFIG_KEY) if isinstance(config, dict) else None
    extra = {
        **(extra if isinstance(extra, dict) else {}),
        "prompt_style": "alpaca",
        "dpo": to_dict(params),
        "dpo_base_model": str(model_dir),
    }
    card = hf_folder.Training(
        base=hf_folder.describe_base(model_dir),  # the instruction-tuned model, by its sha256
        data={"preference data": report["data_sha256"]},
        params=to_dict(params),
        results={
            "train_loss": report["train_loss"],
            "val_loss": report["val_loss"],
            "steps": report["steps"],
            "epochs": report["epochs"],
            "tokens_seen": report["tokens_seen"],
        },
    )
    with atomic_dir(model_out) as tmp:
        hf_folder.write_model_folder(
            model,
            tmp,
            encoding_dir=model_dir,
            prompt_style="alpaca",
            max_new_tokens=max_new_tokens,
            training=card,
            extra_config={CONFIG_KEY: extra},
        )
        with open(tmp / hf_folder.MODEL_CARD, "a", encoding="utf-8", newline="\n") as handle:
            handle.write(_card_section(params, report))


def _card_section(params: DpoParams, report: dict[str, Any]) -> str:
    """The card's DPO part: the losses above are DPO losses, and the reward figures."""
    return f"""
## Preference tuning (DPO)

This model is the instruction-fine-tuned model above, further trained by gpt2-instruct's
dpo stage (the reference's ch07 bonus recipe) with the `{params.loss}` loss (beta
{params.beta}) on preferred (`chosen`) over dispreferred (`rejected`) answers. The losses
reported under Training are **preference losses**, not cross-entropy. Rewards are the
change of the mean answer log-probability from the reference (instruction-tuned) model.

| split | loss | reward margin | accuracy |
|---|---|---|---|
| train | {report["train_loss"]:.4f} | {report["train_reward_margin"]:.4f} | {report["train_accuracy"]:.3f} |
| val | {report["val_loss"]:.4f} | {report["val_reward_margin"]:.4f} | {report["val_accuracy"]:.3f} |
| test | {report["test_loss"]:.4f} | {report["test_reward_margin"]:.4f} | {report["test_accuracy"]:.3f} |
"""  # noqa: E501


def _not_run(
    model_out: Path,
    prepared: Path,
    reference_out: Path,
    metrics: Path,
    log_tsv: Path,
    plot: Path,
    live_dir: Path,
) -> dict[str, Any]:
    """The outputs DVC expects, saying DPO did not run (a reference cache is kept)."""
    for directory in (model_out, prepared, live_dir):  # a directory left empty DVC warns of
        with atomic_dir(directory) as tmp:
            (tmp / "NOT_RUN.md").write_text(
                f"{NOT_RUN}: `dvc exp run -S dpo.enabled=true` runs it.\n", encoding="utf-8"
            )
    if not reference_out.is_file():  # persistent: a cache from an earlier run stays usable
        with atomic_path(reference_out) as tmp:
            save_file({}, tmp, metadata={"format": CACHE_FORMAT})
    with atomic_open(log_tsv) as handle:
        handle.write("\t".join(prefs.LOG_FIELDS) + "\n")
    dpo_plots.plot_not_run(plot, NOT_RUN)
    report = {"enabled": False, "status": "not run"}
    write_json(metrics, report)
    log(f"dpo: {NOT_RUN}")
    return report
