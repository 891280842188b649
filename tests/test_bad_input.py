"""Bad input at the stage level (issue 22): the real stage scripts, in-process where possible.

Every case must end with exit code 1 and exactly one line ``error: ...`` on stderr (no
traceback), or, for Ctrl-C, exit code 130 and one line; and nothing may be left at the
stage's output paths. The scripts run through ``runpy`` (the same code DVC runs, without
paying for a new interpreter and torch); a few true subprocesses check the real process:
its exit code, and SIGINT while it imports torch and while it writes.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2_instruct import devices, stages
from gpt2_instruct.batching import TokenizedSplit
from gpt2_instruct.data import DataError

REPO_ROOT = Path(__file__).resolve().parents[1]
SRC = REPO_ROOT / "src" / "gpt2_instruct"
GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}
BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]\n"
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.fixture(autouse=True)
def _keep_malloc_defaults(monkeypatch):
    """run_stage tunes glibc's malloc for training; not for the test process."""
    monkeypatch.setattr(devices, "reuse_freed_memory", lambda: False)


def run_script(monkeypatch, name: str, args: list[str]) -> int:
    """Run ``stages/<name>.py`` as DVC would, in this process; its exit code."""
    script = REPO_ROOT / "stages" / f"{name}.py"
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def one_line(err: str, start: str = "error: ") -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(start), err
    return lines[0]


def leftovers(directory: Path, inputs: set[str]) -> list[str]:
    """Anything in ``directory`` (outputs, temporary files) beyond the given inputs."""
    return sorted(p.name for p in directory.iterdir() if p.name not in inputs)


def write_params(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def prepare_args(tmp_path: Path, raw: Path, params: Path) -> list[str]:
    return [
        *["--params", str(params), "--raw", str(raw)],
        *["--out", str(tmp_path / "prepared"), "--metrics", str(tmp_path / "prepare.json")],
    ]


# ------------------------------------------------------------------------------ prepare
RAW_CASES = {
    "deep-json": "[" * 100_000 + "]" * 100_000,
    "5000-digit-int": '[{"instruction": "a", "output": "b", "id": ' + "9" * 5000 + "}]",
    "nan": '[{"instruction": "a", "output": "b", "id": NaN}]',
    "duplicate-key": '[{"instruction": "a", "output": "b", "output": "c"}]',
    "capital-Input": '[{"instruction": "a", "Input": "ctx", "output": "b"}]',
    "control-only-instruction": '[{"instruction": "\\u0001\\u0002", "output": "b"}]',
    "zero-width-output": '[{"instruction": "a", "output": "\\u200b\\u200b"}]',
    "truncated": json.dumps([GOOD] * 3)[:-20],
    "not-utf8": b'[{"instruction": "caf\xe9", "output": "b"}]',
    "too-few-entries": json.dumps([GOOD] * 3),
    "lone-surrogate": '[{"instruction": "a", "output": "\\ud800"}]',
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_prepare_bad_data_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, case):
    raw = tmp_path / "raw.json"
    content = RAW_CASES[case]
    raw.write_bytes(content if isinstance(content, bytes) else content.encode())
    params = write_params(tmp_path)
    started = time.monotonic()
    assert run_script(monkeypatch, "prepare", prepare_args(tmp_path, raw, params)) == 1
    assert time.monotonic() - started < 5
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"error: {raw}: ")
    assert leftovers(tmp_path, {"raw.json", "params.yaml"}) == []


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_prepare_unreadable_input_is_one_line(tmp_path, monkeypatch, capsys, kind):
    raw = tmp_path / "raw.json"
    if kind == "directory":
        raw.mkdir()
    params = write_params(tmp_path)
    assert run_script(monkeypatch, "prepare", prepare_args(tmp_path, raw, params)) == 1
    assert one_line(capsys.readouterr().err).startswith(f"error: {raw}: cannot read file")
    assert leftovers(tmp_path, {"raw.json", "params.yaml"}) == []


def test_prepare_unwritable_output_is_one_line(tmp_path, monkeypatch, capsys):
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps([GOOD] * 20), encoding="utf-8")
    (tmp_path / "file").write_text("not a directory")
    args = [
        *["--params", str(write_params(tmp_path)), "--raw", str(raw)],
        *["--out", str(tmp_path / "file" / "prepared"), "--metrics", str(tmp_path / "m.json")],
    ]
    assert run_script(monkeypatch, "prepare", args) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"error: {tmp_path / 'file'}: ")  # the path, then the OS's reason


PARAMS_CASES = {
    "temperature": "generate:\n  temperature: -1\n",
    "top_p": "generate:\n  top_p: 0\n",
    "top_k": "generate:\n  top_k: 0\n",
    "max_new_tokens": "generate:\n  max_new_tokens: 5000\n",
    "device": "finetune:\n  device: tpu\n",
    "lr": "finetune:\n  lr: .inf\n",
    "batch_size": "finetune:\n  batch_size: 1e23\n",
    "n_embd": "fetch_gpt2:\n  source: random\n  random:\n    n_embd: 0\n",
    "seed": "fetch_gpt2:\n  random:\n    seed: 99999999999999999999999\n",
    "lora_rank": "fetch_gpt2:\n  source: random\nfinetune:\n  lora:\n    rank: 4096\n",
    "alias-bomb": BOMB,
    "deep-yaml": "finetune: " + "[" * 50_000 + "]" * 50_000 + "\n",
    "huge-int": "finetune:\n  epochs: " + "7" * 5000 + "\n",
}


@pytest.mark.parametrize("case", list(PARAMS_CASES))
def test_bad_params_fail_before_any_work(tmp_path, monkeypatch, capsys, case):
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps([GOOD] * 20), encoding="utf-8")
    params = write_params(tmp_path, PARAMS_CASES[case])
    started = time.monotonic()
    assert run_script(monkeypatch, "prepare", prepare_args(tmp_path, raw, params)) == 1
    assert time.monotonic() - started < 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"error: {params}: ") and len(line) < 1000
    assert leftovers(tmp_path, {"raw.json", "params.yaml"}) == []


def test_prepare_warnings_go_to_stderr_and_metrics(tmp_path, monkeypatch, capsys):
    items = [json.dumps(GOOD)] * 18 + [
        '{"instruction": "a", "output": "b", "output": "b"}',
        '{"instruction": "a", "input": "\\u200b", "output": "b"}',
    ]
    raw = tmp_path / "raw.json"
    raw.write_text("[" + ",".join(items) + "]", encoding="utf-8")
    params = write_params(tmp_path)
    assert run_script(monkeypatch, "prepare", prepare_args(tmp_path, raw, params)) == 0
    err = capsys.readouterr().err
    assert len(re.findall(r"^prepare: WARNING: ", err, flags=re.MULTILINE)) == 2
    assert "entry 18: field 'output' repeated" in err and "entry 19: field 'input'" in err
    metrics = json.loads((tmp_path / "prepare.json").read_text(encoding="utf-8"))
    assert metrics["entries"] == 20 and metrics["duplicate_pairs"] == 17  # existing keys kept
    assert (metrics["warnings"], metrics["warnings_duplicate_key"]) == (2, 1)
    assert metrics["warnings_blank_input"] == 1


# ----------------------------------------------------------------------------- evaluate
def evaluate_args(tmp_path: Path, responses: Path) -> list[str]:
    return [
        *["--params", str(write_params(tmp_path)), "--responses", str(responses)],
        *["--model", str(tmp_path / "model"), "--tokenized", str(tmp_path / "tokenized")],
        *["--metrics", str(tmp_path / "eval.json"), "--per-entry", str(tmp_path / "rows.csv")],
        *["--plots", str(tmp_path / "plots")],
    ]


RESPONSE = {**GOOD, "model_response": "hello"}
RESPONSES_CASES = {
    "truncated": (json.dumps([RESPONSE] * 2)[:-10], "invalid JSON at line 1"),
    "null-response": (
        json.dumps([RESPONSE, {**RESPONSE, "model_response": None}]),
        "entry 1: field 'model_response' must be a string, got null",
    ),
    "no-response": (
        json.dumps([{"instruction": "a", "output": "b"}]),
        "entry 0: missing required field 'model_response'",
    ),
    "more-than-the-test-split": (json.dumps([RESPONSE] * 3), "3 entries but the test split"),
    "deep": ("[" * 100_000, "nested more than"),
}


@pytest.mark.parametrize("case", list(RESPONSES_CASES))
def test_evaluate_bad_responses_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys, case):
    text, expected = RESPONSES_CASES[case]
    responses = tmp_path / "test.json"
    responses.write_text(text, encoding="utf-8")
    (tmp_path / "tokenized").mkdir()
    TokenizedSplit.from_lists([[1, 2, 3], [4, 5]], [1, 1]).save(
        tmp_path / "tokenized" / "test.safetensors"
    )
    assert run_script(monkeypatch, "evaluate", evaluate_args(tmp_path, responses)) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"error: {responses}: ") and expected in line
    assert leftovers(tmp_path, {"test.json", "tokenized", "params.yaml"}) == []


# ------------------------------------------------------------------------ the frame itself
def frame(tmp_path: Path, body) -> int:
    params = write_params(tmp_path)
    try:
        stages.run_stage("test", {"out": str(tmp_path / "out")}, body, ["--params", str(params)])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def raiser(error: BaseException):
    def body(params, args):
        raise error

    return body


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (KeyboardInterrupt(), "interrupted"),
        (KeyboardInterrupt("interrupted after step 7; checkpoint in x"), "interrupted after"),
    ],
)
def test_ctrl_c_in_a_stage_is_one_line_and_exit_130(tmp_path, capsys, error, expected):
    assert frame(tmp_path, raiser(error)) == 130
    assert one_line(capsys.readouterr().err, start="interrupted").startswith(expected)


def test_ctrl_c_while_prepare_writes_leaves_nothing(tmp_path, monkeypatch, capsys):
    import gpt2_instruct.stages.prepare as prepare_stage

    written = []
    real_write = prepare_stage.write_entries

    def write_then_interrupt(path, entries):
        real_write(path, entries)
        written.append(path)
        if len(written) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(prepare_stage, "write_entries", write_then_interrupt)
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps([GOOD] * 20), encoding="utf-8")
    args = prepare_args(tmp_path, raw, write_params(tmp_path))
    assert run_script(monkeypatch, "prepare", args) == 130
    assert one_line(capsys.readouterr().err, start="interrupted") == "interrupted"
    assert len(written) == 2
    assert leftovers(tmp_path, {"raw.json", "params.yaml"}) == []  # no half a split, no temp


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (PermissionError(13, "Permission denied", "data/x.json"), "data/x.json: Permission denied"),
        (FileNotFoundError("data/x: missing"), "data/x: missing"),
        (IsADirectoryError(21, "Is a directory", "data/raw"), "data/raw: Is a directory"),
        (DataError("a.json: entry 1:\nfield 'x'\r\nbad"), "a.json: entry 1: field 'x' bad"),
    ],
)
def test_expected_errors_are_one_line(tmp_path, capsys, error, expected):
    assert frame(tmp_path, raiser(error)) == 1
    assert one_line(capsys.readouterr().err) == f"error: {expected}"


def test_a_huge_message_is_cut(tmp_path, capsys):
    assert frame(tmp_path, raiser(DataError("x" * 100_000))) == 1
    line = one_line(capsys.readouterr().err)
    assert len(line) < 2100 and line.endswith("... (cut)")


@pytest.mark.parametrize("bug", [RuntimeError("bug"), TypeError("bug"), ValueError("bug")])
def test_true_bugs_keep_their_traceback(tmp_path, bug):
    with pytest.raises(type(bug)):
        frame(tmp_path, raiser(bug))


def test_every_error_class_raised_for_bad_input_is_expected():
    """Each public ``class XError`` of the package is one of the frame's expected errors."""
    defined = set()
    for path in SRC.rglob("*.py"):
        if path.name.startswith("serve"):  # the server answers its errors as HTTP 4xx replies
            continue
        text = path.read_text(encoding="utf-8")
        defined.update(re.findall(r"^class ([A-Z]\w*Error)\(", text, flags=re.MULTILINE))
    expected = {cls.__name__ for cls in stages.EXPECTED_ERRORS}
    assert defined - expected == set()
    assert all(not issubclass(cls, KeyboardInterrupt) for cls in stages.EXPECTED_ERRORS)


# ------------------------------------------------------------------- real processes (few)
def start_prepare(tmp_path: Path, entries: int) -> tuple[subprocess.Popen[str], Path]:
    raw = tmp_path / "raw.json"
    items = [{**GOOD, "instruction": f"Say hi, number {i}."} for i in range(entries)]
    raw.write_text(json.dumps(items), encoding="utf-8")
    args = prepare_args(tmp_path, raw, write_params(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "stages" / "prepare.py"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process, raw


def wait_for(condition, process: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_process_bad_data_exits_1_with_one_line(tmp_path):
    raw = tmp_path / "raw.json"
    raw.write_text('[{"instruction": "a", "Input": "x", "output": "b"}]', encoding="utf-8")
    args = prepare_args(tmp_path, raw, write_params(tmp_path))
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages" / "prepare.py"), *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "looks like a misspelt 'input'" in one_line(result.stderr)
    assert leftovers(tmp_path, {"raw.json", "params.yaml"}) == []


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_process_ctrl_c_while_importing_torch(tmp_path):
    process, _ = start_prepare(tmp_path, 20)
    maps = Path(f"/proc/{process.pid}/maps")
    wait_for(lambda: "libtorch" in maps.read_text(errors="replace"), process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert one_line(err, start="interrupted") == "interrupted"
    assert leftovers(tmp_path, {"raw.json", "params.yaml"}) == []


def test_process_ctrl_c_while_writing_leaves_nothing(tmp_path):
    process, _ = start_prepare(tmp_path, 60_000)
    wait_for(lambda: any(p.name.startswith(".prepared.") for p in tmp_path.iterdir()), process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert one_line(err, start="interrupted") == "interrupted"
    assert leftovers(tmp_path, {"raw.json", "params.yaml"}) == []
