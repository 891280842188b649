"""Stage fetch_gpt2: GPT-2's BPE files and base weights (hub, local directory or random)."""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2_instruct.download import fetch, local_path
from gpt2_instruct.io import atomic_dir
from gpt2_instruct.model import GPT2_CONFIGS, GPTConfig, GPTModel
from gpt2_instruct.params import FetchParams
from gpt2_instruct.stages import log
from gpt2_instruct.tokenizer import BPE_SHA256, ENCODER_JSON, VOCAB_BPE, load_tokenizer
from gpt2_instruct.weights import (
    CONFIG_KEY,
    CONFIG_NAME,
    WEIGHTS_NAME,
    WeightsError,
    load_model,
    save_model,
)


def _join(source: str, name: str) -> str:
    path = local_path(source)
    return str(path / name) if path is not None else f"{source.rstrip('/')}/{name}"


def fetch_gpt2(params: FetchParams, encoding_out: Path, model_out: Path) -> None:
    """BPE files (sha256-pinned) and the base model as safetensors + config.json."""
    with atomic_dir(encoding_out) as tmp:
        for name in (ENCODER_JSON, VOCAB_BPE):
            fetch(
                _join(params.bpe_source, name),
                tmp / name,
                sha256=BPE_SHA256[name],
                timeout=params.timeout,
                retries=params.retries,
            )
    tokenizer = load_tokenizer(encoding_out)

    with atomic_dir(model_out) as tmp:
        if params.source == "random":
            cfg = params.random
            torch.manual_seed(cfg.seed)
            model = GPTModel(
                GPTConfig(
                    vocab_size=tokenizer.vocab_size,
                    context_length=cfg.context_length,
                    n_embd=cfg.n_embd,
                    n_layer=cfg.n_layer,
                    n_head=cfg.n_head,
                )
            )
            save_model(model, tmp, extra_config={CONFIG_KEY: {"random_init": True}})
            source = "random model"
            log(
                "fetch_gpt2: WARNING: randomly initialised model, NOT pre-trained GPT-2 "
                f"({model.num_parameters():,} parameters) - for smoke tests and CI only"
            )
        else:
            if params.source == "hub":
                base = f"{params.hub_url.rstrip('/')}/openai-community/{params.model}"
                base = f"{base}/resolve/{params.revision}"
            else:
                base = str(params.local_dir)
            source = base
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                fetch(
                    _join(base, name),
                    tmp / name,
                    timeout=params.timeout,
                    retries=params.retries,
                    progress=True,
                )
            model = load_model(tmp)  # checks every tensor name and shape against config.json
            expected = GPT2_CONFIGS[params.model]
            shape = (model.config.n_layer, model.config.n_embd)
            if params.source == "hub" and shape != (expected.n_layer, expected.n_embd):
                raise WeightsError(f"{base}: checkpoint does not have the shape of {params.model}")
            log(f"fetch_gpt2: {base} ({model.num_parameters():,} parameters)")
        if model.config.vocab_size < tokenizer.vocab_size:
            raise WeightsError(
                f"{source}: "
                f"{model.config.vocab_size} token embeddings, fewer than the tokenizer's "
                f"{tokenizer.vocab_size} tokens"
            )
