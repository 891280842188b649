"""One CUDA session's checks (issue 21), in at most ~8 minutes on one GPU.

Runs, one after the other, each in its own process with its own time limit:

1. ``pytest -m cuda tests/test_cuda.py``: logits = Hugging Face's on CUDA, a few
   fp32 / tf32 / bf16 training steps with finite losses and fp32 close to the CPU,
   cached greedy = uncached greedy, resume bit for bit in deterministic mode, and a
   2-process NCCL step where there are 2 GPUs;
2. ``bench/train_step.py`` against HF on the GPU, per precision (fp32, tf32, bf16) with
   HF's fused AdamW (``--hf-fused-optimizer``, the issue's comparison) and with its
   default AdamW;
3. ``bench/generate.py`` against HF: 32 prompts x 256 new tokens, fp32, bf16, tf32;
4. ``bench/pipeline.py``: the projected time of the default ``dvc repro`` (params.yaml's
   recipe) of gpt2-medium on the GPU, then the same recipe in bf16.

The parts run in that order of importance: the tests and the issue's two targets first
(bf16 training against HF with fused AdamW for both; the default run's projection), the
other comparisons after. A part that would not fit in what is left of ``--budget-s`` is
not started and is listed in ``not_run``. A precision a script does not accept yet
(``tf32``, say) is listed there too, with the script's own message.

Each benchmark's last-line JSON is collected. Standard output ends with ONE JSON line:
the summary (every part's status, seconds and key figures, the targets, the failures);
the complete results (every part's whole JSON) go to ``--json-out`` (default
``$OUT/gpu_check.json`` when ``$OUT`` is set, as the ``device`` tool sets it, else
``gpu_check.json`` in a temporary directory; its path is in the summary; pytest's
``junit.xml`` beside it). Exit status 0 when nothing failed (a missed target is not a
failure: it is reported under ``targets``), 1 otherwise.

Without CUDA it prints why and ends at once with ``{"benchmark": "gpu_check",
"skipped": "no CUDA", ...}`` and exit status 0.

    python bench/gpu_check.py [--budget-s 450] [--model gpt2-medium] [--parts tests,train_step]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "bench"
SRC = REPO_ROOT / "src"

# The targets on an H200.
TARGET_REPRO_S = 120.0  # whole default dvc repro of gpt2-medium
TARGET_BF16_TRAIN_RATIO = 2.0  # ours / HF tokens/s in bf16, fused AdamW for both

# Python modules the tests and the benchmarks import (beside the standard library).
# bench/pipeline.py also times a stage's start-up, ``import gpt2_instruct.pipeline``
# (dvclive, rouge_score, ...): checked apart, before the first pipeline part.
NEEDED_MODULES = ("torch", "transformers", "safetensors", "tiktoken", "tqdm", "ruamel.yaml")

# Figures of each benchmark kept in the summary line (the whole JSON goes to --json-out).
SUMMARY_KEYS = {
    "train_step": (
        "dtype", "hf_optimizer", "ours_tokens_per_s", "hf_tokens_per_s", "ratio_tokens_per_s",
        "ours_step_s", "hf_step_s", "mfu_ours", "mfu_hf", "losses_agree",
        "loss_diff_first_batch", "ours_cuda_peak_gb", "hf_cuda_peak_gb", "data",
    ),
    "generate": (
        "dtype", "ours_tokens_per_s", "hf_tokens_per_s", "ratio_tokens_per_s",
        "identical_to_uncached", "identical_to_hf", "mismatches", "ours_seconds",
        "hf_seconds", "data",
    ),
    "pipeline": (
        "precision", "dtype", "projected_total_s", "projected_total_real_answers_s",
        "compute_floor_s", "floor_over_projection", "parts", "step_s", "eval_s",
        "checkpoint_s", "gen_batch_s", "data",
    ),
}  # fmt: skip


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


@dataclass
class Part:
    """One process to run: its command, the seconds it may take and the least worth starting."""

    name: str
    kind: str  # tests | train_step | generate | pipeline
    argv: list[str]
    timeout_s: float
    min_s: float  # not started with less than this left
    facts: dict[str, Any] = field(default_factory=dict)  # configuration, for the summary


# --------------------------------------------------------------------- the plan
def plan(args: argparse.Namespace, report_dir: Path) -> list[Part]:
    py = sys.executable
    model = ["--model", args.model, "--device", "cuda"]
    data = ["--data-dir", str(args.data_dir)] if args.data_dir else []
    parts: list[Part] = [
        Part(
            "tests",
            "tests",
            [
                py, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-rfEsxX",
                "-p", "no:cacheprovider", f"--junitxml={report_dir / 'junit.xml'}",
            ],
            timeout_s=180, min_s=60,
        ),
    ]  # fmt: skip

    def train(dtype: str, fused: bool) -> Part:
        optimizer = "fused" if fused else "default"
        argv = [
            py, str(BENCH / "train_step.py"), *model, *data, "--dtype", dtype,
            "--steps", str(args.train_steps), "--warmup", "3",
        ]  # fmt: skip
        if fused:
            argv.append("--hf-fused-optimizer")
        facts = {"dtype": dtype, "hf_optimizer": optimizer}
        return Part(f"train_step_{dtype}_hf_{optimizer}", "train_step", argv, 100, 30, facts)

    def gen(dtype: str) -> Part:
        argv = [
            py, str(BENCH / "generate.py"), *model, *data, "--dtype", dtype,
            "--prompts", "32", "--max-new-tokens", "256", "--batch-size", "32",
            "--check", "3", "--check-tokens", "32",
        ]  # fmt: skip
        return Part(f"generate_{dtype}", "generate", argv, 120, 40, {"dtype": dtype})

    def pipeline(dtype: str | None) -> Part:
        argv = [
            py, str(BENCH / "pipeline.py"), *model, *data, "--steps", "8",
            "--gen-prompts", "32", "--eval-repeats", "2",
        ]  # fmt: skip
        if dtype:
            argv += ["--dtype", dtype]
        name = f"pipeline_{dtype}" if dtype else "pipeline_default"
        facts = {"precision": dtype or "params.yaml"}
        return Part(name, "pipeline", argv, 150, 60, facts)

    parts += [
        train("bf16", fused=True),  # target: >= 2x HF tokens/s
        pipeline(None),  # target: the default run <= 2 minutes
        train("fp32", fused=True),
        train("tf32", fused=True),
        gen("fp32"),
        gen("bf16"),
        train("bf16", fused=False),
        train("fp32", fused=False),
        train("tf32", fused=False),
        gen("tf32"),
        pipeline("bf16"),
    ]
    if args.parts:
        wanted = set(args.parts.split(","))
        parts = [p for p in parts if p.kind in wanted or p.name in wanted]
    return parts


# ---------------------------------------------------------------------- running
def last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, dict) else None
        if line:
            return None  # the contract: the JSON is the very last line
    return None


_REFUSED = re.compile(r"argument --dtype: invalid choice: '?(\w+)'?")


def run_part(part: Part, timeout_s: float, env: dict[str, str]) -> dict[str, Any]:
    log(f"{part.name}: starting (limit {timeout_s:.0f} s): {' '.join(part.argv[1:])}")
    started = time.monotonic()
    # A session of its own: on timeout the whole group goes (pytest's subprocesses,
    # torchrun's workers), so nothing left behind holds the GPU for the next part.
    with subprocess.Popen(
        part.argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    ) as process:  # fmt: skip
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            timed_out = True
        except BaseException:  # Ctrl-C: the children are in their own session, end them too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            raise
        returncode = process.returncode
    seconds = round(time.monotonic() - started, 1)
    out: dict[str, Any] = {"name": part.name, "kind": part.kind, "seconds": seconds, **part.facts}
    refused = _REFUSED.search(stderr) if returncode == 2 else None
    if refused:
        out["status"] = "not_accepted"
        out["why"] = refused.group(0)
    elif timed_out:
        out["status"] = "timeout"
        out["why"] = f"killed after {timeout_s:.0f} s"
        out["stderr_tail"] = stderr[-1500:]
    elif returncode != 0:
        out["status"] = "failed"
        out["why"] = f"exit status {returncode}"
        out["stderr_tail"] = stderr[-1500:]
    else:
        out["status"] = "ok"
    if part.kind == "tests":
        out.update(test_counts(stdout, Path(part.argv[-1].split("=", 1)[1])))
        out["stdout_tail"] = stdout[-2500:]
        if out["status"] == "failed" and returncode == 5:  # pytest: nothing collected
            out["why"] = "no tests collected"
    else:
        result = last_json(stdout)
        out["result"] = result
        if out["status"] == "ok" and result is None:
            out["status"] = "failed"
            out["why"] = "no JSON object on the last line of standard output"
    log(
        f"{part.name}: {out['status']} in {seconds} s"
        + (f" ({out['why']})" if "why" in out else "")
    )
    return out


def test_counts(stdout: str, junit: Path) -> dict[str, Any]:
    """Outcome counts and the names of the tests that failed, from pytest's JUnit XML."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "xfailed": 0}
    failed: list[str] = []
    skipped: list[str] = []
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        summary = stdout.strip().splitlines()[-1:] if stdout.strip() else []
        return {"counts": None, "summary": summary}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            failed.append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failed.append(name)
        elif (skip := case.find("skipped")) is not None:
            kind = "xfailed" if skip.get("type") == "pytest.xfail" else "skipped"
            counts[kind] += 1
            skipped.append(f"{name}: {kind}: {(skip.get('message') or '')[:200]}")
        else:
            counts["passed"] += 1
    return {"counts": counts, "failed_tests": failed, "skipped_tests": skipped}


# ---------------------------------------------------------------------- judging
def checks(part: dict[str, Any]) -> list[str]:
    """What went wrong in a part that ran: its status, then its own correctness checks."""
    problems = []
    if part["status"] not in ("ok", "not_accepted"):
        problems.append(f"{part['name']}: {part['status']}: {part.get('why', '')}")
    if part["kind"] == "tests" and part.get("counts"):
        c = part["counts"]
        if c["failed"] or c["errors"]:
            problems.append(
                f"tests: {c['failed']} failed, {c['errors']} errors: {part['failed_tests']}"
            )
        if part["status"] == "ok" and not c["passed"]:
            problems.append("tests: none passed (all skipped: is CUDA visible to pytest?)")
    result = part.get("result") or {}
    if part["kind"] == "train_step" and result and result.get("losses_agree") is False:
        problems.append(
            f"{part['name']}: first losses differ from HF by {result.get('loss_diff_first_batch')}"
        )
    if part["kind"] == "generate" and result:
        if result.get("identical_to_uncached") is False:
            problems.append(f"{part['name']}: batched greedy differs from generate_uncached")
        if result.get("identical_to_hf") is False:
            problems.append(f"{part['name']}: greedy tokens differ from HF's")
    return problems


def targets(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def figure(name: str, key: str) -> float | None:
        result = (parts.get(name) or {}).get("result") or {}
        value = result.get(key)
        return value if isinstance(value, int | float) else None

    ratio = figure("train_step_bf16_hf_fused", "ratio_tokens_per_s")
    repro = figure("pipeline_default", "projected_total_real_answers_s")
    upper = figure("pipeline_default", "projected_total_s")
    return {
        "bf16_training_vs_hf_fused": {
            "want": f">= {TARGET_BF16_TRAIN_RATIO}x HF tokens/s",
            "got": ratio,
            "met": None if ratio is None else ratio >= TARGET_BF16_TRAIN_RATIO,
        },
        "default_repro_gpt2_medium_s": {
            "want": f"<= {TARGET_REPRO_S:.0f} s",
            "got": repro,
            "got_upper_bound": upper,
            "met": None if repro is None else repro <= TARGET_REPRO_S,
        },
    }


def _rounded(value: Any) -> Any:
    """Floats to 4 significant digits, lists cut to 3 items: the summary stays one short line."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value[:3]] + (
            [f"... {len(value) - 3} more"] * (len(value) > 3)
        )
    return value


def summary_of(part: dict[str, Any]) -> dict[str, Any]:
    """A part's status and key figures (its whole JSON is in the full results)."""
    dropped = ("name", "kind", "result", "stdout_tail", "stderr_tail", "skipped_tests")
    short = {k: v for k, v in part.items() if k not in dropped}
    if part["kind"] == "tests":
        short["skipped_tests"] = part.get("skipped_tests", [])[:8]
    result = part.get("result")
    if result:
        short.update({k: _rounded(result[k]) for k in SUMMARY_KEYS[part["kind"]] if k in result})
    if part["status"] not in ("ok", "not_accepted") and "stderr_tail" in part:
        short["stderr_tail"] = part["stderr_tail"][-400:]
    return short


# ------------------------------------------------------------------------- main
def environment() -> tuple[dict[str, str], list[str]]:
    """The children's environment (``src`` importable even without ``pip install -e``)
    and the modules that are missing."""
    env = dict(os.environ)
    if importlib.util.find_spec("gpt2_instruct") is None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
        sys.path.insert(0, str(SRC))
    env.setdefault("PYTHONUNBUFFERED", "1")
    missing = []
    for module in (*NEEDED_MODULES, "pytest"):
        try:
            if importlib.util.find_spec(module) is None:
                missing.append(module)
        except ModuleNotFoundError:  # a missing parent package ("ruamel")
            missing.append(module)
    return env, missing


def stage_imports(env: dict[str, str]) -> str | None:
    """Why a stage's imports fail here (bench/pipeline.py times them), or None."""
    code = "import yaml, gpt2_instruct.pipeline"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    if done.returncode == 0:
        return None
    lines = done.stderr.strip().splitlines()
    return f"{code!r} fails: {lines[-1] if lines else done.returncode}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--budget-s", type=float, default=450.0, help="seconds for everything")
    parser.add_argument("--model", default="gpt2-medium", help="GPT-2 shape of the benchmarks")
    parser.add_argument("--train-steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--data-dir", type=Path, default=None, help="passed to the benchmarks")
    parser.add_argument(
        "--parts", default="", help="comma-separated kinds or names to run (default: all)"
    )
    parser.add_argument("--json-out", type=Path, default=None, help="where the full results go")
    args = parser.parse_args()
    started = time.monotonic()

    import torch  # after argparse: --help stays fast

    base = {
        "benchmark": "gpu_check",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (run it on a GPU machine)")
        print(json.dumps({**base, "skipped": "no CUDA", "ok": True}), flush=True)
        return 0

    env, missing = environment()
    base.update(
        device_name=torch.cuda.get_device_name(0),
        device_count=torch.cuda.device_count(),
        budget_s=args.budget_s,
    )
    if missing:
        why = f"missing Python modules: {missing} (see bench/README.md, 'On a GPU machine')"
        log(why)
        print(json.dumps({**base, "ok": False, "failures": [why]}), flush=True)
        return 1

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    json_out = args.json_out or (
        out_dir / "gpu_check.json"
        if out_dir
        else Path(tempfile.mkdtemp(prefix="gpu_check-")) / "gpu_check.json"
    )
    json_out.parent.mkdir(parents=True, exist_ok=True)
    report_dir = json_out.parent  # pytest's junit.xml beside the results

    results: dict[str, dict[str, Any]] = {}
    not_run: list[dict[str, Any]] = []
    unimportable: str | None = ""  # "": not checked yet
    for part in plan(args, report_dir):
        left = args.budget_s - (time.monotonic() - started)
        if left < part.min_s:
            not_run.append({"name": part.name, "why": f"out of budget ({left:.0f} s left)"})
            log(f"{part.name}: not started, {left:.0f} s left")
            continue
        if part.kind == "pipeline":
            if unimportable == "":
                unimportable = stage_imports(env)
            if unimportable:
                not_run.append({"name": part.name, "why": unimportable})
                log(f"{part.name}: not started: {unimportable}")
                continue
        result = run_part(part, min(part.timeout_s, left), env)
        if result["status"] == "not_accepted":
            not_run.append({"name": part.name, "why": result["why"]})
        results[part.name] = result
        print(f"{part.name}: {json.dumps(summary_of(result))}", flush=True)

    failures = [problem for part in results.values() for problem in checks(part)]
    total = round(time.monotonic() - started, 1)
    full = {
        **base,
        "total_s": total,
        "ok": not failures,
        "failures": failures,
        "not_run": not_run,
        "targets": targets(results),
        "parts": results,
    }
    json_out.write_text(json.dumps(full, indent=1), encoding="utf-8")
    summary = {
        **{k: v for k, v in full.items() if k != "parts"},
        "parts": {name: summary_of(part) for name, part in results.items()},
        "full_results": str(json_out),
    }
    print(json.dumps(summary), flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
