"""Preference tuning (DPO) exact to the reference: data, token batches, log-probs, losses, loop.

The reference is the bonus material of Raschka's *Build a Large Language Model (From
Scratch)*, ch07 ``04_preference-tuning-with-dpo/dpo-from-scratch.ipynb``. Each function
below names the reference function it restates; where we differ, it is in how the same
numbers are computed, never in which numbers:

* the reference model's log-probabilities are computed once, per example, before training
  (:func:`reference_logprobs`; the dpo stage caches them as a DVC output), instead of by a
  second, frozen model at every step: the same values up to float rounding (the reference
  computes them on padded batches of 8), for any batch order, and training holds one model;
* the policy's chosen and rejected sequences go through the model as one batch of 2B rows,
  not two batches of B (:func:`policy_logprobs`): the same log-probs up to rounding.

Rewards are the reference's, unscaled by beta: ``chosen = pc - rc``, ``rejected = pr - rr``
(p: policy, r: reference, c/r: chosen/rejected mean answer log-probs); the margin is their
difference and the accuracy the share of pairs whose chosen reward is the larger.
"""

from __future__ import annotations

import math
import os
import time
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from gpt2_instruct.batching import BatchOrder
from gpt2_instruct.data import (
    DataError,
    DataWarning,
    Entry,
    _required_text,
    format_prompt,
    split_entries,
    validate_entries,
)
from gpt2_instruct.model import GPTModel
from gpt2_instruct.optim import build_optimizer
from gpt2_instruct.resume import deferred_sigint
from gpt2_instruct.safe_json import JSONError, duplicate_keys, read_json
from gpt2_instruct.tokenizer import Tokenizer

if TYPE_CHECKING:  # params imports this module (DpoLoss): no import at run time
    from gpt2_instruct.dpo_checkpoint import DpoCheckpoints
    from gpt2_instruct.params import DpoParams

__all__ = [
    "DPO_LOSSES",
    "HEADER_NEWLINES",
    "LOG_FIELDS",
    "RESPONSE_HEADER",
    "DpoLoss",
    "PreferenceBatch",
    "PreferenceEntry",
    "PreferenceExample",
    "PreferenceLoss",
    "ReferenceLogprobs",
    "collate",
    "compute_logprobs",
    "encode_entry",
    "evaluate",
    "format_input",
    "load_preference_entries",
    "policy_logprobs",
    "preference_loss",
    "reference_logprobs",
    "selected_tokens",
    "split_preferences",
    "train",
    "validate_preference_entries",
]

# The loss variants (params.py's type for dpo.loss; the tuple derives from it).
DpoLoss = Literal["sigmoid", "ipo", "simpo"]
DPO_LOSSES: tuple[str, ...] = typing.get_args(DpoLoss)

RESPONSE_HEADER = "\n\n### Response:\n"
"""What the reference puts between the prompt and each answer."""

HEADER_NEWLINES = 2
"""The reference masks ``prompt + 2`` tokens: the two "\\n" tokens (GPT-2 splits "\\n\\n"
before "###" into two) that open the response header; the rest of the header counts."""

PREFERENCE_FIELDS: tuple[str, ...] = ("chosen", "rejected")


# --- data ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceEntry(Entry):
    """An instruction entry with a preferred (``chosen``) and a dispreferred answer."""

    chosen: str
    rejected: str

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "chosen": self.chosen, "rejected": self.rejected}


def validate_preference_entries(
    raw: Any, source: str | os.PathLike[str], warnings: list[DataWarning] | None = None
) -> list[PreferenceEntry]:
    """Parsed JSON as preference entries, or one DataError naming the file, entry and field.

    ``instruction``, ``input`` and ``output`` are checked by ``data.validate_entries``, as the
    instruction data is; ``chosen`` and ``rejected`` must be non-blank strings
    (``data._required_text``), and neither may be repeated with different values.
    """
    entries = validate_entries(raw, source, warnings)
    source = os.fspath(source)
    out: list[PreferenceEntry] = []
    for index, (item, entry) in enumerate(zip(raw, entries, strict=True)):
        where = f"{source}: entry {index}"
        for key, same in duplicate_keys(item):
            if key in PREFERENCE_FIELDS and not same:
                raise DataError(
                    f"{where}: field {key!r} appears more than once with different values "
                    "(JSON keeps only the last)"
                )
        chosen, rejected = (_required_text(item, name, where) for name in PREFERENCE_FIELDS)
        out.append(PreferenceEntry(entry.instruction, entry.input, entry.output, chosen, rejected))
    return out


def load_preference_entries(
    path: str | os.PathLike[str], warnings: list[DataWarning] | None = None
) -> list[PreferenceEntry]:
    """Read and validate a JSON list of preference entries (``data.load_entries``'s rules)."""
    try:
        raw = read_json(path)
    except JSONError as err:
        raise DataError(str(err)) from None
    return validate_preference_entries(raw, path, warnings)


def split_preferences(
    entries: Sequence[PreferenceEntry], **split_options: Any
) -> dict[str, list[PreferenceEntry]]:
    """The instruction data's split: ``data.split_entries`` with its options (and defaults),
    as train, val and test lists of preference entries."""
    split = split_entries(entries, **split_options)
    return {
        name: typing.cast(list[PreferenceEntry], getattr(split, name))
        for name in ("train", "val", "test")
    }


# --- tokens and batches ----------------------------------------------------------------------


def format_input(entry: Entry) -> str:
    """The reference's ``format_input``: the Alpaca prompt without its response header."""
    return format_prompt(entry, "alpaca").removesuffix(RESPONSE_HEADER)


@dataclass(frozen=True)
class PreferenceExample:
    """One entry's token ids (the reference's ``PreferenceDataset`` item)."""

    prompt: list[int]
    chosen: list[int]  # prompt + RESPONSE_HEADER + chosen answer
    rejected: list[int]


def encode_entry(entry: PreferenceEntry, tokenizer: Tokenizer) -> PreferenceExample:
    """Tokenize the prompt and both full sequences, each encoded whole, as the reference."""
    prompt = format_input(entry)
    return PreferenceExample(
        prompt=tokenizer.encode(prompt),
        chosen=tokenizer.encode(f"{prompt}{RESPONSE_HEADER}{entry.chosen}"),
        rejected=tokenizer.encode(f"{prompt}{RESPONSE_HEADER}{entry.rejected}"),
    )


@dataclass(frozen=True)
class PreferenceBatch:
    """Padded ids (B, T) and their selection masks (True: the log-prob counts)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_mask: torch.Tensor

    def to(self, device: torch.device | str) -> PreferenceBatch:
        return PreferenceBatch(*(t.to(device) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.chosen, self.rejected, self.chosen_mask, self.rejected_mask)


def collate(
    examples: Sequence[PreferenceExample],
    *,
    pad_id: int,
    max_length: int | None = None,
    mask_prompt: bool = True,
) -> PreferenceBatch:
    """The reference's ``custom_collate_fn``.

    Both sequences of every example are right-padded with ``pad_id`` to one width, the
    longest sequence + 1 (the reference's ``len + 1``); the mask is True on real tokens
    and, with ``mask_prompt``, False on the prompt and the two newline tokens after it.
    Ids and masks are then cut to ``max_length`` (``allowed_max_length``).
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(seq) + 1 for ex in examples for seq in (ex.chosen, ex.rejected))
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in ("ids_c", "ids_r", "m_c", "m_r")}
    for ex in examples:
        for key, seq in (("c", ex.chosen), ("r", ex.rejected)):
            ids = torch.full((width,), pad_id, dtype=torch.long)
            ids[: len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            mask = torch.zeros(width, dtype=torch.bool)
            mask[: len(seq)] = True
            if mask_prompt:
                mask[: len(ex.prompt) + HEADER_NEWLINES] = False
            rows[f"ids_{key}"].append(ids)
            rows[f"m_{key}"].append(mask)
    stacked = [torch.stack(rows[name])[:, :max_length] for name in ("ids_c", "ids_r", "m_c", "m_r")]
    return PreferenceBatch(*stacked)


def selected_tokens(
    example: PreferenceExample, *, max_length: int, mask_prompt: bool
) -> tuple[int, int]:
    """How many log-probs of the chosen and of the rejected answer count; 0: a NaN mean."""
    batch = collate([example], pad_id=0, max_length=max_length, mask_prompt=mask_prompt)
    return int(batch.chosen_mask[:, 1:].sum()), int(batch.rejected_mask[:, 1:].sum())


# --- log-probabilities and losses ------------------------------------------------------------


def compute_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, selection_mask: torch.Tensor
) -> torch.Tensor:
    """The reference's ``compute_logprobs``: each row's **mean** log-prob of its next tokens.

    ``logits`` (B, T, V) at positions 0..T-2 predict ``labels`` (B, T) at 1..T-1; the mean
    runs over the positions where ``selection_mask[:, 1:]`` is True. Returns (B,).
    """
    labels = labels[:, 1:]
    logits = logits[:, :-1, :]
    log_probs = F.log_softmax(logits, dim=-1)
    selected = torch.gather(log_probs, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    mask = selection_mask[:, 1:]
    return (selected * mask).sum(-1) / mask.sum(-1)


def policy_logprobs(model: GPTModel, batch: PreferenceBatch) -> tuple[torch.Tensor, ...]:
    """(chosen, rejected) mean log-probs (B,) each, from one forward pass over both."""
    ids = torch.cat([batch.chosen, batch.rejected])
    mask = torch.cat([batch.chosen_mask, batch.rejected_mask])
    return compute_logprobs(model(ids), ids, mask).chunk(2)


@dataclass(frozen=True)
class PreferenceLoss:
    """A batch's loss (mean over its pairs) and each pair's detached rewards."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor  # (B,): pc - rc
    rejected_rewards: torch.Tensor  # (B,): pr - rr

    @property
    def reward_margin(self) -> float:
        return float((self.chosen_rewards - self.rejected_rewards).mean())

    @property
    def accuracy(self) -> float:
        """The share of pairs whose chosen answer gained more than the rejected one."""
        return float((self.chosen_rewards > self.rejected_rewards).float().mean())


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
    loss: str = "sigmoid",
    simpo_gamma: float = 0.5,
) -> PreferenceLoss:
    """The batch loss of one of :data:`DPO_LOSSES`, on mean answer log-probs (B,) each.

    With ``h = (pc - pr) - (rc - rr)``, the policy's log-ratio gain over the reference:

    * ``sigmoid``: ``-logsigmoid(beta * h)``, DPO (Rafailov et al. 2023, "Direct
      Preference Optimization", eq. 7): the reference's ``compute_dpo_loss``;
    * ``ipo``: ``(h - 1 / (2 * beta)) ** 2``, IPO (Azar et al. 2023, "A General Theoretical
      Paradigm to Understand Learning from Human Preferences", eq. 17), as TRL's
      ``DPOTrainer(loss_type="ipo")`` on length-averaged log-probs, which ours are;
    * ``simpo``: ``-logsigmoid(beta * (pc - pr) - simpo_gamma)``, SimPO (Meng, Xia and Chen
      2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6):
      the length-normalised reward ``beta * mean log-prob`` with a target margin
      ``simpo_gamma``, no reference model (as TRL's ``CPOTrainer(loss_type="simpo")``;
      the paper's beta is 2 to 10). The rewards below still track the reference.
    """
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    elif loss == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss == "simpo":
        losses = -F.logsigmoid(beta * (policy_chosen - policy_rejected) - simpo_gamma)
    else:
        raise ValueError(f"unknown DPO loss {loss!r}; valid: {list(DPO_LOSSES)}")
    return PreferenceLoss(
        loss=losses.mean(),
        chosen_rewards=(policy_chosen - reference_chosen).detach(),
        rejected_rewards=(policy_rejected - reference_rejected).detach(),
    )


@dataclass(frozen=True)
class ReferenceLogprobs:
    """The frozen reference model's mean answer log-probs of one split, per example."""

    chosen: torch.Tensor  # (N,) float32, on the CPU
    rejected: torch.Tensor

    def __post_init__(self) -> None:
        if self.chosen.shape != self.rejected.shape or self.chosen.ndim != 1:
            raise ValueError(
                f"reference log-probs must be two (N,) tensors, got {tuple(self.chosen.shape)} "
                f"and {tuple(self.rejected.shape)}"
            )

    def __len__(self) -> int:
        return len(self.chosen)

    def take(self, indices: Sequence[int], device: torch.device) -> tuple[torch.Tensor, ...]:
        at = torch.as_tensor(list(indices), dtype=torch.long)
        return self.chosen[at].to(device), self.rejected[at].to(device)


@torch.no_grad()
def reference_logprobs(
    model: GPTModel,
    examples: Sequence[PreferenceExample],
    *,
    pad_id: int,
    max_length: int,
    mask_prompt: bool,
    device: torch.device,
) -> ReferenceLogprobs:
    """The model's log-probs of each example alone (a batch of one: right in any batch order)."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for example in examples:
        batch = collate([example], pad_id=pad_id, max_length=max_length, mask_prompt=mask_prompt)
        c, r = policy_logprobs(model, batch.to(device))
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    model.train(was_training)
    empty = torch.zeros(0)
    return ReferenceLogprobs(torch.cat(chosen or [empty]), torch.cat(rejected or [empty]))


# --- evaluation and training -----------------------------------------------------------------

SPLIT_FIGURES: tuple[str, ...] = (
    "loss",
    "chosen_reward",
    "rejected_reward",
    "reward_margin",
    "accuracy",
)
LOG_FIELDS: tuple[str, ...] = (
    "step",
    "epoch",
    "tokens_seen",
    *(f"{split}_{name}" for split in ("train", "val") for name in SPLIT_FIGURES),
    "seconds",
)


def first_batches(examples: int, batch_size: int, count: int) -> list[list[int]]:
    """The first ``count`` batches in order, the last maybe short (an unshuffled loader)."""
    count = min(count, math.ceil(examples / batch_size))
    return [list(range(i * batch_size, min((i + 1) * batch_size, examples))) for i in range(count)]


@torch.no_grad()
def evaluate(
    model: GPTModel,
    examples: Sequence[PreferenceExample],
    reference: ReferenceLogprobs,
    batches: Sequence[Sequence[int]],
    params: DpoParams,
    *,
    pad_id: int,
    device: torch.device,
) -> dict[str, float]:
    """The mean over ``batches`` of each batch's figures (the reference's
    ``compute_dpo_loss_loader``; NaN without batches), in eval mode."""
    was_training = model.training
    model.eval()
    sums = dict.fromkeys(SPLIT_FIGURES, 0.0)
    for indices in batches:
        out = _batch_loss(model, examples, reference, indices, params, pad_id, device)
        sums["loss"] += out.loss.item()
        sums["chosen_reward"] += out.chosen_rewards.mean().item()
        sums["rejected_reward"] += out.rejected_rewards.mean().item()
        sums["accuracy"] += out.accuracy
    model.train(was_training)
    n = len(batches)
    means = {k: v / n if n else math.nan for k, v in sums.items()}
    means["reward_margin"] = means["chosen_reward"] - means["rejected_reward"]  # the reference's
    return means


def _batch_loss(
    model: GPTModel,
    examples: Sequence[PreferenceExample],
    reference: ReferenceLogprobs,
    indices: Sequence[int],
    params: DpoParams,
    pad_id: int,
    device: torch.device,
) -> PreferenceLoss:
    """The reference's ``compute_dpo_loss_batch``, the reference model's part from the cache."""
    batch = collate(
        [examples[i] for i in indices],
        pad_id=pad_id,
        max_length=params.max_length,
        mask_prompt=params.mask_prompt,
    ).to(device)
    policy_chosen, policy_rejected = policy_logprobs(model, batch)
    reference_chosen, reference_rejected = reference.take(indices, device)
    return preference_loss(
        policy_chosen,
        policy_rejected,
        reference_chosen,
        reference_rejected,
        beta=params.beta,
        loss=params.loss,
        simpo_gamma=params.simpo_gamma,
    )


@dataclass
class DpoRun:
    """What a training run did (its log rows, ``LOG_FIELDS``, and totals) and where it stands:
    with the weights, the optimizer and the generators, enough to continue it exactly."""

    log: list[dict[str, float]]
    step: int
    steps_per_epoch: int
    tokens_seen: int
    seconds: float
    epoch: int = 0  # the current epoch (0-based)
    batch_in_epoch: int = 0  # batches of the current epoch already trained on
    epoch_batches: list[list[int]] = field(default_factory=list)


def train(
    model: GPTModel,
    data: Mapping[str, Sequence[PreferenceExample]],
    reference: Mapping[str, ReferenceLogprobs],
    params: DpoParams,
    *,
    pad_id: int,
    device: torch.device,
    on_log: Callable[[dict[str, float]], None] | None = None,
    checkpoints: DpoCheckpoints | None = None,
) -> DpoRun:
    """The reference's ``train_model_dpo_simple`` on ``data["train"]``, evaluating on val.

    Batches are drawn as ``torch.manual_seed(seed)`` then ``DataLoader(shuffle=True,
    drop_last=True)`` draws them (``batching.BatchOrder``), each evaluation's train batches
    from a fresh pass over that loader and its val batches from the first ``eval_batches``
    in order; AdamW over the parameters that train. The loss is evaluated after steps 1,
    1 + ``eval_every``, ... (the reference's 0, 5, ...) and, unless the last step was one of
    them, once more at the end. ``model`` must be on ``device``.

    With ``checkpoints`` (``dpo_checkpoint``) a checkpoint made from the same inputs is
    resumed (its log rows go through ``on_log`` again) and one is written every
    ``checkpoint_every`` steps and at each epoch end, but not after the last step: the
    stage then exports the model and deletes the checkpoint. Ctrl-C (SIGINT) is honoured
    between steps: the step in flight finishes, a checkpoint is written and
    ``KeyboardInterrupt`` is raised.
    """
    train_set, val_set = data["train"], data["val"]
    order = BatchOrder(torch.zeros(len(train_set)), params.batch_size, seed=params.seed)
    optimizer = build_optimizer(model, lr=params.lr, weight_decay=params.weight_decay)
    val_batches = first_batches(len(val_set), params.batch_size, params.eval_batches)
    total_steps = params.epochs * len(order)
    if params.max_steps is not None:
        total_steps = min(total_steps, params.max_steps)
    run = DpoRun(log=[], step=0, steps_per_epoch=len(order), tokens_seen=0, seconds=0.0)
    saved = checkpoints.load(model, optimizer, order, total_steps) if checkpoints else None
    if saved is not None:
        run = DpoRun(**saved)
        if on_log is not None:  # a resumed run re-logs what it restored
            for row in run.log:
                on_log(row)
    started = time.perf_counter() - run.seconds

    def log_row() -> None:
        train_batches = order.sample_batches(params.eval_batches)
        order.skip_unshuffled_iterator()  # the reference's pass over its val loader
        row: dict[str, float] = {
            "step": run.step,
            "epoch": run.step / run.steps_per_epoch,
            "tokens_seen": run.tokens_seen,
        }
        for split, batches in (("train", train_batches), ("val", val_batches)):
            figures = evaluate(
                model, data[split], reference[split], batches, params, pad_id=pad_id, device=device
            )
            row.update({f"{split}_{name}": value for name, value in figures.items()})
        row["seconds"] = time.perf_counter() - started
        run.log.append(row)
        if on_log is not None:
            on_log(row)

    def batches() -> Iterator[list[int]]:
        """The batches left, epoch by epoch: a new epoch's shuffle once the last one is done."""
        while run.epoch < params.epochs:
            if run.batch_in_epoch == 0:
                run.epoch_batches = order.epoch()
            while run.batch_in_epoch < len(run.epoch_batches):
                yield run.epoch_batches[run.batch_in_epoch]
            run.epoch += 1
            run.batch_in_epoch = 0

    def save() -> None:
        if checkpoints is not None:
            checkpoints.save(model, optimizer, order, vars(run))

    model.train()
    upcoming = batches()
    with deferred_sigint() as interrupted:
        while run.step < total_steps:
            indices = next(upcoming)
            optimizer.zero_grad()
            out = _batch_loss(model, train_set, reference["train"], indices, params, pad_id, device)
            if not torch.isfinite(out.loss):
                raise FloatingPointError(
                    f"the DPO loss is {out.loss.item()} at step {run.step + 1}"
                )
            out.loss.backward()
            optimizer.step()
            run.tokens_seen += len(indices) * _width(train_set, indices, params.max_length)
            run.step += 1
            run.batch_in_epoch += 1
            if (run.step - 1) % params.eval_every == 0:
                log_row()
            run.seconds = time.perf_counter() - started
            every = params.checkpoint_every
            epoch_end = run.batch_in_epoch == len(run.epoch_batches)
            if run.step < total_steps and (epoch_end or (every and run.step % every == 0)):
                save()
            if interrupted:
                save()
                where = checkpoints.directory if checkpoints else None
                raise KeyboardInterrupt(
                    f"interrupted after step {run.step}; checkpoint in "
                    f"{where or 'nowhere (no checkpoint directory)'}"
                )
    if not run.log or run.log[-1]["step"] != run.step:
        log_row()  # the final weights' figures, so the curves reach the end
    run.seconds = time.perf_counter() - started
    return run


def _width(examples: Sequence[PreferenceExample], indices: Sequence[int], max_length: int) -> int:
    """The padded width of a batch (the reference counts ``batch["chosen"].numel()``)."""
    longest = max(len(s) + 1 for i in indices for s in (examples[i].chosen, examples[i].rejected))
    return min(longest, max_length)
