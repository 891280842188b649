"""Preference tuning (DPO): exact to the reference recipe, validated data, and the dpo stage.

The reference is restated below in its own style and names (ch07 bonus
``04_preference-tuning-with-dpo/dpo-from-scratch.ipynb``: ``format_input``,
``PreferenceDataset``, ``custom_collate_fn``, ``compute_logprobs``, ``compute_dpo_loss``,
``compute_dpo_loss_batch``, ``compute_dpo_loss_loader``, ``evaluate_dpo_loss_loader``,
``train_model_dpo_simple``), with a second, frozen reference model and a real
``DataLoader``; none of it imports ``gpt2_instruct.dpo``. Our code caches the reference
model's log-probs per example and runs chosen and rejected in one forward pass: the same
numbers up to float rounding, hence the tolerances.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset

from gpt2_instruct import dpo as prefs
from gpt2_instruct.data import DataError, Entry
from gpt2_instruct.model import GPTConfig, GPTModel
from gpt2_instruct.model_dir import load_instruct_model
from gpt2_instruct.params import DpoParams, ParamsError, PrepareParams, load_params
from gpt2_instruct.stages.dpo import dpo as run_dpo_stage
from gpt2_instruct.tokenizer import load_tokenizer
from gpt2_instruct.weights import CONFIG_KEY, save_model

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
PREFERENCE_FILE = SHARED_DATA / "instruction-data-with-preference.json"
PREFERENCE_SHA256 = "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"
PAD = 7  # any id: padding is masked
MERGES = [("t", "h"), ("e", "r"), ("Ġ", "t"), ("Ġ", "a"), ("i", "n"), ("Ċ", "Ċ")]


# ----------------------------------------------------- the reference, restated
def format_input(entry):
    instruction_text = (
        f"Below is an instruction that describes a task. "
        f"Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
    return instruction_text + input_text


class PreferenceDataset(Dataset):
    def __init__(self, data, tokenizer):
        self.data = data
        self.encoded_texts = []
        for entry in data:
            prompt = format_input(entry)
            rejected_response = entry["rejected"]
            chosen_response = entry["chosen"]
            prompt_tokens = tokenizer.encode(prompt)
            chosen_full_text = f"{prompt}\n\n### Response:\n{chosen_response}"
            rejected_full_text = f"{prompt}\n\n### Response:\n{rejected_response}"
            chosen_full_tokens = tokenizer.encode(chosen_full_text)
            rejected_full_tokens = tokenizer.encode(rejected_full_text)
            self.encoded_texts.append(
                {
                    "prompt": prompt_tokens,
                    "chosen": chosen_full_tokens,
                    "rejected": rejected_full_tokens,
                }
            )

    def __getitem__(self, index):
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)


def custom_collate_fn(
    batch, pad_token_id=50256, allowed_max_length=None, mask_prompt_tokens=True, device="cpu"
):
    batch_data = {
        "prompt": [],
        "chosen": [],
        "rejected": [],
        "rejected_mask": [],
        "chosen_mask": [],
    }
    max_length_common = 0
    if batch:
        for key in ["chosen", "rejected"]:
            current_max = max(len(item[key]) + 1 for item in batch)
            max_length_common = max(max_length_common, current_max)
    for item in batch:
        prompt = torch.tensor(item["prompt"])
        batch_data["prompt"].append(prompt)
        for key in ["chosen", "rejected"]:
            sequence = item[key]
            padded = sequence + [pad_token_id] * (max_length_common - len(sequence))
            mask = torch.ones(len(padded)).bool()
            mask[len(sequence) :] = False
            if mask_prompt_tokens:
                mask[: prompt.shape[0] + 2] = False
            batch_data[key].append(torch.tensor(padded))
            batch_data[f"{key}_mask"].append(mask)
    for key in ["chosen", "rejected", "chosen_mask", "rejected_mask"]:
        tensor_stack = torch.stack(batch_data[key])
        if allowed_max_length is not None:
            tensor_stack = tensor_stack[:, :allowed_max_length]
        batch_data[key] = tensor_stack.to(device)
    return batch_data


def compute_logprobs(logits, labels, selection_mask=None):
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    log_probs = F.log_softmax(logits, dim=-1)
    selected_log_probs = torch.gather(input=log_probs, dim=-1, index=labels.unsqueeze(-1)).squeeze(
        -1
    )
    if selection_mask is not None:
        mask = selection_mask[:, 1:].clone()
        selected_log_probs = selected_log_probs * mask
        avg_log_prob = selected_log_probs.sum(-1) / mask.sum(-1)
        return avg_log_prob
    else:
        return selected_log_probs.mean(-1)


def compute_dpo_loss(
    model_chosen_logprobs,
    model_rejected_logprobs,
    reference_chosen_logprobs,
    reference_rejected_logprobs,
    beta=0.1,
):
    model_logratios = model_chosen_logprobs - model_rejected_logprobs
    reference_logratios = reference_chosen_logprobs - reference_rejected_logprobs
    logits = model_logratios - reference_logratios
    losses = -F.logsigmoid(beta * logits)
    chosen_rewards = (model_chosen_logprobs - reference_chosen_logprobs).detach()
    rejected_rewards = (model_rejected_logprobs - reference_rejected_logprobs).detach()
    return losses.mean(), chosen_rewards.mean(), rejected_rewards.mean()


def compute_dpo_loss_batch(batch, policy_model, reference_model, beta):
    policy_chosen_log_probas = compute_logprobs(
        logits=policy_model(batch["chosen"]),
        labels=batch["chosen"],
        selection_mask=batch["chosen_mask"],
    )
    policy_rejected_log_probas = compute_logprobs(
        logits=policy_model(batch["rejected"]),
        labels=batch["rejected"],
        selection_mask=batch["rejected_mask"],
    )
    with torch.no_grad():
        ref_chosen_log_probas = compute_logprobs(
            logits=reference_model(batch["chosen"]),
            labels=batch["chosen"],
            selection_mask=batch["chosen_mask"],
        )
        ref_rejected_log_probas = compute_logprobs(
            logits=reference_model(batch["rejected"]),
            labels=batch["rejected"],
            selection_mask=batch["rejected_mask"],
        )
    loss, chosen_rewards, rejected_rewards = compute_dpo_loss(
        model_chosen_logprobs=policy_chosen_log_probas,
        model_rejected_logprobs=policy_rejected_log_probas,
        reference_chosen_logprobs=ref_chosen_log_probas,
        reference_rejected_logprobs=ref_rejected_log_probas,
        beta=beta,
    )
    return loss, chosen_rewards, rejected_rewards


def compute_dpo_loss_loader(data_loader, policy_model, reference_model, beta, num_batches=None):
    total_loss, total_chosen_rewards, total_rejected_rewards = 0.0, 0.0, 0.0
    if len(data_loader) == 0:
        return float("nan")
    elif num_batches is None:
        num_batches = len(data_loader)
    else:
        num_batches = min(num_batches, len(data_loader))
    for i, batch in enumerate(data_loader):
        if i < num_batches:
            loss, chosen_rewards, rejected_rewards = compute_dpo_loss_batch(
                batch=batch, policy_model=policy_model, reference_model=reference_model, beta=beta
            )
            total_loss += loss.item()
            total_chosen_rewards += chosen_rewards.item()
            total_rejected_rewards += rejected_rewards.item()
        else:
            break
    total_loss /= num_batches
    total_chosen_rewards /= num_batches
    total_rejected_rewards /= num_batches
    return total_loss, total_chosen_rewards, total_rejected_rewards


def evaluate_dpo_loss_loader(
    policy_model, reference_model, train_loader, val_loader, beta, eval_iter
):
    policy_model.eval()
    with torch.no_grad():
        train_loss, train_chosen_rewards, train_rejected_rewards = compute_dpo_loss_loader(
            data_loader=train_loader,
            policy_model=policy_model,
            reference_model=reference_model,
            beta=beta,
            num_batches=eval_iter,
        )
        val_loss, val_chosen_rewards, val_rejected_rewards = compute_dpo_loss_loader(
            data_loader=val_loader,
            policy_model=policy_model,
            reference_model=reference_model,
            beta=beta,
            num_batches=eval_iter,
        )
    res = {
        "train_loss": train_loss,
        "train_chosen_reward": train_chosen_rewards,
        "train_rejected_reward": train_rejected_rewards,
        "val_loss": val_loss,
        "val_chosen_reward": val_chosen_rewards,
        "val_rejected_reward": val_rejected_rewards,
    }
    policy_model.train()
    return res


def train_model_dpo_simple(
    policy_model, reference_model, train_loader, val_loader, optimizer, num_epochs, beta,
    eval_freq, eval_iter, max_steps=None,
):  # fmt: skip
    """The reference's loop (its sample generation after each epoch left out: greedy, no RNG);
    ``max_steps`` stops it early, as ``dpo.max_steps`` does."""
    tracking = {
        "train_losses": [], "train_chosen_rewards": [], "train_rejected_rewards": [],
        "val_losses": [], "val_chosen_rewards": [], "val_rejected_rewards": [], "tokens_seen": [],
    }  # fmt: skip
    tokens_seen, global_step = 0, -1
    for _epoch in range(num_epochs):
        policy_model.train()
        for batch in train_loader:
            optimizer.zero_grad()
            loss, chosen_rewards, rejected_rewards = compute_dpo_loss_batch(  # noqa: RUF059
                batch=batch, policy_model=policy_model, reference_model=reference_model, beta=beta
            )
            loss.backward()
            optimizer.step()
            tokens_seen += batch["chosen"].numel()
            global_step += 1
            if global_step % eval_freq == 0:
                res = evaluate_dpo_loss_loader(
                    policy_model=policy_model,
                    reference_model=reference_model,
                    train_loader=train_loader,
                    val_loader=val_loader,
                    beta=beta,
                    eval_iter=eval_iter,
                )
                tracking["train_losses"].append(res["train_loss"])
                tracking["train_chosen_rewards"].append(res["train_chosen_reward"])
                tracking["train_rejected_rewards"].append(res["train_rejected_reward"])
                tracking["val_losses"].append(res["val_loss"])
                tracking["val_chosen_rewards"].append(res["val_chosen_reward"])
                tracking["val_rejected_rewards"].append(res["val_rejected_reward"])
                tracking["tokens_seen"].append(tokens_seen)
            if max_steps is not None and global_step + 1 >= max_steps:
                return tracking
    return tracking


# ----------------------------------------------------------------- helpers
def _random_examples(count: int, seed: int, vocab: int = 60) -> list[prefs.PreferenceExample]:
    """Hand-made token ids: prompts and answers of assorted lengths."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    out = []
    for _ in range(count):
        prompt = ids(int(torch.randint(2, 9, (1,), generator=g)))
        header = ids(4)  # "\n\n" + the rest of the response header
        chosen = prompt + header + ids(int(torch.randint(1, 7, (1,), generator=g)))
        rejected = prompt + header + ids(int(torch.randint(1, 7, (1,), generator=g)))
        out.append(prefs.PreferenceExample(prompt, chosen, rejected))
    return out


def _as_items(examples: list[prefs.PreferenceExample]) -> list[dict[str, list[int]]]:
    return [dataclasses.asdict(e) for e in examples]


def _tiny_model(vocab: int, seed: int = 0, context: int = 64) -> GPTModel:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab, context_length=context, n_embd=32, n_layer=2, n_head=2)
    return GPTModel(config)


def _ours(batch: prefs.PreferenceBatch) -> dict[str, torch.Tensor]:
    return dict(
        zip(("chosen", "rejected", "chosen_mask", "rejected_mask"), batch.tensors(), strict=True)
    )


# --------------------------------------------------------------- collation
@pytest.mark.parametrize("mask_prompt", [True, False])
@pytest.mark.parametrize("max_length", [None, 9, 1024])
def test_collate_equals_the_reference(mask_prompt: bool, max_length: int | None) -> None:
    examples = _random_examples(6, seed=1)
    ours = prefs.collate(examples, pad_id=PAD, max_length=max_length, mask_prompt=mask_prompt)
    theirs = custom_collate_fn(
        _as_items(examples),
        pad_token_id=PAD,
        allowed_max_length=max_length,
        mask_prompt_tokens=mask_prompt,
    )
    for key, tensor in _ours(ours).items():
        assert tensor.dtype == theirs[key].dtype, key
        assert torch.equal(tensor, theirs[key]), key


def test_collate_masks_prompt_plus_two_newlines_and_padding() -> None:
    """Written out by hand: prompt of 3, header 4 (its first two: the newlines), answers 2, 1."""
    example = prefs.PreferenceExample(
        prompt=[10, 11, 12],
        chosen=[10, 11, 12, 1, 1, 20, 21, 30, 31],
        rejected=[10, 11, 12, 1, 1, 20, 21, 40],
    )
    batch = prefs.collate([example], pad_id=PAD, mask_prompt=True)
    assert batch.chosen.tolist() == [[10, 11, 12, 1, 1, 20, 21, 30, 31, PAD]]  # longest + 1
    assert batch.rejected.tolist() == [[10, 11, 12, 1, 1, 20, 21, 40, PAD, PAD]]
    F_, T_ = False, True
    assert batch.chosen_mask.tolist() == [[F_, F_, F_, F_, F_, T_, T_, T_, T_, F_]]
    assert batch.rejected_mask.tolist() == [[F_, F_, F_, F_, F_, T_, T_, T_, F_, F_]]
    unmasked = prefs.collate([example], pad_id=PAD, mask_prompt=False)
    assert unmasked.chosen_mask.tolist() == [[T_] * 9 + [F_]]
    assert prefs.selected_tokens(example, max_length=1024, mask_prompt=True) == (4, 3)
    assert prefs.selected_tokens(example, max_length=5, mask_prompt=True) == (0, 0)


def test_tokenized_entries_equal_the_reference_dataset(tmp_path: Path, write_bpe: Any) -> None:
    tokenizer = load_tokenizer(write_bpe(tmp_path / "bpe", MERGES))
    data = [
        {"instruction": "Say the thing.", "input": "", "output": "x",
         "chosen": "Sure, the thing.", "rejected": "Ugh. The thing."},
        {"instruction": "Rewrite this.", "input": "the input\nline", "output": "x",
         "chosen": "Here it is: the input.", "rejected": "Whatever: input"},
    ]  # fmt: skip
    reference = PreferenceDataset(data, tokenizer)
    for index, item in enumerate(data):
        entry = prefs.PreferenceEntry(
            item["instruction"], item["input"], item["output"], item["chosen"], item["rejected"]
        )
        assert prefs.format_input(entry) == format_input(item)
        ours = prefs.encode_entry(entry, tokenizer)
        assert dataclasses.asdict(ours) == reference[index]


# ------------------------------------------------------ log-probs and losses
def test_logprobs_loss_and_rewards_equal_the_reference_on_hand_made_batches() -> None:
    examples = _random_examples(5, seed=2)
    batch = prefs.collate(examples, pad_id=PAD, mask_prompt=True)
    ref_batch = custom_collate_fn(_as_items(examples), pad_token_id=PAD)
    g = torch.Generator().manual_seed(3)
    width = batch.chosen.shape[1]
    logits = {k: torch.randn(5, width, 60, generator=g) for k in ("pc", "pr", "rc", "rr")}
    ours = {
        k: prefs.compute_logprobs(logits[k], getattr(batch, side), getattr(batch, f"{side}_mask"))
        for k, side in (("pc", "chosen"), ("pr", "rejected"), ("rc", "chosen"), ("rr", "rejected"))
    }
    theirs = {
        k: compute_logprobs(logits[k], ref_batch[side], ref_batch[f"{side}_mask"])
        for k, side in (("pc", "chosen"), ("pr", "rejected"), ("rc", "chosen"), ("rr", "rejected"))
    }
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6)
    # Padding and the masked prompt do not count: changing their logits changes nothing.
    masked = ~batch.chosen_mask[:, 1:]
    noisy = logits["pc"].clone()
    noisy[:, :-1][masked] += 100.0
    torch.testing.assert_close(
        prefs.compute_logprobs(noisy, batch.chosen, batch.chosen_mask), ours["pc"], rtol=0, atol=0
    )
    for beta in (0.1, 0.5):
        out = prefs.preference_loss(
            ours["pc"], ours["pr"], ours["rc"], ours["rr"], beta=beta, loss="sigmoid"
        )
        loss, chosen, rejected = compute_dpo_loss(
            theirs["pc"], theirs["pr"], theirs["rc"], theirs["rr"], beta=beta
        )
        assert abs(out.loss.item() - loss.item()) <= 1e-6
        assert abs(out.chosen_rewards.mean().item() - chosen.item()) <= 1e-6
        assert abs(out.rejected_rewards.mean().item() - rejected.item()) <= 1e-6
        assert abs(out.reward_margin - (chosen - rejected).item()) <= 1e-6
        expected_accuracy = ((ours["pc"] - ours["rc"]) > (ours["pr"] - ours["rr"])).float().mean()
        assert out.accuracy == pytest.approx(expected_accuracy.item())
        assert not out.chosen_rewards.requires_grad


def test_the_losses_on_numbers_worked_by_hand() -> None:
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -1.5]), torch.tensor([-1.5, -1.5])
    # h = (pc - pr) - (rc - rr) = [1, -1]; rewards: chosen [0.5, -0.5], rejected [-0.5, 0.5]
    sigmoid = prefs.preference_loss(pc, pr, rc, rr, beta=0.1, loss="sigmoid")
    expected = (math.log1p(math.exp(-0.1)) + math.log1p(math.exp(0.1))) / 2
    assert sigmoid.loss.item() == pytest.approx(expected, abs=1e-6)
    assert sigmoid.chosen_rewards.tolist() == [0.5, -0.5]
    assert sigmoid.rejected_rewards.tolist() == [-0.5, 0.5]
    assert sigmoid.reward_margin == pytest.approx(0.0)
    assert sigmoid.accuracy == 0.5
    ipo = prefs.preference_loss(pc, pr, rc, rr, beta=0.1, loss="ipo")
    assert ipo.loss.item() == pytest.approx(((1 - 5) ** 2 + (-1 - 5) ** 2) / 2, abs=1e-5)
    simpo = prefs.preference_loss(pc, pr, rc, rr, beta=2.0, loss="simpo", simpo_gamma=0.5)
    expected = (math.log1p(math.exp(-(2.0 - 0.5))) + math.log1p(math.exp(2.0 + 0.5))) / 2
    assert simpo.loss.item() == pytest.approx(expected, abs=1e-6)
    assert simpo.chosen_rewards.tolist() == [0.5, -0.5]  # tracked against the reference
    with pytest.raises(ValueError, match="unknown DPO loss"):
        prefs.preference_loss(pc, pr, rc, rr, beta=0.1, loss="hinge")


def test_model_logprobs_and_cached_reference_equal_the_reference_batches() -> None:
    examples = _random_examples(6, seed=4)
    model = _tiny_model(64).eval()
    batch = prefs.collate(examples, pad_id=PAD, mask_prompt=True)
    ref_batch = custom_collate_fn(_as_items(examples), pad_token_id=PAD)
    with torch.no_grad():
        chosen, rejected = prefs.policy_logprobs(model, batch)
        their_chosen = compute_logprobs(model(ref_batch["chosen"]), ref_batch["chosen"],
                                        ref_batch["chosen_mask"])  # fmt: skip
        their_rejected = compute_logprobs(model(ref_batch["rejected"]), ref_batch["rejected"],
                                          ref_batch["rejected_mask"])  # fmt: skip
    torch.testing.assert_close(chosen, their_chosen, rtol=0, atol=1e-6)
    torch.testing.assert_close(rejected, their_rejected, rtol=0, atol=1e-6)
    cached = prefs.reference_logprobs(
        model, examples, pad_id=PAD, max_length=1024, mask_prompt=True, device=torch.device("cpu")
    )
    torch.testing.assert_close(cached.chosen, their_chosen, rtol=0, atol=1e-6)
    torch.testing.assert_close(cached.rejected, their_rejected, rtol=0, atol=1e-6)
    order = [4, 0, 5]
    c, r = cached.take(order, torch.device("cpu"))
    assert torch.equal(c, cached.chosen[order]) and torch.equal(r, cached.rejected[order])


# -------------------------------------------------------------- training
def _reference_run(
    model: GPTModel,
    train: list[prefs.PreferenceExample],
    val: list[prefs.PreferenceExample],
    params: DpoParams,
) -> tuple[GPTModel, dict[str, list[float]]]:
    """The reference's set-up and loop on a copy of ``model``: two models, real loaders."""
    policy_model = copy.deepcopy(model)
    reference_model = copy.deepcopy(model)
    reference_model.eval()
    collate_fn = partial(
        custom_collate_fn,
        pad_token_id=PAD,
        mask_prompt_tokens=params.mask_prompt,
        allowed_max_length=params.max_length,
    )
    train_loader = DataLoader(
        _as_items(train),
        batch_size=params.batch_size,
        collate_fn=collate_fn,
        shuffle=True,
        drop_last=True,
    )
    val_loader = DataLoader(
        _as_items(val),
        batch_size=params.batch_size,
        collate_fn=collate_fn,
        shuffle=False,
        drop_last=False,
    )
    torch.manual_seed(params.seed)
    optimizer = torch.optim.AdamW(
        policy_model.parameters(), lr=params.lr, weight_decay=params.weight_decay
    )
    tracking = train_model_dpo_simple(
        policy_model, reference_model, train_loader, val_loader, optimizer,
        num_epochs=params.epochs, beta=params.beta, eval_freq=params.eval_every,
        eval_iter=params.eval_batches, max_steps=params.max_steps,
    )  # fmt: skip
    return policy_model, tracking


def _our_run(
    model: GPTModel,
    train: list[prefs.PreferenceExample],
    val: list[prefs.PreferenceExample],
    params: DpoParams,
) -> tuple[GPTModel, prefs.DpoRun]:
    """Our recipe: the reference log-probs cached per example, then one model trained."""
    policy = copy.deepcopy(model)
    cpu = torch.device("cpu")
    reference = {
        name: prefs.reference_logprobs(
            policy,
            split,
            pad_id=PAD,
            max_length=params.max_length,
            mask_prompt=params.mask_prompt,
            device=cpu,
        )
        for name, split in (("train", train), ("val", val))
    }
    run = prefs.train(
        policy, {"train": train, "val": val}, reference, params, pad_id=PAD, device=cpu
    )
    return policy, run


def _assert_same_weights(ours: GPTModel, theirs: GPTModel, atol: float) -> None:
    mine, other = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == other.keys()
    for name, tensor in mine.items():
        torch.testing.assert_close(tensor, other[name], rtol=0, atol=atol, msg=name)


def test_one_optimizer_step_equals_the_reference() -> None:
    examples = _random_examples(20, seed=5)
    train, val = examples[:14], examples[14:]
    params = DpoParams(enabled=True, batch_size=4, max_steps=1, lr=1e-3)
    model = _tiny_model(64, seed=6)
    ours, run = _our_run(model, train, val, params)
    theirs, tracking = _reference_run(model, train, val, params)
    assert run.step == 1
    changed = max((a - b).abs().max().item() for a, b in zip(
        ours.parameters(), model.parameters(), strict=True))  # fmt: skip
    assert changed > 1e-4  # the step moved the weights
    _assert_same_weights(ours, theirs, atol=1e-6)
    row = run.log[0]  # evaluated after step 1, as the reference's step 0
    assert row["train_loss"] == pytest.approx(tracking["train_losses"][0], abs=1e-6)
    assert row["val_loss"] == pytest.approx(tracking["val_losses"][0], abs=1e-6)
    assert row["tokens_seen"] == tracking["tokens_seen"][0]


def test_training_and_its_log_equal_the_reference_over_epochs() -> None:
    """Two epochs, evaluations every 3 steps: the same batches, weights and tracked figures."""
    examples = _random_examples(26, seed=7)
    train, val = examples[:17], examples[17:]
    params = DpoParams(
        enabled=True, batch_size=4, epochs=2, eval_every=3, eval_batches=2, lr=5e-4, beta=0.5
    )
    model = _tiny_model(64, seed=8)
    ours, run = _our_run(model, train, val, params)
    theirs, tracking = _reference_run(model, train, val, params)
    assert run.step == 8  # 2 epochs of 17 // 4 batches
    _assert_same_weights(ours, theirs, atol=1e-5)  # ~1e-7 rounding per step, lr * sign moves
    evaluated = [row for row in run.log if (row["step"] - 1) % params.eval_every == 0]
    assert [row["step"] for row in evaluated] == [1, 4, 7]
    assert run.log[-1]["step"] == 8  # and a final row
    for i, row in enumerate(evaluated):
        for split in ("train", "val"):
            assert row[f"{split}_loss"] == pytest.approx(tracking[f"{split}_losses"][i], abs=1e-6)
            chosen = tracking[f"{split}_chosen_rewards"][i]
            rejected = tracking[f"{split}_rejected_rewards"][i]
            assert row[f"{split}_chosen_reward"] == pytest.approx(chosen, abs=1e-6)
            assert row[f"{split}_rejected_reward"] == pytest.approx(rejected, abs=1e-6)
            assert row[f"{split}_reward_margin"] == pytest.approx(chosen - rejected, abs=1e-6)
        assert row["tokens_seen"] == tracking["tokens_seen"][i]


def _polite_data(count: int, seed: int) -> list[prefs.PreferenceEntry]:
    """Preferred answers open politely, dispreferred ones rudely; the rest is shared."""
    g = torch.Generator().manual_seed(seed)
    words = ["tea", "rain", "the map", "a tree", "ten", "an inn", "her art", "the net"]
    entries = []
    for _ in range(count):
        a, b = (words[int(i)] for i in torch.randint(0, len(words), (2,), generator=g))
        answer = f"{a} and {b}."
        entries.append(
            prefs.PreferenceEntry(
                f"Name {a}.", b, answer, f"Sure, thanks: {answer}", f"Ugh, fine: {answer}"
            )
        )
    return entries


def test_dpo_raises_the_reward_margin_and_preference_on_held_out_pairs(
    tmp_path: Path, write_bpe: Any
) -> None:
    tokenizer = load_tokenizer(write_bpe(tmp_path / "bpe", MERGES))
    encode = partial(prefs.encode_entry, tokenizer=tokenizer)
    train = [encode(e) for e in _polite_data(32, seed=9)]
    held_out = [encode(e) for e in _polite_data(8, seed=10)]
    params = DpoParams(enabled=True, batch_size=8, epochs=6, lr=1e-3, beta=0.5, eval_every=4)
    model = _tiny_model(tokenizer.vocab_size, seed=11, context=256)
    cpu = torch.device("cpu")
    before = prefs.reference_logprobs(
        model, held_out, pad_id=tokenizer.eot_id, max_length=256, mask_prompt=True, device=cpu
    )
    policy, run = _our_run(model, train, held_out, params)
    after = prefs.reference_logprobs(
        policy, held_out, pad_id=tokenizer.eot_id, max_length=256, mask_prompt=True, device=cpu
    )
    # Before training the policy is the reference: margin 0, loss log(2); then both move.
    margins = [row["val_reward_margin"] for row in run.log]
    assert margins[-1] > max(0.5, 2 * margins[0]), margins
    assert run.log[-1]["val_accuracy"] == 1.0
    assert run.log[-1]["val_loss"] < math.log(2) - 0.05
    # The preferred answers' likelihood relative to the dispreferred ones rose, pair by pair.
    gain = (after.chosen - after.rejected) - (before.chosen - before.rejected)
    assert bool((gain > 0).all()), gain


# ------------------------------------------------------------------ data
def _raw(count: int = 20) -> list[dict[str, Any]]:
    return [e.to_dict() for e in _polite_data(count, seed=12)]


def _data_error(tmp_path: Path, raw: Any, text: str | None = None) -> str:
    path = tmp_path / "prefs.json"
    path.write_text(text if text is not None else json.dumps(raw), encoding="utf-8")
    with pytest.raises(DataError) as info:
        prefs.load_preference_entries(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize(
    ("change", "entry", "words"),
    [
        (lambda e: e.pop("chosen"), 3, ["missing required field 'chosen'"]),
        (lambda e: e.update(rejected=""), 4, ["'rejected'", "non-empty string", "empty string"]),
        (lambda e: e.update(rejected="  \u200b "), 0, ["'rejected'", "non-empty"]),
        (lambda e: e.update(chosen=["a"]), 7, ["'chosen'", "got list"]),
        (lambda e: e.update(chosen=None), 2, ["'chosen'", "got null"]),
        (lambda e: e.update(instruction=" "), 5, ["'instruction'", "non-empty"]),
        (lambda e: e.update(Input="x"), 1, ["'Input'", "misspelt 'input'"]),
    ],
)
def test_bad_entries_fail_in_one_line_naming_file_entry_and_field(
    tmp_path: Path, change: Any, entry: int, words: list[str]
) -> None:
    raw = _raw()
    change(raw[entry])
    message = _data_error(tmp_path, raw)
    assert f"entry {entry}:" in message
    for word in words:
        assert word in message


def test_a_repeated_answer_and_a_bad_file_are_errors(tmp_path: Path) -> None:
    text = json.dumps(_raw(3)).replace('"chosen": ', '"chosen": "first", "chosen": ', 1)
    message = _data_error(tmp_path, None, text)
    assert "entry 0: field 'chosen' appears more than once with different values" in message
    assert "top level must be a JSON list" in _data_error(tmp_path, {"a": 1})
    assert "entry 1: must be a JSON object" in _data_error(tmp_path, [_raw(1)[0], 5])
    _data_error(tmp_path, None, "[{")  # truncated JSON: one line naming the file


def test_entries_split_like_the_instruction_data() -> None:
    entries = [
        prefs.PreferenceEntry(f"i{n}", "", "o", "c", "r") for n in range(1100)
    ]  # the reference's 1,100
    split = prefs.split_preferences(entries)
    assert {k: len(v) for k, v in split.items()} == {"train": 935, "val": 55, "test": 110}
    assert split["train"] == entries[:935]
    assert split["test"] == entries[935:1045] and split["val"] == entries[1045:]
    assert isinstance(split["val"][0], prefs.PreferenceEntry)
    assert isinstance(split["val"][0], Entry)  # prompts: data.format_prompt's


def test_real_preference_data_and_gpt2_tokens(shared_data: Path) -> None:
    if not PREFERENCE_FILE.is_file():
        pytest.skip(f"{PREFERENCE_FILE} not present")
    assert hashlib.sha256(PREFERENCE_FILE.read_bytes()).hexdigest() == PREFERENCE_SHA256
    entries = prefs.load_preference_entries(PREFERENCE_FILE)
    split = prefs.split_preferences(entries)
    assert {k: len(v) for k, v in split.items()} == {"train": 935, "val": 55, "test": 110}
    tokenizer = load_tokenizer(shared_data / "gpt2-encoding")
    newline = tokenizer.encode("\n")
    for entry in entries:
        example = prefs.encode_entry(entry, tokenizer)
        n = len(example.prompt)
        for full in (example.chosen, example.rejected):
            # The prompt's tokens start the sequence, and the +2 masks exactly "\n", "\n".
            assert full[:n] == example.prompt
            assert full[n : n + 2] == newline * 2
    raw = json.loads(PREFERENCE_FILE.read_text(encoding="utf-8"))
    reference = PreferenceDataset(raw[:50], tokenizer)
    for i in range(50):
        assert dataclasses.asdict(prefs.encode_entry(entries[i], tokenizer)) == reference[i]


# ------------------------------------------------------------------ params
def test_dpo_params_are_checked(tmp_path: Path) -> None:
    assert DpoParams().enabled is False  # off by default: dvc repro is the SFT run
    assert (DpoParams().beta, DpoParams().lr, DpoParams().weight_decay) == (0.1, 5e-6, 0.01)
    assert DpoParams().data_sha256 == PREFERENCE_SHA256
    path = tmp_path / "params.yaml"
    for text, words in (
        ("dpo:\n  loss: hinge\n", ["dpo.loss", "'hinge'", "'ipo'"]),
        ("dpo:\n  beta: 0\n", ["dpo", "beta must be > 0"]),
        ("dpo:\n  data_sha256: abc\n", ["dpo", "data_sha256 must be 64 hex digits"]),
        ("dpo:\n  batch_size: 0\n", ["dpo", "batch_size must be in 1.."]),
        ("dpo:\n  lr: -1\n", ["dpo", "lr must be > 0"]),
        ("dpo:\n  enabled: yes please\n", ["dpo.enabled", "true or false"]),
    ):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ParamsError) as info:
            load_params(path)
        for word in words:
            assert word in str(info.value), (text, str(info.value))
    path.write_text("dpo:\n  enabled: true\n  loss: ipo\n  lora:\n    rank: 4\n", encoding="utf-8")
    loaded = load_params(path).dpo
    assert loaded.enabled and loaded.loss == "ipo" and loaded.lora.rank == 4
    assert prefs.DPO_LOSSES == ("sigmoid", "ipo", "simpo")


# ------------------------------------------------------------------ the stage
STAGE_PATHS = {
    "out": "data/dpo/model",
    "prepared": "data/dpo/prepared",
    "reference": "data/dpo/reference_logprobs.safetensors",
    "metrics": "metrics/dpo.json",
    "log": "metrics/dpo_log.tsv",
    "plot": "plots/dpo.png",
    "live": "dvclive_dpo",
}


def _tiny_inputs(root: Path, write_bpe: Any, entries: int = 40) -> dict[str, Path]:
    """An instruction-tuned model folder (random, tiny) and a preference data file."""
    model_dir = root / "data/model"
    tokenizer = load_tokenizer(write_bpe(model_dir, MERGES))
    model = _tiny_model(tokenizer.vocab_size, seed=13, context=256)
    model.untie_embeddings()  # finetune's default layout: a separate head
    save_model(model, model_dir, extra_config={CONFIG_KEY: {"prompt_style": "alpaca"}})
    data = root / "prefs.json"
    data.write_text(json.dumps(_raw(entries)), encoding="utf-8")
    return {"model": model_dir, "data": data, **{k: root / v for k, v in STAGE_PATHS.items()}}


def _stage(paths: dict[str, Path], params: DpoParams) -> dict[str, Any]:
    return run_dpo_stage(
        params, PrepareParams(), paths["model"], paths["out"], paths["prepared"],
        paths["reference"], paths["metrics"], paths["log"], paths["plot"], paths["live"],
        max_new_tokens=16,
    )  # fmt: skip


def test_the_stage_script_trains_exports_and_logs(tmp_path: Path, write_bpe: Any) -> None:
    paths = _tiny_inputs(tmp_path, write_bpe)
    (tmp_path / "params.yaml").write_text(
        "dpo:\n  enabled: true\n  data_url: prefs.json\n  data_sha256: null\n  batch_size: 4\n"
        "  max_steps: 6\n  eval_every: 2\n  eval_batches: 2\n  lr: 1.0e-3\n  device: cpu\n"
        "generate:\n  max_new_tokens: 16\n",
        encoding="utf-8",
    )
    args = [arg for name, path in paths.items() if name != "data"
            for arg in (f"--{name}", str(path))]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages/dpo.py"), *args],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(paths["metrics"].read_text(encoding="utf-8"))
    assert report["enabled"] is True and report["steps"] == 6
    assert report["entries"] == {"train": 34, "val": 2, "test": 4}
    assert report["reference_logprobs"] == "computed"
    for key in ("train_loss", "val_loss", "val_reward_margin", "val_accuracy", "test_loss"):
        assert math.isfinite(report[key]), key
    rows = paths["log"].read_text(encoding="utf-8").splitlines()
    assert rows[0].split("\t") == list(prefs.LOG_FIELDS)
    assert [r.split("\t")[0] for r in rows[1:]] == ["1", "3", "5", "6"]
    assert paths["plot"].read_bytes().startswith(b"\x89PNG")
    assert (paths["live"] / "plots" / "metrics" / "val" / "reward_margin.tsv").is_file()
    prepared = json.loads((paths["prepared"] / "test.json").read_text(encoding="utf-8"))
    assert len(prepared) == 4 and {"chosen", "rejected"} <= set(prepared[0])
    with safe_open(str(paths["reference"]), framework="pt") as handle:
        assert {"train.chosen", "val.rejected", "test.chosen"} <= set(handle.keys())
        assert handle.get_tensor("train.chosen").shape == (34,)
    # The exported folder loads like finetune's, with other weights than the SFT model's.
    model, _, style = load_instruct_model(paths["out"])
    sft, _, _ = load_instruct_model(paths["model"])
    assert style == "alpaca"
    assert any(not torch.equal(a, b) for a, b in zip(
        model.state_dict().values(), sft.state_dict().values(), strict=True))  # fmt: skip
    config = json.loads((paths["out"] / "config.json").read_text(encoding="utf-8"))
    assert config[CONFIG_KEY]["dpo"]["enabled"] is True
    card = (paths["out"] / "README.md").read_text(encoding="utf-8")
    assert "Preference tuning (DPO)" in card and "preference losses" in card


def test_the_stage_reuses_the_reference_cache_only_when_its_key_matches(
    tmp_path: Path, write_bpe: Any
) -> None:
    paths = _tiny_inputs(tmp_path, write_bpe)
    params = DpoParams(
        enabled=True, data_url=str(paths["data"]), data_sha256=None, batch_size=4,
        max_steps=2, device="cpu",
    )  # fmt: skip
    first = _stage(paths, params)
    assert first["reference_logprobs"] == "computed"
    cache = paths["reference"].read_bytes()
    second = _stage(paths, dataclasses.replace(params, beta=0.3, lr=1e-4))  # not in the key
    assert second["reference_logprobs"] == "reused"
    assert paths["reference"].read_bytes() == cache
    third = _stage(paths, dataclasses.replace(params, mask_prompt=False))  # in the key
    assert third["reference_logprobs"] == "computed"
    # A LoRA run trains adapters only and exports a plain model folder again.
    lora = dataclasses.replace(params, lora=dataclasses.replace(params.lora, rank=2))
    report = _stage(paths, lora)
    assert report["trainable_parameters"] < report["parameters"] / 4
    load_instruct_model(paths["out"])


def test_the_stage_fails_in_one_line_on_a_wrong_pin(tmp_path: Path, write_bpe: Any) -> None:
    paths = _tiny_inputs(tmp_path, write_bpe)
    params = DpoParams(enabled=True, data_url=str(paths["data"]), device="cpu")
    with pytest.raises(Exception, match="sha256") as info:
        _stage(paths, params)  # the reference data's pin, not this file's
    assert "\n" not in str(info.value)
    assert not paths["out"].exists()


def test_the_stage_when_disabled_writes_not_run_outputs_at_once(
    tmp_path: Path, write_bpe: Any
) -> None:
    paths = {k: tmp_path / v for k, v in STAGE_PATHS.items()}
    paths["model"] = tmp_path / "missing-model"  # not even read
    report = _stage(paths, DpoParams())
    assert report == {"enabled": False, "status": "not run"}
    assert json.loads(paths["metrics"].read_text(encoding="utf-8")) == report
    assert paths["log"].read_text(encoding="utf-8") == "\t".join(prefs.LOG_FIELDS) + "\n"
    assert paths["plot"].read_bytes().startswith(b"\x89PNG")
    assert (paths["out"] / "NOT_RUN.md").is_file() and (paths["live"] / "NOT_RUN.md").is_file()
    assert paths["reference"].is_file()
