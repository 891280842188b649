"""GPT-2's training loss, computed where it counts and with as little memory as it needs.

The loss is ``F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())`` over the
targets that are not ``IGNORE_INDEX``. The seam is three functions of a ``GPTModel``,
which ``GPTModel.loss`` and ``GPTModel.token_losses`` call:

* ``model_loss``: the mean (or summed) loss, the trainer's.
* ``model_token_losses``: the per-position losses (B, T), evaluation's.
* ``counted_logits``: the fp32 logits of the counted positions, both of theirs.

On the CPU (``devices.counts_only_targets``) three pieces of machinery make it cheaper
than that formula, each justified in its docstring:
``Packing`` (no work after a row's last counted target), ``_CrossEntropy`` (a backward that
allocates no logits-sized tensor) and ``TiedGradient`` (the tied embedding/head weight's
gradient in one buffer). The model's forward has one hook for each of the last two
(``hidden_states(..., packing=, tied=)``, ``head(..., tied=)``) and knows nothing else of them.
Elsewhere (CUDA) the formula runs as written (``_dense_logits``): no host syncs, and a
deterministic tied gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from gpt2_instruct.cpu import pad_bf16_rows, pads_bf16_rows
from gpt2_instruct.devices import counts_only_targets

if TYPE_CHECKING:
    from gpt2_instruct.model import GPTModel

IGNORE_INDEX = -100


class Packing:
    """The positions of a (B, T) batch that matter, for computing on those alone.

    With causal attention a position only affects later ones, so every position
    after a row's last counted target can be dropped without changing any
    counted logit: right padding costs nothing. Between blocks activations are
    packed as (N, C); attention unpacks them to (B, T, ...) and packs its output.
    """

    def __init__(self, keep: torch.Tensor) -> None:
        self.batch, self.width = keep.shape
        self.full = bool(keep.all())
        self.index = None if self.full else keep.flatten().nonzero().squeeze(1)  # (N,)

    @classmethod
    def for_targets(cls, targets: torch.Tensor) -> Packing:
        """Keep each row up to and including its last target that is not ignored."""
        T = targets.shape[1]
        steps = torch.arange(1, T + 1, device=targets.device)
        needed = torch.where(targets != IGNORE_INDEX, steps, 0).amax(dim=1)  # (B,)
        return cls(steps[None, :] <= needed[:, None])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)."""
        flat = x.flatten(0, 1)
        return flat if self.index is None else flat.index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (B, T, D), zeros where positions were dropped."""
        if self.index is None:
            return x.view(self.batch, self.width, -1)
        out = x.new_zeros(self.batch * self.width, x.shape[-1])
        return out.index_copy(0, self.index, x).view(self.batch, self.width, -1)


class CountedLogits(NamedTuple):
    """What the model computes for a loss: only the counted positions' logits."""

    logits: torch.Tensor  # (K, V) fp32, one row per counted target
    targets: torch.Tensor  # (K,)
    packing: Packing
    keep: torch.Tensor  # (N,) bool: which packed positions are counted


def counted_logits(model: GPTModel, idx: torch.Tensor, targets: torch.Tensor) -> CountedLogits:
    """fp32 logits (K, V) and targets (K,) of the positions whose target counts.

    Runs the blocks only up to each row's last counted target (``Packing``) and projects
    onto the vocabulary, the largest product of all, only where a target counts. With
    gradients on a tied head, its weight's gradient is built in one buffer (``TiedGradient``).
    """
    packing = Packing.for_targets(targets)
    tied = None
    if model.out_head is None and torch.is_grad_enabled() and model.tok_emb.weight.requires_grad:
        tied = TiedGradient()
    hidden = model.hidden_states(idx, packing=packing, tied=tied)  # (N, C)
    packed_targets = packing.pack(targets)  # (N,)
    keep = packed_targets != IGNORE_INDEX
    logits = model.head(hidden[keep], tied=tied)  # (K, V): the vocabulary only where it counts
    return CountedLogits(logits.float(), packed_targets[keep], packing, keep)


def model_loss(
    model: GPTModel, idx: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy over the counted targets (``reduction``: "mean" or "sum").

    Equals ``F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())``; with gradients
    on, its backward reuses the log-probabilities' memory (``_CrossEntropy``).
    """
    if not counts_only_targets(idx.device):
        return F.cross_entropy(_dense_logits(model, idx), targets.flatten(), reduction=reduction)
    logits, counted, _, _ = counted_logits(model, idx, targets)
    if reduction not in ("mean", "sum") or not torch.is_grad_enabled():
        return F.cross_entropy(logits, counted, reduction=reduction)
    return _CrossEntropy.apply(logits, counted, reduction)


def model_token_losses(model: GPTModel, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy (B, T), zero where the target is ignored."""
    if not counts_only_targets(idx.device):
        losses = F.cross_entropy(_dense_logits(model, idx), targets.flatten(), reduction="none")
        return losses.view(targets.shape)
    logits, counted, packing, keep = counted_logits(model, idx, targets)
    losses = torch.zeros(keep.shape[0], dtype=torch.float32, device=targets.device)  # (N,)
    losses[keep] = F.cross_entropy(logits, counted, reduction="none")
    return packing.unpack(losses[:, None]).view(targets.shape)


def _dense_logits(model: GPTModel, idx: torch.Tensor) -> torch.Tensor:
    """fp32 logits (B*T, V) of every position: the loss's formula with nothing skipped."""
    return model(idx).flatten(0, 1).float()


class _CrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(logits, targets)`` (mean or sum) whose backward needs no new memory.

    ``F.cross_entropy`` keeps the (K, V) log-probabilities for its backward, which then
    allocates two more (K, V) tensors (the NLL gradient, then the logits' gradient):
    with GPT-2's 50,257 classes that is ~100 MB each for a batch's ~500 counted
    tokens, at the moment every block's activations are held. Here the forward is the
    same two calls (the same loss, bit for bit) and the backward turns the kept
    log-probabilities into the logits' gradient in place, by the formula of torch's
    own kernels: ``softmax * g / K``, less ``g / K`` at each target (``g / 1`` for a
    sum). Saves 2 x (K, V) at the peak of fine-tuning and two passes over them.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        logits: torch.Tensor,
        targets: torch.Tensor,
        reduction: str,
    ) -> torch.Tensor:
        log_probs = F.log_softmax(logits, dim=1)  # (K, V)
        ctx.save_for_backward(log_probs, targets)
        ctx.reduction = reduction
        ctx.spent = False
        return F.nll_loss(log_probs, targets, reduction=reduction)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor
    ) -> tuple[torch.Tensor, None, None]:
        if ctx.spent:
            raise RuntimeError(
                "GPTModel.loss: a second backward through the same loss is not supported "
                "(the first turned its saved log-probabilities into the gradient); "
                "compute the loss again"
            )
        ctx.spent = True
        log_probs, targets = ctx.saved_tensors
        per_target = grad_loss / targets.numel() if ctx.reduction == "mean" else grad_loss
        grad = log_probs.exp_().mul_(per_target)  # (K, V), in the log-probabilities' memory
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, targets] -= per_target
        return grad, None, None


class TiedGradient:
    """The tied token-embedding / output-head weight's gradient for one loss, in one buffer.

    Left to autograd, the embedding's backward fills a dense (V, C) tensor of zeros
    to scatter its few rows into, and the engine then adds it to the head's (V, C)
    gradient into a third (V, C) tensor: ~200 MB each for gpt2-medium, every step.
    Here the head's backward leaves its gradient in this ledger and the embedding's
    backward, which autograd always runs later (the head's input depends on the
    embedding), adds its rows into it in place and hands it to autograd as the
    weight's whole gradient. Same sum, grouped differently (to rounding).

    The model calls ``embed`` and ``project`` in place of its embedding lookup and head
    product when a loss hands it a ledger.
    """

    def __init__(self) -> None:
        self.head: torch.Tensor | None = None

    def embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``F.embedding(ids, weight)``; its backward adds into the head's gradient."""
        return _TiedEmbedding.apply(ids, weight, self)

    def project(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``hidden @ weight.T`` (K, V); its weight gradient is left in this ledger."""
        return _TiedHead.apply(hidden, weight, self)

    def add(self, grad: torch.Tensor) -> None:
        self.head = grad if self.head is None else self.head.add_(grad)

    def take(self) -> torch.Tensor | None:
        grad, self.head = self.head, None
        return grad


class _TiedHead(torch.autograd.Function):
    """``hidden @ weight.T`` whose weight gradient goes to a ``TiedGradient``, not autograd.

    Under autocast both operands are cast as autocast casts them for ``F.linear``, and
    the casts are what is kept for backward, as autograd keeps them. bf16 products on
    the CPU get zero rows up to a multiple of 32, as ``cpu.linear`` gives them.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        tied: TiedGradient,
    ) -> torch.Tensor:
        ctx.dtypes = (hidden.dtype, weight.dtype)
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        rows = hidden.shape[0]
        if pads_bf16_rows(rows, hidden, weight):
            hidden = pad_bf16_rows(hidden)  # (K', C): shapes that repeat, as in ``cpu.linear``
        ctx.save_for_backward(hidden, weight)
        ctx.tied = tied
        ctx.rows = rows
        return (hidden @ weight.t())[:rows]  # (K, V)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_logits: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None]:
        hidden, weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_logits = grad_logits.to(weight.dtype)
        if hidden.shape[0] != ctx.rows:  # padded rows: zero gradient
            grad_logits = pad_bf16_rows(grad_logits)  # (K', V)
        if ctx.needs_input_grad[1]:
            ctx.tied.add((grad_logits.t() @ hidden).to(weight_dtype))  # (V, C)
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_logits @ weight)[: ctx.rows].to(hidden_dtype)  # (K, C)
        return grad_hidden, None, None


class _TiedEmbedding(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose backward adds its rows into the head's gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        ids: torch.Tensor,
        weight: torch.Tensor,
        tied: TiedGradient,
    ) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight_shape = weight.shape
        ctx.tied = tied
        return F.embedding(ids, weight)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[None, torch.Tensor | None, None]:
        if not ctx.needs_input_grad[1]:
            return None, None, None
        (ids,) = ctx.saved_tensors
        grad = ctx.tied.take()
        if grad is None:  # the head took no part in this loss
            grad = grad_out.new_zeros(ctx.weight_shape)
        width = ctx.weight_shape[1]
        grad.index_add_(0, ids.flatten(), grad_out.reshape(-1, width).to(grad.dtype))
        return None, grad, None
