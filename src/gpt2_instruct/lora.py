"""Low-Rank Adaptation (LoRA, Hu et al. 2021) for our ``GPTModel``.

LoRA freezes every pre-trained weight ``W`` and learns a low-rank update
``ΔW = (alpha / rank) * B @ A`` with ``A`` (rank x in) and ``B`` (out x rank).
``B`` starts at zero, so an adapted model computes exactly what the base model
computes until the first optimizer step. ``alpha / rank`` is the effective
multiplier of ``B @ A``: changing ``rank`` at a fixed ``alpha`` keeps the scale
of the initial update comparable, so the learning rate need not be re-tuned.

Targets, per transformer block unless noted:

- ``attn_qkv``: ``blocks[i].attn.qkv``      - ``attn_out``: ``blocks[i].attn.out_proj``
- ``ff_fc``:    ``blocks[i].ff.fc``         - ``ff_proj``:  ``blocks[i].ff.proj``
- ``head``: the output projection (``out_head``, or the token embedding when tied).

The Linear targets are wrapped in place by :class:`LoRALinear` (the original
layer lives on as ``.base``). :func:`merge_lora` folds the updates back and puts
the plain ``nn.Linear`` layers back under their original names, so
``model.state_dict()`` has exactly the keys of an unadapted model and
``weights.save_model`` writes an ordinary GPT-2 checkpoint.

An untied model (the reference's layout, ``finetune.tie_embeddings: false``) has an
``out_head`` Linear of its own, which ``head`` wraps like any other target: it merges
and exports. A tied head cannot touch ``tok_emb.weight`` (that would change the input
embedding too), so there it is a separate adapter, ``model.head_lora``
(:class:`LoRAHeadDelta`), which the model adds to its output projection. For the
same reason it cannot be merged into a tied GPT-2 checkpoint. ``GPTModel``
consults the adapter when it declares the slot ``self.head_lora = None`` and
either adds ``head_lora(hidden)`` to its logits (preferred: dropout applies and
no vocabulary-sized weight gradient is formed) or returns
``tok_emb.weight + head_lora.delta()`` from ``out_head_weight``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from gpt2_instruct.cpu import linear
from gpt2_instruct.model import GPTModel

# Target name -> (child of a transformer block, attribute of that child).
_BLOCK_TARGETS: dict[str, tuple[str, str]] = {
    "attn_qkv": ("attn", "qkv"),
    "attn_out": ("attn", "out_proj"),
    "ff_fc": ("ff", "fc"),
    "ff_proj": ("ff", "proj"),
}
LORA_TARGETS: tuple[str, ...] = (*_BLOCK_TARGETS, "head")
_ADAPTER_NAMES = ("lora_a", "lora_b")


def _check_hparams(rank: int, alpha: float, dropout: float) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise ValueError(f"LoRA alpha must be a number > 0, got {alpha!r}")
    if isinstance(alpha, float) and not math.isfinite(alpha):
        raise ValueError(f"LoRA alpha must be finite, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


class LoRAAdapter(nn.Module):
    """The low-rank path alone: ``x -> (alpha / rank) * B @ A @ dropout(x)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_hparams(rank, alpha, dropout)
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        # As in the paper and peft: A like nn.Linear's default init, B = 0 so ΔW starts at 0.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        # Identity when p == 0 so the adapter draws no random numbers then.
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution ``scaling * dropout(x) @ A.T @ B.T`` (..., out)."""
        return linear(linear(self.lora_dropout(x), self.lora_a), self.lora_b) * self.scaling

    def delta(self) -> torch.Tensor:
        """The weight update ``scaling * B @ A`` (out, in), differentiable."""
        return (self.lora_b @ self.lora_a) * self.scaling

    def extra_repr(self) -> str:
        out_features, in_features = self.lora_b.shape[0], self.lora_a.shape[1]
        return (
            f"in_features={in_features}, out_features={out_features}, rank={self.rank}, "
            f"alpha={self.alpha}, scaling={self.scaling}"
        )


class LoRALinear(LoRAAdapter):
    """A frozen ``nn.Linear`` (kept as ``.base``) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0) -> None:
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        super().__init__(
            base.in_features,
            base.out_features,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        self.base = base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.update(x)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with ΔW folded into its weight (in place); what replaces us."""
        weight = self.base.weight
        weight.copy_((weight.float() + self.delta().float()).to(weight.dtype))
        return self.base


class LoRAHeadDelta(LoRAAdapter):
    """Adapter of the tied output projection (hidden C -> vocabulary V).

    ``forward(hidden)`` is the logit update (dropout on ``hidden``); ``delta()``
    is the same update as a (V, C) weight for ``tok_emb.weight + delta()``.
    """

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.update(hidden)


def _block_linears(model: GPTModel, target: str) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of the target's layer in every block."""
    child, attr = _BLOCK_TARGETS[target]
    return [(getattr(block, child), attr) for block in model.blocks]


def _validate_targets(targets: Sequence[str]) -> tuple[str, ...]:
    if isinstance(targets, str):
        raise ValueError(f"LoRA targets must be a sequence of names, got the string {targets!r}")
    chosen = tuple(dict.fromkeys(targets))
    if not chosen:
        raise ValueError(f"LoRA targets must not be empty; valid targets: {list(LORA_TARGETS)}")
    unknown = [t for t in chosen if t not in LORA_TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; valid targets: {list(LORA_TARGETS)}")
    return chosen


def has_lora(model: nn.Module) -> bool:
    """Whether ``apply_lora`` has adapted the model (and it is not merged yet)."""
    return any(isinstance(m, LoRAAdapter) for m in model.modules())


def apply_lora(
    model: GPTModel, *, rank: int, alpha: float, dropout: float, targets: Sequence[str]
) -> int:
    """Freeze every existing parameter and add LoRA adapters; return the trainable count.

    Adapters are created on the device and dtype of the layer they adapt, so the
    model may already sit on its training device.
    """
    _check_hparams(rank, alpha, dropout)
    chosen = _validate_targets(targets)
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; merge_lora it first")
    if "head" in chosen and not hasattr(model, "head_lora"):
        # Without the slot nothing would consult the adapter and it would train nothing.
        raise ValueError(
            "LoRA target 'head' needs GPTModel to declare `self.head_lora = None` and add "
            "the adapter to its output projection (see gpt2_instruct.lora)"
        )

    model.requires_grad_(False)
    for target in chosen:
        if target == "head" and model.out_head is not None:  # untied: a Linear like the rest
            model.out_head = LoRALinear(model.out_head, rank=rank, alpha=alpha, dropout=dropout)
            continue
        if target == "head":
            weight = model.tok_emb.weight
            vocab_size, n_embd = weight.shape
            model.head_lora = LoRAHeadDelta(
                n_embd,
                vocab_size,
                rank=rank,
                alpha=alpha,
                dropout=dropout,
                device=weight.device,
                dtype=weight.dtype,
            )
            continue
        for parent, attr in _block_linears(model, target):
            base = getattr(parent, attr)
            setattr(parent, attr, LoRALinear(base, rank=rank, alpha=alpha, dropout=dropout))
    return trainable_parameters(model)


def merge_lora(model: GPTModel) -> None:
    """Fold every adapter into its base weight and restore the plain ``nn.Linear`` layers.

    Afterwards ``model.state_dict()`` has exactly the original keys and every
    parameter is trainable again. A model without adapters is left as it is.

    Raises:
        ValueError: the model has a tied ``head`` adapter, which has no weight of its
            own to merge into (the output projection is the token embedding). Nothing
            is changed then.
    """
    if getattr(model, "head_lora", None) is not None:
        raise ValueError(
            "a LoRA 'head' adapter cannot be merged into the tied embedding; train with "
            "finetune.tie_embeddings: false (the default) or without 'head' to export"
        )
    wrapped = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, LoRALinear)
    ]
    for parent, name, child in wrapped:
        setattr(parent, name, child.merged())
    model.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements with ``requires_grad`` (tied tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _is_adapter_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in _ADAPTER_NAMES


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors of ``model.state_dict()``: a checkpoint of megabytes, not GBs."""
    return {k: v for k, v in model.state_dict().items() if _is_adapter_key(k)}


def load_lora_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load adapter tensors saved by :func:`lora_state_dict` into an equally adapted model.

    Unlike ``load_state_dict(strict=False)``, a missing or unexpected adapter
    tensor is an error, so a checkpoint of another target set never loads halfway.
    """
    expected = set(lora_state_dict(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"LoRA state does not match the model's adapters: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.load_state_dict(dict(state), strict=False)
