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
    with pytest.raises(WeightsError, match=r"config\.json: invalid JSON at line 1, column 2"):
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


UNTIED = GPTConfig(**{**CONFIG.to_dict(), "tie_embeddings": False})


@pytest.fixture
def untied_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = GPTModel(CONFIG)
    model.untie_embeddings()
    with torch.no_grad():
        model.out_head.weight.add_(1.0)  # trained apart from the embedding
    save_model(model, tmp_path)
    return tmp_path


def test_untied_model_round_trips_with_its_own_head(untied_checkpoint: Path) -> None:
    config = json.loads((untied_checkpoint / CONFIG_NAME).read_text())
    assert config["tie_word_embeddings"] is False
    tensors = load_file(untied_checkpoint / WEIGHTS_NAME)
    assert torch.equal(tensors["lm_head.weight"], tensors["transformer.wte.weight"] + 1.0)
    model = load_model(untied_checkpoint)
    assert model.config == UNTIED
    assert torch.equal(model.out_head.weight, tensors["lm_head.weight"])
    assert torch.equal(model.tok_emb.weight, tensors["transformer.wte.weight"])


def test_untied_config_without_a_head_tensor(untied_checkpoint: Path) -> None:
    _rewrite(untied_checkpoint, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(WeightsError, match=r"missing tensor 'lm_head\.weight'.*false"):
        load_model(untied_checkpoint)


def test_untied_head_of_the_wrong_shape(untied_checkpoint: Path) -> None:
    _rewrite(untied_checkpoint, lambda t: t.update({"lm_head.weight": torch.zeros(40, 4)}))
    with pytest.raises(WeightsError, match=r"'lm_head\.weight' has shape \(40, 4\)"):
        load_model(untied_checkpoint)


def test_a_tensor_stored_under_two_names_is_refused(checkpoint: Path) -> None:
    def duplicate(tensors: dict[str, torch.Tensor]) -> None:
        tensors["wte.weight"] = torch.zeros_like(tensors["transformer.wte.weight"])

    _rewrite(checkpoint, duplicate)
    with pytest.raises(WeightsError, match=r"'wte\.weight' is stored twice"):
        load_model(checkpoint)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false"),
        ({"n_layer": 10**9}, "holds 2 transformer blocks, but config.json says n_layer="),
    ],
)
def test_config_fields_checked_before_the_model_is_built(
    checkpoint: Path, change: dict, message: str
) -> None:
    (checkpoint / CONFIG_NAME).write_text(json.dumps({**config_to_hf(CONFIG), **change}))
    with pytest.raises(WeightsError, match=message):
        load_model(checkpoint)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["transformer.h.1.mlp.c_fc.weight", "lm_head.weight"])
def test_non_finite_weights_are_refused(untied_checkpoint: Path, bad: float, name: str) -> None:
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[3] = bad

    _rewrite(untied_checkpoint, poison)
    with pytest.raises(WeightsError, match=rf"'{name.removeprefix('transformer.')}'.*NaN or inf"):
        load_model(untied_checkpoint)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"n_layer": ' + "[" * 100_000, "nested"),
        ('{"n_layer": 1' + "0" * 5000 + "}", "number"),
        ('{"n_layer": 2, "n_layer": 3}', "repeats the key 'n_layer'"),
        (json.dumps({**config_to_hf(CONFIG), "n_layer": None}), "n_layer"),
        (json.dumps({**config_to_hf(CONFIG), "n_embd": "8"}), "n_embd"),
    ],
)
def test_hostile_config_json_is_one_error(checkpoint: Path, text: str, message: str) -> None:
    (checkpoint / CONFIG_NAME).write_text(text)
    with pytest.raises(WeightsError, match=message) as info:
        load_model(checkpoint)
    assert str(checkpoint / CONFIG_NAME) in str(info.value)
