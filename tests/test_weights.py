"""Bad checkpoints fail with errors that name the file and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2_instruct.model import GPTConfig, GPTModel
from gpt2_instruct.weights import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    WeightsError,
    config_to_hf,
    load_model,
    save_model,
)

CONFIG = GPTConfig(vocab_size=40, context_length=16, n_embd=8, n_layer=2, n_head=2)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    save_model(GPTModel(CONFIG), tmp_path)
    return tmp_path


def _rewrite(path: Path, change) -> None:
    tensors = load_file(path / WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, path / WEIGHTS_NAME)


def test_truncated_file(checkpoint: Path) -> None:
    data = (checkpoint / WEIGHTS_NAME).read_bytes()
    (checkpoint / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model\.safetensors: not a readable safetensors"):
        load_model(checkpoint)


def test_garbage_file_is_never_unpickled(checkpoint: Path) -> None:
    import pickle

    (checkpoint / WEIGHTS_NAME).write_bytes(pickle.dumps({"wte.weight": [1, 2, 3]}))
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_model(checkpoint)


def test_missing_tensor(checkpoint: Path) -> None:
    _rewrite(checkpoint, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(WeightsError, match=r"missing tensor 'h\.1\.mlp\.c_fc\.bias'") as err:
        load_model(checkpoint)
    assert str(err.value) == f"{checkpoint / WEIGHTS_NAME}: missing tensor 'h.1.mlp.c_fc.bias'"


def test_wrong_shape_names_tensor_and_shapes(checkpoint: Path) -> None:
    def shrink(tensors: dict[str, torch.Tensor]) -> None:
        tensors["transformer.h.0.attn.c_attn.weight"] = torch.zeros(8, 12)

    _rewrite(checkpoint, shrink)
    with pytest.raises(
        WeightsError,
        match=r"'h\.0\.attn\.c_attn\.weight' has shape \(8, 12\), "
        r"expected \(8, 24\)",
    ):
        load_model(checkpoint)


def test_unexpected_tensor(checkpoint: Path) -> None:
    _rewrite(checkpoint, lambda t: t.update({"transformer.h.2.ln_1.weight": torch.ones(8)}))
    with pytest.raises(WeightsError, match=r"unexpected tensors \['h\.2\.ln_1\.weight'\]"):
        load_model(checkpoint)


def test_config_disagreeing_with_tensors(checkpoint: Path) -> None:
    config = config_to_hf(CONFIG)
    config["n_embd"] = 16
    (checkpoint / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"expected .* for the config in"):
        load_model(checkpoint)


def test_untied_head_rejected(checkpoint: Path) -> None:
    _rewrite(checkpoint, lambda t: t.update({"lm_head.weight": torch.zeros(40, 8)}))
    with pytest.raises(WeightsError, match="not tied"):
        load_model(checkpoint)


def test_tied_head_and_old_mask_buffers_accepted(checkpoint: Path) -> None:
    def add(tensors: dict[str, torch.Tensor]) -> None:
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
        tensors["transformer.h.0.attn.bias"] = torch.ones(1, 1, 16, 16)

    _rewrite(checkpoint, add)
    assert load_model(checkpoint).config == CONFIG


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "llama"}, "model_type"),
        ({"activation_function": "relu"}, "activation_function"),
        ({"n_inner": 5}, "n_inner"),
        ({"n_head": 3}, "divisible"),
    ],
)
def test_bad_config_values(checkpoint: Path, change: dict, message: str) -> None:
    config = {**config_to_hf(CONFIG), **change}
    (checkpoint / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=message):
        load_model(checkpoint)


def test_missing_and_broken_config(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(WeightsError, match=r"config\.json: not found"):
        load_model(tmp_path / "nowhere")
    (checkpoint / CONFIG_NAME).write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_model(checkpoint)
    config = config_to_hf(CONFIG)
    del config["n_layer"]
    (checkpoint / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="missing key 'n_layer'"):
        load_model(checkpoint)


def test_save_replaces_files_atomically(checkpoint: Path) -> None:
    names = sorted(p.name for p in checkpoint.iterdir())
    assert names == [CONFIG_NAME, WEIGHTS_NAME]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_loaded_model_owns_its_memory_and_leaves_the_file_unmapped(checkpoint: Path) -> None:
    # safetensors maps the file; a tensor kept as a view would keep all of it resident.
    model = load_model(checkpoint)
    weights = str((checkpoint / WEIGHTS_NAME).resolve())
    assert weights not in Path("/proc/self/maps").read_text()
    torch.manual_seed(0)
    expected = GPTModel(CONFIG)  # what the fixture saved
    for (name, got), want in zip(
        model.state_dict().items(), expected.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), name
        assert got.is_contiguous(), name
