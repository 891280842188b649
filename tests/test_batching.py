"""Collate and batch order: the reference's semantics, by position, reproducibly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from gpt2_instruct.batching import BatchOrder, SplitError, TokenizedSplit, collate, read_meta
from gpt2_instruct.model import IGNORE_INDEX

PAD = 9


def reference_collate(batch: list[list[int]], pad: int, max_length: int):
    """The reference's custom_collate_fn, restated: mask all but the first pad by token id."""
    width = max(len(item) + 1 for item in batch)
    inputs, targets = [], []
    for item in batch:
        padded = [*item, pad] + [pad] * (width - len(item) - 1)
        x, y = torch.tensor(padded[:-1]), torch.tensor(padded[1:])
        pads = torch.nonzero(y == pad).squeeze(1)
        y[pads[1:]] = IGNORE_INDEX
        inputs.append(x[:max_length])
        targets.append(y[:max_length])
    return torch.stack(inputs), torch.stack(targets)


def test_collate_hand_made_batch() -> None:
    inputs, targets = collate([[1, 2, 3], [4, 5]], pad_id=PAD, max_length=1024)
    assert inputs.tolist() == [[1, 2, 3], [4, 5, PAD]]
    assert targets.tolist() == [[2, 3, PAD], [5, PAD, IGNORE_INDEX]]


def test_collate_matches_reference_on_pad_free_examples() -> None:
    batch = [[5, 6, 7, 8], [1], [2, 3], [4, 4, 4, 4, 4, 4]]
    for got, want in zip(
        collate(batch, pad_id=PAD, max_length=1024),
        reference_collate(batch, PAD, 1024),
        strict=True,
    ):
        assert torch.equal(got, want)


def test_truncation_keeps_the_eos_target() -> None:
    example = list(range(10))
    inputs, targets = collate([example, [1, 2]], pad_id=PAD, max_length=6)
    assert inputs[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert targets[0].tolist() == [1, 2, 3, 4, 5, PAD]  # the reference would drop the EOS here
    assert targets[1].tolist() == [2, PAD] + [IGNORE_INDEX] * 4


def test_padding_masked_by_position_not_token_id() -> None:
    # An example whose own tokens include the pad id: only positions after its EOS are masked.
    _, targets = collate([[PAD, 1, PAD, 2], [3]], pad_id=PAD, max_length=1024)
    assert targets[0].tolist() == [1, PAD, 2, PAD]
    assert targets[1].tolist() == [PAD, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]


def test_prompt_masking_keeps_the_first_response_target() -> None:
    # prompt = first 3 tokens; the target predicting token 3 (first response token) stays.
    _, targets = collate(
        [[10, 11, 12, 20, 21], [10, 11, 22]], pad_id=PAD, max_length=1024, prompt_lengths=[3, 2]
    )
    assert targets[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 20, 21, PAD]
    assert targets[1].tolist() == [IGNORE_INDEX, 22, PAD, IGNORE_INDEX, IGNORE_INDEX]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=20), min_size=1, max_size=6),
    st.integers(2, 25),
)
def test_collate_invariants(batch: list[list[int]], max_length: int) -> None:
    inputs, targets = collate(batch, pad_id=PAD, max_length=max_length)
    assert inputs.shape == targets.shape
    assert inputs.shape[1] == min(max(len(b) for b in batch), max_length)
    for row, example in enumerate(batch):
        n = min(len(example), max_length)
        assert inputs[row, :n].tolist() == example[:n]
        assert targets[row, : n - 1].tolist() == example[1:n]
        assert targets[row, n - 1].item() == PAD
        assert (targets[row, n:] == IGNORE_INDEX).all()
        assert (inputs[row, n:] == PAD).all()


def test_reference_order_replays_dataloader_with_evaluation_draws() -> None:
    """Epoch batches and the evaluation's fresh train batches come out as the reference's."""
    n, size = 53, 8
    torch.manual_seed(123)
    loader = DataLoader(range(n), batch_size=size, shuffle=True, drop_last=True, collate_fn=list)
    val_loader = DataLoader(range(5), batch_size=size, collate_fn=list)
    expected = []
    for _epoch in range(2):
        epoch = []
        for step, batch in enumerate(loader):
            epoch.append(batch)
            if step % 3 == 0:  # evaluation on the training loader: a fresh iterator, 2 batches
                expected.append(("eval", [b for _, b in zip(range(2), loader, strict=False)]))
                list(val_loader)  # an unshuffled loader draws a base seed too
        expected.append(("epoch", epoch))

    order = BatchOrder(torch.ones(n, dtype=torch.long), size, seed=123)
    got = []
    for _epoch in range(2):
        epoch = order.epoch()
        for step in range(len(epoch)):
            if step % 3 == 0:
                got.append(("eval", order.sample_batches(2)))
                order.skip_unshuffled_iterator()
        got.append(("epoch", epoch))
    # Same draws in the same sequence: compare the evaluation and epoch batches in order.
    assert [g for g in got if g[0] == "epoch"] == [e for e in expected if e[0] == "epoch"]
    assert [g for g in got if g[0] == "eval"] == [e for e in expected if e[0] == "eval"]


def test_length_grouped_order_is_a_seeded_reshuffled_partition_with_less_padding() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 200, (300,), generator=gen)
    grouped = BatchOrder(lengths, 8, seed=1, mode="length_grouped", pool_batches=8)
    again = BatchOrder(lengths, 8, seed=1, mode="length_grouped", pool_batches=8)
    first, second = grouped.epoch(), grouped.epoch()
    assert first == again.epoch()
    assert first != second
    for epoch in (first, second):
        assert len(epoch) == 300 // 8
        flat = [i for batch in epoch for i in batch]
        assert len(set(flat)) == len(flat) == (300 // 8) * 8

    def padding(batches: list[list[int]]) -> float:
        padded = sum(len(b) * int(lengths[b].max()) for b in batches)
        return 1 - sum(int(lengths[b].sum()) for b in batches) / padded

    reference = BatchOrder(lengths, 8, seed=1).epoch()
    assert padding(first) < padding(reference) / 3


def test_tokenized_split_round_trip(tmp_path) -> None:
    split = TokenizedSplit.from_lists([[1, 2, 3], [4], [5, 6]], [2, 1, 1])
    split.save(tmp_path / "s.safetensors")
    again = TokenizedSplit.load(tmp_path / "s.safetensors")
    assert [again[i] for i in range(3)] == [[1, 2, 3], [4], [5, 6]]
    assert again.lengths.tolist() == [3, 1, 2]
    assert again.prompt_lengths.tolist() == [2, 1, 1]
    assert list(tmp_path.iterdir()) == [tmp_path / "s.safetensors"]


def _good() -> dict[str, torch.Tensor]:
    split = TokenizedSplit.from_lists([[1, 2, 3], [4, 5]], [2, 1])
    return {"ids": split.ids, "offsets": split.offsets, "prompt_lengths": split.prompt_lengths}


def _ids_out_of_vocab(t):
    t["ids"] = torch.tensor([1, 2, 3, 4, 99], dtype=torch.int32)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda t: t.pop("offsets"), "missing tensors"),
        (lambda t: t.update(ids=t["ids"].float()), "1-D integer"),
        (lambda t: t.update(offsets=t["offsets"].view(1, -1)), "1-D integer"),
        (lambda t: t.update(offsets=torch.tensor([0, 3, 9])), "offsets do not match"),
        (lambda t: t.update(offsets=torch.tensor([1, 3, 5])), "offsets do not match"),
        (lambda t: t.update(offsets=torch.tensor([0, 5, 5])), "offsets do not match"),
        (
            lambda t: t.update(prompt_lengths=torch.tensor([4, 1], dtype=torch.int32)),
            "prompt length",
        ),
        (
            lambda t: t.update(prompt_lengths=torch.tensor([-1, 1], dtype=torch.int32)),
            "prompt length",
        ),
        (_ids_out_of_vocab, "outside the model's vocabulary of 50"),
        (lambda t: t.update(ids=-t["ids"]), "outside the model's vocabulary"),
    ],
)
def test_a_damaged_split_is_refused_naming_the_file(tmp_path: Path, damage, message: str) -> None:
    """A hand-edited split fails on load, not as an IndexError deep in batching."""
    from safetensors.torch import save_file

    tensors = _good()
    damage(tensors)
    path = tmp_path / "train.safetensors"
    save_file(tensors, path)
    with pytest.raises(SplitError, match=message) as info:
        TokenizedSplit.load(path, vocab_size=50)
    assert str(path) in str(info.value)


def test_a_split_that_is_not_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "train.safetensors"
    path.write_bytes(b"\x80\x04pickle")
    with pytest.raises(SplitError, match="not a readable safetensors file"):
        TokenizedSplit.load(path)
    TokenizedSplit.from_lists([[1, 2]], [1]).save(path)
    assert TokenizedSplit.load(path, vocab_size=3)[0] == [1, 2]


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ([], "JSON object"),
        ({"vocab_size": 50257, "eot_id": 50256}, "'prompt_style' must be str"),
        ({"vocab_size": "50257", "eot_id": 50256, "prompt_style": "alpaca"}, "'vocab_size'"),
        ({"vocab_size": 50257, "eot_id": True, "prompt_style": "alpaca"}, "'eot_id' must be int"),
        ({"vocab_size": 50257, "eot_id": 50257, "prompt_style": "alpaca"}, "outside the vocab"),
    ],
)
def test_meta_json_fields_are_checked(tmp_path: Path, meta: object, message: str) -> None:
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta))
    with pytest.raises(SplitError, match=message):
        read_meta(path)
