"""The fine-tuning loop: the reference recipe, made fast and resumable.

By default this is Raschka's ``train_model_simple`` step for step: AdamW, the
same shuffled batches, loss evaluated every ``eval_every`` steps on
``eval_batches`` train and validation batches (mean of batch means), tokens
seen counted with padding. Speed comes from work that does not change what is
learned: the vocabulary projection only where targets count, fused AdamW,
validation batches collated once, inference mode for evaluation.

Given a ``World`` of several processes (under torchrun, see ``distributed``),
each rank trains on its share of every batch, through DistributedDataParallel
(rank 0 alone evaluates) or with the model sharded by FSDP (every rank takes part
in evaluation); rank 0 alone logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.serialization import config as torch_serialization_config
from tqdm import tqdm

from gpt2_instruct import distributed, fingerprint
from gpt2_instruct.batching import BatchOrder, TokenizedSplit, collate
from gpt2_instruct.distributed import World
from gpt2_instruct.io import atomic_path
from gpt2_instruct.lora import apply_lora, has_lora, merge_lora, trainable_parameters
from gpt2_instruct.model import IGNORE_INDEX, GPTModel
from gpt2_instruct.optim import allocate_moments, apply_lr, build_optimizer, lr_at
from gpt2_instruct.params import FinetuneParams, ParamsError

CHECKPOINT_NAME = "last.pt"


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


@contextlib.contextmanager
def _deferred_sigint() -> Iterator[list[bool]]:
    """Turn SIGINT into a flag checked between steps (main thread only; elsewhere a no-op)."""
    flag: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, lambda *_: flag.append(True))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def autocast(
    device: torch.device, precision: str, *, cache: bool = True
) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast when asked; fp32 runs exactly as written.

    ``cache``: keep one bf16 cast of each weight for the whole region (autocast's
    default) instead of casting it again at every use.
    """
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


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
        if params.batch_size % self.world.size:
            raise ParamsError(
                f"finetune.batch_size ({params.batch_size}) must be divisible by the number of "
                f"processes ({self.world.size}): each rank trains on an equal share of a batch"
            )
        if self.world.size > 1 and not torch.distributed.is_initialized():
            raise RuntimeError(
                f"a world of {self.world.size} processes needs torch.distributed initialised "
                "(run under torchrun inside distributed.process_group)"
            )
        self.device = device or distributed.rank_device(params.device, self.world)
        _set_head_layout(model, tie_embeddings=params.tie_embeddings)
        self.model = model.to(self.device)
        self.train_split, self.val_split = train, val
        self.pad_id = pad_id
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.on_log = on_log
        self.progress = progress
        self.order = BatchOrder(
            train.lengths, params.batch_size, seed=params.seed, mode=params.batch_order
        )
        if len(self.order) == 0:
            raise ParamsError(
                f"finetune.batch_size ({params.batch_size}) is larger than the training split "
                f"({len(train)} examples): no full batch to train on"
            )
        if params.warmup_steps > self.total_steps:  # max_steps: null; known only now
            raise ParamsError(
                f"finetune.warmup_steps ({params.warmup_steps}) exceeds the run's "
                f"{self.total_steps} steps ({params.epochs} epochs of {len(self.order)} batches)"
            )
        self._add_adapters(self.model)
        self.fingerprint = {
            "inputs": dict(inputs or {}),
            "model": self.model.config.to_dict(),
            "params": fingerprint.learning_params(params),
        }
        self.trainable_parameters = trainable_parameters(self.model)
        # DDP: a wrapper all ranks train through, self.model stays the plain model.
        # FSDP: self.model itself is sharded in place (its parameters become DTensors).
        parallel = self.world.size > 1
        self.sharded = parallel and params.distributed.strategy == "fsdp"
        self.ddp = (
            distributed.wrap_ddp(self.model, self.device) if parallel and not self.sharded else None
        )
        if self.sharded:
            distributed.shard_fsdp(self.model, self.device, self.world)
        self.last_grad_norm: float | None = None  # before clipping; only when clipping
        self.optimizer = build_optimizer(
            self.model,
            lr=params.lr,
            weight_decay=params.weight_decay,
            decay_norms_and_biases=params.decay_norms_and_biases,
            fused=params.fused_optimizer or None,
        )
        self._update_hooks = self._apply_updates_in_backward()
        self.state = TrainState()
        # Under DDP only rank 0 evaluates: the others keep no evaluation batches on their
        # device. Sharded forward passes need every rank.
        main = self.world.is_main or self.sharded
        self._val_batches = self._collate_many(self._val_eval_indices(), val) if main else []
        self._fixed_train_batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if params.eval_train == "fixed" and main:
            fixed = BatchOrder(train.lengths, params.batch_size, seed=params.seed + 1)
            self._fixed_train_batches = self._collate_many(
                fixed.sample_batches(params.eval_batches), train
            )

    # ---------------------------------------------------------------- optimizer
    @property
    def updates_in_backward(self) -> bool:
        """Whether each parameter is updated as soon as its gradient is complete."""
        return bool(self._update_hooks)

    def _apply_updates_in_backward(self) -> list[Any]:
        """Hooks that apply AdamW to each parameter during the backward pass.

        A parameter's gradient is complete once backward has accumulated it (the tied
        embedding's two contributions included); AdamW's update of one parameter reads
        only its own gradient and moments, so it is applied there and the gradient freed
        at once: the same update as one step after backward, without ever holding all
        the gradients (4 bytes a parameter, 1.4 GB for gpt2-medium). Only where nothing
        needs every gradient first: gradient clipping, micro-batches and data-parallel
        gradient averaging keep the step after backward.
        """
        p = self.params
        micro = self._micro_batch_size(p.batch_size) is not None
        if not p.optimizer_in_backward or p.grad_clip is not None or micro or self.world.size > 1:
            return []
        # By index: loading a checkpoint's state replaces the optimizer's group dicts.
        group_of = {q: i for i, g in enumerate(self.optimizer.param_groups) for q in g["params"]}
        allocate_moments(self.optimizer)  # before the activations: a smaller heap

        def update(param: torch.Tensor) -> None:
            group = self.optimizer.param_groups[group_of[param]]
            everyone, group["params"] = group["params"], [param]
            try:
                self.optimizer.step()  # steps the parameters with a gradient: this one
            finally:
                group["params"] = everyone
            param.grad = None

        return [q.register_post_accumulate_grad_hook(update) for q in group_of]

    # ----------------------------------------------------------------- batches
    def _val_eval_indices(self) -> list[list[int]]:
        """The first ``eval_batches`` validation batches in file order (the last may be short)."""
        n, size = len(self.val_split), self.params.batch_size
        count = min(self.params.eval_batches, math.ceil(n / size))
        return [list(range(i * size, min((i + 1) * size, n))) for i in range(count)]

    def _collate(
        self, indices: list[int], split: TokenizedSplit
    ) -> tuple[torch.Tensor, torch.Tensor]:
        examples = [split[i] for i in indices]
        prompt_lengths = (
            [int(split.prompt_lengths[i]) for i in indices] if self.params.mask_prompt else None
        )
        inputs, targets = collate(
            examples,
            pad_id=self.pad_id,
            max_length=self.params.max_length,
            prompt_lengths=prompt_lengths,
        )
        return inputs.to(self.device), targets.to(self.device)

    def _collate_many(
        self, batches: list[list[int]], split: TokenizedSplit
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self._collate(b, split) for b in batches]

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def _mean_losses(self, *splits: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, ...]:
        """The mean batch loss of each list of batches (NaN for an empty one).

        ``no_grad``, not ``inference_mode``: autocast keeps its bf16 cast of a weight
        for the rest of the region only outside inference mode. Under inference mode
        it cast every weight again for every batch (20% of a bf16 evaluation's
        samples); here each weight is cast once per evaluation, the same values
        (gpt2-medium, 10 batches: 5.5-6.0 -> 4.8 s, identical losses). Sharded
        (FSDP) runs keep no casts: holding every gathered weight's would undo the
        sharding.
        """
        self.model.eval()
        with autocast(self.device, self.params.precision, cache=not self.sharded):
            losses = [[self.model.loss(x, y).item() for x, y in batches] for batches in splits]
        self.model.train()
        return tuple(sum(ls) / len(ls) if ls else float("nan") for ls in losses)

    def _draw_eval_train_indices(self) -> list[list[int]] | None:
        """The random draws one evaluation makes on the batch order (None: fixed batches).

        Every rank makes them, evaluating or not, so all ranks' shuffles stay in step.
        """
        if self.params.eval_train == "fixed":
            return None
        indices = self.order.sample_batches(self.params.eval_batches)
        self.order.skip_unshuffled_iterator()  # the reference's pass over its val loader
        return indices

    def evaluate(self) -> tuple[float, float]:
        """(train loss, val loss) as the reference's ``evaluate_model`` computes them."""
        if not (self.world.is_main or self.sharded):
            raise RuntimeError("under DDP only rank 0 evaluates (the others hold no batches)")
        indices = self._draw_eval_train_indices()
        if indices is None:
            assert self._fixed_train_batches is not None
            train_batches = self._fixed_train_batches
        else:  # fresh shuffled batches, drawn from the training order's generator
            train_batches = self._collate_many(indices, self.train_split)
        train_loss, val_loss = self._mean_losses(train_batches, self._val_batches)
        return train_loss, val_loss

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        """Rank 0 writes; all ranks call it (FSDP gathers the shards first), then wait.

        The layout is the single-process one whatever the strategy, so a checkpoint
        resumes under any strategy and world size.
        """
        if self.checkpoint_dir is None:
            return
        if self.sharded:
            model_state = distributed.full_model_state(self.model)
            optimizer_state = distributed.full_optimizer_state(self.model, self.optimizer)
        elif self.world.is_main:
            model_state, optimizer_state = self.model.state_dict(), self.optimizer.state_dict()
        if self.world.is_main:
            state = {
                "model": model_state,
                "optimizer": optimizer_state,
                "order_rng": self.order.state(),
                "torch_rng": torch.get_rng_state(),
                "train_state": vars(self.state),
                "params": dataclasses.asdict(self.params),
                "fingerprint": self.fingerprint,
            }
            if self.device.type == "cuda":  # dropout draws there
                state["cuda_rng"] = torch.cuda.get_rng_state_all()
            # Without the zip's CRC-32s: torch.load never checks them, and computing them
            # (on one thread) made gpt2-medium's 4.3 GB take 11-17 s instead of 6.
            with (
                atomic_path(self.checkpoint_dir / CHECKPOINT_NAME) as tmp,
                torch_serialization_config.patch({"save.compute_crc32": False}),
            ):
                torch.save(state, tmp)
        if self.world.size > 1:
            distributed.barrier(self.device)

    def _scheduled_checkpoint(self) -> None:
        """An epoch end's or ``checkpoint_every``'s checkpoint, unless training is over: the
        finetune stage then exports the model and deletes the checkpoint at once."""
        if self.state.step < self.total_steps:
            self.save_checkpoint()

    def remove_checkpoint(self) -> None:
        """Drop the checkpoint once the finished model is saved: it would only fill the disk."""
        if self.checkpoint_dir is not None:
            (self.checkpoint_dir / CHECKPOINT_NAME).unlink(missing_ok=True)

    def load_checkpoint(self) -> bool:
        """Resume from the checkpoint if it was made from the same inputs; True if resumed.

        A checkpoint whose fingerprint differs from this run's (other data, base model,
        model config or learning params), or that is past this run's last step, is
        stale: one line says why, it is deleted and training starts from step 0.

        Every rank reads the file; under DDP they must all find the same step (a
        checkpoint directory that not every node shares would split the job).
        """
        resumed = self._load_checkpoint()
        if self.world.size > 1 and not distributed.all_equal(
            self.state.step if resumed else -1, self.device
        ):
            raise RuntimeError(
                f"ranks disagree on the checkpoint in {self.checkpoint_dir} (rank {self.world.rank}"
                f" {'resumed at step ' + str(self.state.step) if resumed else 'found none'}); "
                "the checkpoint directory must be shared by every node"
            )
        return resumed

    def _load_checkpoint(self) -> bool:
        if self.checkpoint_dir is None:
            return False
        path = self.checkpoint_dir / CHECKPOINT_NAME
        if not path.is_file():
            return False
        # Sharded: every rank maps the full file and keeps its own shards of it.
        device = "cpu" if self.sharded else self.device
        state = torch.load(path, map_location=device, weights_only=True, mmap=self.sharded)
        stale = self._stale_because(state)
        if stale:
            if self.world.is_main:
                print(f"{path}: {stale}; deleting it and starting from step 0", flush=True)
            del state
            if self.world.size > 1:  # every rank has read it before it goes
                distributed.barrier(self.device)
            if self.world.is_main:
                path.unlink(missing_ok=True)
            return False
        if self.sharded:
            distributed.load_full_state(
                self.model, self.optimizer, state["model"], state["optimizer"]
            )
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.order.restore(state["order_rng"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.state = TrainState(**state["train_state"])
        return True

    def _stale_because(self, state: dict[str, Any]) -> str:
        """Why a loaded checkpoint cannot be resumed by this run ("" if it can)."""
        saved = state.get("fingerprint")
        if not isinstance(saved, dict):
            return "made without an input fingerprint (an older version)"
        changed = fingerprint.changes(saved, self.fingerprint)
        if changed:
            return f"made from other inputs (changed: {', '.join(changed)})"
        step = int(state["train_state"]["step"])
        if step > self.total_steps:
            return f"at step {step}, past this run's last step {self.total_steps}"
        return ""

    # ---------------------------------------------------------------- the loop
    def _batches(self) -> Iterator[list[int]]:
        p, s = self.params, self.state
        while s.epoch < p.epochs:
            if s.batch_in_epoch == 0:
                s.epoch_batches = self.order.epoch()
            while s.batch_in_epoch < len(s.epoch_batches):
                yield s.epoch_batches[s.batch_in_epoch]
            s.epoch += 1
            s.batch_in_epoch = 0
            self._scheduled_checkpoint()

    @property
    def total_steps(self) -> int:
        steps = self.params.epochs * len(self.order)
        return min(steps, self.params.max_steps) if self.params.max_steps else steps

    def train(self) -> TrainState:
        """Train to the end (or ``max_steps``); returns the final state with the loss log.

        Ctrl-C (SIGINT) is honoured between steps: the step in flight finishes, a
        checkpoint is written and ``KeyboardInterrupt`` is raised, so the run
        resumes exactly where it stopped. Checkpoints come every ``checkpoint_every``
        steps and at each epoch end, but not after the last step: the finetune stage
        then exports the model and deletes the checkpoint, which would have been
        written (4.3 GB for gpt2-medium) only to be deleted.
        """
        with _deferred_sigint() as interrupted:
            return self._train(interrupted)

    def _train(self, interrupted: list[bool]) -> TrainState:
        p, s = self.params, self.state
        self.model.train()
        bar = tqdm(
            total=self.total_steps,
            initial=s.step,
            disable=not (self.progress and self.world.is_main),
            desc="finetune",
        )
        started = time.perf_counter() - s.seconds
        for indices in self._batches():
            if s.step >= self.total_steps:
                break
            lr = lr_at(
                s.step, base_lr=p.lr, warmup_steps=p.warmup_steps,
                total_steps=self.total_steps, schedule=p.lr_schedule,
                min_lr_ratio=p.min_lr_ratio,
            )  # fmt: skip
            apply_lr(self.optimizer, lr)
            self.optimizer.zero_grad(set_to_none=True)
            loss, positions, counted = self._forward_backward(indices)
            stop = bool(interrupted)
            if self.world.size > 1:  # whole-batch figures, and one decision for all ranks
                loss, positions, stop = self._reduce_step(loss, positions, stop)
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss} at step {s.step + 1} (epoch {s.epoch + 1}); "
                    "the last good checkpoint is kept"
                )
            if p.grad_clip is not None:
                self.last_grad_norm = float(
                    torch.nn.utils.clip_grad_norm_(self._trainable, p.grad_clip)
                )
            if not self.updates_in_backward:
                self.optimizer.step()
            s.batch_in_epoch += 1
            s.step += 1
            s.tokens_seen += positions
            s.target_tokens += counted
            s.seconds = time.perf_counter() - started
            bar.update(1)
            if (s.step - 1) % p.eval_every == 0:  # the reference evaluates at steps 0, 5, ...
                if self.world.is_main:
                    self._log(loss, lr)
                    bar.set_postfix(
                        train=f"{s.log[-1]['train_loss']:.3f}", val=f"{s.log[-1]['val_loss']:.3f}"
                    )
                elif self.sharded:
                    self.evaluate()  # its sharded forward passes need this rank too
                else:
                    self._draw_eval_train_indices()
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

    def _forward_backward(self, indices: list[int]) -> tuple[float, int, int]:
        """Gradients of the batch's mean loss; (loss, input positions, counted targets).

        Without micro-batches this is the reference's step. With them, each
        micro-batch is padded on its own and its summed loss is divided by the
        whole batch's target count, so the gradient is the full batch's.
        """
        p = self.params
        if self.world.size > 1:
            return self._forward_backward_parallel(indices)
        size = self._micro_batch_size(len(indices))
        if size is None:
            inputs, targets = self._collate(indices, self.train_split)
            with autocast(self.device, p.precision):
                loss = self.model.loss(inputs, targets)
            loss.backward()
            return loss.item(), inputs.numel(), int((targets != IGNORE_INDEX).sum())
        micro = self._micro_batches(indices, size)
        counted = sum(int((y != IGNORE_INDEX).sum()) for _, y in micro)
        total = 0.0
        for inputs, targets in micro:
            with autocast(self.device, p.precision):
                loss = self.model.loss(inputs, targets, reduction="sum") / counted
            loss.backward()
            total += loss.item()
        return total, sum(x.numel() for x, _ in micro), counted

    def _micro_batch_size(self, examples: int) -> int | None:
        """The micro-batch size a batch of ``examples`` is split by; None: it runs whole."""
        size = self.params.micro_batch_size
        return size if size is not None and size < examples else None

    def _micro_batches(
        self, indices: list[int], size: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive micro-batches of ``size`` examples, each padded on its own."""
        return self._collate_many(
            [indices[i : i + size] for i in range(0, len(indices), size)], self.train_split
        )

    def _forward_backward_parallel(self, indices: list[int]) -> tuple[float, int, int]:
        """This rank's share of the batch; (local loss, local positions, global count).

        Each rank's loss is its summed token losses over the whole batch's target
        count, times the world size: DDP and FSDP average the ranks' gradients, which
        then sum to the gradient of the whole batch's mean loss. Gradients are
        exchanged once per step, at the last micro-batch.
        """
        p, world = self.params, self.world
        share = len(indices) // world.size
        mine = indices[world.rank * share : (world.rank + 1) * share]
        micro = self._micro_batches(mine, min(p.micro_batch_size or share, share))
        local = sum(int((y != IGNORE_INDEX).sum()) for _, y in micro)
        counted = int(distributed.all_reduce_sum([local], self.device)[0])
        total = 0.0
        loss_of = self.ddp if self.ddp is not None else self.model.loss
        for i, (inputs, targets) in enumerate(micro):
            with self._gradient_sync(i == len(micro) - 1):
                with autocast(self.device, p.precision):
                    loss = loss_of(inputs, targets, reduction="sum") / counted * world.size
                loss.backward()
            total += loss.item()
        return total, sum(x.numel() for x, _ in micro), counted

    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Exchange gradients in this backward pass only if ``sync`` (the last micro-batch)."""
        if self.ddp is not None:
            return contextlib.nullcontext() if sync else self.ddp.no_sync()
        self.model.set_requires_gradient_sync(sync)  # type: ignore[operator]  # FSDP's
        return contextlib.nullcontext()

    def _reduce_step(self, loss: float, positions: int, stop: bool) -> tuple[float, int, bool]:
        """The whole batch's loss and positions, and whether any rank was interrupted."""
        total, positions_sum, stops = distributed.all_reduce_sum(
            [loss / self.world.size, positions, float(stop)], self.device
        )
        return total, int(positions_sum), stops > 0

    def release_distributed(self) -> None:
        """Leave the distributed engine while the process group still exists; all ranks call it.

        DDP: drop the wrapper. Its reducer holds the group; freed later (when the trainer
        goes), the group's destructor would run outside the process-group context and can
        deadlock. FSDP: gather the weights; rank 0 then holds a plain model to export and
        evaluate, the others hold none.
        """
        if self.sharded:
            state = distributed.full_model_state(self.model)
            self.sharded = False
            self.model = self._plain_model(state) if self.world.is_main else None  # type: ignore[assignment]
            self.optimizer = None  # type: ignore[assignment]  # over the sharded parameters
        if self.ddp is not None:
            self.ddp = None
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

    def _plain_model(self, state: dict[str, torch.Tensor]) -> GPTModel:
        """An unsharded model (with this run's adapters, if any) holding ``state``."""
        with torch.device("meta"):
            model = GPTModel(self.model.config)  # untied too, if this run unties
        self._add_adapters(model)
        model.load_state_dict(state, assign=True)
        return model.to(self.device).train()

    def _add_adapters(self, model: GPTModel) -> None:
        """This run's LoRA adapters on ``model``; none when ``lora.rank`` is 0."""
        lora = self.params.lora
        if lora.rank:
            apply_lora(
                model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                targets=lora.targets,
            )  # fmt: skip

    @property
    def _trainable(self) -> list[torch.nn.Parameter]:
        return [q for q in self.model.parameters() if q.requires_grad]

    def export_model(self) -> GPTModel:
        """The trained model with any LoRA adapters merged: a plain GPT-2 again."""
        if has_lora(self.model):
            merge_lora(self.model)
        return self.model

    def _log(self, batch_loss: float, lr: float) -> None:
        s = self.state
        train_loss, val_loss = self.evaluate()
        row = {
            "step": s.step,
            "epoch": s.epoch + s.batch_in_epoch / len(self.order),
            "tokens_seen": s.tokens_seen,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "batch_loss": batch_loss,
            "lr": lr,
            "grad_norm": self.last_grad_norm,
            "seconds": s.seconds,
        }
        s.log.append(row)
        if self.on_log is not None:
            self.on_log(row)
