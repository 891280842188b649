"""The training loss: F.cross_entropy's numbers, with a backward that allocates no (K, V)
tensor and builds the tied embedding/head weight's gradient in one (V, C) buffer."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2_instruct.loss import IGNORE_INDEX, Packing, _CrossEntropy
from gpt2_instruct.model import GPTConfig, GPTModel

K, V = 13, 211


class _NewTensorsAtLeast(TorchDispatchMode):
    """Records the ops that return a new tensor of at least ``numel`` elements (of ``shape``)."""

    def __init__(self, numel: int, shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.numel = numel
        self.shape = shape
        self.ops: list[str] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        fresh = not func._schema.is_mutable and not func._schema.name.startswith("aten::detach")
        big = isinstance(out, torch.Tensor) and out.numel() >= self.numel
        if fresh and big and (self.shape is None or tuple(out.shape) == self.shape):
            self.ops.append(func._schema.name)
        return out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_same_loss_bit_for_bit_and_gradient_to_rounding(reduction: str) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(K, V) * 4).requires_grad_()
    targets = torch.randint(0, V, (K,))
    expected = F.cross_entropy(logits, targets, reduction=reduction)
    (expected * 0.37).backward()  # an upstream gradient other than 1
    expected_grad, logits.grad = logits.grad, None

    got = _CrossEntropy.apply(logits, targets, reduction)
    (got * 0.37).backward()

    assert torch.equal(got, expected)
    torch.testing.assert_close(logits.grad, expected_grad, rtol=1e-6, atol=1e-12)


def test_backward_allocates_no_logits_sized_tensor() -> None:
    torch.manual_seed(0)
    logits = torch.randn(K, V, requires_grad=True)
    targets = torch.randint(0, V, (K,))
    reference = F.cross_entropy(logits, targets)
    with _NewTensorsAtLeast(K * V) as seen:
        reference.backward()
    assert len(seen.ops) == 2, seen.ops  # the check can see what F.cross_entropy allocates

    ours = _CrossEntropy.apply(logits, targets, "mean")
    with _NewTensorsAtLeast(K * V) as seen:
        ours.backward()
    assert seen.ops == []


def test_a_second_backward_through_the_same_loss_is_refused() -> None:
    logits = torch.randn(K, V, requires_grad=True)
    loss = _CrossEntropy.apply(logits, torch.randint(0, V, (K,)), "mean")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def _model_and_batch() -> tuple[GPTModel, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, context_length=16, n_embd=16, n_layer=2, n_head=2)
    model = GPTModel(config)
    idx = torch.randint(0, 97, (3, 12))
    idx[2, :6] = idx[0, :6]  # tokens seen more than once: rows added twice into the gradient
    targets = torch.randint(0, 97, (3, 12))
    targets[0, 8:] = IGNORE_INDEX  # right padding
    targets[1, :4] = IGNORE_INDEX  # a masked prompt
    return model, idx, targets


def test_model_loss_gradients_match_the_full_cross_entropy() -> None:
    model, idx, targets = _model_and_batch()

    F.cross_entropy(model(idx).flatten(0, 1), targets.flatten()).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.loss(idx, targets).backward()

    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], msg=name)


def test_bf16_autocast_gradients_match_autograd_on_the_same_casts() -> None:
    """Under autocast the tied head casts as autocast does: the same gradients as plain
    autograd through ``F.linear`` and ``F.cross_entropy`` on the same packed positions."""
    model, idx, targets = _model_and_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packing = Packing.for_targets(targets)
        hidden = model.hidden_states(idx, packing=packing)
        packed = packing.pack(targets)
        keep = packed != IGNORE_INDEX
        logits = F.linear(hidden[keep], model.tok_emb.weight)
        assert logits.dtype == torch.bfloat16
        reference = F.cross_entropy(logits.float(), packed[keep])
    reference.backward()  # outside autocast, as the trainer runs it
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(idx, targets)
    loss.backward()

    for name, param in model.named_parameters():
        assert param.grad.dtype == torch.float32
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_tied_weight_gets_one_gradient_buffer_and_no_zeros() -> None:
    model, idx, targets = _model_and_batch()
    shape = tuple(model.tok_emb.weight.shape)  # (V, C), the largest tensor of this model
    reference = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    with _NewTensorsAtLeast(0, shape) as seen:
        reference.backward()
    assert len(seen.ops) >= 3, seen.ops  # head gradient, embedding zeros, their sum
    model.zero_grad(set_to_none=True)

    loss = model.loss(idx, targets)
    with _NewTensorsAtLeast(0, shape) as seen:
        loss.backward()
    assert len(seen.ops) == 1, seen.ops  # the head's gradient, which the embedding adds into
