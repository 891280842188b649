"""Data-parallel training: 2 CPU processes (gloo, under torchrun) learn what one process learns,
with DDP (a replica per rank) and with FSDP (the model sharded over the ranks).

The torchrun workers run this file as a script (``python tests/test_distributed.py MODE OUT``),
so the cases they train are the very ones the tests compare against. torchrun's
``--standalone`` rendezvous binds a free port itself, so parallel runs do not collide.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_training import PAD, RECIPE, TRAIN, VAL, VOCAB, fresh_model
from torch.distributed.tensor import DTensor

from gpt2_instruct import distributed
from gpt2_instruct.distributed import World
from gpt2_instruct.params import (
    DistributedParams,
    FinetuneParams,
    LoRAParams,
    ParamsError,
    load_params,
)
from gpt2_instruct.training import CHECKPOINT_NAME, Trainer
from gpt2_instruct.weights import save_model

REPO_ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
# The global batch (RECIPE.batch_size 4) is split 2 + 2. "micro" runs 2 micro-batches of 1
# per rank (no_sync on the first) with clipping on the all-reduced gradient; "resume" is
# interrupted on rank 1 only and resumed from its checkpoint.
CASES: dict[str, FinetuneParams] = {
    "full": RECIPE,
    "micro": dataclasses.replace(RECIPE, micro_batch_size=1, grad_clip=1.0, mask_prompt=True),
    "resume": dataclasses.replace(RECIPE, checkpoint_every=4),
    # Frozen weights and trainable adapters (in FSDP: in the same shards).
    "lora": dataclasses.replace(RECIPE, lora=LoRAParams(rank=2, alpha=4.0, dropout=0.0)),
}
STRATEGIES = ("ddp", "fsdp")
INTERRUPT_AT = 7  # rank 1 gets SIGINT inside step 7; the ranks agree on it after step 8
FAIL_AT = 2
# Each rank sums the token losses of its half and the gradients meet in an all-reduce, while
# one process sums them inside one batched kernel: the same numbers added in another order,
# ~1e-7 relative in fp32 per step. Over 18 AdamW steps at lr 1e-3 (the update ~ lr * sign
# for small gradients) the weights drift apart by ~1e-6; 1e-5 is the bar the micro-batch
# test in test_training.py uses for the same reason.
ATOL = 1e-5


# --------------------------------------------------------------- the workers
def _train_cases(world: World, out: Path, strategy: str) -> None:
    results: dict[str, Any] = {}
    for name, recipe in CASES.items():
        params = dataclasses.replace(recipe, distributed=DistributedParams(strategy=strategy))
        checkpoints = out / f"checkpoints-{name}"
        trainer = Trainer(
            fresh_model(), TRAIN, VAL, params, pad_id=PAD, progress=False, world=world,
            checkpoint_dir=checkpoints if name == "resume" else None,
        )  # fmt: skip
        if name == "resume":
            original = trainer.optimizer.step

            def step(*args: Any, _t: Trainer = trainer, _o: Any = original, **kwargs: Any) -> Any:
                if world.rank == 1 and _t.state.step + 1 == INTERRUPT_AT:
                    os.kill(os.getpid(), signal.SIGINT)  # only this rank is interrupted
                return _o(*args, **kwargs)

            trainer.optimizer.step = step  # type: ignore[method-assign]
            try:
                trainer.train()
                raise AssertionError("not interrupted")
            except KeyboardInterrupt:
                results["interrupted_at"] = trainer.state.step
            trainer.release_distributed()
            if world.is_main:
                shutil.copyfile(checkpoints / CHECKPOINT_NAME, out / "interrupted.pt")
            trainer = Trainer(
                fresh_model(), TRAIN, VAL, params, pad_id=PAD, progress=False, world=world,
                checkpoint_dir=checkpoints,
            )  # fmt: skip
            assert trainer.load_checkpoint()
        state = trainer.train()
        held = sum(_local(q).numel() for q in trainer.model.parameters())
        trainer.release_distributed()  # FSDP: rank 0 now holds the gathered, plain model
        if world.is_main:
            results[name] = {
                "held_fraction": held / trainer.model.num_parameters(),
                "log": state.log,
                "model": trainer.model.state_dict(),
                "target_tokens": state.target_tokens,
            }
    if world.is_main:
        torch.save(results, out / "results.pt")


def _local(param: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank stores (a DTensor's shard)."""
    return param.to_local() if isinstance(param, DTensor) else param


def _fail(world: World, strategy: str) -> None:
    params = dataclasses.replace(RECIPE, distributed=DistributedParams(strategy=strategy))
    trainer = Trainer(fresh_model(), TRAIN, VAL, params, pad_id=PAD, progress=False, world=world)
    original = trainer.optimizer.step

    def step(*args: Any, **kwargs: Any) -> Any:
        if world.rank == 1 and trainer.state.step + 1 == FAIL_AT:
            raise RuntimeError(f"boom on rank 1 at step {FAIL_AT}")
        return original(*args, **kwargs)

    trainer.optimizer.step = step  # type: ignore[method-assign]
    trainer.train()


def _worker(mode: str, out: Path) -> None:
    torch.set_num_threads(1)
    with distributed.process_group(
        DistributedParams(nproc_per_node=WORLD, timeout_s=30), "cpu"
    ) as w:
        assert w.size == WORLD
        if mode in STRATEGIES:
            _train_cases(w, out, strategy=mode)
        else:  # "fail-ddp", "fail-fsdp"
            _fail(w, strategy=mode.removeprefix("fail-"))


def _launch(tmp_path: Path, mode: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """This file as a script under torchrun, started by ``maybe_relaunch`` as the stage does."""
    code = (
        "import sys; from gpt2_instruct.distributed import maybe_relaunch; "
        f"sys.exit(maybe_relaunch({WORLD}, sys.argv[1:]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, __file__, mode, str(tmp_path)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=timeout,
        check=False,
        capture_output=True,
        text=True,
    )


# ----------------------------------------------------------------- the tests
@pytest.fixture(scope="module", params=STRATEGIES)
def trained(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    """The cases trained by 2 ranks with each strategy: (output directory, results)."""
    out = tmp_path_factory.mktemp(request.param)
    result = _launch(out, request.param, timeout=180)
    assert result.returncode == 0, result.stderr
    return out, torch.load(out / "results.pt", weights_only=True)


def _single(params: FinetuneParams, checkpoints: Path | None = None) -> Trainer:
    trainer = Trainer(
        fresh_model(), TRAIN, VAL, params, pad_id=PAD, progress=False, checkpoint_dir=checkpoints
    )
    if checkpoints is not None:
        assert trainer.load_checkpoint()
    trainer.train()
    return trainer


def _assert_same_training(trainer: Trainer, got: dict[str, Any], *, exact_tokens: bool) -> None:
    log = trainer.state.log
    assert len(got["log"]) == len(log) == 6  # 18 steps, evaluated every 3
    keys = ["train_loss", "val_loss", "batch_loss", "lr"]
    if trainer.params.grad_clip is not None:
        keys.append("grad_norm")
    for key in keys:
        a = torch.tensor([row[key] for row in log], dtype=torch.float64)
        b = torch.tensor([row[key] for row in got["log"]], dtype=torch.float64)
        torch.testing.assert_close(b, a, rtol=0, atol=ATOL, msg=key)
    assert [r["step"] for r in got["log"]] == [r["step"] for r in log]
    # Positions count padding, which each rank adds to its own half: fewer or equal.
    for ours, theirs in zip(log, got["log"], strict=True):
        if exact_tokens:
            assert theirs["tokens_seen"] == ours["tokens_seen"]
        else:
            assert theirs["tokens_seen"] <= ours["tokens_seen"]
    assert got["target_tokens"] == trainer.state.target_tokens
    for name, tensor in trainer.model.state_dict().items():
        torch.testing.assert_close(got["model"][name], tensor, rtol=0, atol=ATOL, msg=name)


def test_two_ranks_learn_what_one_process_learns(trained: tuple[Path, dict[str, Any]]) -> None:
    """Same loss log and weights; the evaluation draws keep both ranks' shuffles in step."""
    out, results = trained
    _assert_same_training(_single(CASES["full"]), results["full"], exact_tokens=False)
    # DDP keeps a whole replica on each rank; FSDP about half of every parameter (dim 0
    # split 2 ways; rank 0 takes the odd row of the 61-token embedding).
    held = results["full"]["held_fraction"]
    assert held == 1.0 if out.name.startswith("ddp") else 0.5 <= held < 0.51


def test_micro_batches_on_two_ranks_accumulate_the_global_gradient(
    trained: tuple[Path, dict[str, Any]],
) -> None:
    _, results = trained
    # Micro-batches of 1 carry no padding, so even the position counts agree.
    _assert_same_training(_single(CASES["micro"]), results["micro"], exact_tokens=True)


def test_interrupt_on_one_rank_stops_all_and_resumes_anywhere(
    trained: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, results = trained
    # Rank 1's Ctrl-C, agreed on at the next step, stopped rank 0 at the same step.
    assert results["interrupted_at"] == INTERRUPT_AT + 1
    saved = torch.load(out / "interrupted.pt", weights_only=True)
    assert saved["train_state"]["step"] == INTERRUPT_AT + 1
    # Resumed with the same strategy: bit for bit the uninterrupted run (same ranks, same sums).
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in results["resume"]["log"]] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in results["full"]["log"]
    ]
    for name, tensor in results["full"]["model"].items():
        assert torch.equal(results["resume"]["model"][name], tensor), name
    # The checkpoint (full, in the single-process layout, even from FSDP's shards) also
    # resumes in a single process, which then ends like one.
    (tmp_path / "ckpt").mkdir()
    shutil.copyfile(out / "interrupted.pt", tmp_path / "ckpt" / CHECKPOINT_NAME)
    resumed = _single(CASES["resume"], tmp_path / "ckpt")
    straight = _single(CASES["resume"])
    for name, tensor in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=0, atol=ATOL)


def test_lora_adapters_train_on_two_ranks_as_in_one_process(
    trained: tuple[Path, dict[str, Any]],
) -> None:
    _, results = trained
    _assert_same_training(_single(CASES["lora"]), results["lora"], exact_tokens=False)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_failing_rank_ends_the_job_with_its_error(tmp_path: Path, strategy: str) -> None:
    started = time.monotonic()
    result = _launch(tmp_path, f"fail-{strategy}", timeout=90)
    assert result.returncode != 0
    assert f"boom on rank 1 at step {FAIL_AT}" in result.stderr
    assert time.monotonic() - started < 60  # torchrun tore rank 0 down: no hang


def _tiny_stage_inputs(root: Path, write_bpe: Any) -> dict[str, Path]:
    paths = {
        name: root / rel
        for name, rel in {
            "tokenized": "data/tokenized",
            "base-model": "data/gpt2/base",
            "encoding": "data/gpt2/encoding",
            "out": "data/model",
            "checkpoints": "data/checkpoints",
            "metrics": "metrics/train.json",
            "log": "metrics/train_log.tsv",
            "plot": "plots/loss.png",
            "live": "dvclive",
        }.items()
    }
    paths["tokenized"].mkdir(parents=True)
    TRAIN.save(paths["tokenized"] / "train.safetensors")
    VAL.save(paths["tokenized"] / "val.safetensors")
    meta = {"prompt_style": "alpaca", "eot_id": PAD, "vocab_size": VOCAB}
    (paths["tokenized"] / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    save_model(fresh_model(), paths["base-model"])
    write_bpe(paths["encoding"], [("t", "h")])
    return paths


STAGE_PARAMS = """\
finetune:
  batch_size: 4
  lr: 1.0e-3
  max_steps: 6
  eval_every: 2
  eval_batches: 2
  checkpoint_every: 2
  fused_optimizer: false
  device: cpu
  distributed:
    nproc_per_node: {nproc}
    timeout_s: 60
    strategy: {strategy}
"""


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stage_relaunches_itself_under_torchrun(
    tmp_path: Path, write_bpe: Any, strategy: str
) -> None:
    from gpt2_instruct import pipeline  # here, not at the top: the workers start faster

    paths = _tiny_stage_inputs(tmp_path, write_bpe)
    text = STAGE_PARAMS.format(nproc=2, strategy=strategy)
    (tmp_path / "params.yaml").write_text(text, encoding="utf-8")
    args = [arg for name, path in paths.items() for arg in (f"--{name}", str(path))]
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages/finetune.py"), *args],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "distributed: 2 processes, backend gloo" in result.stderr
    assert (paths["out"] / "model.safetensors").is_file()
    assert not (paths["checkpoints"] / CHECKPOINT_NAME).exists()  # removed once saved
    report = json.loads(paths["metrics"].read_text(encoding="utf-8"))
    assert report["steps"] == 6

    # The same stage in one process, in this process: the same losses.
    single = tmp_path / "single"
    single_paths = {k: single / v.relative_to(tmp_path) for k, v in paths.items()}
    for name in ("tokenized", "base-model", "encoding"):
        shutil.copytree(paths[name], single_paths[name])
    params = load_params(tmp_path / "params.yaml").finetune
    params = dataclasses.replace(params, distributed=DistributedParams())
    expected = pipeline.finetune(
        params, *(single_paths[k] for k in ("tokenized", "base-model", "encoding", "out")),
        *(single_paths[k] for k in ("checkpoints", "metrics", "log", "plot", "live")),
    )  # fmt: skip
    for key in ("train_loss", "val_loss"):
        assert report[key] == pytest.approx(expected[key], abs=ATOL)
    got_log = pipeline.read_tsv(paths["log"])
    want_log = pipeline.read_tsv(single_paths["log"])
    assert len(got_log) == len(want_log) == 4  # 3 scheduled evaluations + the final one
    assert got_log[-1]["step"] == "6" and got_log[-1]["batch_loss"] == ""
    for got, want in zip(got_log, want_log, strict=True):
        for key in ("train_loss", "val_loss", "batch_loss"):
            assert got[key] == want[key] == "" or float(got[key]) == pytest.approx(
                float(want[key]), abs=ATOL
            )
    # The exported weights (under FSDP: gathered from the shards) are the same model.
    got_model = load_file(paths["out"] / "model.safetensors")
    want_model = load_file(single_paths["out"] / "model.safetensors")
    assert got_model.keys() == want_model.keys()
    for name, tensor in want_model.items():
        torch.testing.assert_close(got_model[name], tensor, rtol=0, atol=ATOL, msg=name)


# --------------------------------------------------------- checks, no processes
def test_batch_size_must_split_evenly_over_the_processes(tmp_path: Path) -> None:
    text = "finetune:\n  batch_size: 6\n  distributed:\n    nproc_per_node: 4\n"
    (tmp_path / "params.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(ParamsError, match=r"finetune: batch_size \(6\) must be divisible"):
        load_params(tmp_path / "params.yaml")
    # A world from torchrun (e.g. several nodes) is checked by the trainer, before any work.
    params = dataclasses.replace(RECIPE, batch_size=3)
    with pytest.raises(ValueError, match=r"batch_size \(3\) must be divisible .* processes \(2\)"):
        Trainer(fresh_model(), TRAIN, VAL, params, pad_id=PAD, world=World(size=2))


def test_relaunch_only_when_asked_and_not_already_under_torchrun(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    assert distributed.maybe_relaunch(1, ["stages/finetune.py"]) is None
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.maybe_relaunch(2, ["stages/finetune.py"]) is None


def test_devices_and_backends() -> None:
    two = World(rank=1, local_rank=1, size=2)
    assert distributed.rank_device("cpu", two) == torch.device("cpu")
    assert distributed.resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert distributed.resolve_backend("auto", torch.device("cuda", 0)) == "nccl"
    with pytest.raises(ValueError, match="nccl needs CUDA"):
        distributed.resolve_backend("nccl", torch.device("cpu"))
    with pytest.raises(ValueError, match="pins one GPU"):
        distributed.rank_device("cuda:0", two)


if __name__ == "__main__":  # a torchrun worker: MODE OUT
    _worker(sys.argv[1], Path(sys.argv[2]))
