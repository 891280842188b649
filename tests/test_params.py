"""params.yaml: the repository's file, strict validation, and its agreement with dvc.yaml."""

from __future__ import annotations

import ast
import dataclasses
import functools
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2_instruct import devices, stages
from gpt2_instruct.model_dir import load_instruct_model
from gpt2_instruct.params import (
    FetchParams,
    FinetuneParams,
    Params,
    ParamsError,
    RandomModelParams,
    TokenizeParams,
    load_params,
    load_section,
    to_dict,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS_YAML = REPO_ROOT / "params.yaml"
DVC_YAML = REPO_ROOT / "dvc.yaml"
SECTIONS = [f.name for f in dataclasses.fields(Params)]
PIPELINE_DIRS = ("data/", "metrics/", "plots/", "dvclive")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert str(path) in message
    return message


def _dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stages with ``${section.key}`` filled in from params.yaml, as DVC does."""
    params = yaml.safe_load(PARAMS_YAML.read_text(encoding="utf-8"))

    def value(match: re.Match) -> str:
        found: Any = params
        for key in match.group(1).split("."):
            found = found[key]
        return str(found)

    text = re.sub(r"\$\{([\w.]+)\}", value, DVC_YAML.read_text(encoding="utf-8"))
    return yaml.safe_load(text)["stages"]


def _stage_paths(spec: dict) -> set[str]:
    """The data/, metrics/ and plots/ paths a dvc.yaml stage depends on or writes."""
    paths = set()
    for key in ("deps", "outs", "metrics", "plots"):
        for item in spec.get(key, []):
            paths.update([item] if isinstance(item, str) else item)
    # DVCLive's files are declared one by one; the script is given their directory.
    paths = {"dvclive" if p.startswith("dvclive/") else p for p in paths}
    return {p for p in paths if p.startswith(PIPELINE_DIRS)}


def _script_default_paths(script: Path) -> set[str]:
    """The default paths in the ``run_stage(doc, {name: path, ...}, ...)`` call of a script."""
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_stage":
            return set(ast.literal_eval(node.args[1]).values())
    raise AssertionError(f"{script}: no run_stage call")


# ------------------------------------------------------------- the repo's file
def test_repo_params_equal_the_dataclass_defaults_section_by_section():
    params = load_params(PARAMS_YAML)
    defaults = Params()
    raw = yaml.safe_load(PARAMS_YAML.read_text(encoding="utf-8"))
    assert list(raw) == SECTIONS  # every section present, in pipeline order
    for name in SECTIONS:
        # the file pins the downloaded data set; the dataclass default cannot know its hash
        expected = to_dict(getattr(defaults, name))
        got = to_dict(getattr(params, name))
        if name == "download":
            assert len(got.pop("sha256")) == 64
            expected.pop("sha256")
        assert got == expected, name
        assert set(raw[name]) == set(to_dict(getattr(defaults, name))), name


def test_repo_finetune_section_is_the_reference_recipe():
    finetune = load_section("finetune", PARAMS_YAML)
    assert isinstance(finetune, FinetuneParams)
    assert (finetune.lr, finetune.weight_decay) == (5e-5, 0.1)
    assert (finetune.epochs, finetune.batch_size, finetune.seed) == (2, 8, 123)
    assert (finetune.eval_every, finetune.eval_batches) == (5, 5)
    assert isinstance(finetune.lr, float)


def test_empty_file_gives_the_defaults(tmp_path):
    assert load_params(_write(tmp_path, "")) == Params()


def test_missing_file_is_a_params_error(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


# ------------------------------------------------------------------ validation
def test_unknown_key_names_file_section_and_key(tmp_path):
    message = _error(tmp_path, "finetune:\n  lerning_rate: 0.001\n")
    assert "finetune" in message
    assert "lerning_rate" in message
    assert "'lr'" in message  # the valid keys are listed


def test_unknown_section(tmp_path):
    message = _error(tmp_path, "finetuning:\n  lr: 0.001\n")
    assert "finetuning" in message
    assert "'finetune'" in message


def test_string_for_int_rejected(tmp_path):
    message = _error(tmp_path, "finetune:\n  epochs: two\n")
    assert "finetune.epochs" in message
    assert "integer" in message


def test_params_are_read_as_yaml_1_2_so_dvc_written_floats_are_numbers(tmp_path):
    # `dvc exp run -S finetune.lr=5e-5` writes `lr: 5e-05`; PyYAML (YAML 1.1) reads text.
    assert yaml.safe_load("lr: 5e-05") == {"lr": "5e-05"}
    assert load_params(_write(tmp_path, "finetune:\n  lr: 5e-05\n")).finetune.lr == 5e-5
    assert load_params(_write(tmp_path, "finetune:\n  lr: 5.0e-5\n")).finetune.lr == 5e-5
    message = _error(tmp_path, "finetune:\n  lr: '5e-5'\n")  # quoted: really a string
    assert "finetune.lr" in message and "expected a number" in message


@pytest.mark.parametrize(
    "text",
    ["finetune:\n  epochs: true\n", "finetune:\n  lr: true\n", "generate:\n  limit: false\n"],
)
def test_bool_is_not_a_number(tmp_path, text):
    message = _error(tmp_path, text)
    assert "True" in message or "False" in message


def test_int_accepted_for_float(tmp_path):
    params = load_params(_write(tmp_path, "finetune:\n  lr: 1\n  weight_decay: 0\n"))
    assert params.finetune.lr == 1.0
    assert isinstance(params.finetune.lr, float)
    assert isinstance(params.finetune.weight_decay, float)


def test_float_not_accepted_for_int(tmp_path):
    assert "finetune.batch_size" in _error(tmp_path, "finetune:\n  batch_size: 8.0\n")


def test_literal_values_checked_and_valid_ones_listed(tmp_path):
    message = _error(tmp_path, "finetune:\n  precision: fp16\n")
    assert "finetune.precision" in message
    assert "'fp16'" in message
    assert "['fp32', 'tf32', 'bf16']" in message
    assert load_params(_write(tmp_path, "finetune:\n  precision: bf16\n")).finetune.precision == (
        "bf16"
    )


def test_literal_choices_are_the_modules_own_constants():
    """Each set of choices is written once: the Literal types and the tuples agree."""
    import typing

    from gpt2_instruct import data, lora, optim
    from gpt2_instruct.params import (
        JUDGE_BACKENDS,
        GenerateParams,
        JudgeParams,
        LoRAParams,
    )

    def choices(cls, name):
        return typing.get_args(typing.get_type_hints(cls)[name])

    assert choices(TokenizeParams, "prompt_style") == data.PROMPT_STYLES
    assert choices(GenerateParams, "response_extraction") == data.RESPONSE_EXTRACTIONS
    assert choices(FinetuneParams, "lr_schedule") == optim.SCHEDULES
    assert choices(JudgeParams, "backend") == JUDGE_BACKENDS == ("none", "ollama", "openai")
    assert set(LoRAParams().targets) < set(lora.LORA_TARGETS)
    message = _error_text(lambda: LoRAParams(targets=("ff_fc", "mlp")))
    assert f"valid: {list(lora.LORA_TARGETS)}" in message


def test_sampling_knobs_are_defined_once_for_the_stage_the_decoder_and_the_cli():
    from gpt2_instruct import cli, generation
    from gpt2_instruct.params import GenerateParams, SamplingParams

    assert generation.SamplingConfig is SamplingParams
    assert issubclass(GenerateParams, SamplingParams)  # the stage passes its params as they are
    sampling = {f.name for f in dataclasses.fields(SamplingParams)}
    assert sampling == {"max_new_tokens", "temperature", "top_k", "top_p", "seed"}
    assert sampling < {f.name for f in dataclasses.fields(GenerateParams)}
    assert GenerateParams() == cli.DEFAULTS
    for key, bad in (("max_new_tokens", 0), ("temperature", -1.0), ("top_k", 0), ("top_p", 0.0)):
        alone = _error_text(functools.partial(SamplingParams, **{key: bad}))
        assert alone.startswith(f"{key} must be"), alone
        assert _error_text(functools.partial(GenerateParams, **{key: bad})) == alone


def test_download_pin_is_checked_before_any_work(tmp_path):
    message = _error(tmp_path, "download:\n  sha256: not-a-hash\n")
    assert "download: sha256 must be 64 hex digits or null" in message
    pin = "AB" * 32  # upper case and blanks around it: normalised, as sha256sum prints it
    params = load_params(_write(tmp_path, f"download:\n  sha256: ' {pin} '\n"))
    assert params.download.sha256 == "ab" * 32


def _error_text(build) -> str:
    with pytest.raises(ValueError) as info:
        build()
    return str(info.value)


def test_string_field_rejects_a_number(tmp_path):
    assert "fetch_gpt2.model" in _error(tmp_path, "fetch_gpt2:\n  model: 2\n")


def test_nested_random_section_validated(tmp_path):
    message = _error(tmp_path, "fetch_gpt2:\n  random:\n    n_layr: 1\n")
    assert "fetch_gpt2.random" in message
    assert "n_layr" in message
    message = _error(tmp_path, "fetch_gpt2:\n  random:\n    n_head: two\n")
    assert "fetch_gpt2.random.n_head" in message
    assert "fetch_gpt2.random" in _error(tmp_path, "fetch_gpt2:\n  random: 3\n")
    params = load_params(_write(tmp_path, "fetch_gpt2:\n  random:\n    n_layer: 1\n"))
    assert params.fetch_gpt2.random == RandomModelParams(n_layer=1)
    assert params.fetch_gpt2.model == FetchParams().model  # other keys keep their defaults


def test_judge_section_validated(tmp_path):
    message = _error(tmp_path, "judge:\n  backend: claude\n")
    assert ": judge.backend: " in message
    assert "'ollama'" in message
    message = _error(tmp_path, "judge:\n  min_scored_fraction: 0\n")
    assert "judge: min_scored_fraction must be in (0, 1]" in message
    params = load_params(_write(tmp_path, "judge:\n  backend: ollama\n"))
    assert params.judge.backend == "ollama" and params.judge.min_scored_fraction == 0.9


def test_the_old_evaluate_judge_key_says_where_it_moved(tmp_path):
    message = _error(tmp_path, "evaluate:\n  judge:\n    backend: ollama\n")
    assert "evaluate: unknown key(s) ['judge'] (judge: moved to judge:" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("prepare:\n  train_fraction: 1.2\n", ["prepare", "train_fraction"]),
        ("prepare:\n  train_fraction: 0.5\n  test_fraction: 0.5\n", ["prepare", "< 1"]),
        (
            "fetch_gpt2:\n  random:\n    n_embd: 10\n    n_head: 4\n",
            ["fetch_gpt2.random", "divisible"],
        ),
        ("fetch_gpt2:\n  random:\n    context_length: 2048\n", ["context_length"]),
        ("fetch_gpt2:\n  model: gpt3\n", ["fetch_gpt2", "gpt3", "gpt2-medium"]),
        ("fetch_gpt2:\n  source: local\n", ["local_dir"]),
        ("finetune:\n  dropout: 1.0\n", ["finetune", "dropout"]),
        ("finetune:\n  max_steps: 0\n", ["finetune", "max_steps"]),
        ("generate:\n  batch_size: 0\n", ["generate", "batch_size"]),
        ("download:\n  timeout: 0\n", ["download", "timeout"]),
    ],
)
def test_range_checks(tmp_path, text, words):
    message = _error(tmp_path, text)
    for word in words:
        assert word in message


def test_null_accepted_for_optional_fields_only(tmp_path):
    text = (
        "download:\n  sha256: null\n"
        "finetune:\n  max_steps: null\n  threads: null\n"
        "generate:\n  top_k: null\n  top_p: null\n  limit: null\n"
        "fetch_gpt2:\n  local_dir: null\n"
    )
    params = load_params(_write(tmp_path, text))
    assert params.download.sha256 is None
    assert params.finetune.max_steps is None
    assert params.generate.top_p is None
    assert load_params(_write(tmp_path, "finetune:\n  max_steps: 7\n")).finetune.max_steps == 7
    assert "finetune.epochs" in _error(tmp_path, "finetune:\n  epochs: null\n")


def test_optional_field_checks_its_inner_type(tmp_path):
    assert "generate.top_k" in _error(tmp_path, "generate:\n  top_k: many\n")
    assert load_params(_write(tmp_path, "generate:\n  top_p: 1\n")).generate.top_p == 1.0


def test_not_a_mapping(tmp_path):
    assert "mapping" in _error(tmp_path, "- finetune\n")
    assert "mapping" in _error(tmp_path, "finetune: 3\n")


def test_unknown_keys_of_mixed_types_are_a_params_error(tmp_path):
    message = _error(tmp_path, "finetune:\n  on: 1\n  foo: 2\n")
    assert "foo" in message


def test_load_section_validates_the_whole_file(tmp_path):
    path = _write(tmp_path, "generate:\n  max_new_tokens: 10\nfinetune:\n  lr: -1.0\n")
    with pytest.raises(ParamsError, match="finetune"):
        load_section("generate", path)


# ------------------------------------------------------------------- dvc.yaml
def test_dvc_params_are_sections_of_params_yaml():
    raw = yaml.safe_load(PARAMS_YAML.read_text(encoding="utf-8"))
    stages = _dvc_stages()
    assert set(stages) == set(SECTIONS)  # one stage per section, same names
    for name, spec in stages.items():
        assert name in spec["params"], name  # its own section, whole
        for key in spec["params"]:
            assert isinstance(key, str), (name, key)
            section, _, field_name = key.partition(".")  # another stage's single key
            assert section in raw and section in SECTIONS, (name, key)
            assert not field_name or field_name in raw[section], (name, key)


def test_dvc_commands_and_dependencies_exist():
    for name, spec in _dvc_stages().items():
        program, script, *options = spec["cmd"].split()
        assert program == "python", name
        assert options in ([], ["--model", "data/model"]), name  # ${generate.model}
        assert (REPO_ROOT / script).is_file(), (name, script)
        assert script in spec["deps"], name  # editing the script reruns the stage
        for dep in spec["deps"]:
            if dep.startswith(("stages/", "src/")):
                assert (REPO_ROOT / dep).is_file(), (name, dep)


def test_stage_scripts_default_to_the_paths_in_dvc_yaml():
    for name, spec in _dvc_stages().items():
        script = REPO_ROOT / spec["cmd"].split()[1]
        assert _script_default_paths(script) == _stage_paths(spec), name


# Modules that cannot change what a stage writes: arguments and params, device and memory
# settings, atomic writes, the bounded JSON reader (json.loads' values or an error), the
# deadline on HTTP requests (it can end a request, never change a byte that is kept) with
# the redaction of URLs in messages, and the stages' frame (``gpt2_instruct.stages``).
PLUMBING = {"params", "io", "safe_json", "deadline", "progress", "stages"}
PACKAGE = REPO_ROOT / "src" / "gpt2_instruct"


def _package_imports(path: Path) -> set[str]:
    """gpt2_instruct modules a file imports anywhere (functions too), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gpt2_instruct"):
            sub = node.module.removeprefix("gpt2_instruct").lstrip(".")
            found.update([sub] if sub else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):  # import gpt2_instruct.x.y
            for alias in node.names:
                if alias.name.startswith("gpt2_instruct."):
                    found.add(alias.name.removeprefix("gpt2_instruct."))
    return found


def _module_path(module: str) -> Path:
    path = PACKAGE / f"{module.replace('.', '/')}.py"
    return path if path.is_file() else PACKAGE / module.replace(".", "/") / "__init__.py"


def _code_deciding_outputs(script: Path) -> set[str]:
    """Every non-plumbing module a stage script reaches through imports, as dvc.yaml paths."""
    seen: set[str] = set()
    todo = list(_package_imports(script))
    while todo:
        module = todo.pop()
        if module in seen or module in PLUMBING:
            continue
        seen.add(module)
        todo.extend(_package_imports(_module_path(module)))
    return {str(_module_path(m).relative_to(REPO_ROOT)) for m in seen}


def test_every_stage_depends_on_exactly_the_code_that_decides_its_outputs():
    for name, spec in _dvc_stages().items():
        script = REPO_ROOT / spec["cmd"].split()[1]
        expected = _code_deciding_outputs(script)
        assert f"src/gpt2_instruct/stages/{script.name}" in expected, name  # its own module
        listed = {dep for dep in spec["deps"] if dep.startswith("src/")}
        missing, stale = sorted(expected - listed), sorted(listed - expected)
        assert not missing and not stale, f"{name}: missing {missing}, not used {stale}"


def test_code_deciding_outputs_follows_imports_inside_functions(tmp_path):
    script = tmp_path / "lazy.py"
    script.write_text("def main():\n    from gpt2_instruct.judge import judge_entries\n")
    reached = _code_deciding_outputs(script)
    assert "src/gpt2_instruct/judge.py" in reached  # imported inside a function
    assert "src/gpt2_instruct/params.py" not in reached  # plumbing
    plain = tmp_path / "plain.py"
    plain.write_text("import gpt2_instruct.plots\n", encoding="utf-8")
    assert _code_deciding_outputs(plain) == {"src/gpt2_instruct/plots.py"}


def test_the_judge_and_evaluate_stages_share_no_judging_code():
    """A judge change reruns only the judge; an evaluate change never reruns the judge."""
    judge = _code_deciding_outputs(REPO_ROOT / "stages/judge.py")
    evaluate = _code_deciding_outputs(REPO_ROOT / "stages/evaluate.py")
    assert "src/gpt2_instruct/judge.py" in judge
    assert "src/gpt2_instruct/judge.py" not in evaluate
    for module in ("evaluation.py", "plots.py", "model.py", "generation.py"):
        assert f"src/gpt2_instruct/{module}" not in judge, module


def test_the_pipeline_module_only_gathers_the_stages_functions():
    """Its functions live in the stages' own modules; so it is no stage's dependency."""
    tree = ast.parse((PACKAGE / "pipeline.py").read_text(encoding="utf-8"))
    for node in tree.body:
        docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        all_names = isinstance(node, ast.Assign) and node.targets[0].id == "__all__"
        assert isinstance(node, ast.ImportFrom) or docstring or all_names, ast.dump(node)


def test_every_input_is_some_stage_output():
    stages = _dvc_stages()
    outputs = set()
    for spec in stages.values():
        for key in ("outs", "metrics"):
            for item in spec.get(key, []):
                outputs.update([item] if isinstance(item, str) else item)
    for name, spec in stages.items():
        for dep in spec["deps"]:
            if dep.startswith(PIPELINE_DIRS):
                assert any(dep == out or dep.startswith(out + "/") for out in outputs), (
                    name,
                    dep,
                )


def dvc_plot_files() -> set[str]:
    """Every file dvc.yaml's top-level ``plots`` draws (a plot's id or its ``y`` sources)."""
    files = set()
    for item in yaml.safe_load(DVC_YAML.read_text(encoding="utf-8"))["plots"]:
        if isinstance(item, str):
            files.add(item)
            continue
        [(name, spec)] = item.items()
        sources = spec.get("y") if spec else None
        files.update(sources if isinstance(sources, dict) else [name])
    return files


def test_every_plot_draws_a_file_some_stage_writes():
    outputs = set()
    for spec in _dvc_stages().values():
        for key in ("outs", "metrics", "plots"):
            for item in spec.get(key, []):
                outputs.update([item] if isinstance(item, str) else item)
    files = dvc_plot_files()
    assert "dvclive/plots/metrics/lr.tsv" in files
    for path in files:
        assert any(path == out or path.startswith(out + "/") for out in outputs), path


# ------------------------------------------------------------------ run_stage
def _run_stage(tmp_path: Path, params_text: str, capsys, body=None, device_section=None):
    path = _write(tmp_path, params_text)
    calls = []

    def record(params, args):
        calls.append((params, args))
        if body is not None:
            body()

    with pytest.raises(SystemExit) as info:
        stages.run_stage(
            "test", {"out": "data/x"}, record, ["--params", str(path)],
            device_section=device_section,
        )  # fmt: skip
        raise SystemExit(0)
    return info.value.code, capsys.readouterr(), calls


def test_run_stage_bad_params_exits_1_with_one_error_line(tmp_path, capsys):
    code, captured, calls = _run_stage(tmp_path, "finetune:\n  lerning_rate: 1.0\n", capsys)
    assert code == 1
    assert calls == []  # nothing ran
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert "lerning_rate" in lines[0]
    assert "Traceback" not in captured.err


def test_run_stage_passes_params_and_paths(tmp_path, capsys):
    code, _, calls = _run_stage(tmp_path, "finetune:\n  epochs: 3\n", capsys)
    assert code == 0
    [(params, args)] = calls
    assert params.finetune.epochs == 3
    assert args == {"out": Path("data/x")}


def test_run_stage_expected_error_in_body_exits_1(tmp_path, capsys):
    def fail():
        raise FileNotFoundError("data/x: missing")

    code, captured, _ = _run_stage(tmp_path, "", capsys, body=fail)
    assert code == 1
    assert captured.err == "error: data/x: missing\n"


def test_run_stage_reports_an_unusable_model_directory_in_one_line(tmp_path, capsys):
    (tmp_path / "model").mkdir()

    def load():
        load_instruct_model(tmp_path / "model")  # generate and evaluate start with this

    code, captured, _ = _run_stage(tmp_path, "", capsys, body=load)
    assert code == 1
    [line] = captured.err.splitlines()
    assert line.startswith(
        f"error: model directory {tmp_path / 'model'}: missing model.safetensors"
    )


def test_run_stage_invalid_yaml_is_one_error_line(tmp_path, capsys):
    code, captured, _ = _run_stage(tmp_path, "finetune: [\n", capsys)
    assert code == 1
    assert captured.err.startswith("error: ")
    assert len(captured.err.splitlines()) == 1


def test_section_with_every_key_commented_out_means_the_defaults(tmp_path):
    params = load_params(
        _write(tmp_path, "tokenize:\n  # prompt_style: phi3\nfinetune:\n  epochs: 3\n")
    )
    assert params.tokenize == TokenizeParams()
    assert params.finetune.epochs == 3


@pytest.mark.parametrize(
    ("strategy", "precision", "tunables", "reused"),
    [
        ("ddp", "fp32", None, True),
        ("fsdp", "fp32", None, False),
        ("ddp", "bf16", None, False),
        ("ddp", "bf16", "glibc.malloc.tcache_count=0", True),
        ("fsdp", "bf16", "glibc.malloc.tcache_count=0", False),
    ],
)
def test_run_stage_keeps_freed_memory_for_fp32_and_for_bf16_with_the_cache_off(
    tmp_path, capsys, monkeypatch, strategy, precision, tunables, reused
):
    applied, restarts = [], []
    monkeypatch.setattr(devices, "reuse_freed_memory", lambda: applied.append(True) or True)
    monkeypatch.setattr(devices, "relaunch_without_per_thread_cache", lambda *a: restarts.append(a))
    if tunables is None:
        monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    else:
        monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    text = (
        f"finetune:\n  device: cpu\n  precision: {precision}\n"
        f"  distributed:\n    strategy: {strategy}\n"
    )
    code, _, calls = _run_stage(tmp_path, text, capsys, device_section="finetune")
    assert code == 0 and len(calls) == 1
    assert applied == ([True] if reused else [])
    # bf16 without FSDP restarts first (the cache off), unless it already runs so
    assert len(restarts) == (precision == "bf16" and strategy != "fsdp")


# ------------------------------------------- hostile values: ranges, caps, limits (issue 22)
BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]\n"
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        # sampling
        ("generate:\n  temperature: -0.5\n", ["generate", "temperature"]),
        ("generate:\n  temperature: .inf\n", ["generate.temperature", "finite"]),
        ("generate:\n  top_p: 0\n", ["generate", "top_p"]),
        ("generate:\n  top_p: 1.5\n", ["generate", "top_p"]),
        ("generate:\n  top_p: .nan\n", ["generate.top_p", "finite"]),
        ("generate:\n  top_k: 0\n", ["generate", "top_k"]),
        ("generate:\n  top_k: -3\n", ["generate", "top_k"]),
        ("generate:\n  max_new_tokens: 1024\n", ["generate", "max_new_tokens", "1023"]),
        ("generate:\n  max_new_tokens: 100000\n", ["generate", "max_new_tokens"]),
        (
            "fetch_gpt2:\n  source: random\n  random:\n    context_length: 64\n"
            "generate:\n  max_new_tokens: 64\n",
            ["generate.max_new_tokens", "fetch_gpt2.random", "64"],
        ),
        # devices: names
        ("finetune:\n  device: tpu\n", ["finetune", "device", "'tpu'"]),
        ("generate:\n  device: CUDA\n", ["generate", "device"]),
        ("evaluate:\n  device: 'cuda:'\n", ["evaluate", "device"]),
        ("evaluate:\n  device: 'cuda:-1'\n", ["evaluate", "device"]),
        ("finetune:\n  device: ''\n", ["finetune", "device"]),
        # non-finite floats anywhere
        ("finetune:\n  lr: .inf\n", ["finetune.lr", "finite"]),
        ("finetune:\n  lr: .nan\n", ["finetune.lr", "finite"]),
        ("finetune:\n  weight_decay: .inf\n", ["finetune.weight_decay", "finite"]),
        ("finetune:\n  grad_clip: .inf\n", ["finetune.grad_clip", "finite"]),
        ("finetune:\n  min_lr_ratio: .nan\n", ["finetune.min_lr_ratio", "finite"]),
        ("finetune:\n  lora:\n    alpha: .inf\n", ["finetune.lora.alpha", "finite"]),
        ("finetune:\n  lr: 1e400\n", ["finetune.lr", "finite"]),
        ("prepare:\n  train_fraction: .nan\n", ["prepare.train_fraction", "finite"]),
        ("download:\n  timeout: .inf\n", ["download", "timeout"]),
        (
            "finetune:\n  distributed:\n    timeout_s: 1e300\n",
            ["finetune.distributed", "timeout_s"],
        ),
        # absurdly large integers
        ("finetune:\n  batch_size: 1e23\n", ["finetune.batch_size", "integer"]),
        ("finetune:\n  batch_size: 100000000000000000000000\n", ["finetune.batch_size", "range"]),
        ("finetune:\n  batch_size: 65537\n", ["finetune", "batch_size", "65536"]),
        ("finetune:\n  micro_batch_size: 100000\n", ["finetune", "micro_batch_size"]),
        ("generate:\n  batch_size: 1000000\n", ["generate", "batch_size"]),
        ("evaluate:\n  batch_size: 1000000\n", ["evaluate", "batch_size"]),
        ("finetune:\n  epochs: 1000000\n", ["finetune", "epochs"]),
        ("finetune:\n  max_steps: 10000000000\n", ["finetune", "max_steps"]),
        ("finetune:\n  warmup_steps: 10000000000\n", ["finetune", "warmup_steps"]),
        ("finetune:\n  eval_every: 10000000000\n", ["finetune", "eval_every"]),
        ("finetune:\n  eval_batches: 1000000\n", ["finetune", "eval_batches"]),
        ("finetune:\n  checkpoint_every: 10000000000\n", ["finetune", "checkpoint_every"]),
        ("finetune:\n  threads: 1000000\n", ["finetune", "threads"]),
        ("finetune:\n  max_length: 100000000\n", ["finetune", "max_length"]),
        ("finetune:\n  distributed:\n    nproc_per_node: 100000\n", ["nproc_per_node"]),
        ("generate:\n  limit: 100000000000000000000\n", ["generate.limit", "range"]),
        # seeds
        ("finetune:\n  seed: -1\n", ["finetune", "seed"]),
        ("prepare:\n  seed: 9223372036854775808\n", ["prepare.seed", "range"]),
        ("generate:\n  seed: -5\n", ["generate", "seed"]),
        ("fetch_gpt2:\n  random:\n    seed: 18446744073709551616\n", ["fetch_gpt2.random.seed"]),
        # the random model's shape
        ("fetch_gpt2:\n  random:\n    n_embd: 0\n", ["fetch_gpt2.random", "n_embd"]),
        ("fetch_gpt2:\n  random:\n    n_embd: -64\n", ["fetch_gpt2.random", "n_embd"]),
        ("fetch_gpt2:\n  random:\n    n_embd: 1000000\n", ["fetch_gpt2.random", "n_embd", "1600"]),
        ("fetch_gpt2:\n  random:\n    n_layer: 0\n", ["fetch_gpt2.random", "n_layer"]),
        ("fetch_gpt2:\n  random:\n    n_layer: 100000\n", ["fetch_gpt2.random", "n_layer", "48"]),
        ("fetch_gpt2:\n  random:\n    n_head: 0\n", ["fetch_gpt2.random", "n_head"]),
        ("fetch_gpt2:\n  random:\n    n_head: 128\n", ["fetch_gpt2.random", "n_head"]),
        ("fetch_gpt2:\n  random:\n    context_length: 0\n", ["fetch_gpt2.random", "context"]),
        # LoRA rank against the width known from fetch_gpt2
        ("finetune:\n  lora:\n    rank: -1\n", ["finetune.lora", "rank"]),
        ("finetune:\n  lora:\n    rank: 100000\n", ["finetune.lora", "rank"]),
        (
            "fetch_gpt2:\n  model: gpt2\nfinetune:\n  lora:\n    rank: 769\n",
            ["finetune.lora.rank", "768", "fetch_gpt2.model gpt2"],
        ),
        (
            "fetch_gpt2:\n  source: random\nfinetune:\n  lora:\n    rank: 65\n",
            ["finetune.lora.rank", "64", "fetch_gpt2.random"],
        ),
        # within finetune
        (
            "finetune:\n  max_steps: 5\n  warmup_steps: 6\n",
            ["finetune", "warmup_steps", "max_steps"],
        ),
        (
            "finetune:\n  device: cpu\n  distributed:\n    nproc_per_node: 2\n    backend: nccl\n",
            ["finetune", "nccl", "cpu"],
        ),
        (
            "finetune:\n  device: 'cuda:0'\n  distributed:\n    nproc_per_node: 2\n",
            ["finetune", "cuda:0", "rank"],
        ),
        # strings and lists
        ('fetch_gpt2:\n  revision: "main\\0"\n', ["fetch_gpt2.revision", "NUL"]),
        ("finetune:\n  lora:\n    targets: [" + "ff_fc, " * 200 + "]\n", ["lora.targets"]),
    ],
)
def test_hostile_values_name_section_and_key(tmp_path, text, words):
    message = _error(tmp_path, text)
    assert "\n" not in message and len(message) < 400
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize(
    "text",
    [
        "fetch_gpt2:\n  model: gpt2-xl\nfinetune:\n  lora:\n    rank: 1600\n",
        "fetch_gpt2:\n  source: random\n  random:\n    context_length: 65\n"
        "generate:\n  max_new_tokens: 64\n",
        "fetch_gpt2:\n  source: local\n  local_dir: x\nfinetune:\n  lora:\n    rank: 1024\n",
        "finetune:\n  seed: 9223372036854775807\n  batch_size: 65536\n  threads: 2\n",
        "finetune:\n  lora:\n    targets: &t [attn_qkv, head]\n    rank: &r 8\n"
        "  warmup_steps: *r\n",  # a plain alias is fine
    ],
)
def test_values_at_the_limits_are_accepted(tmp_path, text):
    load_params(_write(tmp_path, text))


def test_devices_are_checked_against_this_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = _error(tmp_path, "generate:\n  device: cuda\n")
    assert "generate.device" in message and "CUDA is not available" in message
    assert "evaluate.device" in _error(tmp_path, "evaluate:\n  device: 'cuda:0'\n")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert "MPS" in _error(tmp_path, "finetune:\n  device: mps\n")
    load_params(_write(tmp_path, "finetune:\n  device: cpu\ngenerate:\n  device: auto\n"))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    load_params(_write(tmp_path, "finetune:\n  device: 'cuda:1'\ngenerate:\n  device: cuda\n"))
    message = _error(tmp_path, "finetune:\n  device: 'cuda:7'\n")
    assert "finetune.device" in message and "'cuda:7'" in message and "2 CUDA device" in message
    message = _error(tmp_path, "finetune:\n  distributed:\n    nproc_per_node: 4\n")
    assert "nproc_per_node (4)" in message and "2 CUDA" in message


def _timed_error(tmp_path, text) -> str:
    started = time.monotonic()
    message = _error(tmp_path, text)
    assert time.monotonic() - started < 2.0
    assert "\n" not in message and len(message) < 1000  # the valid keys may be listed
    return message


@pytest.mark.parametrize(
    "text",
    [
        BOMB,  # unknown top-level keys
        "finetune:\n" + "".join(f"  {line}\n" for line in BOMB.splitlines()),  # in a section
        BOMB.replace("i: &i", "finetune:\n  lora:\n    targets: &i"),  # as a value
    ],
    ids=["top-level", "in-a-section", "as-a-value"],
)
def test_alias_bomb_fails_fast_in_one_line(tmp_path, text):
    assert len(text) < 1100
    assert "aliases" in _timed_error(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("finetune: " + "[" * 100_000 + "]" * 100_000 + "\n", ["nested"]),
        ("finetune:\n  batch_size: " + "1" * 5000 + "\n", ["not valid YAML", "4300"]),
        ("finetune:\n  lr: !!float\n", ["not valid YAML"]),
        ("finetune:\n  lr: 2001-13-45\n", ["not valid YAML"]),
        ("finetune:\n  lr: 1\n  lr: 2\n", ["duplicate key"]),
        ("x: &a [*a]\n", ["unknown key"]),
        ("finetune:\n  precision: " + "x" * 100_000 + "\n", ["finetune.precision", "..."]),
        ("finetune:\n  lr: [" + "1, " * 10_000 + "]\n", ["finetune.lr", "..."]),
        ("finetune:\n" + "".join(f"  k{i}: 1\n" for i in range(1000)), ["990 more"]),
        ("false\n", ["mapping"]),
    ],
)
def test_unusable_yaml_is_one_short_line(tmp_path, text, words):
    message = _timed_error(tmp_path, text)
    for word in words:
        assert word in message, (word, message)


def test_unreadable_params_files(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"finetune:\n  lr: \xff\n")
    with pytest.raises(ParamsError, match=r"not valid UTF-8 \(byte 0xff at offset 16\)"):
        load_params(path)
    path.write_bytes(b"# " + b"x" * (2 << 20))
    with pytest.raises(ParamsError, match="larger than"):
        load_params(path)
    with pytest.raises(ParamsError, match="cannot read"):
        load_params(tmp_path)  # a directory


def test_reused_anchor_prints_no_warning(tmp_path, capsys):
    load_params(_write(tmp_path, "finetune:\n  seed: &a 1\n  epochs: &a 3\n  max_steps: *a\n"))
    assert capsys.readouterr().err == ""


YAML_FRAGMENTS = [
    *["finetune:", "generate:", "fetch_gpt2:", "  lr: ", "  lora:", "    rank: ", "  seed: "],
    *["&a ", "*a", "[", "]", "{", "}", ",", ": ", "- ", "? ", "<<: ", "!!float ", "!!binary "],
    *["!!set ", "!!omap ", "!!timestamp ", ".inf", ".nan", "1e400", "0x", "2001-13-01", "~"],
    *["\n", "  ", "x", "1", "-1", "null", "|", ">", "#", "---\n", "%YAML 1.1\n", "\t", '"\\0"'],
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(YAML_FRAGMENTS) | st.text(max_size=3), max_size=30))
def test_any_yaml_text_raises_only_a_one_line_params_error(parts):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_bytes("".join(parts).encode("utf-8", "surrogatepass"))
        try:
            load_params(path)
        except ParamsError as err:
            assert "\n" not in str(err) and str(err).startswith(str(path))


def test_generate_answers_with_the_dpo_model_only_when_dpo_runs(tmp_path):
    """``generate.model`` picks the folder generate and evaluate load (``${generate.model}``
    in dvc.yaml); the DPO folder holds a model only with ``dpo.enabled``."""
    path = tmp_path / "params.yaml"
    path.write_text("generate:\n  model: data/dpo/model\n", encoding="utf-8")
    with pytest.raises(ParamsError, match=r"needs the dpo stage: set dpo\.enabled true"):
        load_params(path)
    path.write_text("generate:\n  model: data/dpo/model\ndpo:\n  enabled: true\n", encoding="utf-8")
    assert load_params(path).generate.model == "data/dpo/model"
    path.write_text("generate:\n  model: models/other\n", encoding="utf-8")
    with pytest.raises(ParamsError, match=r"generate\.model"):
        load_params(path)
    stages = _dvc_stages()
    for name in ("generate", "evaluate"):
        assert stages[name]["cmd"].endswith("--model data/model"), name
        assert "data/model" in stages[name]["deps"], name
