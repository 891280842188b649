"""The stage functions end to end on tiny data, without DVC.

A 40-entry data set, a hand-made BPE (256 bytes + 3 merges + <|endoftext|>) and a
one-layer random model go through download, prepare, fetch_gpt2, tokenize, finetune,
generate, evaluate and judge (backend none, as in params.yaml) in a few seconds on a CPU.
"""

from __future__ import annotations

import csv
import hashlib
import http.server
import json
import math
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from test_params import dvc_plot_files

from gpt2_instruct import pipeline, training
from gpt2_instruct.batching import TokenizedSplit
from gpt2_instruct.data import DataError, Entry, format_prompt, load_entries, write_entries
from gpt2_instruct.download import DownloadError
from gpt2_instruct.model import GPTConfig, GPTModel
from gpt2_instruct.model_dir import load_instruct_model
from gpt2_instruct.params import (
    DownloadParams,
    DpoParams,
    EvaluateParams,
    FetchParams,
    FinetuneParams,
    GenerateParams,
    JudgeParams,
    PrepareParams,
    RandomModelParams,
    TokenizeParams,
    load_params,
)
from gpt2_instruct.stages import fetch_gpt2 as fetch_gpt2_stage
from gpt2_instruct.stages import generate as generate_stage
from gpt2_instruct.stages import judge as judge_stage
from gpt2_instruct.tokenizer import ENCODER_JSON, ENDOFTEXT, VOCAB_BPE, load_tokenizer
from gpt2_instruct.training import CHECKPOINT_NAME

REPO_ROOT = Path(__file__).resolve().parents[1]
# "Ċ" is GPT-2's character for the newline byte: "Ċ Ċ" merges "\n\n".
MERGES = [("t", "h"), ("th", "e"), ("Ċ", "Ċ")]
VOCAB_SIZE = 256 + len(MERGES) + 1
EOT = VOCAB_SIZE - 1
N_ENTRIES = 40
N_TRAIN, N_TEST, N_VAL = 34, 4, 2  # int(40 * 0.85), int(40 * 0.1), the rest
NEWLINE_ENTRY = 1  # its output starts with "\n\n": BPE merges across the prompt boundary
EOT_TEXT_ENTRY = 3  # its output contains a literal <|endoftext|>
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _raw_entries() -> list[dict]:
    """Short entries; test entries (34..37) get prompts whose lengths are not in file order."""
    raw = []
    for i in range(N_ENTRIES):
        item: dict = {
            "instruction": f"Name {i}: " + "x" * (N_ENTRIES - i),
            "output": f"The answer {i}.",
        }
        if i % 2:
            item["input"] = f"in {i}"
        elif i % 4 == 2:
            item["input"] = None  # null means no input
        # i % 4 == 0: no "input" key at all
        raw.append(item)
    raw[NEWLINE_ENTRY]["output"] = "\n\nthe end"
    raw[EOT_TEXT_ENTRY]["output"] = f"Stop{ENDOFTEXT}here"
    return raw


def _entry(item: dict) -> Entry:
    return Entry(item["instruction"], item.get("input") or "", item["output"])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _response_loss_by_hand(model: GPTModel, ids: list[int], prompt_length: int) -> float:
    """Mean cross-entropy of the response tokens and the closing EOS, from ``model(idx)``."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]  # (T, V)
    targets = torch.tensor([*ids[prompt_length:], EOT])
    return F.cross_entropy(logits[prompt_length - 1 :], targets).item()


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory, write_bpe) -> Path:
    return write_bpe(tmp_path_factory.mktemp("bpe"), MERGES)


@pytest.fixture(scope="module")
def tokenizer(bpe_dir):
    return load_tokenizer(bpe_dir)


@pytest.fixture(scope="module")
def run(tmp_path_factory, bpe_dir):
    """Every stage once, in DVC's order; the tests below check what each one wrote."""
    root = tmp_path_factory.mktemp("pipeline")
    source = root / "source.json"
    source.write_text(json.dumps(_raw_entries(), indent=1), encoding="utf-8")
    p = SimpleNamespace(
        root=root,
        source=source,
        raw=root / "data/raw/instruction-data.json",
        prepared=root / "data/prepared",
        prepare_metrics=root / "metrics/prepare.json",
        encoding=root / "data/gpt2/encoding",
        base=root / "data/gpt2/base",
        tokenized=root / "data/tokenized",
        tokenize_metrics=root / "metrics/tokenize.json",
        model=root / "data/model",
        checkpoints=root / "data/checkpoints",
        train_metrics=root / "metrics/train.json",
        train_log=root / "metrics/train_log.tsv",
        loss_plot=root / "plots/loss.png",
        responses=root / "data/responses/test.json",
        generate_metrics=root / "metrics/generate.json",
        eval_metrics=root / "metrics/eval.json",
        per_entry=root / "metrics/eval_per_entry.csv",
        eval_scores=root / "metrics/eval_scores.csv",
        eval_plots=root / "plots/eval",
        judge_metrics=root / "metrics/judge.json",
        judge_per_entry=root / "metrics/judge_per_entry.csv",
        judge_scores=root / "metrics/judge_scores.csv",
        checkpoint_seen=[],
    )
    pins = {name: _sha256(bpe_dir / name) for name in (ENCODER_JSON, VOCAB_BPE)}
    save_checkpoint = training.Trainer.save_checkpoint

    def spy(trainer):
        save_checkpoint(trainer)
        p.checkpoint_seen.append((trainer.checkpoint_dir / CHECKPOINT_NAME).is_file())

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fetch_gpt2_stage, "BPE_SHA256", pins)
        mp.setattr(training.Trainer, "save_checkpoint", spy)
        pipeline.download(DownloadParams(url=str(source), sha256=_sha256(source)), p.raw)
        p.prepare_report = pipeline.prepare(PrepareParams(), p.raw, p.prepared, p.prepare_metrics)
        pipeline.fetch_gpt2(
            FetchParams(
                source="random",
                bpe_source=str(bpe_dir),
                random=RandomModelParams(n_layer=1, n_head=2, n_embd=16, context_length=256),
            ),
            p.encoding,
            p.base,
        )
        p.tokenize_report = pipeline.tokenize(
            TokenizeParams(), p.prepared, p.encoding, p.tokenized, p.tokenize_metrics
        )
        p.finetune_params = FinetuneParams(
            max_steps=3,
            batch_size=4,
            eval_every=1,
            eval_batches=2,
            checkpoint_every=1,
            device="cpu",
        )
        p.train_report = pipeline.finetune(
            p.finetune_params,
            p.tokenized,
            p.base,
            p.encoding,
            p.model,
            p.checkpoints,
            p.train_metrics,
            p.train_log,
            p.loss_plot,
            p.root / "dvclive",
        )
        p.generate_report = pipeline.generate_responses(
            GenerateParams(max_new_tokens=4, batch_size=3, device="cpu"),
            p.model,
            p.prepared / "test.json",
            p.responses,
            p.generate_metrics,
        )
        p.eval_report = pipeline.evaluate(
            EvaluateParams(batch_size=3, device="cpu"),
            p.responses,
            p.model,
            p.tokenized,
            p.eval_metrics,
            p.per_entry,
            p.eval_plots,
            p.eval_scores,
        )
        p.judge_report = judge_stage.judge(
            JudgeParams(), p.responses, p.judge_metrics, p.judge_per_entry, p.judge_scores
        )
        p.dpo_report = pipeline.dpo(  # off by default: its marker outputs only
            DpoParams(), PrepareParams(), p.model,
            *(root / name for name in (
                "data/dpo/model", "data/dpo/prepared", "data/dpo/reference_logprobs.safetensors",
                "metrics/dpo.json", "metrics/dpo_log.tsv", "plots/dpo.png", "dvclive_dpo",
            )),
        )  # fmt: skip
    return p


# -------------------------------------------------------------------- stages
def test_download_copies_the_source(run):
    assert run.raw.read_bytes() == run.source.read_bytes()


def test_download_rejects_a_wrong_pin(tmp_path, run):
    out = tmp_path / "raw.json"
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        pipeline.download(DownloadParams(url=str(run.source), sha256="0" * 64), out)
    assert not out.exists()


def test_prepare_splits_in_file_order_and_reports(run):
    raw = [_entry(item) for item in _raw_entries()]
    splits = {name: load_entries(run.prepared / f"{name}.json") for name in pipeline.SPLITS}
    assert splits["train"] == raw[:N_TRAIN]
    assert splits["test"] == raw[N_TRAIN : N_TRAIN + N_TEST]
    assert splits["val"] == raw[N_TRAIN + N_TEST :]
    metrics = json.loads(run.prepare_metrics.read_text(encoding="utf-8"))
    assert metrics == run.prepare_report
    assert metrics == {
        "entries": N_ENTRIES,
        "train_entries": N_TRAIN,
        "val_entries": N_VAL,
        "test_entries": N_TEST,
        "duplicate_pairs": 0,
        "test_prompts_seen_in_train": 0,
        "val_prompts_seen_in_train": 0,
        "warnings": 0,
        "warnings_blank_input": 0,
        "warnings_duplicate_key": 0,
    }


def test_prepare_counts_duplicates_and_leaks(tmp_path):
    raw = _raw_entries()
    raw[N_TRAIN] = dict(raw[0])  # the first test entry repeats a training entry
    raw[N_TRAIN + N_TEST] = {**raw[2], "output": "another answer"}  # a val prompt leaks
    source = tmp_path / "raw.json"
    source.write_text(json.dumps(raw), encoding="utf-8")
    report = pipeline.prepare(PrepareParams(), source, tmp_path / "out", tmp_path / "m.json")
    assert report["duplicate_pairs"] == 1
    assert report["test_prompts_seen_in_train"] == 1
    assert report["val_prompts_seen_in_train"] == 1


def test_prepare_on_bad_data_raises_and_writes_nothing(tmp_path):
    source = tmp_path / "raw.json"
    source.write_text(json.dumps([{"instruction": "x", "output": ""}]), encoding="utf-8")
    out_dir, metrics = tmp_path / "prepared", tmp_path / "metrics/prepare.json"
    with pytest.raises(DataError, match="entry 0") as info:
        pipeline.prepare(PrepareParams(), source, out_dir, metrics)
    assert str(source) in str(info.value)
    assert not out_dir.exists()
    assert not metrics.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.json"]  # no temp dirs left


def test_fetch_gpt2_random_model(run, bpe_dir, tokenizer):
    for name in (ENCODER_JSON, VOCAB_BPE):
        assert (run.encoding / name).read_bytes() == (bpe_dir / name).read_bytes()
    config = json.loads((run.base / "config.json").read_text(encoding="utf-8"))
    assert config["gpt2_instruct"] == {"random_init": True}
    assert config["vocab_size"] == tokenizer.vocab_size == VOCAB_SIZE
    assert (config["n_layer"], config["n_head"], config["n_embd"]) == (1, 2, 16)
    assert config["n_positions"] == 256
    assert (run.base / "model.safetensors").is_file()


def test_fetch_gpt2_refuses_bpe_files_that_are_not_gpt2s(tmp_path, bpe_dir):
    """Without the test's pins, the real sha256 pins reject the tiny files."""
    encoding_out, model_out = tmp_path / "encoding", tmp_path / "base"
    params = FetchParams(source="random", bpe_source=str(bpe_dir))
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        pipeline.fetch_gpt2(params, encoding_out, model_out)
    assert not encoding_out.exists()
    assert not model_out.exists()


def test_tokenize_prompt_lengths_and_ids(run, tokenizer):
    meta = json.loads((run.tokenized / "meta.json").read_text(encoding="utf-8"))
    assert meta["prompt_style"] == "alpaca"
    assert (meta["eot_id"], meta["vocab_size"]) == (EOT, VOCAB_SIZE)
    report = json.loads(run.tokenize_metrics.read_text(encoding="utf-8"))
    assert report == run.tokenize_report
    for name in pipeline.SPLITS:
        entries = load_entries(run.prepared / f"{name}.json")
        split = TokenizedSplit.load(run.tokenized / f"{name}.safetensors")
        assert len(split) == len(entries)
        lengths = [len(split[i]) + 1 for i in range(len(split))]  # + EOS
        assert report[f"{name}_tokens"] == sum(lengths)
        assert report[f"{name}_max_length"] == max(lengths)
        for i, entry in enumerate(entries):
            ids, prompt_length = split[i], int(split.prompt_lengths[i])
            prompt = format_prompt(entry, "alpaca")
            assert EOT not in ids
            assert tokenizer.decode(ids) == prompt + entry.output
            assert ids == tokenizer.encode(prompt + entry.output)
            if name == "train" and i == NEWLINE_ENTRY:
                # ":\n" + "\n\n..." encodes ":", "\n\n", "\n": the prompt's last "\n" is shared
                assert prompt_length == len(tokenizer.encode(prompt)) - 1
                assert tokenizer.decode(ids[:prompt_length]) == prompt.removesuffix("\n")
            else:
                assert prompt_length == len(tokenizer.encode(prompt))
                assert tokenizer.decode(ids[:prompt_length]) == prompt


def test_tokenize_keeps_endoftext_text_as_text(run, tokenizer):
    train = TokenizedSplit.load(run.tokenized / "train.safetensors")
    ids = train[EOT_TEXT_ENTRY]
    assert EOT not in ids
    assert tokenizer.decode(ids).endswith(f"Stop{ENDOFTEXT}here")


def test_tokenize_is_deterministic(run, tmp_path):
    out, metrics = tmp_path / "tokenized", tmp_path / "tokenize.json"
    pipeline.tokenize(TokenizeParams(), run.prepared, run.encoding, out, metrics)
    names = sorted(p.name for p in run.tokenized.iterdir())
    assert names == ["meta.json", "test.safetensors", "train.safetensors", "val.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        assert (out / name).read_bytes() == (run.tokenized / name).read_bytes(), name
    assert metrics.read_bytes() == run.tokenize_metrics.read_bytes()


def test_tokenize_reports_entries_longer_than_the_context(run, tmp_path, capsys):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    long_answer = "word " * 1100  # about 1,100 tokens with the tiny BPE's byte tokens
    for name in pipeline.SPLITS:
        entries = load_entries(run.prepared / f"{name}.json")
        if name == "train":
            entries[1] = Entry(entries[1].instruction, entries[1].input, long_answer)
        write_entries(prepared / f"{name}.json", entries)
    report = pipeline.tokenize(
        TokenizeParams(), prepared, run.encoding, tmp_path / "tok", tmp_path / "m.json"
    )
    assert report["train_over_context"] == 1 and report["test_over_context"] == 0
    assert report["train_max_length"] > pipeline.GPT2_CONTEXT
    err = capsys.readouterr().err
    assert "train.json: 1 entries longer than GPT-2's 1024-token context" in err
    assert "(entries [1])" in err


def test_a_50_mb_entry_is_validated_and_tokenized(run, tmp_path):
    huge = "All work and no play. " * (50_000_000 // 22)
    entries = [Entry("Repeat the phrase.", "", huge), *load_entries(run.prepared / "test.json")]
    path = tmp_path / "big.json"
    write_entries(path, entries)
    assert path.stat().st_size > 50_000_000
    loaded = load_entries(path)
    assert loaded[0].output == huge
    tokenizer = load_tokenizer(run.encoding)
    examples, prompt_lengths = pipeline.tokenize_entries(loaded[:1], tokenizer, "alpaca")
    assert len(examples[0]) > 1_000_000
    assert prompt_lengths[0] == len(tokenizer.encode(format_prompt(loaded[0])))


def test_sigkill_during_tokenize_then_rerun_gives_the_same_outputs(run, tmp_path):
    """Killed mid-stage, nothing is left at the output path; a rerun matches a clean run."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from pathlib import Path
        from gpt2_instruct import pipeline, batching
        from gpt2_instruct.params import TokenizeParams
        original = batching.TokenizedSplit.save
        def save_then_die(self, path):
            original(self, path)
            if Path(path).name == "val.safetensors":
                os.kill(os.getpid(), signal.SIGKILL)
        if sys.argv[1] == "die":
            batching.TokenizedSplit.save = save_then_die
        prepared, encoding = Path({str(run.prepared)!r}), Path({str(run.encoding)!r})
        pipeline.tokenize(TokenizeParams(), prepared, encoding, Path(sys.argv[2]),
                          Path(sys.argv[3]))
        """
    )
    out, metrics = tmp_path / "tokenized", tmp_path / "tokenize.json"
    killed = subprocess.run(
        [sys.executable, "-c", script, "die", str(out), str(metrics)], timeout=120, check=False
    )
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists() and not metrics.exists()  # only a hidden temp dir may remain
    rerun = subprocess.run(
        [sys.executable, "-c", script, "ok", str(out), str(metrics)], timeout=120, check=False
    )
    assert rerun.returncode == 0
    for name in sorted(p.name for p in run.tokenized.iterdir()):
        assert (out / name).read_bytes() == (run.tokenized / name).read_bytes(), name


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from gpt2_instruct import evaluation, pipeline
from gpt2_instruct.params import EvaluateParams, GenerateParams
from gpt2_instruct.stages import generate as generate_stage
stage, mode, root, out = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
def die_after(module, name, calls):
    original, seen = getattr(module, name), []
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append(1)
        if len(seen) == calls:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(module, name, wrapper)
if stage == "generate":
    if mode == "die":
        die_after(generate_stage, "generate", 2)  # after the second batch of answers
    pipeline.generate_responses(GenerateParams(max_new_tokens=4, batch_size=3, device="cpu"),
                                root / "data/model", root / "data/prepared/test.json",
                                out / "test.json", out / "generate.json")
else:
    if mode == "die":
        die_after(evaluation, "write_per_entry_csv", 1)  # the table written, metrics not yet
    pipeline.evaluate(EvaluateParams(batch_size=3, device="cpu"), root / "data/responses/test.json",
                      root / "data/model", root / "data/tokenized", out / "eval.json",
                      out / "per_entry.csv", out / "plots")
"""


@pytest.mark.parametrize("stage", ["generate", "evaluate"])
def test_sigkill_during_generate_or_evaluate_then_rerun(run, tmp_path, stage):
    """A killed stage leaves no metrics/answers file behind; the rerun equals a clean run."""

    def launch(mode: str, out: Path) -> int:
        command = [sys.executable, "-c", KILL_SCRIPT, stage, mode, str(run.root), str(out)]
        return subprocess.run(command, timeout=180, check=False).returncode

    assert launch("die", tmp_path / "killed") == -signal.SIGKILL
    final = tmp_path / "killed" / ("test.json" if stage == "generate" else "eval.json")
    assert not final.exists()
    assert launch("ok", tmp_path / "killed") == 0
    assert launch("ok", tmp_path / "clean") == 0
    names = ["test.json"] if stage == "generate" else ["eval.json", "per_entry.csv"]
    for name in names:
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    if stage == "generate":
        assert (tmp_path / "clean/test.json").read_bytes() == run.responses.read_bytes()


def test_tokenize_phi3_differs(run, tmp_path, tokenizer):
    out = tmp_path / "tokenized"
    pipeline.tokenize(
        TokenizeParams(prompt_style="phi3"), run.prepared, run.encoding, out, tmp_path / "m.json"
    )
    entry = load_entries(run.prepared / "test.json")[0]
    split = TokenizedSplit.load(out / "test.safetensors")
    assert tokenizer.decode(split[0]) == format_prompt(entry, "phi3") + entry.output
    assert json.loads((out / "meta.json").read_text(encoding="utf-8"))["prompt_style"] == "phi3"


def test_finetune_saves_a_loadable_model(run, bpe_dir):
    for name in ("model.safetensors", "config.json", ENCODER_JSON, VOCAB_BPE):
        assert (run.model / name).is_file(), name
    for name in (ENCODER_JSON, VOCAB_BPE):
        assert (run.model / name).read_bytes() == (bpe_dir / name).read_bytes()
    config = json.loads((run.model / "config.json").read_text(encoding="utf-8"))
    extra = config["gpt2_instruct"]
    assert extra["prompt_style"] == "alpaca"
    assert extra["finetune"]["max_steps"] == 3
    assert extra["finetune"]["max_length"] == 256  # capped at the model's context length
    assert extra["base_model"] == str(run.base)
    model, tok, style = load_instruct_model(run.model)
    assert style == "alpaca"
    assert tok.vocab_size == model.config.vocab_size == VOCAB_SIZE


def test_finetune_changed_the_weights(run):
    """The default layout is the reference's: the export gains a separate, trained head
    that started as a copy of the embedding and moved away from it."""
    base = load_file(run.base / "model.safetensors")
    tuned = load_file(run.model / "model.safetensors")
    assert "lm_head.weight" not in base
    assert tuned.keys() == base.keys() | {"lm_head.weight"}
    assert all(not torch.equal(base[k], tuned[k]) for k in base if k.endswith("wte.weight"))
    assert not torch.equal(tuned["lm_head.weight"], tuned["transformer.wte.weight"])
    config = json.loads((run.model / "config.json").read_text(encoding="utf-8"))
    assert config["tie_word_embeddings"] is False


def test_finetune_metrics_and_log(run):
    metrics = json.loads(run.train_metrics.read_text(encoding="utf-8"))
    assert metrics == run.train_report
    assert metrics["steps"] == 3
    assert metrics["epochs"] == round(3 / (N_TRAIN // 4), 4)
    for key in ("train_loss", "val_loss"):
        assert math.isfinite(metrics[key]), key
        assert 0 < metrics[key] < 2 * math.log(VOCAB_SIZE), key  # near ln(V) for a random model
    assert metrics["tokens_seen"] > metrics["target_tokens"] > 0
    lines = run.train_log.read_text(encoding="utf-8").splitlines()
    assert lines[0].split("\t") == list(pipeline.LOG_FIELDS)
    rows = pipeline.read_tsv(run.train_log)
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for row in rows:
        assert math.isfinite(float(row["train_loss"]))
        assert math.isfinite(float(row["val_loss"]))
    assert run.loss_plot.read_bytes().startswith(PNG_MAGIC)


def test_finetune_logs_live_to_dvclive(run):
    summary = json.loads((run.root / "dvclive/metrics.json").read_text(encoding="utf-8"))
    rows = pipeline.read_tsv(run.train_log)
    assert summary["val"]["loss"] == pytest.approx(float(rows[-1]["val_loss"]))
    assert summary["tokens_seen"] == int(rows[-1]["tokens_seen"])
    live_train = pipeline.read_tsv(run.root / "dvclive/plots/metrics/train/loss.tsv")
    assert [int(r["step"]) for r in live_train] == [1, 2, 3]
    assert not (run.root / "dvclive/dvc.yaml").exists()  # dvcyaml=False: plots are ours


def test_finetune_writes_the_dvclive_series_dvc_yaml_plots(run):
    plotted = [p for p in dvc_plot_files() if p.startswith("dvclive/")]
    assert plotted
    for path in plotted:
        rows = pipeline.read_tsv(run.root / path)
        metric = Path(path).stem
        assert [int(r["step"]) for r in rows] == [1, 2, 3], path
        assert all(math.isfinite(float(r[metric])) and float(r[metric]) > 0 for r in rows), path


def test_finetune_removes_its_checkpoint_after_success(run):
    assert run.checkpoint_seen == [True, True]  # written after every step but the last...
    assert run.checkpoints.is_dir()
    assert list(run.checkpoints.iterdir()) == []  # ...and gone once the model is saved


def test_generate_answers_every_test_entry_in_order(run):
    test_entries = load_entries(run.prepared / "test.json")
    results = json.loads(run.responses.read_text(encoding="utf-8"))
    assert len(results) == len(test_entries) == N_TEST
    for result, entry in zip(results, test_entries, strict=True):
        assert set(result) == {"instruction", "input", "output", "model_response"}
        assert all(isinstance(value, str) for value in result.values())
        assert (result["instruction"], result["input"], result["output"]) == (
            entry.instruction,
            entry.input,
            entry.output,
        )


@pytest.mark.parametrize("header", [False, True])
def test_generate_prompts_limit_and_batches(run, tmp_path, tokenizer, monkeypatch, header):
    """What the model is asked: the generation prompt, shortest first, ``batch_size`` at a time."""
    calls = []
    real_generate = generate_stage.generate

    def spy(model, prompts, **kwargs):
        calls.append([tokenizer.decode(p) for p in prompts])
        assert kwargs["eos_id"] == EOT
        assert kwargs["sampling"].max_new_tokens == 2
        return real_generate(model, prompts, **kwargs)

    monkeypatch.setattr(generate_stage, "generate", spy)
    out = tmp_path / "responses.json"
    params = GenerateParams(
        max_new_tokens=2, batch_size=2, limit=3, response_header_in_prompt=header, device="cpu"
    )
    pipeline.generate_responses(
        params, run.model, run.prepared / "test.json", out, tmp_path / "generate.json"
    )
    test_entries = load_entries(run.prepared / "test.json")[:3]
    expected = [pipeline.generation_prompt(e, "alpaca", header) for e in test_entries]
    assert [len(batch) for batch in calls] == [2, 1]
    asked = [prompt for batch in calls for prompt in batch]
    assert sorted(asked) == sorted(expected)
    assert asked == sorted(expected, key=lambda t: len(tokenizer.encode(t)))
    assert asked != expected  # the fixture's test prompts are not in length order
    results = json.loads(out.read_text(encoding="utf-8"))
    assert [r["instruction"] for r in results] == [e.instruction for e in test_entries]


def test_generate_metrics_count_the_answers(run):
    metrics = json.loads(run.generate_metrics.read_text(encoding="utf-8"))
    assert metrics == run.generate_report
    assert metrics["answers"] == N_TEST
    assert metrics["stopped_at_eos"] + metrics["cut_at_max_new_tokens"] == N_TEST
    assert metrics["new_tokens"] <= 4 * N_TEST
    assert metrics["mean_answer_tokens"] == pytest.approx(metrics["new_tokens"] / N_TEST, abs=0.01)


def test_generate_metrics_tell_stopped_answers_from_cut_ones(run, tmp_path, monkeypatch):
    """An answer shorter than max_new_tokens ended with EOS (generate drops it)."""
    given: list[int] = []

    def answers(model, prompts, **kwargs):  # 4, 1, 0 tokens for a call's 1st, 2nd, 3rd prompt
        lengths = [(4, 1, 0)[i % 3] for i in range(len(prompts))]
        given.extend(lengths)
        return [[EOT - 1] * n for n in lengths]

    monkeypatch.setattr(generate_stage, "generate", answers)
    params = GenerateParams(max_new_tokens=4, batch_size=3, device="cpu")
    report = pipeline.generate_responses(
        params, run.model, run.prepared / "test.json", tmp_path / "r.json", tmp_path / "g.json"
    )
    assert given == [4, 1, 0, 4]  # two batches: 3 prompts, then 1
    assert report["answers"] == N_TEST
    assert report["cut_at_max_new_tokens"] == 2
    assert report["stopped_at_eos"] == 2
    assert report["new_tokens"] == 9
    assert report["mean_answer_tokens"] == 2.25
    assert json.loads((tmp_path / "g.json").read_text(encoding="utf-8")) == report


def test_evaluate_metrics_and_outputs(run):
    metrics = json.loads(run.eval_metrics.read_text(encoding="utf-8"))
    assert metrics == run.eval_report
    assert metrics["count"] == N_TEST
    assert 0.0 <= metrics["rougeL"] <= 1.0
    assert math.isfinite(metrics["mean_response_loss"])
    assert metrics["response_perplexity"] == pytest.approx(math.exp(metrics["mean_response_loss"]))
    with run.per_entry.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    results = json.loads(run.responses.read_text(encoding="utf-8"))
    assert [row["instruction"] for row in rows] == [r["instruction"] for r in results]
    assert [row["model_response"] for row in rows] == [r["model_response"] for r in results]
    assert sorted(p.name for p in run.eval_plots.iterdir()) == ["rougeL_histogram.png"]
    assert (run.eval_plots / "rougeL_histogram.png").read_bytes().startswith(PNG_MAGIC)
    assert "judge_count" not in metrics  # the judge is a stage of its own


def test_evaluate_scores_table_is_the_per_entry_numbers_without_text(run):
    """What dvc.yaml plots: the same numbers as the readable table, and no text at all."""
    with run.per_entry.open(encoding="utf-8", newline="") as handle:
        table = list(csv.DictReader(handle))
    with run.eval_scores.open(encoding="utf-8", newline="") as handle:
        scores = list(csv.DictReader(handle))
    assert list(scores[0]) == [
        "index",
        "exact_match",
        "rouge1",
        "rouge2",
        "rougeL",
        "chrf",
        "response_loss",
        "response_chars",
    ]
    assert len(scores) == len(table) == N_TEST
    for row, full in zip(scores, table, strict=True):
        assert row["exact_match"] == str(int(full["exact_match"] == "True"))
        for key in ("index", "rougeL", "chrf", "response_loss", "response_chars"):
            assert float(row[key]) == float(full[key]), key
    assert all(math.isfinite(float(value)) for row in scores for value in row.values())


def test_every_dvc_plot_names_columns_the_stages_write(run):
    """A renamed column would leave a dvc.yaml plot empty (or failing) without this."""
    items = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["plots"]
    checked = 0
    for item in items:
        if not isinstance(item, dict):
            continue
        [(name, spec)] = item.items()
        sources = spec["y"] if isinstance(spec.get("y"), dict) else {name: spec.get("y")}
        for source, fields in sources.items():
            if not source.endswith((".csv", ".tsv")):
                continue
            delimiter = "\t" if source.endswith(".tsv") else ","
            with (run.root / source).open(encoding="utf-8", newline="") as handle:
                header = next(csv.reader(handle, delimiter=delimiter))
            wanted = [fields] if isinstance(fields, str) else list(fields or [])
            for field in [spec.get("x"), *wanted]:
                assert field is None or field in header, (name, source, field, header)
            checked += 1
    assert checked >= 5


def test_judge_with_backend_none_says_not_run(run):
    assert run.judge_report == {"judge_status": "not run", "judge_backend": "none"}
    assert json.loads(run.judge_metrics.read_text(encoding="utf-8")) == run.judge_report
    assert run.judge_scores.read_text(encoding="utf-8").splitlines() == ["index,score,reason"]


def test_evaluate_response_loss_is_the_models_loss_on_the_answers(run):
    model, _, _ = load_instruct_model(run.model)
    test = TokenizedSplit.load(run.tokenized / "test.safetensors")
    by_hand = [
        _response_loss_by_hand(model, test[i], int(test.prompt_lengths[i]))
        for i in range(len(test))
    ]
    metrics = json.loads(run.eval_metrics.read_text(encoding="utf-8"))
    assert metrics["mean_response_loss"] == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-5)
    with run.per_entry.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["response_loss"]) for row in rows] == pytest.approx(by_hand, rel=1e-5)


def test_evaluate_rejects_more_responses_than_test_entries(run, tmp_path):
    results = json.loads(run.responses.read_text(encoding="utf-8"))
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps(results * 2), encoding="utf-8")
    with pytest.raises(ValueError, match="test split has 4"):
        pipeline.evaluate(
            EvaluateParams(device="cpu"),
            responses,
            run.model,
            run.tokenized,
            tmp_path / "eval.json",
            tmp_path / "per_entry.csv",
            tmp_path / "plots",
        )
    assert not (tmp_path / "eval.json").exists()


# --------------------------------------------------------------- the helpers
@pytest.fixture(scope="module")
def tiny_model() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(
        GPTConfig(vocab_size=VOCAB_SIZE, context_length=64, n_embd=16, n_layer=1, n_head=2)
    )


def test_response_losses_equal_a_direct_computation(tiny_model):
    generator = torch.Generator().manual_seed(1)
    examples = [torch.randint(0, EOT, (n,), generator=generator).tolist() for n in (9, 5, 14, 7)]
    prompt_lengths = [4, 1, 10, 6]
    split = TokenizedSplit.from_lists(examples, prompt_lengths)
    losses = pipeline.response_losses(tiny_model, split, pad_id=EOT, batch_size=3, limit=4)
    by_hand = [
        _response_loss_by_hand(tiny_model, ids, p)
        for ids, p in zip(examples, prompt_lengths, strict=True)
    ]
    assert losses == pytest.approx(by_hand, rel=1e-5, abs=1e-6)
    # limit: only the first entries are scored
    assert pipeline.response_losses(
        tiny_model, split, pad_id=EOT, batch_size=3, limit=2
    ) == pytest.approx(by_hand[:2], rel=1e-5)


def test_response_losses_with_an_empty_prompt_count_every_token(tiny_model):
    ids = [5, 6, 7, 8]
    split = TokenizedSplit.from_lists([ids], [0])
    [loss] = pipeline.response_losses(tiny_model, split, pad_id=EOT, batch_size=1, limit=1)
    with torch.no_grad():
        logits = tiny_model(torch.tensor([ids]))[0]
    expected = F.cross_entropy(logits, torch.tensor([*ids[1:], EOT])).item()
    assert loss == pytest.approx(expected, rel=1e-5)


def _boundary_entries() -> list[Entry]:
    return [
        Entry("Say it twice.", "", "\n\nthe end"),  # "\n" + "\n\n" -> "\n\n", "\n"
        Entry("Say it.", "with input", "the end"),  # no merge across the boundary
        Entry("Say it.", "", " the end"),  # a leading space stays its own pre-token
    ]


def _check_boundary(tokenizer, style: str, expected_overlap: list[int]) -> None:
    entries = _boundary_entries()
    examples, prompt_lengths = pipeline.tokenize_entries(entries, tokenizer, style)
    for entry, ids, length, overlap in zip(
        entries, examples, prompt_lengths, expected_overlap, strict=True
    ):
        prompt = format_prompt(entry, style)
        prompt_ids = tokenizer.encode(prompt)
        assert ids == tokenizer.encode(prompt + entry.output)
        assert tokenizer.decode(ids) == prompt + entry.output
        assert length == len(prompt_ids) - overlap
        assert ids[:length] == prompt_ids[:length]  # the longest common prefix...
        if overlap:
            assert ids[length] != prompt_ids[length]  # ...and no longer
        assert prompt.startswith(tokenizer.decode(ids[:length]))


def test_tokenize_entries_prompt_length_is_the_common_prefix(tokenizer):
    _check_boundary(tokenizer, "alpaca", [1, 0, 0])
    _check_boundary(tokenizer, "phi3", [1, 0, 0])


def test_tokenize_entries_prompt_length_with_gpt2s_bpe(shared_data):
    tokenizer = load_tokenizer(shared_data / "gpt2-encoding")
    _check_boundary(tokenizer, "alpaca", [1, 0, 0])


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
@pytest.mark.parametrize("header", [False, True])
@pytest.mark.parametrize("entry_input", ["", "some input"])
def test_generation_prompt(style, header, entry_input):
    entry = Entry("Do it.", entry_input, "Done.")
    prompt = pipeline.generation_prompt(entry, style, header)
    full = format_prompt(entry, style)
    if style == "alpaca" and not header:
        assert full == prompt + "\n\n### Response:\n"
        assert prompt.endswith(entry_input or "Do it.")
    else:
        assert prompt == full


# ---------------------------------------------------------------- real data
def test_download_and_prepare_the_real_data_set(shared_data, tmp_path):
    pin = load_params(REPO_ROOT / "params.yaml").download.sha256
    raw = tmp_path / "data/raw/instruction-data.json"
    pipeline.download(
        DownloadParams(url=str(shared_data / "instruction-data.json"), sha256=pin), raw
    )
    report = pipeline.prepare(
        PrepareParams(), raw, tmp_path / "data/prepared", tmp_path / "metrics/prepare.json"
    )
    assert report["entries"] == 1100
    assert (report["train_entries"], report["test_entries"], report["val_entries"]) == (
        935,
        110,
        55,
    )
    assert isinstance(report["test_prompts_seen_in_train"], int)
    assert isinstance(report["duplicate_pairs"], int)
    assert len(load_entries(tmp_path / "data/prepared/test.json")) == 110


class _FakeOllama(http.server.BaseHTTPRequestHandler):
    """Scores every answer 42, except one reply that is garbage."""

    calls = 0

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/api/chat" and body["stream"] is False
        type(self).calls += 1
        reply = "no idea" if type(self).calls == 2 else "42"
        data = json.dumps({"message": {"role": "assistant", "content": reply}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def _judge(run, tmp_path, url: str, **settings) -> dict:
    judge = JudgeParams(backend="ollama", url=url, timeout=5.0, retries=0, **settings)
    return judge_stage.judge(
        judge,
        run.responses,
        tmp_path / "judge.json",
        tmp_path / "judge_per_entry.csv",
        tmp_path / "judge_scores.csv",
    )


def test_judge_stage_with_a_judge_server(run, tmp_path):
    """One garbage reply of the 4: 75% scored passes at 0.75 and fails the default 0.9."""
    from gpt2_instruct.judge import JudgeError

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeOllama)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        _FakeOllama.calls = 0
        summary = _judge(run, tmp_path, url, min_scored_fraction=0.75)
        _FakeOllama.calls = 0
        with pytest.raises(JudgeError, match=r"scored 3 of 4 entries \(75.0%\)"):
            _judge(run, tmp_path / "strict", url)
    finally:
        server.shutdown()
    assert summary["judge_status"] == "partial" and summary["judge_entries"] == N_TEST
    assert summary["judge_count"] == N_TEST - 1 and summary["judge_unparseable"] == 1
    assert summary["judge_mean"] == 42
    rows = list(csv.DictReader((tmp_path / "judge_scores.csv").open(encoding="utf-8")))
    assert [r["score"] for r in rows] == ["42", "", "42", "42"]
    strict = json.loads((tmp_path / "strict/judge.json").read_text(encoding="utf-8"))
    assert strict["judge_status"] == "failed"  # written, to read, though the stage fails


def test_judge_stage_without_a_judge_server_fails(run, tmp_path):
    from gpt2_instruct.judge import JudgeError

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(JudgeError, match="could not reach") as info:  # exit 1: DVC won't cache
        _judge(run, tmp_path, url)
    assert url in str(info.value) and "scored none" in str(info.value)
    saved = json.loads((tmp_path / "judge.json").read_text(encoding="utf-8"))
    assert saved["judge_count"] == 0 and saved["judge_failed"] == {"unreachable": N_TEST}
    rows = list(csv.DictReader((tmp_path / "judge_per_entry.csv").open(encoding="utf-8")))
    assert all(row["error"].startswith("unreachable: ") for row in rows)
