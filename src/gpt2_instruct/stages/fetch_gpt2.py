"""Stage fetch_gpt2: GPT-2's BPE files and base weights (hub, local directory or random)."""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2_instruct.deadline import redact
from gpt2_instruct.download import fetch, local_path
from gpt2_instruct.io import atomic_dir, remove_stale_temps
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

# Caps on what is downloaded. GPT-2's BPE files are fetched at their exact sizes (known
# by their sha256 pins; other pins get BPE_MAX_BYTES), a config.json (under 1 KB) at most
# CONFIG_MAX_BYTES, model.safetensors at most ``max_bytes`` or weights_max_bytes().
BPE_SIZES = {
    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783": 1_042_301,  # encoder.json
    "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5": 456_318,  # vocab.bpe
}
BPE_MAX_BYTES = 4 << 20
CONFIG_MAX_BYTES = 1 << 20


def weights_max_bytes(model: str | None) -> int:
    """Default cap on model.safetensors: 1.25 x the size of the Hub's file for ``model``.

    The Hub's files hold every weight in fp32 plus each layer's causal mask
    (context x context fp32): gpt2 548 MB, gpt2-medium 1.52 GB, gpt2-large 3.25 GB,
    gpt2-xl 6.43 GB. ``None`` (a local directory of any GPT-2): the largest, gpt2-xl's.
    """
    if model is None:
        return max(weights_max_bytes(name) for name in GPT2_CONFIGS)
    cfg = GPT2_CONFIGS[model]
    d, layers, ctx = cfg.n_embd, cfg.n_layer, cfg.context_length
    weights = cfg.vocab_size * d + ctx * d + layers * (12 * d * d + 13 * d) + 2 * d
    masks = layers * ctx * ctx
    return int(1.25 * 4 * (weights + masks)) + (1 << 20)


def _join(source: str, name: str) -> str:
    path = local_path(source)
    return str(path / name) if path is not None else f"{source.rstrip('/')}/{name}"


def fetch_gpt2(params: FetchParams, encoding_out: Path, model_out: Path) -> None:
    """BPE files (sha256-pinned) and the base model as safetensors + config.json.

    Both outputs are built in temporary directories and put in place together at the
    end: when any part fails, neither output path is touched.
    """
    for stale in remove_stale_temps(encoding_out, model_out):
        log(f"fetch_gpt2: removed {stale}, left by an interrupted run")
    limits = {"timeout": params.timeout, "deadline_s": params.deadline_s}
    with atomic_dir(encoding_out) as enc_tmp, atomic_dir(model_out) as tmp:
        for name in (ENCODER_JSON, VOCAB_BPE):
            fetch(
                _join(params.bpe_source, name),
                enc_tmp / name,
                sha256=BPE_SHA256[name],
                size=BPE_SIZES.get(BPE_SHA256[name]),
                max_bytes=BPE_MAX_BYTES,
                retries=params.retries,
                **limits,
            )
        tokenizer = load_tokenizer(enc_tmp)

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
                weights_cap = params.max_bytes or weights_max_bytes(params.model)
            else:
                base = str(params.local_dir)
                weights_cap = params.max_bytes or weights_max_bytes(None)
            local = local_path(base)
            source = str(local) if local is not None else redact(base)
            for name, cap in ((CONFIG_NAME, CONFIG_MAX_BYTES), (WEIGHTS_NAME, weights_cap)):
                fetch(
                    _join(base, name),
                    tmp / name,
                    max_bytes=cap,
                    retries=params.retries,
                    progress=True,
                    **limits,
                )
            try:
                model = load_model(tmp)  # checks every tensor name and shape against config.json
            except (WeightsError, ValueError) as err:
                # Name the user's files, not our temporary copies of them.
                raise WeightsError(str(err).replace(str(tmp), source)) from err
            expected = GPT2_CONFIGS[params.model]
            shape = (model.config.n_layer, model.config.n_embd)
            if params.source == "hub" and shape != (expected.n_layer, expected.n_embd):
                raise WeightsError(
                    f"{source}: checkpoint does not have the shape of {params.model}"
                )
            log(f"fetch_gpt2: {source} ({model.num_parameters():,} parameters)")
        if model.config.vocab_size < tokenizer.vocab_size:
            raise WeightsError(
                f"{source}: "
                f"{model.config.vocab_size} token embeddings, fewer than the tokenizer's "
                f"{tokenizer.vocab_size} tokens"
            )
