"""The optimizer and the learning-rate schedule of fine-tuning.

The defaults reproduce the reference recipe exactly: one AdamW group over every
parameter (weight decay on all of them) and a constant learning rate. The
options are the usual refinements: no weight decay for biases and LayerNorm
parameters (decaying a gain towards 0 or a bias towards 0 is not
regularisation, just a bias), and linear warmup followed by cosine decay.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import nn

Schedule = Literal["constant", "cosine"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)


def _check_number(name: str, value: float, *, allow_zero: bool = True) -> None:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if isinstance(value, bool) or not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    decay_norms_and_biases: bool = True,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over the parameters that require gradients (so LoRA trains only its adapters).

    With ``decay_norms_and_biases=True`` (the reference) there is one group and
    the optimizer updates exactly like ``AdamW(model.parameters(), lr, weight_decay)``;
    tied tensors (``tok_emb`` is the output head) appear once. With ``False``
    there are two groups, in this order: ``weight_decay`` for matrices (>= 2-D:
    Linear weights, embeddings), ``0.0`` for vectors (biases, LayerNorm
    weights/biases); an empty group is left out.
    """
    _check_number("lr", lr)
    _check_number("weight_decay", weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True to optimize")
    kwargs = {"lr": float(lr), "betas": betas, "eps": eps, "fused": fused}
    if decay_norms_and_biases:
        return torch.optim.AdamW(params, weight_decay=float(weight_decay), **kwargs)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": group, "weight_decay": wd}
        for group, wd in ((decay, float(weight_decay)), (no_decay, 0.0))
        if group
    ]
    return torch.optim.AdamW(groups, **kwargs)


def allocate_moments(optimizer: torch.optim.AdamW) -> None:
    """Create AdamW's zero moments now instead of at the first update of each parameter.

    Allocated lazily, the moments land in the holes that the first step's activations
    leave and the heap ends up larger; allocated before training they sit together
    beside the weights. The state is what the first update would have created (step 0,
    zero moments), loaded through ``load_state_dict`` as a resumed run's is.
    """
    if optimizer.state:
        return  # already stepped or resumed
    state = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state["state"] = {
        i: {
            "step": torch.tensor(0.0),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }
        for i, p in enumerate(params)
    }
    optimizer.load_state_dict(state)


def lr_at(
    step: int,
    *,
    base_lr: float,
    warmup_steps: int,
    total_steps: int,
    schedule: Schedule,
    min_lr_ratio: float = 0.0,
) -> float:
    """Learning rate of optimizer step ``step`` (counted from 0).

    Warmup rises linearly so that step ``s < warmup_steps`` uses
    ``base_lr * (s + 1) / warmup_steps``: the first step already learns and step
    ``warmup_steps - 1`` reaches ``base_lr``. After warmup, ``constant`` keeps
    ``base_lr`` (``min_lr_ratio`` is unused) and ``cosine`` decays along half a
    cosine from ``base_lr`` at ``warmup_steps`` to ``base_lr * min_lr_ratio`` at
    ``total_steps``, where it stays for any later step.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid schedules: {list(SCHEDULES)}")
    _check_number("base_lr", base_lr)
    for name, value, low in (("step", step, 0), ("warmup_steps", warmup_steps, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) exceeds total_steps ({total_steps})")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")

    if step < warmup_steps:
        return base_lr * ((step + 1) / warmup_steps)  # exactly base_lr at warmup_steps - 1
    if schedule == "constant":
        return base_lr
    min_lr = base_lr * min_lr_ratio
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every group, as a Python float (what fused AdamW takes)."""
    _check_number("lr", lr)
    for group in optimizer.param_groups:
        group["lr"] = float(lr)
