"""How the processes share a training step: one process, DDP replicas or FSDP shards.

Every strategy presents the same small interface to the trainer: ``prepare`` the model,
``forward_backward`` a batch, ``reduce_step`` the step's figures over the ranks, the
``full_state`` a checkpoint holds and ``load_full_state`` from one (always the
single-process layout), ``barrier`` and ``all_equal`` between ranks, and ``release``
the distributed engine once training is over. ``for_world`` picks one.

Data-parallel strategies train each rank on its share of every batch. Each rank's loss
is its summed token losses over the whole batch's target count, times the world size:
DDP and FSDP average the ranks' gradients, which then sum to the gradient of the whole
batch's mean loss. Gradients are exchanged once per step, at the last micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from gpt2_instruct import distributed
from gpt2_instruct.distributed import World
from gpt2_instruct.lora import apply_lora
from gpt2_instruct.model import GPTModel
from gpt2_instruct.params import FinetuneParams, LoRAParams
from gpt2_instruct.train_batches import Collator, autocast, counted_targets, micro_batch_size

StepFigures = tuple[float, int, int]  # (loss, input positions, counted targets)


def add_adapters(model: GPTModel, lora: LoRAParams) -> None:
    """This run's LoRA adapters on ``model``; none when ``lora.rank`` is 0."""
    if lora.rank:
        apply_lora(
            model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets
        )


class SingleProcess:
    """One process: the reference's step, or micro-batches summed into the batch's gradient."""

    sharded = False  # whether the model's parameters are shards (FSDP)

    def __init__(
        self, world: World, device: torch.device, params: FinetuneParams, batches: Collator
    ) -> None:
        self.world, self.device, self.params, self.batches = world, device, params, batches

    def prepare(self, model: GPTModel) -> None:
        """Ready ``model`` (adapters added, before the optimizer) for this strategy."""

    def forward_backward(self, model: GPTModel, indices: list[int]) -> StepFigures:
        """Gradients of the batch's mean loss; (loss, input positions, counted targets).

        Without micro-batches this is the reference's step. With them, each
        micro-batch is padded on its own and its summed loss is divided by the
        whole batch's target count, so the gradient is the full batch's.
        """
        precision = self.params.precision
        size = micro_batch_size(self.params.micro_batch_size, len(indices))
        if size is None:
            inputs, targets = self.batches(indices)
            with autocast(self.device, precision):
                loss = model.loss(inputs, targets)
            loss.backward()
            return loss.item(), inputs.numel(), counted_targets(targets)
        micro = self.batches.micro_batches(indices, size)
        counted = sum(counted_targets(y) for _, y in micro)
        total = 0.0
        for inputs, targets in micro:
            with autocast(self.device, precision):
                loss = model.loss(inputs, targets, reduction="sum") / counted
            loss.backward()
            total += loss.item()
        return total, sum(x.numel() for x, _ in micro), counted

    def reduce_step(self, loss: float, positions: int, stop: bool) -> tuple[float, int, bool]:
        """The whole batch's loss and positions, and whether any rank was interrupted."""
        return loss, positions, stop

    @property
    def load_location(self) -> torch.device | str:
        """Where a checkpoint's tensors are loaded to."""
        return self.device

    def full_state(
        self, model: GPTModel, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model state, optimizer state) in the single-process layout; empty off rank 0."""
        if not self.world.is_main:
            return {}, {}
        return model.state_dict(), optimizer.state_dict()

    def load_full_state(
        self,
        model: GPTModel,
        optimizer: torch.optim.Optimizer,
        model_state: dict[str, torch.Tensor],
        optimizer_state: dict[str, Any],
    ) -> None:
        """Load a checkpoint's (single-process layout) state into the model and optimizer."""
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)

    def barrier(self) -> None:
        """Wait for every rank."""

    def all_equal(self, value: int) -> bool:
        """Whether every rank passed the same integer."""
        return True

    def release(self, model: GPTModel | None) -> GPTModel | None:
        """Leave the distributed engine; the model to keep (None on ranks that keep none)."""
        return model


class _DataParallel(SingleProcess):
    """Each rank trains its share of the batch; the ranks' gradients are averaged."""

    def forward_backward(self, model: GPTModel, indices: list[int]) -> StepFigures:
        """This rank's share of the batch; (local loss, local positions, global count)."""
        precision, world = self.params.precision, self.world
        share = len(indices) // world.size
        mine = indices[world.rank * share : (world.rank + 1) * share]
        micro = self.batches.micro_batches(mine, min(self.params.micro_batch_size or share, share))
        local = sum(counted_targets(y) for _, y in micro)
        counted = int(distributed.all_reduce_sum([local], self.device)[0])
        total = 0.0
        loss_of = self._loss_of(model)
        for i, (inputs, targets) in enumerate(micro):
            with self._gradient_sync(model, i == len(micro) - 1):
                with autocast(self.device, precision):
                    loss = loss_of(inputs, targets, reduction="sum") / counted * world.size
                loss.backward()
            total += loss.item()
        return total, sum(x.numel() for x, _ in micro), counted

    def _loss_of(self, model: GPTModel) -> Callable[..., torch.Tensor]:
        """What computes a micro-batch's loss (DDP's wrapper: its forward arms the sync)."""
        raise NotImplementedError

    def _gradient_sync(self, model: GPTModel, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Exchange gradients in this backward pass only if ``sync`` (the last micro-batch)."""
        raise NotImplementedError

    def reduce_step(self, loss: float, positions: int, stop: bool) -> tuple[float, int, bool]:
        total, positions_sum, stops = distributed.all_reduce_sum(
            [loss / self.world.size, positions, float(stop)], self.device
        )
        return total, int(positions_sum), stops > 0

    def barrier(self) -> None:
        distributed.barrier(self.device)

    def all_equal(self, value: int) -> bool:
        return distributed.all_equal(value, self.device)


class DDP(_DataParallel):
    """A replica per rank, trained through a DistributedDataParallel wrapper; rank 0 evaluates."""

    ddp: DistributedDataParallel | None = None

    def prepare(self, model: GPTModel) -> None:
        """Wrap the model; construction broadcasts rank 0's weights to every rank."""
        self.ddp = distributed.wrap_ddp(model, self.device)

    def _loss_of(self, model: GPTModel) -> Callable[..., torch.Tensor]:
        assert self.ddp is not None, "released"
        return self.ddp

    def _gradient_sync(self, model: GPTModel, sync: bool) -> contextlib.AbstractContextManager[Any]:
        assert self.ddp is not None, "released"
        return contextlib.nullcontext() if sync else self.ddp.no_sync()

    def release(self, model: GPTModel | None) -> GPTModel | None:
        """Drop the wrapper. Its reducer holds the process group; freed later (when the
        trainer goes), the group's destructor would run outside the process-group context
        and can deadlock."""
        self.ddp = None
        return model


class FSDP(_DataParallel):
    """The model sharded in place over the ranks (its parameters become DTensors).

    Forward passes are collective, so every rank takes part in evaluation.
    """

    sharded = True

    def prepare(self, model: GPTModel) -> None:
        distributed.shard_fsdp(model, self.device, self.world)

    def _loss_of(self, model: GPTModel) -> Callable[..., torch.Tensor]:
        return model.loss

    def _gradient_sync(self, model: GPTModel, sync: bool) -> contextlib.AbstractContextManager[Any]:
        model.set_requires_gradient_sync(sync)  # type: ignore[operator]  # FSDP's
        return contextlib.nullcontext()

    @property
    def load_location(self) -> torch.device | str:
        """CPU: every rank maps the full file and keeps its own shards of it."""
        return "cpu"

    def full_state(
        self, model: GPTModel, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Gathered on rank 0 ({} on the others); every rank must call it."""
        return (
            distributed.full_model_state(model),
            distributed.full_optimizer_state(model, optimizer),
        )

    def load_full_state(
        self,
        model: GPTModel,
        optimizer: torch.optim.Optimizer,
        model_state: dict[str, torch.Tensor],
        optimizer_state: dict[str, Any],
    ) -> None:
        distributed.load_full_state(model, optimizer, model_state, optimizer_state)

    def release(self, model: GPTModel | None) -> GPTModel | None:
        """Gather the weights (all ranks); rank 0 then holds a plain model to export and
        evaluate, the others hold none. Once released, nothing is sharded any more."""
        if not self.sharded or model is None:
            return model
        state = distributed.full_model_state(model)
        self.sharded = False
        return self._plain_model(model, state) if self.world.is_main else None

    def _plain_model(self, sharded: GPTModel, state: dict[str, torch.Tensor]) -> GPTModel:
        """An unsharded model (with this run's adapters, if any) holding ``state``."""
        with torch.device("meta"):
            model = GPTModel(sharded.config)  # untied too, if this run unties
        add_adapters(model, self.params.lora)
        model.load_state_dict(state, assign=True)
        return model.to(self.device).train()


def for_world(
    world: World, device: torch.device, params: FinetuneParams, batches: Collator
) -> SingleProcess:
    """The strategy ``finetune.distributed.strategy`` asks for; one process needs none."""
    if world.size == 1:
        return SingleProcess(world, device, params, batches)
    if params.distributed.strategy == "fsdp":
        return FSDP(world, device, params, batches)
    return DDP(world, device, params, batches)
