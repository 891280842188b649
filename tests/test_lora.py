"""LoRA: exact at initialisation, trains only adapters, merges into a plain GPT-2."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpt2_instruct.cpu import Linear
from gpt2_instruct.lora import (
    LORA_TARGETS,
    LoRAHeadDelta,
    LoRALinear,
    apply_lora,
    has_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    trainable_parameters,
)
from gpt2_instruct.model import GPTConfig, GPTModel
from gpt2_instruct.weights import load_model, save_model

CONFIG = GPTConfig(vocab_size=40, context_length=12, n_embd=16, n_layer=2, n_head=2)
BLOCK_TARGETS = ("attn_qkv", "attn_out", "ff_fc", "ff_proj")
IDX = torch.randint(0, CONFIG.vocab_size, (3, 10), generator=torch.Generator().manual_seed(7))


class HeadGPT(GPTModel):
    """GPTModel with the recommended head contract (what model.py gains on integration)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.head_lora: LoRAHeadDelta | None = None

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.out_head_weight)
        return logits if self.head_lora is None else logits + self.head_lora(hidden)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self._head(self.hidden_states(idx))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(idx).flatten(0, 1), targets.flatten())


class HeadWeightGPT(HeadGPT):
    """The minimal alternative contract: ``out_head_weight`` includes the adapter's delta."""

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.tok_emb.weight
        weight = weight if self.head_lora is None else weight + self.head_lora.delta()
        return F.linear(hidden, weight)


def tiny(cls: type[GPTModel] = GPTModel, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return cls(CONFIG)


def train(model: GPTModel, steps: int, lr: float = 1e-2) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(3)
    model.train()
    for _ in range(steps):
        targets = torch.randint(0, CONFIG.vocab_size, IDX.shape, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        model.loss(IDX, targets).backward()
        optimizer.step()
    model.eval()


def adapted(
    cls: type[GPTModel] = GPTModel, targets: tuple[str, ...] = BLOCK_TARGETS, **kwargs: float
) -> tuple[GPTModel, GPTModel]:
    """(base model, adapted copy) with identical pre-trained weights."""
    base = tiny(cls)
    model = copy.deepcopy(base)
    options = {"rank": 4, "alpha": 8.0, "dropout": 0.0, **kwargs}
    apply_lora(model, targets=targets, **options)
    return base, model


def test_adapted_model_equals_base_model_at_initialisation() -> None:
    base, model = adapted(dropout=0.1)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(IDX), base(IDX))
    assert all(isinstance(b.attn.qkv, LoRALinear) for b in model.blocks)
    assert all(
        torch.count_nonzero(m.lora_a) > 0 and torch.count_nonzero(m.lora_b) == 0
        for m in model.modules()
        if isinstance(m, LoRALinear)
    )


def test_only_adapters_are_trainable_and_only_they_change() -> None:
    base, model = adapted()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(n.endswith(("lora_a", "lora_b")) for n in trainable)

    train(model, steps=2)  # B moves in step 1; A only once B != 0
    adapters = lora_state_dict(model)
    assert set(adapters) == trainable
    initial = lora_state_dict(adapted()[1])
    for name, tensor in adapters.items():
        assert not torch.equal(tensor, initial[name]), name
    for name, tensor in base.state_dict().items():
        wrapped = name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        key = name if name in model.state_dict() else wrapped
        assert torch.equal(model.state_dict()[key], tensor), name


@pytest.mark.parametrize("rank", [1, 3])
def test_trainable_count_is_rank_times_fan_in_plus_fan_out(rank: int) -> None:
    model = tiny(HeadGPT)
    count = apply_lora(model, rank=rank, alpha=1.0, dropout=0.0, targets=LORA_TARGETS)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 4 * CONFIG.n_layer
    expected = sum(rank * (m.base.in_features + m.base.out_features) for m in layers)
    expected += rank * (CONFIG.n_embd + CONFIG.vocab_size)  # head: C -> V
    c = CONFIG.n_embd  # per block: qkv 4C, out_proj 2C, fc 5C, proj 5C
    assert expected == rank * (CONFIG.n_layer * 16 * c + c + CONFIG.vocab_size)
    assert count == expected == trainable_parameters(model)


def test_scaling_is_alpha_over_rank_and_doubling_alpha_doubles_the_update() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    x = torch.randn(4, 6)
    updates = []
    for alpha in (3.0, 6.0):
        layer = LoRALinear(copy.deepcopy(base), rank=2, alpha=alpha)
        assert layer.scaling == alpha / 2
        with torch.no_grad():
            layer.lora_a.copy_(torch.arange(12.0).view(2, 6) / 10)
            layer.lora_b.copy_(torch.arange(10.0).view(5, 2) / 10)
            updates.append(layer(x) - base(x))
            expected = layer.scaling * x @ layer.lora_a.T @ layer.lora_b.T
        torch.testing.assert_close(updates[-1], expected)
    torch.testing.assert_close(updates[1], 2 * updates[0])
    assert updates[0].abs().max() > 0


def test_dropout_acts_on_the_lora_path_only_and_only_in_train_mode() -> None:
    torch.manual_seed(0)
    base = nn.Linear(32, 8)
    layer = LoRALinear(copy.deepcopy(base), rank=4, alpha=4.0, dropout=0.5)
    x = torch.randn(16, 32)
    with torch.no_grad():
        layer.train()
        assert torch.equal(layer(x), base(x))  # B = 0: nothing of the base path is dropped
        layer.lora_b.normal_()
        train_a, train_b = layer(x), layer(x)
        layer.eval()
        eval_a, eval_b = layer(x), layer(x)
    assert torch.equal(eval_a, eval_b)
    torch.testing.assert_close(eval_a, base(x) + x @ layer.delta().T)
    assert not torch.equal(train_a, train_b)
    assert not torch.allclose(train_a, eval_a)


def test_merge_reproduces_the_adapted_model_with_the_original_keys() -> None:
    base, model = adapted()
    train(model, steps=3)
    with torch.no_grad():
        adapted_logits = model(IDX)
    assert not torch.allclose(adapted_logits, base(IDX))

    merge_lora(model)
    assert not has_lora(model)
    assert list(model.state_dict()) == list(base.state_dict())
    assert all(type(b.attn.qkv) is Linear for b in model.blocks)
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(IDX), adapted_logits, atol=1e-5, rtol=0)


def test_merged_model_round_trips_through_save_model(tmp_path: Path) -> None:
    _, model = adapted(targets=("attn_qkv", "ff_proj"))
    train(model, steps=3)
    merge_lora(model)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDX), model(IDX), atol=1e-6, rtol=0)


def test_adapter_state_dict_round_trips() -> None:
    _, model = adapted(targets=("attn_out", "ff_fc"))
    train(model, steps=2)
    state = lora_state_dict(model)
    assert len(state) == 2 * 2 * CONFIG.n_layer
    _, fresh = adapted(targets=("attn_out", "ff_fc"))
    load_lora_state_dict(fresh, state)
    with torch.no_grad():
        assert torch.equal(fresh(IDX), model(IDX))

    _, other = adapted(targets=("attn_qkv",))
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(other, state)


@pytest.mark.parametrize("cls", [HeadGPT, HeadWeightGPT])
def test_head_adapter_trains_without_touching_the_tied_embedding(cls: type[GPTModel]) -> None:
    base, model = adapted(cls, targets=("head",))
    assert isinstance(model.head_lora, LoRAHeadDelta)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "head_lora.lora_a",
        "head_lora.lora_b",
    ]
    with torch.no_grad():
        assert torch.equal(model(IDX), base(IDX))
    train(model, steps=3)
    assert torch.equal(model.tok_emb.weight, base.tok_emb.weight)
    with torch.no_grad():
        hidden = model.hidden_states(IDX)
        assert torch.equal(hidden, base.hidden_states(IDX))  # the input side is untouched
        delta = model.head_lora.delta()
        assert delta.abs().max() > 0
        torch.testing.assert_close(model(IDX), F.linear(hidden, base.tok_emb.weight + delta))
        torch.testing.assert_close(model.head_lora(hidden), F.linear(hidden, delta))


def test_head_adapter_cannot_be_merged_into_the_tied_embedding() -> None:
    _, model = adapted(HeadGPT, targets=("attn_qkv", "head"))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="tied embedding"):
        merge_lora(model)
    assert has_lora(model)  # nothing was half-merged
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_head_target_needs_the_model_to_consult_the_adapter() -> None:
    model = tiny()
    if "head_lora" in vars(model):  # model.py already integrated the contract
        del model.head_lora
    with pytest.raises(ValueError, match="head_lora"):
        apply_lora(model, rank=2, alpha=2.0, dropout=0.0, targets=("head",))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.0}, "rank"),
        ({"alpha": 0.0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"targets": ()}, "empty"),
        ({"targets": ("attn_qkv", "lm_head")}, r"unknown LoRA targets \['lm_head'\]; valid"),
        ({"targets": "attn_qkv"}, "sequence"),
    ],
)
def test_invalid_arguments_are_rejected(overrides: dict, match: str) -> None:
    model = tiny()
    kwargs = {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": BLOCK_TARGETS, **overrides}
    with pytest.raises(ValueError, match=match) as err:
        apply_lora(model, **kwargs)
    if "unknown" in match:
        assert all(t in str(err.value) for t in LORA_TARGETS)
    assert not has_lora(model)
    assert all(p.requires_grad for p in model.parameters())  # rejected before freezing


def test_adapting_twice_is_rejected() -> None:
    _, model = adapted()
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, rank=2, alpha=2.0, dropout=0.0, targets=("attn_qkv",))
