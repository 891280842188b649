"""The fine-tuning loop: the reference recipe, made fast and resumable.

By default this is Raschka's ``train_model_simple`` step for step: AdamW, the
same shuffled batches, loss evaluated every ``eval_every`` steps on
``eval_batches`` train and validation batches (mean of batch means), tokens
seen counted with padding. Speed comes from work that does not change what is
learned: the vocabulary projection only where targets count, fused AdamW,
validation batches collated once, evaluation without autograd.

Given a ``World`` of several processes (under torchrun, see ``distributed``),
each rank trains on its share of every batch, through DistributedDataParallel
(rank 0 alone evaluates) or with the model sharded by FSDP (every rank takes part
in evaluation); rank 0 alone logs and writes checkpoints.

The pieces live beside it: ``strategy`` (one process, DDP or FSDP), ``eval_schedule``
(which batches are evaluated when, the reference's RNG replay), ``checkpointing`` (the
checkpoint file and when it may be resumed), ``backward_updates`` (AdamW inside the
backward pass) and ``train_batches`` (collation and autocast).
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from gpt2_instruct import backward_updates, checkpointing, distributed, fingerprint, strategy
from gpt2_instruct.batching import BatchOrder, TokenizedSplit
from gpt2_instruct.checkpointing import CHECKPOINT_NAME
from gpt2_instruct.distributed import World
from gpt2_instruct.eval_schedule import EvalSchedule
from gpt2_instruct.lora import has_lora, merge_lora, trainable_parameters
from gpt2_instruct.model import GPTModel
from gpt2_instruct.optim import apply_lr, build_optimizer, lr_at
from gpt2_instruct.params import FinetuneParams, ParamsError
from gpt2_instruct.progress import progress_bar
from gpt2_instruct.resume import deferred_sigint
from gpt2_instruct.train_batches import Collator

__all__ = ["CHECKPOINT_NAME", "NonFiniteLossError", "TrainState", "Trainer"]


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN or inf; the last good checkpoint is kept."""


@dataclass
class TrainState:
    """Everything needed to continue a run exactly where it stopped."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # batches of the current epoch already trained on
    epoch_batches: list[list[int]] = field(default_factory=list)
    tokens_seen: int = 0  # input positions, padding included (as the reference counts)
    target_tokens: int = 0  # positions whose target counts in the loss
    seconds: float = 0.0
    log: list[dict[str, float]] = field(default_factory=list)

    def log_row(self, batches_per_epoch: int, **figures: float | None) -> dict[str, float]:
        """A row of the loss log: where training stands, the ``figures``, the time so far."""
        return {
            "step": self.step,
            "epoch": self.epoch + self.batch_in_epoch / batches_per_epoch,
            "tokens_seen": self.tokens_seen,
            **figures,  # type: ignore[dict-item]  # grad_norm: None without clipping
            "seconds": self.seconds,
        }


def _set_head_layout(model: GPTModel, *, tie_embeddings: bool) -> None:
    """The output head ``finetune.tie_embeddings`` asks for.

    ``False`` (the reference): a tied model gets a separate head copied from the token
    embedding (``GPTModel.untie_embeddings``). ``True`` keeps GPT-2's tied head; a base
    model that already has a separate head is refused, since tying would discard it.
    """
    if not tie_embeddings:
        model.untie_embeddings()
    elif not model.config.tie_embeddings:
        raise ParamsError(
            "finetune.tie_embeddings is true but the base model has a separate output head "
            "(lm_head.weight); tying would discard it: set finetune.tie_embeddings: false"
        )


def _check_world(params: FinetuneParams, world: World) -> None:
    """Refuse a world the batch cannot be shared by, or one without its process group."""
    if params.batch_size % world.size:
        raise ParamsError(
            f"finetune.batch_size ({params.batch_size}) must be divisible by the number of "
            f"processes ({world.size}): each rank trains on an equal share of a batch"
        )
    if world.size > 1 and not torch.distributed.is_initialized():
        raise RuntimeError(
            f"a world of {world.size} processes needs torch.distributed initialised "
            "(run under torchrun inside distributed.process_group)"
        )


def _check_run(params: FinetuneParams, examples: int, batches: int, total_steps: int) -> None:
    """Refuse a run without a full batch, or whose warmup outlasts it (known only now)."""
    if batches == 0:
        raise ParamsError(
            f"finetune.batch_size ({params.batch_size}) is larger than the training split "
            f"({examples} examples): no full batch to train on"
        )
    if params.warmup_steps > total_steps:  # max_steps: null
        raise ParamsError(
            f"finetune.warmup_steps ({params.warmup_steps}) exceeds the run's "
            f"{total_steps} steps ({params.epochs} epochs of {batches} batches)"
        )


def _build_optimizer(model: GPTModel, params: FinetuneParams) -> torch.optim.AdamW:
    """AdamW as the params ask, over the parameters that train."""
    return build_optimizer(
        model,
        lr=params.lr,
        weight_decay=params.weight_decay,
        decay_norms_and_biases=params.decay_norms_and_biases,
        fused=params.fused_optimizer or None,
    )


class Trainer:
    """Runs the recipe in ``FinetuneParams`` on a model and tokenized splits."""

    def __init__(
        self,
        model: GPTModel,
        train: TokenizedSplit,
        val: TokenizedSplit,
        params: FinetuneParams,
        *,
        pad_id: int,
        device: torch.device | None = None,
        checkpoint_dir: str | Path | None = None,
        on_log: Callable[[dict[str, float]], None] | None = None,
        progress: bool = True,
        world: World | None = None,
        inputs: dict[str, Any] | None = None,
    ) -> None:
        """``inputs``: what identifies the data and the base model (content hashes, prompt
        style, pad id); with the model's config and the learning params they make the
        fingerprint a checkpoint must match to be resumed (``gpt2_instruct.fingerprint``).
        """
        self.params = params
        self.world = world or World()
        _check_world(params, self.world)
        self.device = device or distributed.rank_device(params.device, self.world)
        _set_head_layout(model, tie_embeddings=params.tie_embeddings)
        self.model: GPTModel = model.to(self.device)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.on_log, self.progress = on_log, progress
        self.order = BatchOrder(
            train.lengths, params.batch_size, seed=params.seed, mode=params.batch_order
        )
        _check_run(params, len(train), len(self.order), self.total_steps)
        strategy.add_adapters(self.model, params.lora)
        self.fingerprint = fingerprint.of_run(inputs or {}, self.model.config.to_dict(), params)
        self.trainable_parameters = trainable_parameters(self.model)
        train_batches = Collator(train, params, pad_id=pad_id, device=self.device)
        self.strategy = strategy.for_world(self.world, self.device, params, train_batches)
        self.strategy.prepare(self.model)  # DDP wraps it; FSDP shards it in place
        self.last_grad_norm: float | None = None  # before clipping; only when clipping
        self.optimizer = _build_optimizer(self.model, params)
        self._update_hooks = backward_updates.register(
            self.optimizer, params, world_size=self.world.size, device=self.device
        )
        self.state = TrainState()
        self.checkpointer = checkpointing.Checkpointer(self.strategy, params, self.fingerprint)
        self.schedule = EvalSchedule(  # sharded forward passes need every rank
            params, self.order, train_batches,
            Collator(val, params, pad_id=pad_id, device=self.device),
            holds_batches=self.world.is_main or self.strategy.sharded,
        )  # fmt: skip

    @property
    def updates_in_backward(self) -> bool:
        """Whether each parameter is updated as soon as its gradient is complete."""
        return bool(self._update_hooks)

    @property
    def total_steps(self) -> int:
        """The optimizer steps this run makes: its epochs' batches, or ``max_steps``."""
        steps = self.params.epochs * len(self.order)
        return min(steps, self.params.max_steps) if self.params.max_steps else steps

    def evaluate(self) -> tuple[float, float]:
        """(train loss, val loss) as the reference's ``evaluate_model`` computes them."""
        if not (self.world.is_main or self.strategy.sharded):
            raise RuntimeError("under DDP only rank 0 evaluates (the others hold no batches)")
        return self.schedule.evaluate(self.model, cache=not self.strategy.sharded)

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        """Rank 0 writes; all ranks call it (FSDP gathers the shards first), then wait."""
        if self.checkpoint_dir is not None:
            self.checkpointer.save(
                self.checkpoint_dir, self.model, self.optimizer, self.order, vars(self.state)
            )

    def _scheduled_checkpoint(self) -> None:
        """An epoch end's or ``checkpoint_every``'s checkpoint, unless training is over: the
        finetune stage then exports the model and deletes the checkpoint at once."""
        if self.state.step < self.total_steps:
            self.save_checkpoint()

    def remove_checkpoint(self) -> None:
        """Drop the checkpoint once the finished model is saved: it would only fill the disk."""
        checkpointing.remove(self.checkpoint_dir)

    def load_checkpoint(self) -> bool:
        """Resume from the checkpoint if it was made from the same inputs; True if resumed.

        A checkpoint whose fingerprint differs from this run's (other data, base model,
        model config or learning params), or that is past this run's last step, is
        stale: one line says why, it is deleted and training starts from step 0.
        """
        saved = self.checkpointer.load(
            self.checkpoint_dir, self.model, self.optimizer, self.order, self.total_steps
        )
        if saved is not None:
            self.state = TrainState(**saved)
        return saved is not None

    # ---------------------------------------------------------------- the loop
    def train(self) -> TrainState:
        """Train to the end (or ``max_steps``); returns the final state with the loss log.

        Ctrl-C (SIGINT) is honoured between steps: the step in flight finishes, a
        checkpoint is written and ``KeyboardInterrupt`` is raised, so the run
        resumes exactly where it stopped. Checkpoints come every ``checkpoint_every``
        steps and at each epoch end, but not after the last step: the finetune stage
        then exports the model and deletes the checkpoint, which would have been
        written (4.3 GB for gpt2-medium) only to be deleted.
        """
        with deferred_sigint() as interrupted:
            return self._train(interrupted)

    def _train(self, interrupted: list[bool]) -> TrainState:
        """One optimizer step per batch; evaluation, checkpoints and Ctrl-C between steps."""
        p, s = self.params, self.state
        self.model.train()
        bar = progress_bar(
            self.total_steps, "finetune", "step",
            enabled=self.progress and self.world.is_main, initial=s.step,
        )  # fmt: skip
        started = time.perf_counter() - s.seconds
        for indices in self._batches():
            if s.step >= self.total_steps:
                break
            lr = self._set_lr()
            self.optimizer.zero_grad(set_to_none=True)
            loss, positions, counted = self._forward_backward(indices)
            # Distributed: whole-batch figures, and one decision for all ranks.
            loss, positions, stop = self.strategy.reduce_step(loss, positions, bool(interrupted))
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss} at step {s.step + 1} (epoch {s.epoch + 1}); "
                    "the last good checkpoint is kept"
                )
            self._update()
            s.batch_in_epoch += 1
            s.step += 1
            s.tokens_seen += positions
            s.target_tokens += counted
            s.seconds = time.perf_counter() - started
            bar.update(1)
            if self.schedule.due(s.step):
                self._evaluate_after_step(loss, lr, bar)
            if p.checkpoint_every and s.step % p.checkpoint_every == 0:
                self._scheduled_checkpoint()
            if self.world.size == 1:  # a Ctrl-C up to here counts; distributed: the agreed one
                stop = bool(interrupted)
            if stop:
                bar.close()
                self.save_checkpoint()
                where = self.checkpoint_dir or "nowhere (no checkpoint directory)"
                raise KeyboardInterrupt(f"interrupted after step {s.step}; checkpoint in {where}")
        bar.close()
        s.seconds = time.perf_counter() - started
        return s

    def _batches(self) -> Iterator[list[int]]:
        """The batches left to train on, epoch by epoch; a checkpoint at each epoch end."""
        p, s = self.params, self.state
        while s.epoch < p.epochs:
            if s.batch_in_epoch == 0:
                s.epoch_batches = self.order.epoch()
            while s.batch_in_epoch < len(s.epoch_batches):
                yield s.epoch_batches[s.batch_in_epoch]
            s.epoch += 1
            s.batch_in_epoch = 0
            self._scheduled_checkpoint()

    def _set_lr(self) -> float:
        """Set and return the learning rate of the coming step."""
        p = self.params
        lr = lr_at(
            self.state.step, base_lr=p.lr, warmup_steps=p.warmup_steps,
            total_steps=self.total_steps, schedule=p.lr_schedule, min_lr_ratio=p.min_lr_ratio,
        )  # fmt: skip
        apply_lr(self.optimizer, lr)
        return lr

    def _forward_backward(self, indices: list[int]) -> tuple[float, int, int]:
        """Gradients of the batch's mean loss (``strategy``); (loss, positions, counted)."""
        return self.strategy.forward_backward(self.model, indices)

    def _update(self) -> None:
        """Clip the gradients if asked, then step, unless each update ran in backward."""
        if self.params.grad_clip is not None:
            trainable = [q for q in self.model.parameters() if q.requires_grad]
            self.last_grad_norm = float(
                torch.nn.utils.clip_grad_norm_(trainable, self.params.grad_clip)
            )
        if not self.updates_in_backward:
            self.optimizer.step()

    def _evaluate_after_step(self, batch_loss: float, lr: float, bar: tqdm) -> None:
        """Rank 0 evaluates and logs a row; the other ranks do their part of the evaluation."""
        if not self.world.is_main:
            if self.strategy.sharded:
                self.evaluate()  # its sharded forward passes need this rank too
            else:
                self.schedule.draw_train_indices()
            return
        train_loss, val_loss = self.evaluate()
        row = self.state.log_row(
            len(self.order), train_loss=train_loss, val_loss=val_loss, batch_loss=batch_loss,
            lr=lr, grad_norm=self.last_grad_norm,
        )  # fmt: skip
        self.state.log.append(row)
        if self.on_log is not None:
            self.on_log(row)
        bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}", refresh=False)

    # ------------------------------------------------------------ after training
    def release_distributed(self) -> None:
        """Leave the distributed engine while the process group still exists; all ranks call it.

        DDP drops its wrapper; FSDP gathers the weights, and rank 0 then holds a plain
        model to export and evaluate, the others none (``strategy``).
        """
        model = self.strategy.release(self.model)
        if model is not self.model:  # FSDP's: the optimizer was over the shards
            self.model, self.optimizer = model, None  # type: ignore[assignment]
        gc.collect()

    def finish(self) -> None:
        """Free what only training needs, once training is over; all ranks call it.

        Leaves the distributed engine (``release_distributed``) and drops the gradients
        and AdamW's moments: 3/4 of full fine-tuning's memory (12 of 16 bytes per
        parameter), so export and the final evaluation run beside the weights alone.
        The trainer can still evaluate and export, not train.
        """
        for hook in self._update_hooks:
            hook.remove()
        self._update_hooks = []
        self.model.zero_grad(set_to_none=True)
        self.optimizer = None  # type: ignore[assignment]
        self.release_distributed()  # which collects what is left

    def export_model(self) -> GPTModel:
        """The trained model with any LoRA adapters merged: a plain GPT-2 again."""
        if has_lora(self.model):
            merge_lora(self.model)
        return self.model
