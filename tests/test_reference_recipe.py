"""Our Trainer, with the default FinetuneParams, must train as Raschka's chapter 7 trains.

The reference (``ch07/01_main-chapter-code``: ``gpt_instruction_finetuning.py`` and
``previous_chapters.py`` of "Build a Large Language Model From Scratch") is restated
below literally and on its own: its ``GPTModel`` (separate ``W_query``/``W_key``/
``W_value``, explicit causal mask and softmax, its own ``LayerNorm`` and tanh ``GELU``),
``load_weights_into_gpt``, ``custom_collate_fn``, the two ``DataLoader``\\ s seeded by
``torch.manual_seed(123)``, ``AdamW(lr=5e-5, weight_decay=0.1)`` and
``train_model_simple`` (``eval_freq=5``, ``eval_iter=5``). Nothing of ``gpt2_instruct``
is used on that side: only torch, numpy, safetensors and a Hugging Face checkpoint.

The lesson this test exists for: ``load_weights_into_gpt`` ends with
``gpt.out_head.weight = assign(gpt.out_head.weight, params["wte"])``, and ``assign``
wraps ``torch.tensor(right)``, a fresh copy, in a new ``nn.Parameter``. The output head
therefore starts equal to the token embedding but is a weight of its own: AdamW trains
head and embedding separately and they drift apart. An earlier restatement
(``tests/test_training.py``'s ``reference_run``) tied them, as GPT-2 itself does, and so
could not notice that our tied model learns something else (losses off by up to 0.055
on the real recipe). The test below checks the untied recipe end to end: the loss log,
the tokens seen, every trained weight (and each weight's change) and the head drifting
away from the embedding on both sides, by the same amount.

The model is GPT-2 shaped where it matters (50,257-token vocabulary, 1,024 positions)
and narrow elsewhere, so the test takes tens of seconds rather than hours; its weights
are perturbed so that no gradient vanishes by accident (the attention's key bias has
none by construction: see ``KEY_BIAS_RTOL``). Both sides run on the CPU: the reference
would pick a GPU if there were one, but this test is about the recipe, not device kernels.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

# Only the test at the bottom uses these: the reference side below never does.
from gpt2_instruct.batching import TokenizedSplit
from gpt2_instruct.params import FinetuneParams
from gpt2_instruct.training import Trainer
from gpt2_instruct.weights import load_model

transformers = pytest.importorskip("transformers")

CPU = torch.device("cpu")
EOS = 50256  # <|endoftext|>, the reference's pad_token_id
N_LAYER = 2
N_TRAIN, N_VAL = 107, 10  # 13 steps per epoch (3 examples dropped), val: a full + a short batch

# Tolerances. The two sides differ only by rounding: the reference's explicit softmax
# attention and full-vocabulary logits against SDPA and logits where targets count, its
# single-tensor AdamW against the fused kernel applied during backward. Measured on this
# fixture (2 runs): losses within 1e-6, weights within 6e-7, weight changes within 5e-5
# relative. A tied head, the mistake this test is for, moves the losses by 8e-4 to 4e-3,
# every weight's change by 7e-4 relative or more (15x its size in wte).
#
# Logged losses: means of ~1,000 fp32 token losses of ~11, after 26 steps.
LOSS_ATOL = 1e-5
# Trained weights, element by element. AdamW divides each gradient by its own running
# RMS, so an element whose gradient is only rounding noise still moves by up to ~lr a
# step: element-wise, two correct runs may differ by up to steps * lr = 1.3e-3, and a
# wrong recipe may move most elements by less (a tied head: 1.2e-5 at most outside wte).
# So elements are only held to WEIGHT_ATOL, and each weight's change as a whole,
# ||delta_ours - delta_ref|| / ||delta_ref||, to DELTA_RTOL (largest measured: a bias
# of the feed-forward layer, some of whose GELU units pass almost no gradient).
WEIGHT_ATOL = 1e-5
DELTA_RTOL = 2e-4
# The key bias has no gradient at all: it adds q . b_k to all of a query's scores, which
# softmax ignores. Its change is the decoupled weight decay (-lr * 0.1 * w a step) plus
# AdamW's normalised rounding noise, which differs between any two implementations by a
# few percent of that small change (measured: 1.7e-2 and 2.2e-2).
KEY_BIAS_RTOL = 0.1


# ================================================================ the reference, restated
# previous_chapters.py, chapters 3 and 4 (dropout kept: the recipe's drop_rate is 0.0).
class MultiHeadAttention(nn.Module):
    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by n_heads"
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer(
            "mask", torch.triu(torch.ones(context_length, context_length), diagonal=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, num_tokens, _ = x.shape
        keys = self.W_key(x)
        queries = self.W_query(x)
        values = self.W_value(x)
        keys = keys.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = values.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        attn_scores = queries @ keys.transpose(2, 3)
        mask_bool = self.mask.bool()[:num_tokens, :num_tokens]
        attn_scores.masked_fill_(mask_bool, -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        context_vec = (attn_weights @ values).transpose(1, 2)
        context_vec = context_vec.reshape(b, num_tokens, self.d_out)
        return self.out_proj(context_vec)


class LayerNorm(nn.Module):
    def __init__(self, emb_dim: int) -> None:
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return self.scale * norm_x + self.shift


class GELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (
            0.5
            * x
            * (
                1
                + torch.tanh(
                    torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))
                )
            )
        )


class FeedForward(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"],
            qkv_bias=cfg["qkv_bias"],
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_resid = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.drop_resid(self.att(self.norm1(x)))
        x = x + shortcut
        shortcut = x
        x = self.drop_resid(self.ff(self.norm2(x)))
        return x + shortcut


class GPTModel(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx: torch.Tensor) -> torch.Tensor:
        _, seq_len = in_idx.shape
        tok_embeds = self.tok_emb(in_idx)
        pos_embeds = self.pos_emb(torch.arange(seq_len, device=in_idx.device))
        x = self.drop_emb(tok_embeds + pos_embeds)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        return self.out_head(x)


# previous_chapters.py, chapter 5: OpenAI's parameters into the model.
def assign(left: torch.Tensor, right: np.ndarray) -> nn.Parameter:
    if left.shape != right.shape:
        raise ValueError(f"Shape mismatch. Left: {left.shape}, Right: {right.shape}")
    return nn.Parameter(torch.tensor(right))  # a copy: every call gives a weight of its own


def load_weights_into_gpt(gpt: GPTModel, params: dict[str, Any]) -> None:
    gpt.pos_emb.weight = assign(gpt.pos_emb.weight, params["wpe"])
    gpt.tok_emb.weight = assign(gpt.tok_emb.weight, params["wte"])
    for b, block in enumerate(params["blocks"]):
        att, ff = gpt.trf_blocks[b].att, gpt.trf_blocks[b].ff
        q_w, k_w, v_w = np.split(block["attn"]["c_attn"]["w"], 3, axis=-1)
        att.W_query.weight = assign(att.W_query.weight, q_w.T)
        att.W_key.weight = assign(att.W_key.weight, k_w.T)
        att.W_value.weight = assign(att.W_value.weight, v_w.T)
        q_b, k_b, v_b = np.split(block["attn"]["c_attn"]["b"], 3, axis=-1)
        att.W_query.bias = assign(att.W_query.bias, q_b)
        att.W_key.bias = assign(att.W_key.bias, k_b)
        att.W_value.bias = assign(att.W_value.bias, v_b)
        att.out_proj.weight = assign(att.out_proj.weight, block["attn"]["c_proj"]["w"].T)
        att.out_proj.bias = assign(att.out_proj.bias, block["attn"]["c_proj"]["b"])
        ff.layers[0].weight = assign(ff.layers[0].weight, block["mlp"]["c_fc"]["w"].T)
        ff.layers[0].bias = assign(ff.layers[0].bias, block["mlp"]["c_fc"]["b"])
        ff.layers[2].weight = assign(ff.layers[2].weight, block["mlp"]["c_proj"]["w"].T)
        ff.layers[2].bias = assign(ff.layers[2].bias, block["mlp"]["c_proj"]["b"])
        norm1, norm2 = gpt.trf_blocks[b].norm1, gpt.trf_blocks[b].norm2
        norm1.scale = assign(norm1.scale, block["ln_1"]["g"])
        norm1.shift = assign(norm1.shift, block["ln_1"]["b"])
        norm2.scale = assign(norm2.scale, block["ln_2"]["g"])
        norm2.shift = assign(norm2.shift, block["ln_2"]["b"])
    gpt.final_norm.scale = assign(gpt.final_norm.scale, params["g"])
    gpt.final_norm.shift = assign(gpt.final_norm.shift, params["b"])
    gpt.out_head.weight = assign(gpt.out_head.weight, params["wte"])  # NOT tied to tok_emb


def openai_params(model_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings, params) as the book's ``download_and_load_gpt2`` returns them, read from a
    Hugging Face checkpoint: its ``Conv1D`` weights are stored ``[in, out]`` like OpenAI's."""
    hf = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    tensors = load_file(model_dir / "model.safetensors")
    w = {k.removeprefix("transformer."): v for k, v in tensors.items()}

    def wb(prefix: str) -> dict[str, np.ndarray]:
        return {"w": w[f"{prefix}.weight"], "b": w[f"{prefix}.bias"]}

    def gb(prefix: str) -> dict[str, np.ndarray]:
        return {"g": w[f"{prefix}.weight"], "b": w[f"{prefix}.bias"]}

    blocks = [
        {
            "attn": {"c_attn": wb(f"h.{i}.attn.c_attn"), "c_proj": wb(f"h.{i}.attn.c_proj")},
            "mlp": {"c_fc": wb(f"h.{i}.mlp.c_fc"), "c_proj": wb(f"h.{i}.mlp.c_proj")},
            "ln_1": gb(f"h.{i}.ln_1"),
            "ln_2": gb(f"h.{i}.ln_2"),
        }
        for i in range(hf["n_layer"])
    ]
    settings = {  # OpenAI's hparams.json
        "n_vocab": hf["vocab_size"],
        "n_ctx": hf["n_positions"],
        "n_embd": hf["n_embd"],
        "n_head": hf["n_head"],
        "n_layer": hf["n_layer"],
    }
    params = {"wte": w["wte.weight"], "wpe": w["wpe.weight"], "blocks": blocks}
    params.update(gb("ln_f"))
    return settings, params


# gpt_instruction_finetuning.py: the data.
class InstructionDataset(Dataset):
    """Holds the encoded texts (prompt + response, without <|endoftext|>)."""

    def __init__(self, encoded_texts: Sequence[Sequence[int]]) -> None:
        self.encoded_texts = [list(t) for t in encoded_texts]

    def __getitem__(self, index: int) -> list[int]:
        return self.encoded_texts[index]

    def __len__(self) -> int:
        return len(self.encoded_texts)


def custom_collate_fn(
    batch: list[list[int]],
    pad_token_id: int = 50256,
    ignore_index: int = -100,
    allowed_max_length: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = item.copy()
        new_item += [pad_token_id]  # the <|endoftext|> token
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        mask = targets == pad_token_id  # all but the first pad become ignore_index
        indices = torch.nonzero(mask).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst).to(device), torch.stack(targets_lst).to(device)


# previous_chapters.py, chapter 5: the loop (less its greedy sample print at each epoch's
# end, which draws no random numbers and changes no weight).
def calc_loss_batch(
    input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module, device: torch.device
) -> torch.Tensor:
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    return nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(
    data_loader: DataLoader, model: nn.Module, device: torch.device, num_batches: int | None = None
) -> float:
    total_loss = 0.0
    if len(data_loader) == 0:
        return float("nan")
    elif num_batches is None:
        num_batches = len(data_loader)
    else:
        num_batches = min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):  # a new iterator: RNG draws
        if i < num_batches:
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            total_loss += loss.item()
        else:
            break
    return total_loss / num_batches


def evaluate_model(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    device: torch.device,
    eval_iter: int,
) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def train_model_simple(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
) -> tuple[list[float], list[float], list[int]]:
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    for _ in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(
                    model, train_loader, val_loader, device, eval_iter
                )
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
    return train_losses, val_losses, track_tokens_seen


@dataclass
class ReferenceRun:
    train_losses: list[float]
    val_losses: list[float]
    tokens_seen: list[int]
    initial: dict[str, torch.Tensor]  # weights as loaded, in our model's names
    final: dict[str, torch.Tensor]  # weights after fine-tuning, in our model's names


def reference_finetune(
    model_dir: Path,
    train_data: Sequence[Sequence[int]],
    val_data: Sequence[Sequence[int]],
) -> ReferenceRun:
    """``main()`` of gpt_instruction_finetuning.py, from the loaders to the trained model."""
    device = CPU
    customized_collate_fn = partial(custom_collate_fn, device=device, allowed_max_length=1024)
    torch.manual_seed(123)
    train_loader = DataLoader(
        InstructionDataset(train_data),
        batch_size=8,
        collate_fn=customized_collate_fn,
        shuffle=True,
        drop_last=True,
        num_workers=0,
    )
    val_loader = DataLoader(
        InstructionDataset(val_data),
        batch_size=8,
        collate_fn=customized_collate_fn,
        shuffle=False,
        drop_last=False,
        num_workers=0,
    )
    settings, params = openai_params(model_dir)
    base_config = {
        "vocab_size": settings["n_vocab"],
        "context_length": settings["n_ctx"],
        "drop_rate": 0.0,
        "qkv_bias": True,
        "emb_dim": settings["n_embd"],
        "n_layers": settings["n_layer"],
        "n_heads": settings["n_head"],
    }
    model = GPTModel(base_config)  # its random init draws from the global RNG ...
    load_weights_into_gpt(model, params)
    model.eval()
    model.to(device)
    initial = in_our_names(model, settings["n_layer"])
    with torch.no_grad():  # ... and so do the initial losses' passes over the train loader,
        calc_loss_loader(train_loader, model, device, num_batches=5)
        calc_loss_loader(val_loader, model, device, num_batches=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.00005, weight_decay=0.1)
    torch.manual_seed(123)  # ... which this second seed wipes out before training.
    train_losses, val_losses, tokens_seen = train_model_simple(
        model, train_loader, val_loader, optimizer, device, num_epochs=2, eval_freq=5, eval_iter=5
    )
    return ReferenceRun(
        train_losses, val_losses, tokens_seen, initial, in_our_names(model, settings["n_layer"])
    )


def in_our_names(model: GPTModel, n_layer: int) -> dict[str, torch.Tensor]:
    """The reference model's weights under our state-dict names (q, k, v fused as ``qkv``)."""
    w = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith(".mask")}
    ours = {
        "tok_emb.weight": w["tok_emb.weight"],
        "pos_emb.weight": w["pos_emb.weight"],
        "final_norm.weight": w["final_norm.scale"],
        "final_norm.bias": w["final_norm.shift"],
        "out_head.weight": w["out_head.weight"],
    }
    for i in range(n_layer):
        ref, our = f"trf_blocks.{i}", f"blocks.{i}"
        for kind in ("weight", "bias"):
            ours[f"{our}.attn.qkv.{kind}"] = torch.cat(
                [w[f"{ref}.att.{p}.{kind}"] for p in ("W_query", "W_key", "W_value")]
            )
            ours[f"{our}.attn.out_proj.{kind}"] = w[f"{ref}.att.out_proj.{kind}"]
            ours[f"{our}.ff.fc.{kind}"] = w[f"{ref}.ff.layers.0.{kind}"]
            ours[f"{our}.ff.proj.{kind}"] = w[f"{ref}.ff.layers.2.{kind}"]
        for norm in ("norm1", "norm2"):
            ours[f"{our}.{norm}.weight"] = w[f"{ref}.{norm}.scale"]
            ours[f"{our}.{norm}.bias"] = w[f"{ref}.{norm}.shift"]
    return ours


# ================================================================ fixtures
def write_checkpoint(model_dir: Path) -> None:
    """A Hugging Face GPT-2 checkpoint: GPT-2's vocabulary and context, narrow and shallow.

    Hugging Face's initialisation leaves biases at 0 and LayerNorms at 1/0, and its
    token embedding is centred noise of std 0.02 (nearly uniform logits). Here every
    bias and LayerNorm is randomised and the embedding is wider, with a mean direction
    shared by all rows (as GPT-2's has), so logits are peaked and no gradient vanishes.
    """
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50257,
        n_positions=1024,
        n_embd=48,
        n_layer=N_LAYER,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    hf = transformers.GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(1)

    def noise(param: torch.Tensor, std: float) -> torch.Tensor:
        return torch.randn(param.shape, generator=gen) * std

    with torch.no_grad():
        wte = hf.transformer.wte.weight
        wte.copy_(noise(wte, 0.12) + noise(wte[0], 0.05))
        for name, param in hf.transformer.named_parameters():
            if name.endswith(".bias"):
                param.add_(noise(param, 0.05))
            elif "ln_" in name:
                param.add_(noise(param, 0.15))
    hf.save_pretrained(model_dir)


def synthetic_examples(n: int, seed: int) -> list[list[int]]:
    """Token ids drawn Zipf-like from 50,256 ids (no <|endoftext|>), 30..120 tokens long."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, EOS + 1, dtype=torch.float64)
    weights = (ranks + 10) ** -1.1
    ids_by_rank = torch.randperm(EOS, generator=torch.Generator().manual_seed(0))
    lengths = torch.randint(30, 121, (n,), generator=gen).tolist()
    return [
        ids_by_rank[torch.multinomial(weights, length, replacement=True, generator=gen)].tolist()
        for length in lengths
    ]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Both runs on one thread. The reference's full-vocabulary logits (8 x ~110 x 50,257
    floats a batch) make it memory-bound: on the 2-core machine, with other processes
    running, the test took ~50 s on one thread and 150-190 s on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("gpt2-narrow")
    write_checkpoint(model_dir)
    return model_dir


TRAIN_EXAMPLES = synthetic_examples(N_TRAIN, seed=11)
VAL_EXAMPLES = synthetic_examples(N_VAL, seed=12)


@dataclass
class OurRun:
    train_losses: list[float]
    val_losses: list[float]
    steps: list[int]
    tokens_seen: list[int]
    total_steps: int
    initial: dict[str, torch.Tensor]
    final: dict[str, torch.Tensor]


def our_finetune(model_dir: Path, params: FinetuneParams) -> OurRun:
    """Our Trainer on the same sequences: a TokenizedSplit holds them without the EOS,
    which ``collate`` appends (and keeps as the one counted pad target), as the reference's
    ``custom_collate_fn`` does."""

    def split(examples: list[list[int]]) -> TokenizedSplit:
        return TokenizedSplit.from_lists(examples, [len(e) // 2 for e in examples])

    trainer = Trainer(
        load_model(model_dir),
        split(TRAIN_EXAMPLES),
        split(VAL_EXAMPLES),
        params,
        pad_id=EOS,
        device=CPU,
        progress=False,
    )

    def weights() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    initial = weights()
    state = trainer.train()
    return OurRun(
        train_losses=[row["train_loss"] for row in state.log],
        val_losses=[row["val_loss"] for row in state.log],
        steps=[int(row["step"]) for row in state.log],
        tokens_seen=[int(row["tokens_seen"]) for row in state.log],
        total_steps=state.step,
        initial=initial,
        final=weights(),
    )


def pieces(weights: dict[str, torch.Tensor], n_embd: int) -> dict[str, torch.Tensor]:
    """The weights as the reference holds them: each fused ``qkv`` split into its query,
    key and value parts (their changes differ in kind, see ``KEY_BIAS_RTOL``)."""
    out = {}
    for name, tensor in weights.items():
        if ".attn.qkv." in name:
            for part, chunk in zip(("query", "key", "value"), tensor.split(n_embd), strict=True):
                out[f"{name}[{part}]"] = chunk
        else:
            out[name] = tensor
    return out


def relative_change_errors(
    ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], start: dict[str, torch.Tensor]
) -> dict[str, float]:
    """||delta_ours - delta_ref|| / ||delta_ref|| of each weight, both changed from ``start``."""
    return {
        name: ((ours[name] - ref[name]).norm() / (ref[name] - s).norm()).item()
        for name, s in start.items()
    }


def max_abs_diff(a: Sequence[float], b: Sequence[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


# ================================================================ the test
@pytest.mark.usefixtures("one_thread")
def test_default_params_reproduce_the_reference_recipe_with_its_untied_head(
    checkpoint: Path,
) -> None:
    params = FinetuneParams()  # the defaults: the recipe under test, nothing overridden
    steps = params.epochs * (N_TRAIN // params.batch_size)
    assert steps >= 25, "the data must give the run enough steps to tell recipes apart"
    ref = reference_finetune(checkpoint, TRAIN_EXAMPLES, VAL_EXAMPLES)
    ours = our_finetune(checkpoint, params)

    # The same starting point: the reference's load_weights_into_gpt and our load_model +
    # Trainer agree bit for bit, the output head included (a copy of wte, of its own).
    assert sorted(ours.initial) == sorted(ref.initial), "state-dict names differ (a tied head?)"
    for name, tensor in ref.initial.items():
        assert torch.equal(ours.initial[name], tensor), name
    assert torch.equal(ref.initial["out_head.weight"], ref.initial["tok_emb.weight"])

    # The same schedule: evaluations after steps 1, 6, 11, ... (global_step 0, 5, 10, ...),
    # the same batches (tokens seen count their padding), the same losses.
    assert ours.total_steps == steps
    assert ours.steps == [s + 1 for s in range(0, steps, params.eval_every)]
    assert len(ref.train_losses) == len(ref.val_losses) == len(ours.steps)
    assert ours.tokens_seen == ref.tokens_seen
    assert max_abs_diff(ours.train_losses, ref.train_losses) <= LOSS_ATOL
    assert max_abs_diff(ours.val_losses, ref.val_losses) <= LOSS_ATOL

    # The same trained weights, element by element and as each weight's change as a whole.
    for name, tensor in ref.final.items():
        torch.testing.assert_close(ours.final[name], tensor, rtol=0, atol=WEIGHT_ATOL, msg=name)
    n_embd = ref.final["tok_emb.weight"].shape[1]
    errors = relative_change_errors(
        pieces(ours.final, n_embd), pieces(ref.final, n_embd), pieces(ref.initial, n_embd)
    )
    key_biases = {name for name in errors if name.endswith(".attn.qkv.bias[key]")}
    assert len(key_biases) == N_LAYER
    too_far = {
        name: error
        for name, error in errors.items()
        if error > (KEY_BIAS_RTOL if name in key_biases else DELTA_RTOL)
    }
    assert not too_far, too_far

    # Head and embedding were trained as two weights: they drifted apart on both sides, by
    # the same amount, and far more than the two sides' heads differ from each other.
    def drift(weights: dict[str, torch.Tensor]) -> float:
        return (weights["out_head.weight"] - weights["tok_emb.weight"]).norm().item()

    for side in (ref.final, ours.final):
        assert not torch.equal(side["out_head.weight"], side["tok_emb.weight"])
    heads_apart = (ours.final["out_head.weight"] - ref.final["out_head.weight"]).norm().item()
    assert drift(ref.final) > 1000 * heads_apart
    assert drift(ours.final) == pytest.approx(drift(ref.final), rel=DELTA_RTOL)
