"""The training loop: the reference's recipe step for step, resumable bit for bit."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from gpt2_instruct.batching import TokenizedSplit, collate
from gpt2_instruct.model import GPTConfig, GPTModel
from gpt2_instruct.params import FinetuneParams, LoRAParams
from gpt2_instruct.training import CHECKPOINT_NAME, NonFiniteLossError, Trainer

VOCAB, PAD = 61, 60
CONFIG = GPTConfig(vocab_size=VOCAB, context_length=48, n_embd=16, n_layer=2, n_head=2)


def make_split(n: int, seed: int) -> TokenizedSplit:
    gen = torch.Generator().manual_seed(seed)
    examples = [
        torch.randint(
            0, PAD, (int(torch.randint(4, 30, (1,), generator=gen)),), generator=gen
        ).tolist()
        for _ in range(n)
    ]
    return TokenizedSplit.from_lists(examples, [3] * n)


TRAIN, VAL = make_split(37, 1), make_split(11, 2)


def fresh_model() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(CONFIG)


def reference_run(params: FinetuneParams) -> tuple[list[tuple[float, float]], GPTModel, int]:
    """The reference's train_model_simple, restated with DataLoaders and the global RNG.

    Our model stands in for the reference's here (``test_reference_recipe.py`` restates
    that too); like the reference's, its output head is a trained copy of the embedding.
    """
    model = fresh_model()
    if not params.tie_embeddings:
        model.untie_embeddings()

    def loader(split: TokenizedSplit, shuffle: bool) -> DataLoader:
        return DataLoader(
            range(len(split)),
            batch_size=params.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            collate_fn=lambda b: collate(
                [split[i] for i in b], pad_id=PAD, max_length=params.max_length
            ),
        )

    def mean_loss(data: DataLoader, batches: int) -> float:
        losses = []
        for i, (x, y) in enumerate(data):
            if i >= batches:
                break
            losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
        return sum(losses) / len(losses)

    torch.manual_seed(params.seed)
    train_loader, val_loader = loader(TRAIN, True), loader(VAL, False)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=params.lr, weight_decay=params.weight_decay
    )
    log, step, tokens_seen = [], -1, 0
    for _ in range(params.epochs):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            optimizer.step()
            tokens_seen += x.numel()
            step += 1
            if step % params.eval_every == 0:
                model.eval()
                with torch.no_grad():
                    log.append(
                        (
                            mean_loss(train_loader, params.eval_batches),
                            mean_loss(val_loader, params.eval_batches),
                        )
                    )
                model.train()
    return log, model, tokens_seen


RECIPE = FinetuneParams(
    lr=1e-3, epochs=2, batch_size=4, eval_every=3, eval_batches=2, fused_optimizer=False
)


def test_matches_the_reference_loop_step_for_step() -> None:
    expected_log, expected_model, expected_tokens = reference_run(RECIPE)
    trainer = Trainer(fresh_model(), TRAIN, VAL, RECIPE, pad_id=PAD, progress=False)
    state = trainer.train()
    got = [(row["train_loss"], row["val_loss"]) for row in state.log]
    assert len(got) == len(expected_log) == -(-2 * (37 // 4) // 3)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected_log), rtol=0, atol=1e-5)
    for (name, a), b in zip(
        trainer.model.state_dict().items(), expected_model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    assert state.tokens_seen == expected_tokens


def test_fused_optimizer_learns_the_same() -> None:
    slow = Trainer(fresh_model(), TRAIN, VAL, RECIPE, pad_id=PAD, progress=False).train()
    fused_params = dataclasses.replace(RECIPE, fused_optimizer=True)
    fast = Trainer(fresh_model(), TRAIN, VAL, fused_params, pad_id=PAD, progress=False).train()
    for a, b in zip(slow.log, fast.log, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)


def test_fixed_evaluation_makes_the_order_independent_of_eval_frequency() -> None:
    def final_weights(eval_every: int, eval_train: str) -> torch.Tensor:
        params = dataclasses.replace(RECIPE, eval_every=eval_every, eval_train=eval_train)
        trainer = Trainer(fresh_model(), TRAIN, VAL, params, pad_id=PAD, progress=False)
        trainer.train()
        return trainer.model.tok_emb.weight.detach().clone()

    assert torch.equal(final_weights(1, "fixed"), final_weights(4, "fixed"))
    # The reference draws evaluation batches from the training shuffle's RNG, so epoch 2 moves.
    assert not torch.equal(final_weights(1, "reference"), final_weights(4, "reference"))


def test_mask_prompt_counts_only_response_targets() -> None:
    base = Trainer(fresh_model(), TRAIN, VAL, RECIPE, pad_id=PAD, progress=False).train()
    masked_params = dataclasses.replace(RECIPE, mask_prompt=True)
    masked = Trainer(fresh_model(), TRAIN, VAL, masked_params, pad_id=PAD, progress=False).train()
    steps = base.step
    assert masked.target_tokens == base.target_tokens - 2 * steps * 4  # 2 prompt targets per row


def test_bf16_autocast_trains_close_to_fp32() -> None:
    fp32 = Trainer(fresh_model(), TRAIN, VAL, RECIPE, pad_id=PAD, progress=False).train()
    bf16_params = dataclasses.replace(RECIPE, precision="bf16")
    bf16 = Trainer(fresh_model(), TRAIN, VAL, bf16_params, pad_id=PAD, progress=False).train()
    assert bf16.log[-1]["val_loss"] == pytest.approx(fp32.log[-1]["val_loss"], abs=5e-2)


class _CountCasts(TorchDispatchMode):
    """How often each given tensor is cast to bf16 (``aten._to_copy``; ``aten.to`` under
    inference mode), by data pointer."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.watched = {t.data_ptr() for t in tensors}
        self.casts: collections.Counter[int] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        dtypes = [kwargs.get("dtype"), *(a for a in args[1:] if isinstance(a, torch.dtype))]
        if (
            func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.to)  # to: inference
            and torch.bfloat16 in dtypes
            and args[0].data_ptr() in self.watched
        ):
            self.casts[args[0].data_ptr()] += 1
        return func(*args, **kwargs)


def test_bf16_evaluation_casts_each_weight_once_and_reports_the_same_losses() -> None:
    """Autocast keeps its casts for the region only outside inference mode: one cast of
    each weight serves every batch of an evaluation (train and validation alike)."""
    params = dataclasses.replace(RECIPE, precision="bf16", eval_batches=3, eval_train="fixed")
    trainer = Trainer(fresh_model(), TRAIN, VAL, params, pad_id=PAD, progress=False)
    matrices = [p for p in trainer.model.parameters() if p.ndim == 2]
    with _CountCasts(matrices) as counter:
        train_loss, val_loss = trainer.evaluate()
    looked_up = {trainer.model.pos_emb.weight, trainer.model.tok_emb.weight}  # untied: both
    assert trainer.model.out_head is not None
    assert set(counter.casts) == {m.data_ptr() for m in matrices if m not in looked_up}
    assert set(counter.casts.values()) == {1}

    def recast_each_batch(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return sum(trainer.model.loss(x, y).item() for x, y in batches) / len(batches)

    trainer.model.eval()
    assert trainer.schedule.fixed_train_batches is not None
    assert train_loss == recast_each_batch(trainer.schedule.fixed_train_batches)
    assert val_loss == recast_each_batch(trainer.schedule.val_batches)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    params = dataclasses.replace(RECIPE, checkpoint_every=2)
    trainer = Trainer(
        fresh_model(), TRAIN, VAL, params, pad_id=PAD, progress=False, checkpoint_dir=tmp_path
    )
    original = trainer._forward_backward

    def poisoned(*args, **kwargs):
        if trainer.state.step == 3:  # the weights go bad after step 3
            with torch.no_grad():
                trainer.model.final_norm.weight.fill_(float("nan"))
        return original(*args, **kwargs)

    trainer._forward_backward = poisoned
    with pytest.raises(NonFiniteLossError, match="step 4"):
        trainer.train()
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert saved["train_state"]["step"] == 2
    assert torch.isfinite(saved["model"]["final_norm.weight"]).all()


RUN_SCRIPT = textwrap.dedent(
    """
    import dataclasses, os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from test_training import TRAIN, VAL, PAD, RECIPE, fresh_model
    from gpt2_instruct.training import Trainer
    torch.set_num_threads(1)
    checkpoints, kill_at, sig, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    params = dataclasses.replace(RECIPE, checkpoint_every=2)
    trainer = Trainer(fresh_model(), TRAIN, VAL, params, pad_id=PAD, progress=False,
                      checkpoint_dir=checkpoints)
    trainer.load_checkpoint()
    original = trainer._forward_backward
    def step(*a, **k):
        if trainer.state.step + 1 == kill_at:
            os.kill(os.getpid(), sig)  # arrives in the middle of a step
        return original(*a, **k)
    trainer._forward_backward = step
    state = trainer.train()
    log = [{{k: v for k, v in r.items() if k != "seconds"}} for r in state.log]
    torch.save({{"model": trainer.model.state_dict(), "log": log}}, out)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupt_mid_epoch_then_resume_is_bit_identical(tmp_path: Path, sig: int) -> None:
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT.format(tests=str(Path(__file__).parent)))

    def run(ckpt: str, kill_at: int, out: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                str(script),
                str(tmp_path / ckpt),
                str(kill_at),
                str(sig),
                str(tmp_path / out),
            ],
            timeout=120,
            check=False,
            capture_output=True,
            text=True,
        )

    assert run("a", 0, "straight.pt").returncode == 0
    # Interrupted in step 7 of 9 in epoch 1; checkpoints every 2 steps.
    killed = run("b", 7, "never.pt")
    assert killed.returncode != 0
    assert not (tmp_path / "never.pt").exists()
    saved = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)
    # SIGKILL loses the work since the step-6 checkpoint; SIGINT finishes step 7 and saves it.
    assert saved["train_state"]["step"] == (6 if sig == signal.SIGKILL else 7)
    if sig == signal.SIGINT:
        assert "interrupted after step 7" in killed.stderr
    assert run("b", 0, "resumed.pt").returncode == 0
    straight = torch.load(tmp_path / "straight.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert straight["log"] == resumed["log"]
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def test_checkpoint_from_other_params_is_not_resumed(tmp_path: Path, capsys) -> None:
    params = dataclasses.replace(RECIPE, checkpoint_every=2, max_steps=3)  # checkpoint at 2

    def trainer(p: FinetuneParams, **inputs: str) -> Trainer:
        return Trainer(
            fresh_model(), TRAIN, VAL, p, pad_id=PAD, progress=False, checkpoint_dir=tmp_path,
            inputs=inputs,
        )  # fmt: skip

    trainer(params, data="a").train()
    same = trainer(params, data="a")
    assert same.load_checkpoint() is True
    assert same.state.step == 2
    for other, inputs, changed in [
        (dataclasses.replace(params, lr=2e-3), {"data": "a"}, "params.lr"),
        (dataclasses.replace(params, tie_embeddings=True), {"data": "a"}, "model.tie_embeddings"),
        (params, {"data": "b"}, "inputs.data"),
    ]:
        trainer(params, data="a").train()  # a fresh checkpoint at step 2
        assert trainer(other, **inputs).load_checkpoint() is False
        assert f"changed: {changed}" in capsys.readouterr().out
        assert not (tmp_path / CHECKPOINT_NAME).exists()  # stale: deleted


def test_checkpoint_skips_the_zip_checksums_and_resumes_the_same_weights(tmp_path: Path) -> None:
    """torch.load never checks the zip's CRC-32s, so checkpoints are written without them."""
    params = dataclasses.replace(RECIPE, checkpoint_every=2, max_steps=3)  # checkpoint at 2
    Trainer(
        fresh_model(), TRAIN, VAL, params, pad_id=PAD, progress=False, checkpoint_dir=tmp_path
    ).train()
    with zipfile.ZipFile(tmp_path / CHECKPOINT_NAME) as archive:
        assert {info.CRC for info in archive.infolist()} == {0}
    resumed = Trainer(
        fresh_model(), TRAIN, VAL, params, pad_id=PAD, progress=False, checkpoint_dir=tmp_path
    )
    assert resumed.load_checkpoint() is True
    assert resumed.state.step == 2
    two_steps = dataclasses.replace(params, max_steps=2)
    done = Trainer(fresh_model(), TRAIN, VAL, two_steps, pad_id=PAD, progress=False)
    done.train()
    for name, tensor in done.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


@pytest.mark.parametrize("checkpoint_every", [0, 3], ids=["epoch ends", "every 3 steps"])
def test_no_checkpoint_is_written_after_the_last_step(
    tmp_path: Path, checkpoint_every: int
) -> None:
    """The stage exports the model and deletes the checkpoint once training ends."""
    params = dataclasses.replace(RECIPE, checkpoint_every=checkpoint_every)
    trainer = Trainer(
        fresh_model(), TRAIN, VAL, params, pad_id=PAD, progress=False, checkpoint_dir=tmp_path
    )
    saved_at: list[int] = []
    save = trainer.save_checkpoint

    def save_and_note_the_step() -> None:
        saved_at.append(trainer.state.step)
        save()

    trainer.save_checkpoint = save_and_note_the_step  # type: ignore[method-assign]
    state = trainer.train()
    per_epoch = state.step // params.epochs
    periodic = (
        list(range(checkpoint_every, state.step, checkpoint_every)) if checkpoint_every else []
    )
    assert state.step == trainer.total_steps
    assert not checkpoint_every or state.step % checkpoint_every == 0  # the last step too
    assert sorted(saved_at) == sorted([*periodic, per_epoch])
    last = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert last["train_state"]["step"] == max(saved_at)


def test_micro_batches_accumulate_the_full_batch_gradient() -> None:
    full = Trainer(fresh_model(), TRAIN, VAL, RECIPE, pad_id=PAD, progress=False)
    full.train()
    micro_params = dataclasses.replace(RECIPE, micro_batch_size=2)
    micro = Trainer(fresh_model(), TRAIN, VAL, micro_params, pad_id=PAD, progress=False)
    state = micro.train()
    for (name, a), b in zip(
        full.model.state_dict().items(), micro.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5, msg=name)
    assert state.tokens_seen < full.state.tokens_seen  # micro-batches carry less padding
    assert state.target_tokens == full.state.target_tokens


def test_warmup_cosine_schedule_is_applied_and_logged() -> None:
    params = dataclasses.replace(
        RECIPE, lr_schedule="cosine", warmup_steps=4, min_lr_ratio=0.1, eval_every=1
    )
    state = Trainer(fresh_model(), TRAIN, VAL, params, pad_id=PAD, progress=False).train()
    lrs = [row["lr"] for row in state.log]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:]))
    # Step 17 of 18: cosine almost down to min_lr_ratio * lr, computed by hand.
    progress = (17 - 4) / (18 - 4)
    expected_last = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * progress))
    assert len(lrs) == 18
    assert lrs[-1] == pytest.approx(expected_last)


def test_gradient_clipping_bounds_the_update() -> None:
    params = dataclasses.replace(RECIPE, grad_clip=1e-3, eval_every=1, max_steps=3)
    trainer = Trainer(fresh_model(), TRAIN, VAL, params, pad_id=PAD, progress=False)
    state = trainer.train()
    assert all(row["grad_norm"] > 1e-3 for row in state.log)  # the norm before clipping
    unclipped = Trainer(
        fresh_model(),
        TRAIN,
        VAL,
        dataclasses.replace(params, grad_clip=None),
        pad_id=PAD,
        progress=False,
    )
    unclipped.train()
    assert not torch.equal(trainer.model.tok_emb.weight, unclipped.model.tok_emb.weight)


def test_lora_trains_adapters_only_and_exports_a_plain_gpt2(tmp_path: Path) -> None:
    from gpt2_instruct.params import LoRAParams
    from gpt2_instruct.weights import load_model, save_model

    params = dataclasses.replace(
        RECIPE,
        max_steps=4,
        lora=LoRAParams(rank=4, alpha=8.0, dropout=0.0, targets=("attn_qkv", "ff_fc")),
    )
    base = fresh_model()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    trainer = Trainer(base, TRAIN, VAL, params, pad_id=PAD, progress=False)
    per_block = 4 * (16 + 48) + 4 * (16 + 64)
    assert trainer.trainable_parameters == CONFIG.n_layer * per_block
    trainer.train()
    idx = torch.tensor([TRAIN[0]])
    with torch.no_grad():
        adapted = trainer.model(idx)
    exported = trainer.export_model()
    original["out_head.weight"] = original["tok_emb.weight"]  # the reference's untied copy
    assert set(exported.state_dict()) == set(original)
    save_model(exported, tmp_path)
    reloaded = load_model(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx), adapted, rtol=0, atol=1e-5)
    changed = [k for k, v in reloaded.state_dict().items() if not torch.equal(v, original[k])]
    assert changed and all(".attn.qkv.weight" in k or ".ff.fc.weight" in k for k in changed)


def test_lora_head_adapter_merges_into_the_separate_head(tmp_path: Path) -> None:
    """Untied (the default), the head is a Linear of its own: its adapter merges and exports."""
    from gpt2_instruct.weights import load_model, save_model

    params = dataclasses.replace(
        RECIPE, max_steps=3, lora=LoRAParams(rank=2, alpha=4.0, dropout=0.0, targets=("head",))
    )
    base = fresh_model()
    embedding = base.tok_emb.weight.detach().clone()
    trainer = Trainer(base, TRAIN, VAL, params, pad_id=PAD, progress=False)
    assert trainer.trainable_parameters == 2 * (CONFIG.n_embd + CONFIG.vocab_size)
    trainer.train()
    idx = torch.tensor([TRAIN[0]])
    with torch.no_grad():
        adapted = trainer.model(idx)
    save_model(trainer.export_model(), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = load_model(tmp_path).eval()
    assert torch.equal(reloaded.tok_emb.weight, embedding)  # the input side is untouched
    assert not torch.equal(reloaded.out_head.weight, embedding)  # the merged update
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx), adapted, rtol=0, atol=1e-5)


def test_finish_frees_gradients_and_optimizer_state_but_still_evaluates() -> None:
    params = dataclasses.replace(RECIPE, optimizer_in_backward=False)  # gradients are kept
    trainer = Trainer(fresh_model(), TRAIN, VAL, params, pad_id=PAD, progress=False)
    trainer.train()
    assert all(p.grad is not None for p in trainer.model.parameters())
    assert len(trainer.optimizer.state) == len(list(trainer.model.parameters()))  # moments
    _, val_before = trainer.evaluate()
    trainer.finish()
    assert all(p.grad is None for p in trainer.model.parameters())
    assert trainer.optimizer is None
    _, val_after = trainer.evaluate()  # the same weights, the same fixed validation batches
    assert val_after == val_before


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"fused_optimizer": True},
        {"decay_norms_and_biases": False, "lr_schedule": "cosine", "warmup_steps": 3},
        {"lora": LoRAParams(rank=2, targets=["attn_qkv", "head"])},
    ],
    ids=["reference", "fused", "two-groups-cosine", "lora"],
)
def test_updates_in_backward_learn_bit_for_bit_what_the_step_after_backward_does(
    overrides: dict,
) -> None:
    def run(in_backward: bool) -> Trainer:
        params = dataclasses.replace(RECIPE, optimizer_in_backward=in_backward, **overrides)
        trainer = Trainer(fresh_model(), TRAIN, VAL, params, pad_id=PAD, progress=False)
        assert trainer.updates_in_backward is in_backward
        trainer.train()
        return trainer

    after, during = run(False), run(True)
    assert [r["val_loss"] for r in during.state.log] == [r["val_loss"] for r in after.state.log]
    for (name, a), b in zip(
        during.model.state_dict().items(), after.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    # The same AdamW state in the same layout: checkpoints do not depend on the option.
    want, got = after.optimizer.state_dict(), during.optimizer.state_dict()
    assert got["param_groups"] == want["param_groups"]
    assert want["state"].keys() == got["state"].keys()
    for i, moments in want["state"].items():
        for key, value in moments.items():
            assert torch.equal(got["state"][i][key], value), (i, key)


@pytest.mark.parametrize("in_backward", [True, False])
def test_updates_in_backward_never_hold_more_than_one_gradient(in_backward: bool) -> None:
    params = dataclasses.replace(RECIPE, optimizer_in_backward=in_backward, max_steps=2)
    trainer = Trainer(fresh_model(), TRAIN, VAL, params, pad_id=PAD, progress=False)
    parameters = list(trainer.model.parameters())
    held: list[int] = []
    for q in parameters:  # runs after the trainer's own hook
        q.register_post_accumulate_grad_hook(
            lambda _: held.append(sum(p.grad is not None for p in parameters))
        )
    trainer.train()
    if in_backward:
        assert max(held) == 0  # each gradient was applied and freed before the next completed
    else:
        assert max(held) == len(parameters)


@pytest.mark.parametrize(
    "overrides",
    [{"grad_clip": 1.0}, {"micro_batch_size": 2}, {"optimizer_in_backward": False}],
    ids=["grad_clip", "micro_batches", "off"],
)
def test_updates_wait_for_the_whole_backward_where_every_gradient_is_needed(
    overrides: dict,
) -> None:
    params = dataclasses.replace(RECIPE, max_steps=1, **overrides)
    trainer = Trainer(fresh_model(), TRAIN, VAL, params, pad_id=PAD, progress=False)
    assert not trainer.updates_in_backward
    trainer.train()
    assert all(p.grad is not None for p in trainer.model.parameters())


def test_updates_in_backward_step_one_parameter_at_a_time_even_after_a_resume() -> None:
    trainer = Trainer(
        fresh_model(), TRAIN, VAL, dataclasses.replace(RECIPE, max_steps=2), pad_id=PAD,
        progress=False,
    )  # fmt: skip
    optimizer = trainer.optimizer
    optimizer.load_state_dict(optimizer.state_dict())  # as resuming does: new group dicts
    stepped: list[int] = []
    original = optimizer.step

    def step(*args, **kwargs):
        stepped.append(sum(len(g["params"]) for g in optimizer.param_groups))
        return original(*args, **kwargs)

    optimizer.step = step
    trainer.train()
    assert len(stepped) == 2 * len(list(trainer.model.parameters()))
    assert set(stepped) == {1}
