"""AdamW construction and the learning-rate schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2_instruct.model import GPTConfig, GPTModel
from gpt2_instruct.optim import allocate_moments, apply_lr, build_optimizer, lr_at

CONFIG = GPTConfig(vocab_size=32, context_length=8, n_embd=8, n_layer=2, n_head=2)


def tiny_model(seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(CONFIG)


def train_steps(model: GPTModel, optimizer: torch.optim.Optimizer, steps: int) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, CONFIG.vocab_size, (2, 6), generator=gen)
        targets = torch.randint(0, CONFIG.vocab_size, (2, 6), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        model.loss(idx, targets).backward()
        optimizer.step()


def test_default_is_exactly_the_reference_adamw() -> None:
    ours, reference = tiny_model(), tiny_model()
    opt = build_optimizer(ours, lr=1e-3, weight_decay=0.1, fused=False)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.1, fused=False)

    assert len(opt.param_groups) == 1
    params = opt.param_groups[0]["params"]
    assert [id(p) for p in params] == [id(p) for p in ours.parameters()]
    assert sum(p is ours.tok_emb.weight for p in params) == 1
    assert opt.param_groups[0]["weight_decay"] == 0.1

    train_steps(ours, opt, 2)
    train_steps(reference, ref_opt, 2)
    initial = tiny_model()
    for (name, p), q in zip(ours.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name
        assert not torch.equal(p, initial.get_parameter(name)), name  # every tensor moved


def test_only_trainable_parameters_are_optimized() -> None:
    model = tiny_model()
    model.requires_grad_(False)
    model.final_norm.requires_grad_(True)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(model.final_norm.weight),
        id(model.final_norm.bias),
    }
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        build_optimizer(model, lr=1e-3, weight_decay=0.0)


def test_no_decay_group_holds_exactly_the_vectors() -> None:
    model = tiny_model()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, decay_norms_and_biases=False)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    assert {names[id(p)] for p in no_decay["params"]} == {
        n for n, p in params.items() if p.ndim == 1
    }
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in params.items() if p.ndim >= 2}
    assert "tok_emb.weight" in {names[id(p)] for p in decay["params"]}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)


@pytest.mark.parametrize("decay_norms_and_biases", [False, True])
def test_weight_decay_reaches_only_the_intended_parameters(decay_norms_and_biases: bool) -> None:
    """With zero gradients AdamW's only move is decoupled decay: p *= 1 - lr * wd."""
    model = tiny_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.fill_(0.5)  # zero biases would stay zero under any decay
    before = copy.deepcopy(model)
    lr, wd = 0.1, 0.5
    opt = build_optimizer(
        model, lr=lr, weight_decay=wd, decay_norms_and_biases=decay_norms_and_biases
    )
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()

    bias, old_bias = model.blocks[0].attn.qkv.bias, before.blocks[0].attn.qkv.bias
    gain, old_gain = model.final_norm.weight, before.final_norm.weight
    weight, old_weight = model.blocks[0].ff.fc.weight, before.blocks[0].ff.fc.weight
    torch.testing.assert_close(weight, old_weight * (1 - lr * wd))
    assert weight.abs().sum() < old_weight.abs().sum()
    if decay_norms_and_biases:
        torch.testing.assert_close(bias, old_bias * (1 - lr * wd))
        torch.testing.assert_close(gain, old_gain * (1 - lr * wd))
    else:
        assert torch.equal(bias, old_bias)
        assert torch.equal(gain, old_gain)


def test_fused_adamw_takes_float_lr_from_apply_lr() -> None:
    fused_model, plain_model = tiny_model(), tiny_model()
    fused = build_optimizer(fused_model, lr=1.0, weight_decay=0.1, fused=True)
    plain = build_optimizer(plain_model, lr=1.0, weight_decay=0.1, fused=False)
    for opt in (fused, plain):
        apply_lr(opt, 2e-3)
        assert all(type(g["lr"]) is float and g["lr"] == 2e-3 for g in opt.param_groups)
    train_steps(fused_model, fused, 2)
    train_steps(plain_model, plain, 2)
    for p, q in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_apply_lr_sets_every_group() -> None:
    opt = build_optimizer(tiny_model(), lr=1e-3, weight_decay=0.1, decay_norms_and_biases=False)
    apply_lr(opt, 5e-5)
    assert [g["lr"] for g in opt.param_groups] == [5e-5, 5e-5]
    with pytest.raises(ValueError, match="lr"):
        apply_lr(opt, -1.0)
    with pytest.raises(ValueError, match="lr"):
        apply_lr(opt, math.nan)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1e-3, "weight_decay": 0.1}, "lr"),
        ({"lr": 1e-3, "weight_decay": -0.1}, "weight_decay"),
        ({"lr": math.inf, "weight_decay": 0.1}, "lr"),
    ],
)
def test_build_optimizer_rejects_bad_hyperparameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_optimizer(tiny_model(), **kwargs)


# --- schedule ---------------------------------------------------------------

BASE, WARMUP, TOTAL, MIN_RATIO = 3e-4, 10, 110, 0.1
MIN = BASE * MIN_RATIO


def cosine(step: int) -> float:
    return lr_at(
        step,
        base_lr=BASE,
        warmup_steps=WARMUP,
        total_steps=TOTAL,
        schedule="cosine",
        min_lr_ratio=MIN_RATIO,
    )


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, BASE / 10),  # (0 + 1) / 10 of the way
        (4, BASE / 2),
        (WARMUP - 1, BASE),
        (WARMUP, BASE),  # cosine starts at the top
        (60, MIN + (BASE - MIN) / 2),  # halfway through the 100 decay steps
        # 99/100 of the way: (1 + cos(0.99 pi)) / 2 = sin(0.005 pi) ** 2
        (TOTAL - 1, MIN + (BASE - MIN) * math.sin(0.005 * math.pi) ** 2),
        (TOTAL, MIN),
        (TOTAL + 50, MIN),
    ],
)
def test_cosine_schedule_at_key_steps(step: int, expected: float) -> None:
    assert cosine(step) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(("step", "expected"), [(0, 1.0), (1, 2.0), (3, 4.0), (4, 4.0), (99, 4.0)])
def test_constant_schedule_with_warmup(step: int, expected: float) -> None:
    lr = lr_at(step, base_lr=4.0, warmup_steps=4, total_steps=10, schedule="constant")
    assert lr == expected


@given(step=st.integers(0, 10_000), base_lr=st.floats(0.0, 1.0), total=st.integers(1, 10_000))
@settings(max_examples=50, deadline=None)
def test_constant_without_warmup_is_the_reference(step: int, base_lr: float, total: int) -> None:
    lr = lr_at(step, base_lr=base_lr, warmup_steps=0, total_steps=total, schedule="constant")
    assert lr == base_lr


@given(
    total=st.integers(1, 500),
    warmup_fraction=st.floats(0.0, 1.0),
    min_lr_ratio=st.floats(0.0, 1.0),
    data=st.data(),
)
@settings(max_examples=100, deadline=None)
def test_cosine_rises_during_warmup_then_never_increases(
    total: int, warmup_fraction: float, min_lr_ratio: float, data: st.DataObject
) -> None:
    warmup = int(total * warmup_fraction)

    def lr(step: int) -> float:
        return lr_at(
            step,
            base_lr=1e-3,
            warmup_steps=warmup,
            total_steps=total,
            schedule="cosine",
            min_lr_ratio=min_lr_ratio,
        )

    step = data.draw(st.integers(0, total + 5))
    assert 0.0 <= lr(step) <= 1e-3
    if step < warmup - 1:
        assert 0.0 < lr(step) < lr(step + 1)
    elif step >= warmup:
        assert lr(step + 1) <= lr(step)
        assert lr(step) >= 1e-3 * min_lr_ratio * (1 - 1e-12)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"warmup_steps": 11, "total_steps": 10}, "exceeds total_steps"),
        ({"base_lr": -1e-3}, "base_lr"),
        ({"schedule": "linear"}, "unknown schedule"),
        ({"step": -1}, "step"),
        ({"total_steps": 0, "warmup_steps": 0}, "total_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
    ],
)
def test_lr_at_rejects_invalid_arguments(overrides: dict, match: str) -> None:
    kwargs = {
        "step": 0,
        "base_lr": 1e-3,
        "warmup_steps": 2,
        "total_steps": 10,
        "schedule": "cosine",
        **overrides,
    }
    with pytest.raises(ValueError, match=match):
        lr_at(kwargs.pop("step"), **kwargs)


@pytest.mark.parametrize("fused", [None, True])
def test_allocated_moments_update_exactly_like_lazily_created_ones(fused: bool | None) -> None:
    def trained(allocate: bool) -> tuple[torch.nn.Module, torch.optim.AdamW]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
        optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1, fused=fused)
        if allocate:
            allocate_moments(optimizer)
            assert all(not s["exp_avg"].any() and s["step"] == 0 for s in optimizer.state.values())
        for i in range(3):
            optimizer.zero_grad()
            model(torch.full((2, 5), float(i + 1))).square().sum().backward()
            optimizer.step()
        return model, optimizer

    (lazy, lazy_opt), (early, early_opt) = trained(False), trained(True)
    for a, b in zip(lazy.parameters(), early.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(lazy_opt.state.values(), early_opt.state.values(), strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_allocate_moments_leaves_an_existing_state_alone() -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.0)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    before = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    allocate_moments(optimizer)
    assert all(torch.equal(optimizer.state[model.weight][k], v) for k, v in before.items())
