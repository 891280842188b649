"""The benchmarks still run, and still print the figures issue 3 asks of them.

Each script runs at its smallest sizes on synthetic tokens (no ``../shared`` needed);
nothing here is timed, but the JSON line each prints last must carry its contract:
ours against Hugging Face, the ratio, the run's matmul peak, and the checks that make
the comparison fair (same losses, identical tokens).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
GPT2_SMALL = ["--model", "gpt2-small", "--synthetic", "--threads", "2"]


def run_bench(script: str, *args: str) -> dict[str, Any]:
    """Run ``bench/<script>`` and return the JSON object of its last line."""
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-3000:]}"
    last = done.stdout.strip().splitlines()[-1]
    return json.loads(last)


def positive(result: dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = result[key]
        assert isinstance(value, float | int) and math.isfinite(value) and value > 0, (key, value)


def test_train_step_compares_with_hugging_face_on_the_same_batches() -> None:
    result = run_bench(
        "train_step.py", *GPT2_SMALL, "--steps", "1", "--warmup", "0", "--batch-size", "2",
        "--peak-size", "256", "--peak-repeats", "1",
    )  # fmt: skip
    assert result["benchmark"] == "train_step" and result["model"] == "gpt2"
    positive(result, "ours_step_s", "hf_step_s", "ours_tokens_per_s", "hf_tokens_per_s")
    positive(result, "mfu_ours", "mfu_hf", "peak_fp32_gflops", "peak_bf16_gflops")
    expected = result["ours_tokens_per_s"] / result["hf_tokens_per_s"]
    assert result["ratio_tokens_per_s"] == pytest.approx(expected)
    assert result["losses_agree"] is True
    assert abs(result["ours_first_loss"] - result["hf_first_loss"]) <= result["loss_tolerance"]


def test_generate_checks_tokens_against_uncached_greedy_and_hugging_face() -> None:
    result = run_bench(
        "generate.py", *GPT2_SMALL, "--prompts", "3", "--max-new-tokens", "4", "--batch-size",
        "3", "--check", "2", "--check-tokens", "4",
    )  # fmt: skip
    assert result["benchmark"] == "generate"
    assert result["identical_to_uncached"] is True and result["identical_to_hf"] is True
    assert result["mismatches"] == []
    assert result["ours_new_tokens"] == result["hf_new_tokens"] == 3 * 4
    positive(result, "ours_tokens_per_s", "hf_tokens_per_s", "ratio_tokens_per_s")


def test_pipeline_projection_is_above_its_compute_floor() -> None:
    result = run_bench(
        "pipeline.py", *GPT2_SMALL, "--steps", "1", "--gen-prompts", "2",
        "--gen-max-new-tokens", "4", "--eval-repeats", "1", "--no-checkpoint",
    )  # fmt: skip
    assert result["benchmark"] == "pipeline"
    positive(result, "projected_total_s", "compute_floor_s", "useful_flops", "peak_fp32_gflops")
    parts = result["compute_floor_parts_s"]
    assert sum(parts.values()) == pytest.approx(result["compute_floor_s"])
    # The floor runs every useful FLOP at the measured peak: no run can beat it.
    assert 0 < result["floor_over_projection"] < 1


def test_op_breakdown_accounts_for_a_training_step() -> None:
    result = run_bench("op_breakdown.py", *GPT2_SMALL, "--steps", "1", "--warmup", "0")
    assert result["benchmark"] == "op_breakdown" and result["phase"] == "train"
    positive(result, "ops_ms", "products_ms", "products_gflops", "peak_fp32_gflops")
    assert result["products_ms"] <= result["ops_ms"] <= result["timed_wall_ms"]
    assert 0 < result["products_share"] <= 1


NO_CUDA = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="a GPU is here: bench/gpu_check.py would run its ~8 minutes of checks",
)


@NO_CUDA
def test_gpu_check_ends_at_once_without_cuda() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no CUDA" in done.stdout.splitlines()[0]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "gpu_check" and result["skipped"] == "no CUDA"
    assert time.monotonic() - started < 60  # the time to import torch, no more


@NO_CUDA
def test_cuda_tests_are_all_skipped_cleanly_without_cuda(tmp_path: Path) -> None:
    """``pytest -m cuda tests/test_cuda.py``: every test collected, every one skipped."""
    junit = tmp_path / "junit.xml"
    done = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q",
            "-p", "no:cacheprovider", f"--junitxml={junit}",
        ],
        cwd=BENCH.parent, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cases = list(ElementTree.parse(junit).getroot().iter("testcase"))
    assert len(cases) >= 10
    for case in cases:
        skipped = case.find("skipped")
        assert skipped is not None, f"{case.get('name')} was not skipped"
        assert skipped.get("type") == "pytest.skip", case.get("name")
        assert "CUDA" in (skipped.get("message") or ""), case.get("name")
