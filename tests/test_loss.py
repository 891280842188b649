"""The training loss: F.cross_entropy's numbers with a backward that allocates no (K, V) tensor."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2_instruct.model import IGNORE_INDEX, GPTConfig, GPTModel, _CrossEntropy

K, V = 13, 211


class _NewTensorsAtLeast(TorchDispatchMode):
    """Records the ops that return a new tensor of at least ``numel`` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel = numel
        self.ops: list[str] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        fresh = not func._schema.is_mutable and not func._schema.name.startswith("aten::detach")
        if fresh and isinstance(out, torch.Tensor) and out.numel() >= self.numel:
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


def test_model_loss_gradients_match_the_full_cross_entropy() -> None:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, context_length=16, n_embd=16, n_layer=2, n_head=2)
    model = GPTModel(config)
    idx = torch.randint(0, 97, (3, 12))
    targets = torch.randint(0, 97, (3, 12))
    targets[0, 8:] = IGNORE_INDEX  # right padding
    targets[1, :4] = IGNORE_INDEX  # a masked prompt

    F.cross_entropy(model(idx).flatten(0, 1), targets.flatten()).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.loss(idx, targets).backward()

    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], msg=name)
