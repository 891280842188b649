"""AdamW applied to each parameter inside the backward pass, as soon as its gradient is complete.

A parameter's gradient is complete once backward has accumulated it (the tied
embedding's two contributions included); AdamW's update of one parameter reads only its
own gradient and moments, so it is applied there and the gradient freed at once: the
same update as one step after backward, without ever holding all the gradients (4 bytes
a parameter, 1.4 GB for gpt2-medium). Only where nothing needs every gradient first:
gradient clipping, micro-batches and data-parallel gradient averaging keep the step
after backward.
"""

from __future__ import annotations

import torch
from torch.utils.hooks import RemovableHandle

from gpt2_instruct.devices import updates_in_backward
from gpt2_instruct.optim import allocate_moments
from gpt2_instruct.params import FinetuneParams
from gpt2_instruct.train_batches import micro_batch_size


def applies(params: FinetuneParams, *, world_size: int, device: torch.device) -> bool:
    """Whether this run updates in backward: ``optimizer_in_backward`` (``auto``: on the
    CPU, ``devices.updates_in_backward``), where nothing needs every gradient first. The
    one place that decides it."""
    micro = micro_batch_size(params.micro_batch_size, params.batch_size) is not None
    return (
        updates_in_backward(params.optimizer_in_backward, device)
        and params.grad_clip is None
        and not micro
        and world_size == 1
    )


def register(
    optimizer: torch.optim.AdamW,
    params: FinetuneParams,
    *,
    world_size: int,
    device: torch.device,
) -> list[RemovableHandle]:
    """Hooks that step ``optimizer`` for each of its parameters once its gradient is complete;
    none where the run does not update in backward (``applies``).

    Each hook steps a single parameter (its group narrowed to it for the call) and frees
    its gradient; removing the hooks restores the step after backward.
    """
    if not applies(params, world_size=world_size, device=device):
        return []
    # By index: loading a checkpoint's state replaces the optimizer's group dicts.
    group_of = {q: i for i, g in enumerate(optimizer.param_groups) for q in g["params"]}
    allocate_moments(optimizer)  # before the activations: a smaller heap

    def update(param: torch.Tensor) -> None:
        group = optimizer.param_groups[group_of[param]]
        everyone, group["params"] = group["params"], [param]
        try:
            optimizer.step()  # steps the parameters with a gradient: this one
        finally:
            group["params"] = everyone
        param.grad = None

    return [q.register_post_accumulate_grad_hook(update) for q in group_of]
