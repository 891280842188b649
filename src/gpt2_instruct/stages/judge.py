"""Stage judge: score the answers 0-100 with an LLM judge, when one is configured.

A stage of its own, after generate and beside evaluate, so that DVC keeps it apart: a
judge that failed is never cached as evaluate's success, and judging again (another
server, model or template: ``dvc exp run -S judge.model=...``) reruns nothing else.

With ``judge.backend: none`` (the default) it contacts nothing and writes, at once, a
metrics file saying ``"judge_status": "not run"`` and empty tables, so an offline
``dvc repro`` passes. With a backend, success and failure are decided by how many
entries were scored (``judge.min_scored_fraction``, see
:class:`gpt2_instruct.params.JudgeParams`): below it, or with none scored, the outputs
are still written (to read what went wrong) and then :class:`JudgeError` makes the stage
exit 1, so DVC caches nothing and the next ``dvc repro`` judges again.

Two tables, one row per entry: ``judge_per_entry.csv`` keeps the judge's raw reply and
the reason an entry has no score, for reading; ``judge_scores.csv`` holds only the index,
the score and the reason's key, for ``dvc plots``, which copies every column of a
plotted file into a ``<script>`` of its HTML: the server's text must not go there.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gpt2_instruct.data import DataError
from gpt2_instruct.io import atomic_path, write_json
from gpt2_instruct.judge import JudgeError, check_entries, check_environment, judge_entries
from gpt2_instruct.params import JudgeParams
from gpt2_instruct.safe_json import JSONError, read_json
from gpt2_instruct.stages import log

PER_ENTRY_FIELDS: tuple[str, ...] = ("index", "score", "reason", "error", "reply")
"""Columns of the readable table (``reply``: the judge's raw text, at most 2,000 chars)."""

SCORE_FIELDS: tuple[str, ...] = ("index", "score", "reason")
"""Columns of the plotted table: numbers and :data:`gpt2_instruct.judge.REASONS` keys only."""

NOT_RUN = "not run"


def load_answers(path: Path) -> list[dict[str, Any]]:
    """The generate stage's answers, checked as the judge needs them (DataError naming the file)."""
    try:
        entries = read_json(path)
    except JSONError as err:
        raise DataError(str(err)) from None
    try:
        check_entries(entries)
    except ValueError as err:
        raise DataError(f"{path}: {err}") from None
    if not entries:
        raise DataError(f"{path}: contains no entries (empty list)")
    return entries


def write_rows(path: Path, fields: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """A UTF-8 CSV with a header (even without rows), written atomically; None is empty."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        handle.flush()
        os.fsync(handle.fileno())


def _verdict(params: JudgeParams, total: int, summary: Mapping[str, Any]) -> tuple[str, str | None]:
    """The run's status and, when it failed, why (one line)."""
    scored = summary["judge_count"]
    fraction = scored / total
    if scored and fraction >= params.min_scored_fraction:
        return ("complete" if scored == total else "partial"), None
    why = summary["judge_error"] or f"unscored entries by reason: {summary['judge_failed']}"
    if not scored:
        return "failed", f"the judge scored none of the {total} entries: {why}"
    return "failed", (
        f"the judge scored {scored} of {total} entries ({fraction:.1%}), fewer than "
        f"judge.min_scored_fraction ({params.min_scored_fraction:g}): {why}"
    )


def judge(
    params: JudgeParams, responses: Path, metrics: Path, per_entry: Path, scores: Path
) -> dict[str, Any]:
    """Judge every answer in ``responses``; write the metrics and both tables; return the metrics.

    The metrics are :func:`gpt2_instruct.judge.judge_entries`' summary plus
    ``judge_status`` (``not run``, ``complete``, ``partial`` or ``failed``),
    ``judge_entries`` and ``judge_scored_fraction``. Raises :class:`JudgeError` after
    writing them when the run failed, so the stage exits 1.
    """
    if not params.enabled:
        report: dict[str, Any] = {"judge_status": NOT_RUN, "judge_backend": params.backend}
        write_rows(per_entry, PER_ENTRY_FIELDS, [])
        write_rows(scores, SCORE_FIELDS, [])
        write_json(metrics, report)
        log("judge: not run (judge.backend: none); set it to ollama or openai to judge")
        return report

    check_environment(params)  # an unusable API key fails before any work
    entries = load_answers(responses)
    rows, summary = judge_entries(entries, params, progress=True)
    status, failure = _verdict(params, len(entries), summary)
    report = {
        "judge_status": status,
        **summary,
        "judge_entries": len(entries),
        "judge_scored_fraction": summary["judge_count"] / len(entries),
    }
    write_rows(per_entry, PER_ENTRY_FIELDS, rows)
    write_rows(scores, SCORE_FIELDS, rows)
    write_json(metrics, report)
    log(f"judge: {json.dumps(report)}")
    if failure is not None:
        raise JudgeError(f"{failure} (so the stage fails and DVC caches nothing; see {metrics})")
    return report
