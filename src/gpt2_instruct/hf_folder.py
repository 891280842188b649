"""A fine-tuned model folder that Hugging Face ``transformers`` loads as it is.

``save_model`` writes the weights and ``config.json``; our own loader also needs OpenAI's
``encoder.json`` and ``vocab.bpe``. ``transformers`` knows neither name: without the files
below, ``AutoTokenizer.from_pretrained`` builds an empty tokenizer (0 tokens, eos id 0)
and ``pipeline("text-generation")`` answers ``''`` without an error. So the folder also
holds, all written by :func:`write_model_folder`:

* ``vocab.json`` and ``merges.txt``: the same BPE under Hugging Face's names (``vocab.json``
  is ``encoder.json``; ``merges.txt`` is ``vocab.bpe``, first line ``#version: 0.2``),
  and ``tokenizer.json``, the fast tokenizer written out here (no ``tokenizers`` needed);
* ``tokenizer_config.json`` and ``special_tokens_map.json``: ``<|endoftext|>`` is bos, eos,
  unk and pad. Pad is ``<|endoftext|>`` because training pads with it (``collate``
  appends one EOS target and masks the rest by position, never by id); GPT-2 has no other
  spare token, and a new one would change the vocabulary. A collator that masks every
  label equal to the pad id would mask that EOS target too, and the model would not
  learn to stop. Padding is on the left, as for any batched generation;
* a ``chat_template`` that renders exactly the training prompt of the saved prompt style
  (:func:`chat_template`);
* ``generation_config.json``: greedy, ``<|endoftext|>`` ends an answer, at most
  ``generate.max_new_tokens`` new tokens, as the generate stage decodes;
* ``README.md``, a model card: base model, data hashes, params, final losses, how to load.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gpt2_instruct.data import Entry, format_prompt
from gpt2_instruct.io import sha256_file, write_json
from gpt2_instruct.model import GPT2_CONFIGS, GPTModel
from gpt2_instruct.params import FetchParams
from gpt2_instruct.safe_json import read_json
from gpt2_instruct.tokenizer import ENCODER_JSON, ENDOFTEXT, VOCAB_BPE, load_tokenizer
from gpt2_instruct.weights import CONFIG_KEY, CONFIG_NAME, MAX_CONFIG_BYTES, WEIGHTS_NAME
from gpt2_instruct.weights import save_model as save_weights

VOCAB_JSON = "vocab.json"
MERGES_TXT = "merges.txt"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
MODEL_CARD = "README.md"
MERGES_VERSION = "#version: 0.2"
HF_FILES: tuple[str, ...] = (
    VOCAB_JSON,
    MERGES_TXT,
    TOKENIZER_JSON,
    TOKENIZER_CONFIG,
    SPECIAL_TOKENS_MAP,
    GENERATION_CONFIG,
    MODEL_CARD,
)
"""What the folder holds beside ``model.safetensors``, ``config.json`` and OpenAI's files."""

HUB_ORG = "openai-community"  # where fetch_gpt2 takes the published sizes from


# --- the prompt as a chat template ---------------------------------------------------------


@dataclass(frozen=True)
class PromptParts:
    """A style's prompt cut around its fields: ``head + instruction [+ before_input + input]
    + response``, where ``response`` is the response header that ``add_generation_prompt``
    adds (``"\\n\\n### Response:\\n"`` for alpaca: the reference's generate leaves it out)."""

    head: str
    before_input: str
    response: str


def prompt_parts(style: str) -> PromptParts:
    """Cut ``format_prompt``'s output around marker fields, so the template never drifts
    from the prompt training used; a style whose prompt is not built that way fails here."""
    instruction, given = "\x00instruction\x00", "\x00input\x00"
    with_input = format_prompt(Entry(instruction, given, "-"), style)
    without = format_prompt(Entry(instruction, "", "-"), style)
    head, _, rest = with_input.partition(instruction)
    before_input, _, response = rest.partition(given)
    if (
        not response
        or with_input != head + instruction + before_input + given + response
        or without != head + instruction + response
    ):
        raise ValueError(f"prompt style {style!r} does not split into a chat template")
    return PromptParts(head, before_input, response)


def _jinja_string(text: str) -> str:
    """A Jinja string literal (Jinja unescapes like Python: ``\\n``, ``\\"``, ``\\uXXXX``)."""
    return json.dumps(text, ensure_ascii=True)


# Every output comes from an expression, so the whitespace control (``-``) and Hugging
# Face's trim_blocks/lstrip_blocks leave nothing of the layout in the rendered text.
_TEMPLATE = """\
{#- gpt2-instruct, prompt style @STYLE@: user = the instruction, an optional second user
    message = its input, then an optional assistant answer. -#}
{%- set ns = namespace(instruction=none, input=none, answer=none) -%}
{%- for message in messages -%}
  {%- if message['role'] == 'user' and ns.instruction is none -%}
    {%- set ns.instruction = message['content'] -%}
  {%- elif message['role'] == 'user' and ns.input is none and ns.answer is none -%}
    {%- set ns.input = message['content'] -%}
  {%- elif message['role'] == 'assistant' and ns.instruction is not none
      and ns.answer is none -%}
    {%- set ns.answer = message['content'] -%}
  {%- elif message['role'] == 'system' -%}
    {{- raise_exception('gpt2-instruct: system messages are refused (trained without one)') -}}
  {%- else -%}
    {{- raise_exception('gpt2-instruct: one exchange only: a user message (the instruction), '
        + 'an optional user message (its input), an optional assistant answer') -}}
  {%- endif -%}
{%- endfor -%}
{%- if ns.instruction is none -%}
  {{- raise_exception('gpt2-instruct: a user message (the instruction) is needed') -}}
{%- endif -%}
{{- @HEAD@ + ns.instruction -}}
{%- if ns.input -%}
  {{- @BEFORE_INPUT@ + ns.input -}}
{%- endif -%}
{%- if ns.answer is not none -%}
  {{- @RESPONSE@ + ns.answer + @EOS@ -}}
{%- elif add_generation_prompt -%}
  {{- @RESPONSE@ -}}
{%- endif -%}
"""


def chat_template(style: str) -> str:
    """A Jinja chat template that renders ``format_prompt(entry, style)`` byte for byte.

    Messages: one ``user`` message is the instruction; a second ``user`` message right
    after it is the entry's ``input`` (as ``gpt2-instruct chat`` asks for both; an empty
    one means no input, as in the data). ``add_generation_prompt=True`` appends the
    response header, so the text is exactly the training prompt; without it the alpaca
    prompt stops where the reference's generate stops. An ``assistant`` message after
    them is the answer, followed by ``<|endoftext|>`` as training appends it.
    A ``system`` message or a second turn is refused, not dropped: the model never saw
    either, and silently ignoring one would make a user believe it took effect.
    """
    parts = prompt_parts(style)
    fields = {
        "@STYLE@": style,
        "@HEAD@": _jinja_string(parts.head),
        "@BEFORE_INPUT@": _jinja_string(parts.before_input),
        "@RESPONSE@": _jinja_string(parts.response),
        "@EOS@": _jinja_string(ENDOFTEXT),
    }
    return re.sub("|".join(fields), lambda match: fields[match.group()], _TEMPLATE)


# --- the tokenizer files -------------------------------------------------------------------


def _merges(vocab_bpe: Path) -> list[str]:
    """The merge lines of a ``vocab.bpe`` that ``load_tokenizer`` has accepted."""
    lines = vocab_bpe.read_bytes().decode("utf-8").split("\n")
    return [line for line in lines[1:] if line]


def tokenizer_json(encoder: dict[str, int], merges: list[str], eot_id: int) -> dict[str, Any]:
    """The ``tokenizers`` file of GPT-2's byte-level BPE (the layout of the Hub's gpt2).

    Merges are written as ``"a b"`` strings, which every ``tokenizers`` release reads
    (the pair form needs 0.20+); GPT-2's byte-level tokens never hold a space.
    """
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": eot_id,
                "content": ENDOFTEXT,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {"type": "ByteLevel", **byte_level, "trim_offsets": False},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": encoder,
            "merges": merges,
        },
    }


def special_tokens() -> dict[str, str]:
    """``<|endoftext|>`` in every role (see the module doc for the pad token)."""
    return {name: ENDOFTEXT for name in ("bos_token", "eos_token", "unk_token", "pad_token")}


def tokenizer_config(style: str, context_length: int) -> dict[str, Any]:
    """``tokenizer_config.json``: no token added to the text, decoding byte-exact
    (``clean_up_tokenization_spaces`` would turn ``" ."`` into ``"."``)."""
    return {
        "tokenizer_class": "GPT2Tokenizer",
        **special_tokens(),
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": context_length,
        "padding_side": "left",
        "chat_template": chat_template(style),
    }


def write_tokenizer_files(
    out_dir: Path, encoding_dir: Path, style: str, context_length: int
) -> int:
    """OpenAI's BPE files plus Hugging Face's tokenizer files; returns the EOS id.

    The BPE files are checked by our own loader first, so a folder is never written with
    a tokenizer that ``load_instruct_model`` would refuse.
    """
    eot_id = load_tokenizer(encoding_dir).eot_id
    for name in (ENCODER_JSON, VOCAB_BPE):
        shutil.copyfile(encoding_dir / name, out_dir / name)
    shutil.copyfile(encoding_dir / ENCODER_JSON, out_dir / VOCAB_JSON)
    merges = _merges(encoding_dir / VOCAB_BPE)
    (out_dir / MERGES_TXT).write_text(
        "\n".join([MERGES_VERSION, *merges]) + "\n", encoding="utf-8", newline="\n"
    )
    encoder = read_json(encoding_dir / ENCODER_JSON, duplicates="error")
    write_json(out_dir / TOKENIZER_JSON, tokenizer_json(encoder, merges, eot_id), indent=None)
    write_json(out_dir / TOKENIZER_CONFIG, tokenizer_config(style, context_length))
    write_json(out_dir / SPECIAL_TOKENS_MAP, special_tokens())
    return eot_id


def generation_config(eot_id: int, max_new_tokens: int) -> dict[str, Any]:
    """``generation_config.json``: how the generate stage decodes (greedy, stop at EOS)."""
    return {
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": eot_id,
        "do_sample": False,
        "num_beams": 1,
        "max_new_tokens": max_new_tokens,
    }


# --- the model card ------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseModel:
    """What can truthfully be said of the base model: ``hub_id`` only when fetch_gpt2 took
    it from the Hub with a published size's shape, ``shape`` the published size it has."""

    hub_id: str | None
    revision: str | None
    shape: str | None
    random_init: bool
    weights_sha256: str

    def describe(self) -> str:
        """One sentence for the card."""
        digest = f"base weights sha256 `{self.weights_sha256}`"
        if self.random_init:
            return (
                "a **randomly initialised** GPT-2-shaped model, NOT pre-trained GPT-2 "
                f"(a smoke run; its answers mean nothing); {digest}"
            )
        if self.hub_id:
            link = f"[{self.hub_id}](https://huggingface.co/{self.hub_id})"
            return f"{link} (revision `{self.revision}`); {digest}"
        shape = f"with the shape of {self.shape}" if self.shape else "of a custom shape"
        return f"a local GPT-2 checkpoint {shape}; {digest}"


def describe_base(base_dir: Path, fetch: FetchParams | None = None) -> BaseModel:
    """The base model as the card states it, from its ``config.json`` and the fetch params.

    The name on the Hub is claimed only where ``fetch`` says the base came from there and
    the weights have that size's shape; the sha256 of the weights lets anyone check it.
    """
    config = read_json(base_dir / CONFIG_NAME, max_bytes=MAX_CONFIG_BYTES)
    extra = config.get(CONFIG_KEY) if isinstance(config, dict) else None
    random_init = isinstance(extra, dict) and extra.get("random_init") is True
    shape = next(
        (
            name
            for name, c in GPT2_CONFIGS.items()
            if isinstance(config, dict)
            and (config.get("n_layer"), config.get("n_embd"), config.get("n_head"))
            == (c.n_layer, c.n_embd, c.n_head)
            and (config.get("vocab_size"), config.get("n_positions"))
            == (c.vocab_size, c.context_length)
        ),
        None,
    )
    from_hub = fetch is not None and fetch.source == "hub" and fetch.model == shape
    return BaseModel(
        hub_id=f"{HUB_ORG}/{fetch.model}" if from_hub and not random_init else None,
        revision=fetch.revision if from_hub and not random_init else None,
        shape=shape,
        random_init=random_init,
        weights_sha256=sha256_file(base_dir / WEIGHTS_NAME),
    )


@dataclass(frozen=True)
class Training:
    """What the finetune stage knows of the run, for the card."""

    base: BaseModel
    data: dict[str, str]  # split name -> sha256 of its tokenized file
    params: dict[str, Any]  # the finetune params as run
    results: dict[str, Any]  # final train_loss, val_loss, steps, epochs, tokens_seen


_KEY_PARAMS = ("epochs", "max_steps", "batch_size", "lr", "weight_decay", "lr_schedule",
               "max_length", "mask_prompt", "tie_embeddings", "precision", "seed")  # fmt: skip


def _example(style: str) -> str:
    entry = Entry("Rewrite the sentence using a simile.", "The car is very fast.", "")
    return format_prompt(entry, style)


def model_card(training: Training, style: str, max_new_tokens: int) -> str:
    """``README.md`` with Hub front matter; every figure comes from the run itself."""
    base = training.base
    front: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    if base.hub_id:
        front["base_model"] = base.hub_id
    front["license"] = "mit"  # GPT-2's weights and BPE files (openai/gpt-2) are MIT
    front["tags"] = ["gpt2", "gpt2-instruct", "instruction-tuning", style]
    params = training.params
    lora = params.get("lora", {})
    key_params = {k: params[k] for k in _KEY_PARAMS if k in params}
    if lora.get("rank"):
        key_params["lora"] = f"rank {lora['rank']}, alpha {lora['alpha']} (merged)"
    results = training.results
    rows = "\n".join(f"| {k} | `{json.dumps(v)}` |" for k, v in key_params.items())
    data = "\n".join(f"- {name}: sha256 `{digest}`" for name, digest in training.data.items())
    batches = params.get("eval_batches", "a few")
    fence = "```"
    return f"""---
{yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip()}
---

# GPT-2 instruction fine-tune ({style} prompt)

Instruction-fine-tuned by gpt2-instruct, a DVC pipeline that follows chapter 7 of
Raschka's *Build a Large Language Model (From Scratch)* with its own PyTorch GPT-2; the
weights are saved in Hugging Face's GPT-2 layout.

- **Base model:** {base.describe()}.
- **Prompt style:** `{style}`; the tokenizer's chat template renders exactly the training
  prompt.

## Training data

Tokenized splits (the files the finetune stage read):

{data}

## Training

| param | value |
|---|---|
{rows}

Final losses, the mean cross-entropy over {batches} batches of each split:
train **{results["train_loss"]:.4f}**, validation **{results["val_loss"]:.4f}**
({results["steps"]} steps, {results["epochs"]} epochs, {results["tokens_seen"]:,} tokens seen).

## Use

The prompt for an instruction with an input, as training saw it
(`apply_chat_template(..., add_generation_prompt=True)` gives the same):

{fence}text
{_example(style)}{fence}

Messages: one `user` message is the instruction, an optional second `user` message its
input, then an optional `assistant` answer (rendered with `<|endoftext|>` after it, as in
training). System messages and further turns are refused: the model never saw them.
`generation_config.json` decodes as gpt2-instruct's generate stage does: greedy, stop at
`<|endoftext|>`, at most {max_new_tokens} new tokens.

{fence}python
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "data/model"  # this folder
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
messages = [
    {{"role": "user", "content": "Rewrite the sentence using a simile."}},
    {{"role": "user", "content": "The car is very fast."}},  # optional: the input
]
prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
inputs = tokenizer(prompt, return_tensors="pt")
output = model.generate(**inputs)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
{fence}

`pipeline("text-generation", model=path)` takes the same messages. With gpt2-instruct
installed: `gpt2-instruct chat --model data/model`.
"""


# --- the whole folder ----------------------------------------------------------------------


def write_model_folder(
    model: GPTModel,
    out_dir: Path,
    *,
    encoding_dir: Path,
    prompt_style: str,
    max_new_tokens: int,
    training: Training,
    extra_config: dict[str, Any] | None = None,
) -> None:
    """Write a complete model folder into ``out_dir`` (the finetune stage's ``atomic_dir``).

    Our loader reads ``model.safetensors``, ``config.json``, ``encoder.json`` and
    ``vocab.bpe``; ``transformers`` reads the same weights with :data:`HF_FILES`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    eot_id = write_tokenizer_files(out_dir, encoding_dir, prompt_style, model.config.context_length)
    config = {"bos_token_id": eot_id, "eos_token_id": eot_id, **(extra_config or {})}
    save_weights(model, out_dir, extra_config=config)
    write_json(out_dir / GENERATION_CONFIG, generation_config(eot_id, max_new_tokens))
    card = model_card(training, prompt_style, max_new_tokens)
    (out_dir / MODEL_CARD).write_text(card, encoding="utf-8", newline="\n")
