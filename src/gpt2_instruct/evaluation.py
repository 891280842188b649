"""Offline scores for generated answers: no judge model or server is needed.

The generate stage writes a JSON list of entries with ``instruction``, ``input``,
``output`` (the reference answer) and ``model_response``. Here each response is
compared with its reference by:

* exact match on :func:`normalize_answer` text, as ``True``/``False`` per entry and
  as a fraction in 0..1 in the summary;
* ROUGE-1, ROUGE-2 and ROUGE-L F1 in 0..1 from ``rouge-score`` (Porter stemming on;
  its tokenizer lowercases and keeps only ASCII letters and digits, so text with no
  such characters has no tokens and scores 0);
* chrF (sacrebleu's defaults: character n-grams up to 6, beta 2, whitespace ignored)
  on sacrebleu's native 0..100 scale, per entry and corpus-level for the summary.

Both libraries score an empty response (or reference) 0, even when both are empty;
exact match counts two empty strings as equal. Maintained libraries are used so the
numbers are comparable with published ones rather than a home-grown variant.
"""

from __future__ import annotations

import csv
import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from rouge_score import rouge_scorer
from sacrebleu.metrics import CHRF

from gpt2_instruct.data import DataError
from gpt2_instruct.io import atomic_path
from gpt2_instruct.safe_json import JSONError, duplicate_keys, read_json

ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")
"""ROUGE variants scored; their names are also the row and summary keys."""

ENTRY_FIELDS: tuple[str, ...] = ("instruction", "input", "output", "model_response")
"""Fields copied from each generated entry into its per-entry row."""

PER_ENTRY_FIELDS: tuple[str, ...] = (
    "index",
    *ENTRY_FIELDS,
    "exact_match",
    *ROUGE_TYPES,
    "chrf",
    "response_loss",
    "response_chars",
)
"""Column order of per-entry rows and of the CSV (``response_loss`` only when given)."""


def normalize_answer(text: str) -> str:
    """Return ``text`` with leading/trailing whitespace removed and each internal run of
    whitespace (spaces, tabs, newlines, any Unicode whitespace) replaced by one space.

    Nothing else changes: case, punctuation and Unicode form are kept, so exact match
    forgives only layout differences that a reader would not notice.
    """
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the two texts are identical after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)


@functools.lru_cache(maxsize=1)
def _rouge() -> rouge_scorer.RougeScorer:
    """The shared ROUGE scorer; building it loads the stemmer, so do it once."""
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


@functools.lru_cache(maxsize=1)
def _chrf() -> CHRF:
    """The shared chrF metric with sacrebleu's default (published) settings."""
    return CHRF()


def rouge_f1(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 in 0..1 of ``prediction`` against ``reference``."""
    scores = _rouge().score(reference, prediction)  # rouge-score takes (target, prediction)
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


def chrf_sentence(prediction: str, reference: str) -> float:
    """Sentence-level chrF (0..100) of ``prediction`` against one ``reference``."""
    return float(_chrf().sentence_score(prediction, [reference]).score)


def chrf_corpus(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level chrF (0..100): n-gram statistics pooled over all pairs, then one F-score.

    This is not the mean of sentence scores; long answers weigh more.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"chrf_corpus needs as many predictions ({len(predictions)}) "
            f"as references ({len(references)})"
        )
    return float(_chrf().corpus_score(list(predictions), [list(references)]).score)


REQUIRED_FIELDS: tuple[str, ...] = ("output", "model_response")
"""Fields every generated entry must have as strings (``instruction``/``input``: or null)."""


def _kind(value: Any) -> str:
    """A parsed JSON value's type as a data author names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    return {dict: "object", list: "list", str: "string"}.get(type(value), type(value).__name__)


def validate_responses(raw: Any, source: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Check parsed generated entries; raise DataError naming ``source``, the entry and field.

    Each entry must be an object with string ``output`` and ``model_response`` (an empty
    answer is allowed) and, when present, string or null ``instruction`` and ``input``;
    a field repeated with different values, and text that cannot be written as UTF-8
    (lone surrogates), are errors.
    """
    source = os.fspath(source)
    if not isinstance(raw, list):
        raise DataError(f"{source}: top level must be a JSON list of entries, got {_kind(raw)}")
    if not raw:
        raise DataError(f"{source}: contains no entries (empty list)")
    for index, item in enumerate(raw):
        where = f"{source}: entry {index}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: must be a JSON object, got {_kind(item)}")
        for key, same in duplicate_keys(item):
            if not same and key in ENTRY_FIELDS:
                raise DataError(
                    f"{where}: field {key!r} appears more than once with different values "
                    "(JSON keeps only the last)"
                )
        for field in ENTRY_FIELDS:
            required = field in REQUIRED_FIELDS
            if field not in item:
                if required:
                    raise DataError(f"{where}: missing required field {field!r}")
                continue
            value = item[field]
            if value is None and not required:
                continue
            if not isinstance(value, str):
                allowed = "a string" if required else "a string or null"
                raise DataError(f"{where}: field {field!r} must be {allowed}, got {_kind(value)}")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise DataError(
                    f"{where}: field {field!r} contains an unpaired surrogate at character "
                    f"{exc.start}"
                ) from None
    return raw


def load_responses(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and check the generate stage's answers (:func:`validate_responses`).

    Unreadable, truncated, too deep or otherwise invalid JSON is a DataError naming the
    file (and line and column), as is every entry-level problem.
    """
    try:
        raw = read_json(path)
    except JSONError as err:
        raise DataError(str(err)) from None
    return validate_responses(raw, path)


def _checked_text(entry: Any, index: int, field: str) -> str:
    """Return ``entry[field]`` or raise a ValueError that names the entry and field."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"entry {index} is a {type(entry).__name__}, not an object")
    if field not in entry:
        raise ValueError(f"entry {index} has no {field!r} field")
    value = entry[field]
    if not isinstance(value, str):
        raise ValueError(f"entry {index} field {field!r} is a {type(value).__name__}, not a string")
    return value


def _checked_losses(losses: Sequence[float], count: int) -> list[float]:
    """Validate per-entry losses: one finite number per entry."""
    if len(losses) != count:
        raise ValueError(f"got {len(losses)} response losses for {count} entries")
    checked = []
    for index, loss in enumerate(losses):
        if isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise ValueError(f"response loss {index} is a {type(loss).__name__}, not a number")
        if not math.isfinite(loss):
            raise ValueError(f"response loss {index} is not finite: {loss!r}")
        checked.append(float(loss))
    return checked


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def score_entries(
    entries: Sequence[Mapping[str, Any]],
    response_losses: Sequence[float] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float | int]]:
    """Score every generated entry against its reference.

    ``response_losses`` are per-entry mean token cross-entropies (nats) over the
    response tokens, in entry order, or None when not computed.

    Returns per-entry rows (keys in :data:`PER_ENTRY_FIELDS` order) and a flat summary
    for ``dvc metrics``: ``count``, ``exact_match`` (fraction), mean ``rouge1``,
    ``rouge2``, ``rougeL`` (0..1), corpus ``chrf`` and ``chrf_sentence_mean`` (0..100),
    ``empty_responses`` (responses that are empty or whitespace only) and, with losses,
    ``mean_response_loss`` and ``response_perplexity`` = exp(mean loss).
    """
    if not entries:
        raise ValueError("no entries to score: the generated-responses list is empty")
    losses = None if response_losses is None else _checked_losses(response_losses, len(entries))

    rows: list[dict[str, Any]] = []
    for index, entry in enumerate(entries):
        reference = _checked_text(entry, index, "output")
        response = _checked_text(entry, index, "model_response")
        row: dict[str, Any] = {"index": index}
        for field in ENTRY_FIELDS:
            value = entry.get(field, "")
            row[field] = "" if value is None else value
        row["exact_match"] = exact_match(response, reference)
        row.update(rouge_f1(response, reference))
        row["chrf"] = chrf_sentence(response, reference)
        if losses is not None:
            row["response_loss"] = losses[index]
        row["response_chars"] = len(response)
        rows.append(row)

    summary: dict[str, float | int] = {
        "count": len(rows),
        "exact_match": _mean([float(row["exact_match"]) for row in rows]),
    }
    for name in ROUGE_TYPES:
        summary[name] = _mean([row[name] for row in rows])
    summary["chrf"] = chrf_corpus(
        [row["model_response"] for row in rows], [row["output"] for row in rows]
    )
    summary["chrf_sentence_mean"] = _mean([row["chrf"] for row in rows])
    summary["empty_responses"] = sum(1 for row in rows if not row["model_response"].strip())
    if losses is not None:
        mean_loss = _mean(losses)
        summary["mean_response_loss"] = mean_loss
        try:
            summary["response_perplexity"] = math.exp(mean_loss)
        except OverflowError:
            summary["response_perplexity"] = math.inf
    return rows, summary


def write_per_entry_csv(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """Write per-entry rows as a UTF-8 CSV with a header, atomically.

    Columns follow :data:`PER_ENTRY_FIELDS` (those present), then any extra keys in
    first-seen order. Text with commas, quotes or newlines is quoted by the csv module,
    so ``csv.DictReader`` reads it back unchanged; booleans are written ``True``/``False``.
    """
    present: dict[str, None] = {}
    for row in rows:
        present.update(dict.fromkeys(row))
    if rows:
        fields = [field for field in PER_ENTRY_FIELDS if field in present]
        fields += [field for field in present if field not in PER_ENTRY_FIELDS]
    else:
        fields = [field for field in PER_ENTRY_FIELDS if field != "response_loss"]
    # newline="" lets the csv module write its own line ends and keep embedded ones.
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
        handle.flush()
        os.fsync(handle.fileno())


SCORE_FIELDS: tuple[str, ...] = (
    "index",
    "exact_match",
    *ROUGE_TYPES,
    "chrf",
    "response_loss",
    "response_chars",
)
"""Columns of the plotted per-entry table: numbers only (``response_loss`` when given)."""


def write_scores_csv(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """Write the per-entry scores without any text, atomically, for ``dvc plots``.

    ``dvc plots show`` and ``diff`` copy every column of a plotted file into a ``<script>``
    of their HTML, unescaped: an answer or instruction containing ``</script>`` would end
    it and run as the page's code. So the plotted table holds only :data:`SCORE_FIELDS`
    (exact match as 0/1); the text stays in :func:`write_per_entry_csv`'s table.
    """
    fields = [f for f in SCORE_FIELDS if f != "response_loss" or any(f in r for r in rows)]
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "exact_match": int(bool(row["exact_match"]))})
        handle.flush()
        os.fsync(handle.fileno())


def worst_entries(
    rows: Sequence[Mapping[str, Any]],
    k: int,
    key: str = "rougeL",
    *,
    higher_is_better: bool = True,
) -> list[Mapping[str, Any]]:
    """The ``k`` rows scoring worst on ``key`` (ties keep entry order), for error analysis.

    Pass ``higher_is_better=False`` for keys such as ``response_loss``.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    for position, row in enumerate(rows):
        if key not in row:
            raise ValueError(f"row {position} has no {key!r} score")
    ordered = sorted(rows, key=lambda row: row[key], reverse=not higher_is_better)
    return ordered[:k]
