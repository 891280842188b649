"""The finetune stage's model folder, loaded by Hugging Face ``transformers``.

The stages run for real (prepare, fetch_gpt2 with a random model, tokenize, finetune) on
a hand-made BPE, which a fresh clone has, and on OpenAI's GPT-2 BPE from ``../shared``
when it is there; then ``transformers`` reads the folder and must agree with our own
tokenizer, prompt formatting and decoder.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from gpt2_instruct import hf_folder, pipeline
from gpt2_instruct.data import (
    PROMPT_STYLES,
    Entry,
    format_example,
    format_prompt,
    load_entries,
    write_entries,
)
from gpt2_instruct.generation import generate
from gpt2_instruct.io import sha256_file
from gpt2_instruct.model import GPTConfig, GPTModel
from gpt2_instruct.model_dir import load_instruct_model
from gpt2_instruct.params import (
    FetchParams,
    FinetuneParams,
    PrepareParams,
    RandomModelParams,
    SamplingParams,
    TokenizeParams,
)
from gpt2_instruct.stages import fetch_gpt2 as fetch_gpt2_stage
from gpt2_instruct.stages.generate import generation_prompt
from gpt2_instruct.tokenizer import ENCODER_JSON, ENDOFTEXT, VOCAB_BPE, load_tokenizer

transformers = pytest.importorskip("transformers")  # a dev dependency
tokenizers = pytest.importorskip("tokenizers")

MERGES = [("t", "h"), ("th", "e"), ("Ċ", "Ċ"), ("Ġ", "a")]  # "Ċ" is "\n", "Ġ" is " "
MAX_NEW_TOKENS = 12
CONTEXT = 256  # holds the tiny BPE's alpaca prompts (about 200 tokens) and the answers


def _tiny_entries() -> list[Entry]:
    """Prompts with and without input, a blank-looking input, non-ASCII text, " ." (which
    transformers 4's clean_up_tokenization_spaces would decode as ".")."""
    entries = []
    for i in range(40):
        given = "" if i % 3 == 0 else (" " if i % 3 == 1 else f"input {i}: caf\u00e9 \u2014 ok")
        entries.append(
            Entry(f"Name the thing {i}.", given, f"The thing is {i} . \u00fcber {'x' * i}")
        )
    return entries


def _run_stages(root: Path, bpe_dir: Path, entries: list[Entry]) -> SimpleNamespace:
    """prepare, fetch_gpt2 (random), tokenize and finetune, as DVC runs them."""
    p = SimpleNamespace(root=root, bpe_dir=bpe_dir, model=root / "data/model")
    raw = root / "data/raw/instruction-data.json"
    raw.parent.mkdir(parents=True)
    write_entries(raw, entries)
    p.prepared, p.tokenized = root / "data/prepared", root / "data/tokenized"
    encoding, base = root / "data/gpt2/encoding", root / "data/gpt2/base"
    pipeline.prepare(PrepareParams(), raw, p.prepared, root / "metrics/prepare.json")
    shape = RandomModelParams(n_layer=2, n_head=2, n_embd=32, context_length=CONTEXT)
    pipeline.fetch_gpt2(
        FetchParams(source="random", bpe_source=str(bpe_dir), random=shape), encoding, base
    )
    pipeline.tokenize(TokenizeParams(), p.prepared, encoding, p.tokenized, root / "tok.json")
    p.report = pipeline.finetune(
        FinetuneParams(max_steps=2, batch_size=4, eval_every=1, eval_batches=2, device="cpu"),
        p.tokenized,
        base,
        encoding,
        p.model,
        root / "data/checkpoints",
        root / "metrics/train.json",
        root / "metrics/train_log.tsv",
        root / "plots/loss.png",
        root / "dvclive",
        max_new_tokens=MAX_NEW_TOKENS,
    )
    p.entries = load_entries(p.prepared / "test.json")
    return p


@pytest.fixture(scope="module")
def tiny_bpe(tmp_path_factory, write_bpe) -> Path:
    return write_bpe(tmp_path_factory.mktemp("bpe"), MERGES)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_bpe) -> SimpleNamespace:
    pins = {name: sha256_file(tiny_bpe / name) for name in (ENCODER_JSON, VOCAB_BPE)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fetch_gpt2_stage, "BPE_SHA256", pins)
        return _run_stages(tmp_path_factory.mktemp("tiny"), tiny_bpe, _tiny_entries())


@pytest.fixture(scope="module")
def real_entries(shared_data) -> list[Entry]:
    return load_entries(shared_data / "instruction-data.json")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, shared_data, real_entries) -> SimpleNamespace:
    """The real GPT-2 BPE (its sha256 pins hold) and the first 40 real entries."""
    root = tmp_path_factory.mktemp("real")
    return _run_stages(root, shared_data / "gpt2-encoding", real_entries[:40])


@pytest.fixture(params=["tiny", "real"])
def run(request) -> SimpleNamespace:
    return request.getfixturevalue(f"{request.param}_run")


def _messages(entry: Entry, answer: bool = False) -> list[dict[str, str]]:
    """Our convention: the instruction, its input as a second user message, the answer."""
    messages = [{"role": "user", "content": entry.instruction}]
    if entry.input:
        messages.append({"role": "user", "content": entry.input})
    if answer:
        messages.append({"role": "assistant", "content": entry.output})
    return messages


def _ids(encoded) -> list[int]:
    """Token ids from apply_chat_template(tokenize=True), a list or (transformers 5) a dict."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _tokenizer_variants(model_dir: Path, tmp_path: Path) -> dict[str, object]:
    """The folder's tokenizer as transformers loads it: from tokenizer.json, from
    vocab.json + merges.txt alone (what a slow GPT2Tokenizer reads), with use_fast=False,
    and tokenizer.json read by ``tokenizers`` itself."""
    bare = tmp_path / "without-tokenizer-json"
    shutil.copytree(model_dir, bare)
    (bare / hf_folder.TOKENIZER_JSON).unlink()
    auto = transformers.AutoTokenizer.from_pretrained
    return {
        "tokenizer.json": auto(model_dir),
        "vocab.json+merges.txt": auto(bare),
        "use_fast=False": auto(bare, use_fast=False),
        "tokenizers": tokenizers.Tokenizer.from_file(str(model_dir / hf_folder.TOKENIZER_JSON)),
    }


def _encode(tok: object, text: str) -> list[int]:
    if isinstance(tok, tokenizers.Tokenizer):
        return tok.encode(text, add_special_tokens=False).ids
    return tok(text, add_special_tokens=False)["input_ids"]


def _check_tokenizers_agree(model_dir: Path, tmp_path: Path, texts: list[str]) -> None:
    ours = load_tokenizer(model_dir)
    expected = [ours.encode(text) for text in texts]
    for name, tok in _tokenizer_variants(model_dir, tmp_path).items():
        got = [_encode(tok, text) for text in texts]
        wrong = [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b]
        assert not wrong, (name, len(wrong), texts[wrong[0]][:80])
        assert tok.decode(expected[0]) == texts[0], name
        if not isinstance(tok, tokenizers.Tokenizer):
            assert len(tok) == ours.vocab_size, name
            assert tok.eos_token_id == tok.pad_token_id == tok.bos_token_id == ours.eot_id, name
            assert [tok.decode(ids) for ids in expected] == texts, name  # byte-exact decode


# ------------------------------------------------------------------ the files


def test_the_folder_holds_our_files_and_hugging_faces(tiny_run, tiny_bpe):
    names = {path.name for path in tiny_run.model.iterdir()}
    assert names == {
        "model.safetensors",
        "config.json",
        ENCODER_JSON,
        VOCAB_BPE,
        *hf_folder.HF_FILES,
    }
    for name in (ENCODER_JSON, VOCAB_BPE):
        assert (tiny_run.model / name).read_bytes() == (tiny_bpe / name).read_bytes()
    assert (tiny_run.model / "vocab.json").read_bytes() == (tiny_bpe / ENCODER_JSON).read_bytes()
    merges = (tiny_run.model / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert merges == ["#version: 0.2", *(f"{a} {b}" for a, b in MERGES), ""]
    model, tokenizer, style = load_instruct_model(tiny_run.model)  # our loader still reads it
    assert style == "alpaca" and tokenizer.vocab_size == model.config.vocab_size


def test_merges_txt_is_vocab_bpe_for_gpt2s_files(real_run, shared_data):
    encoding = shared_data / "gpt2-encoding"
    assert (real_run.model / "merges.txt").read_bytes() == (encoding / VOCAB_BPE).read_bytes()
    assert (real_run.model / "vocab.json").read_bytes() == (encoding / ENCODER_JSON).read_bytes()


def test_config_and_generation_config_name_the_end_of_text_token(run):
    eot = load_tokenizer(run.model).eot_id
    config = transformers.AutoConfig.from_pretrained(run.model)
    assert (config.bos_token_id, config.eos_token_id) == (eot, eot)
    generation = transformers.GenerationConfig.from_pretrained(run.model)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (
        eot,
        eot,
        eot,
    )
    assert generation.do_sample is False and generation.num_beams == 1
    assert generation.max_new_tokens == MAX_NEW_TOKENS
    model = transformers.AutoModelForCausalLM.from_pretrained(run.model)
    assert model.generation_config.max_new_tokens == MAX_NEW_TOKENS  # the model picks it up


def test_tokenizer_config(tiny_run):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_run.model)
    assert tok.model_max_length == CONTEXT
    assert tok.padding_side == "left"
    assert tok.clean_up_tokenization_spaces is False  # decoding is byte-exact, " ." stays
    assert tok("the", add_special_tokens=False)["input_ids"] == tok("the")["input_ids"]  # no BOS
    special = json.loads((tiny_run.model / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert set(special.values()) == {ENDOFTEXT}


# ------------------------------------------------------------------ the tokenizer


def test_transformers_tokenizes_as_we_do_tiny(tiny_run, tmp_path):
    entries = _tiny_entries()
    texts = [format_example(e, style) for e in entries for style in PROMPT_STYLES]
    _check_tokenizers_agree(tiny_run.model, tmp_path, texts)


def test_transformers_tokenizes_as_we_do_on_the_whole_data_set(real_run, real_entries, tmp_path):
    texts = [format_example(e, style) for e in real_entries for style in PROMPT_STYLES]
    assert len(texts) == 2 * 1100
    _check_tokenizers_agree(real_run.model, tmp_path, texts)


# ------------------------------------------------------------------ the chat template


def _style_dir(tmp_path: Path, bpe_dir: Path, style: str) -> Path:
    directory = tmp_path / style
    directory.mkdir()
    hf_folder.write_tokenizer_files(directory, bpe_dir, style, CONTEXT)
    return directory


def _check_template(tok: object, ours: object, entries: list[Entry], style: str) -> None:
    """Rendered text equals our prompt; with the answer, the ids equal the training ids."""
    render = tok.apply_chat_template
    tokenized = pipeline.tokenize_entries(entries, ours, style)[0]
    for entry, training_ids in zip(entries, tokenized, strict=True):
        messages = _messages(entry)
        assert render(messages, tokenize=False, add_generation_prompt=True) == format_prompt(
            entry, style
        )
        without = render(messages, tokenize=False, add_generation_prompt=False)
        assert without + hf_folder.prompt_parts(style).response == format_prompt(entry, style)
        if style == "alpaca":  # the prompt the reference's generate feeds
            assert without == generation_prompt(entry, style, response_header_in_prompt=False)
        full = _messages(entry, answer=True)
        assert render(full, tokenize=False) == format_example(entry, style) + ENDOFTEXT
        assert _ids(render(full, tokenize=True)) == [*training_ids, ours.eot_id]  # + collate's EOS


@pytest.mark.parametrize("style", PROMPT_STYLES)
def test_chat_template_renders_the_training_prompt_tiny(tmp_path, tiny_bpe, style):
    tok = transformers.AutoTokenizer.from_pretrained(_style_dir(tmp_path, tiny_bpe, style))
    _check_template(tok, load_tokenizer(tiny_bpe), _tiny_entries(), style)


@pytest.mark.parametrize("style", PROMPT_STYLES)
def test_chat_template_renders_the_training_prompt_of_every_entry(
    tmp_path, shared_data, real_entries, style
):
    bpe = shared_data / "gpt2-encoding"
    tok = transformers.AutoTokenizer.from_pretrained(_style_dir(tmp_path, bpe, style))
    assert sum(bool(e.input) for e in real_entries) not in (0, len(real_entries))  # both kinds
    _check_template(tok, load_tokenizer(bpe), real_entries, style)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
         {"role": "user", "content": "c"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
         {"role": "user", "content": "c"}],
        [{"role": "assistant", "content": "b"}],
    ],
)  # fmt: skip
def test_chat_template_refuses_what_training_never_saw(tiny_run, messages):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_run.model)
    with pytest.raises(Exception, match="gpt2-instruct"):
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_a_style_that_does_not_split_into_a_template_fails(monkeypatch):
    monkeypatch.setattr(
        hf_folder, "format_prompt", lambda e, style: f"{e.input}|{e.instruction}\n### R:\n"
    )
    with pytest.raises(ValueError, match="does not split"):
        hf_folder.chat_template("alpaca")


# ------------------------------------------------------------------ generation


def _our_answer(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    model, tokenizer, _ = load_instruct_model(model_dir)
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    ids = generate(model, [tokenizer.encode(prompt)], eos_id=tokenizer.eot_id, sampling=sampling)
    return tokenizer.decode(ids[0])


def test_pipeline_answers_as_our_generate_does(run):
    pipe = transformers.pipeline("text-generation", model=str(run.model), device="cpu")
    for entry in run.entries:
        for prompt in (format_prompt(entry), generation_prompt(entry, "alpaca", False)):
            ours = _our_answer(run.model, prompt, MAX_NEW_TOKENS)
            (out,) = pipe(prompt)  # greedy and max_new_tokens from generation_config.json
            assert out["generated_text"] == prompt + ours
        (chat,) = pipe(_messages(entry))  # the chat template adds the response header
        assert chat["generated_text"][-1] == {
            "role": "assistant",
            "content": _our_answer(run.model, format_prompt(entry), MAX_NEW_TOKENS),
        }


def _stopping_model(vocab_size: int, stop_at: int, token: int, eos: int) -> GPTModel:
    """A model whose argmax is ``token`` before position ``stop_at`` and ``eos`` from there.

    The blocks add nothing (zero output projections) and tokens embed to zero, so the
    final hidden state is the position embedding: ``u`` before ``stop_at``, ``w`` after,
    two orthogonal zero-mean directions that the head maps to ``token`` and ``eos``.
    """
    config = GPTConfig(vocab_size, CONTEXT, n_embd=8, n_layer=1, n_head=2, tie_embeddings=False)
    model = GPTModel(config)
    u = torch.tensor([1.0, -1.0, 0, 0, 0, 0, 0, 0])
    w = torch.tensor([0, 0, 1.0, -1.0, 0, 0, 0, 0])
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.final_norm.weight.fill_(1.0)
        model.pos_emb.weight[:stop_at] = u
        model.pos_emb.weight[stop_at:] = w
        model.out_head.weight[token] = u
        model.out_head.weight[eos] = w
    return model


def _training_facts(base_sha256: str = "0" * 64) -> hf_folder.Training:
    base = hf_folder.BaseModel(None, None, None, random_init=True, weights_sha256=base_sha256)
    return hf_folder.Training(
        base=base,
        data={"train": "1" * 64, "val": "2" * 64},
        params={"lr": 5e-5, "epochs": 2},
        results={"train_loss": 1.5, "val_loss": 2.25, "steps": 3, "epochs": 0.5, "tokens_seen": 9},
    )


def test_generate_stops_at_the_end_of_text_token(tmp_path, tiny_bpe):
    ours = load_tokenizer(tiny_bpe)
    prompt = format_prompt(Entry("Say a few", "", ""))
    prompt_ids = ours.encode(prompt)
    a_id, stop_at = ours.encode("a")[0], len(prompt_ids) + 4
    model = _stopping_model(ours.vocab_size, stop_at, a_id, ours.eot_id)
    hf_folder.write_model_folder(
        model,
        tmp_path,
        encoding_dir=tiny_bpe,
        prompt_style="alpaca",
        max_new_tokens=20,  # far more than the answer's 5 tokens
        training=_training_facts(),
    )
    answer = [a_id] * (stop_at - len(prompt_ids) + 1)
    sampling = SamplingParams(max_new_tokens=20)
    assert generate(model, [prompt_ids], eos_id=ours.eot_id, sampling=sampling) == [answer]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    out = hf_model.generate(
        torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long)
    )
    assert out[0].tolist() == [*prompt_ids, *answer, ours.eot_id]  # ends at the first EOS
    pipe = transformers.pipeline("text-generation", model=str(tmp_path), device="cpu")
    assert pipe(prompt)[0]["generated_text"] == prompt + "a" * len(answer)


# ------------------------------------------------------------------ the model card


def _front_matter(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    front, _, body = card[4:].partition("\n---\n")
    return yaml.safe_load(front), body


def test_model_card_states_the_run(run):
    front, body = _front_matter((run.model / "README.md").read_text(encoding="utf-8"))
    assert front["library_name"] == "transformers"
    assert front["license"] == "mit"
    assert front["pipeline_tag"] == "text-generation"
    assert {"gpt2", "alpaca"} <= set(front["tags"])
    assert "base_model" not in front  # a random base is named nothing
    assert "randomly initialised" in body
    assert sha256_file(run.root / "data/gpt2/base/model.safetensors") in body
    for split in ("train", "val"):
        assert sha256_file(run.tokenized / f"{split}.safetensors") in body
    assert f"train **{run.report['train_loss']:.4f}**" in body
    assert f"validation **{run.report['val_loss']:.4f}**" in body
    assert f"({run.report['steps']} steps, " in body
    assert "over 2 batches" in body  # finetune.eval_batches
    assert "gpt2-instruct chat --model" in body


def test_model_cards_python_snippet_runs_and_answers_as_we_do(tiny_run):
    card = (tiny_run.model / "README.md").read_text(encoding="utf-8")
    code = card.split("```python\n")[1].split("```")[0]
    assert 'path = "data/model"' in code
    code = code.replace('"data/model"', repr(str(tiny_run.model)))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, {})
    entry = Entry("Rewrite the sentence using a simile.", "The car is very fast.", "")
    assert (
        printed.getvalue()
        == _our_answer(tiny_run.model, format_prompt(entry), MAX_NEW_TOKENS) + "\n"
    )


def _fake_base(directory: Path, config: dict) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (directory / "model.safetensors").write_bytes(b"weights")
    return directory


MEDIUM = {"n_layer": 24, "n_embd": 1024, "n_head": 16, "vocab_size": 50257, "n_positions": 1024}


@pytest.mark.parametrize(
    ("config", "fetch", "hub_id", "shape"),
    [
        (MEDIUM, FetchParams(source="hub", model="gpt2-medium", revision="v1"),
         "openai-community/gpt2-medium", "gpt2-medium"),
        (MEDIUM, FetchParams(source="hub", model="gpt2"), None, "gpt2-medium"),  # other shape
        (MEDIUM, FetchParams(source="local", local_dir="x"), None, "gpt2-medium"),
        (MEDIUM, None, None, "gpt2-medium"),
        ({**MEDIUM, "n_layer": 2}, None, None, None),
        ({**MEDIUM, "gpt2_instruct": {"random_init": True}},
         FetchParams(source="hub", model="gpt2-medium"), None, "gpt2-medium"),
    ],
)  # fmt: skip
def test_the_card_names_a_base_model_only_when_it_came_from_the_hub(
    tmp_path, config, fetch, hub_id, shape
):
    base = hf_folder.describe_base(_fake_base(tmp_path / "base", config), fetch)
    assert (base.hub_id, base.shape) == (hub_id, shape)
    assert base.weights_sha256 == sha256_file(tmp_path / "base/model.safetensors")
    training = _training_facts()
    training = hf_folder.Training(base, training.data, training.params, training.results)
    front, body = _front_matter(hf_folder.model_card(training, "phi3", 7))
    assert front.get("base_model") == hub_id
    if hub_id:
        assert f"revision `{fetch.revision}`" in body
    assert base.weights_sha256 in body
    assert "at most 7 new tokens" in body
