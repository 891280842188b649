"""When the loss is evaluated and on which batches: the reference's ``evaluate_model``.

The reference evaluates after optimizer steps 1, 1 + ``eval_every``, ... (its step
counter starts at 0), on the mean of ``eval_batches`` batch means of each split. Its
train batches come from a fresh pass over its shuffled train loader, which draws from
the global RNG that also shuffles training (``BatchOrder`` replays it); the pass over
its unshuffled validation loader draws once more. Replaying both draws keeps every
later epoch's shuffle the reference's. ``eval_train: fixed`` evaluates the same train
batches every time instead (drawn once from a generator of their own, so the training
order does not depend on how often the loss is evaluated).
"""

from __future__ import annotations

import math

import torch

from gpt2_instruct.batching import BatchOrder
from gpt2_instruct.model import GPTModel
from gpt2_instruct.params import FinetuneParams
from gpt2_instruct.train_batches import Batch, Collator, autocast


def val_eval_indices(examples: int, batch_size: int, eval_batches: int) -> list[list[int]]:
    """The first ``eval_batches`` validation batches in file order (the last may be short)."""
    count = min(eval_batches, math.ceil(examples / batch_size))
    return [list(range(i * batch_size, min((i + 1) * batch_size, examples))) for i in range(count)]


@torch.no_grad()
def mean_losses(
    model: GPTModel, *splits: list[Batch], device: torch.device, precision: str, cache: bool
) -> tuple[float, ...]:
    """The mean batch loss of each list of batches (NaN for an empty one).

    ``no_grad``, not ``inference_mode``: autocast keeps its bf16 cast of a weight
    for the rest of the region only outside inference mode. Under inference mode
    it cast every weight again for every batch (20% of a bf16 evaluation's
    samples); here each weight is cast once per evaluation, the same values
    (gpt2-medium, 10 batches: 5.5-6.0 -> 4.8 s, identical losses). Sharded
    (FSDP) runs keep no casts (``cache=False``): holding every gathered weight's
    would undo the sharding.
    """
    model.eval()
    with autocast(device, precision, cache=cache):
        losses = [[model.loss(x, y).item() for x, y in batches] for batches in splits]
    model.train()
    return tuple(sum(ls) / len(ls) if ls else float("nan") for ls in losses)


class EvalSchedule:
    """Which batches each evaluation reads, drawn as the reference draws them.

    ``holds_batches``: whether this rank evaluates. Under DDP only rank 0 does, and
    the others keep no evaluation batches on their device; they still make the draws
    (``draw_train_indices``) so that every rank's shuffle stays in step.
    """

    def __init__(
        self,
        params: FinetuneParams,
        order: BatchOrder,
        train: Collator,
        val: Collator,
        *,
        holds_batches: bool,
    ) -> None:
        self.params = params
        self.order = order
        self.train = train
        indices = val_eval_indices(len(val.split), params.batch_size, params.eval_batches)
        self.val_batches: list[Batch] = val.many(indices) if holds_batches else []
        self.fixed_train_batches: list[Batch] | None = None
        if params.eval_train == "fixed" and holds_batches:
            fixed = BatchOrder(train.split.lengths, params.batch_size, seed=params.seed + 1)
            self.fixed_train_batches = train.many(fixed.sample_batches(params.eval_batches))

    def due(self, step: int) -> bool:
        """Whether the loss is evaluated after optimizer step ``step`` (1-based)."""
        return (step - 1) % self.params.eval_every == 0  # the reference's steps 0, 5, ...

    def draw_train_indices(self) -> list[list[int]] | None:
        """The random draws one evaluation makes on the batch order (None: fixed batches).

        Every rank makes them, evaluating or not, so all ranks' shuffles stay in step.
        """
        if self.params.eval_train == "fixed":
            return None
        indices = self.order.sample_batches(self.params.eval_batches)
        self.order.skip_unshuffled_iterator()  # the reference's pass over its val loader
        return indices

    def evaluate(self, model: GPTModel, *, cache: bool) -> tuple[float, float]:
        """(train loss, val loss) as the reference's ``evaluate_model`` computes them."""
        indices = self.draw_train_indices()
        if indices is None:
            assert self.fixed_train_batches is not None
            train_batches = self.fixed_train_batches
        else:  # fresh shuffled batches, drawn from the training order's generator
            train_batches = self.train.many(indices)
        train_loss, val_loss = mean_losses(
            model, train_batches, self.val_batches,
            device=self.train.device, precision=self.params.precision, cache=cache,
        )  # fmt: skip
        return train_loss, val_loss
