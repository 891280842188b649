"""The device seam (``devices.configure``): every platform choice, for the CPU and for CUDA.

The decisions are plain functions of the device type, the precision and the strategy, so
the CUDA column is tested here on a machine without a GPU (the kernels themselves run in
``tests/test_cuda.py`` on one). The CUDA loss path is exercised on the CPU by switching
the decision: it must compute the formula the CPU's counted path computes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from gpt2_instruct import backward_updates, devices, loss, stages
from gpt2_instruct.devices import Platform
from gpt2_instruct.model import IGNORE_INDEX, GPTConfig, GPTModel
from gpt2_instruct.params import FinetuneParams, ParamsError, load_params

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp"])
def test_cuda_gets_none_of_the_cpu_machinery(precision: str, strategy: str) -> None:
    chosen = Platform(CUDA, precision, strategy)  # type: ignore[arg-type]
    assert not chosen.on_cpu
    assert not chosen.settles_vector_math
    assert not chosen.keeps_freed_memory
    assert not chosen.relaunches_without_per_thread_cache
    assert not chosen.shapes_products
    assert not chosen.counts_only_targets
    assert not chosen.updates_in_backward("auto")
    assert chosen.updates_in_backward(True)  # asked for explicitly: honoured
    assert chosen.autocast_dtype == (torch.bfloat16 if precision == "bf16" else None)
    assert not chosen.tf32_matmul  # only precision tf32 rounds fp32 products


def test_the_cpu_gets_its_machinery_where_each_piece_pays(monkeypatch) -> None:
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    fp32 = Platform(CPU, "fp32", "single")
    assert fp32.settles_vector_math and fp32.shapes_products and fp32.counts_only_targets
    assert fp32.keeps_freed_memory and not fp32.relaunches_without_per_thread_cache
    assert fp32.updates_in_backward("auto") and not fp32.updates_in_backward(False)
    assert not fp32.tf32_matmul and fp32.autocast_dtype is None
    # FSDP gathers blocks of every size: glibc's defaults.
    assert not Platform(CPU, "fp32", "fsdp").keeps_freed_memory
    # bf16 keeps freed memory only once restarted with the per-thread cache off.
    bf16 = Platform(CPU, "bf16", "ddp")
    assert bf16.relaunches_without_per_thread_cache and not bf16.keeps_freed_memory
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0")
    assert bf16.keeps_freed_memory
    assert not Platform(CPU, "bf16", "fsdp").relaunches_without_per_thread_cache


@pytest.fixture
def _matmul_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.usefixtures("_matmul_flags")
def test_configure_sets_the_matmul_precision_on_cuda_and_fp32_stays_exact(monkeypatch) -> None:
    applied: list[str] = []
    monkeypatch.setattr(devices, "reuse_freed_memory", lambda: applied.append("malloc"))
    chosen = devices.configure(CUDA, "tf32")
    assert chosen.tf32_matmul and torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32
    devices.configure(CUDA, "fp32")  # a later fp32 run is exact again
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    devices.configure(CUDA, "bf16")
    assert not torch.backends.cuda.matmul.allow_tf32
    assert applied == []  # CUDA: glibc's defaults on the host
    devices.configure(CPU, "fp32")
    assert applied == ["malloc"]


def test_configure_restarts_only_when_the_frame_asks(monkeypatch) -> None:
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(devices, "reuse_freed_memory", lambda: True)
    restarts: list[tuple] = []
    monkeypatch.setattr(devices, "relaunch_without_per_thread_cache", lambda *a: restarts.append(a))
    devices.configure(CPU, "bf16", "ddp")
    assert restarts == []
    devices.configure(CPU, "bf16", "ddp", relaunch=True)
    assert restarts == [("bf16", "ddp", CPU)]
    devices.configure(CUDA, "bf16", "ddp", relaunch=True)  # a GPU run: no restart
    assert len(restarts) == 1


def test_the_stage_frame_configures_the_stages_own_device_once(monkeypatch, tmp_path: Path) -> None:
    calls: list[tuple] = []
    monkeypatch.setattr(
        devices, "configure", lambda *a, **k: calls.append((*a, k)) or Platform(CPU)
    )
    params = tmp_path / "params.yaml"
    params.write_text(
        "finetune:\n  precision: bf16\n  device: cpu\n  distributed:\n    strategy: fsdp\n"
    )
    argv = ["--params", str(params)]
    stages.run_stage("t", {}, lambda p, a: None, argv, device_section="finetune")
    assert calls == [("cpu", "bf16", "fsdp", {"relaunch": True})]
    stages.run_stage("t", {}, lambda p, a: None, argv, device_section="generate")
    assert calls[1] == ("auto", "fp32", "single", {"relaunch": False})
    stages.run_stage("t", {}, lambda p, a: None, argv)  # prepare, tokenize...: nothing
    assert len(calls) == 2


@pytest.mark.parametrize("setting", ["auto", True, False])
def test_updates_in_backward_auto_is_on_for_the_cpu_only(setting) -> None:
    params = FinetuneParams(batch_size=4, optimizer_in_backward=setting)
    on_cpu = backward_updates.applies(params, world_size=1, device=CPU)
    on_cuda = backward_updates.applies(params, world_size=1, device=CUDA)
    assert (on_cpu, on_cuda) == ((True, False) if setting == "auto" else (setting, setting))


def test_tf32_is_refused_where_there_is_no_cuda(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: tf32 is accepted")
    path = tmp_path / "params.yaml"
    path.write_text("finetune:\n  precision: tf32\n")
    with pytest.raises(ParamsError, match=r"tf32 is a CUDA matmul mode.*use fp32"):
        load_params(path)


def _batch(model: GPTModel) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, model.config.vocab_size, (3, 12), generator=gen)
    targets = torch.randint(0, model.config.vocab_size, (3, 12), generator=gen)
    targets[0, 7:] = IGNORE_INDEX  # right padding
    targets[1, :4] = IGNORE_INDEX  # a masked prompt
    targets[2, 10:] = IGNORE_INDEX
    return idx, targets


@pytest.mark.parametrize("tied", [True, False])
def test_the_dense_loss_of_cuda_equals_the_cpus_counted_loss(monkeypatch, tied: bool) -> None:
    """The CUDA path (the whole formula, no host syncs) and the CPU's counted path give the
    same loss, per-position losses and gradients: which one runs is only a speed choice."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=61, context_length=16, n_embd=16, n_layer=2, n_head=2)
    counted = GPTModel(dataclasses.replace(config, tie_embeddings=tied))
    dense = GPTModel(dataclasses.replace(config, tie_embeddings=tied))
    dense.load_state_dict(counted.state_dict())
    idx, targets = _batch(counted)

    counted.loss(idx, targets).backward()
    with torch.no_grad():
        counted_tokens = counted.token_losses(idx, targets)
    monkeypatch.setattr(loss, "counts_only_targets", lambda device: False)
    dense_loss = dense.loss(idx, targets)
    dense_loss.backward()
    with torch.no_grad():
        dense_tokens = dense.token_losses(idx, targets)
        reference = torch.nn.functional.cross_entropy(
            dense(idx).flatten(0, 1), targets.flatten()
        )  # the book's calc_loss_batch
    assert dense_loss.item() == pytest.approx(reference.item(), abs=1e-7)
    assert torch.allclose(dense_tokens, counted_tokens, atol=1e-6)
    assert torch.equal(dense_tokens == 0, targets == IGNORE_INDEX)
    for (name, a), b in zip(counted.named_parameters(), dense.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
