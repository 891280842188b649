"""Stage prepare: validate the raw entries and split them into train, val and test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpt2_instruct.data import (
    SPLITS,
    WARNING_KINDS,
    DataError,
    DataWarning,
    find_duplicates,
    load_entries,
    overlap,
    split_entries,
    write_entries,
)
from gpt2_instruct.io import atomic_dir, write_json
from gpt2_instruct.params import PrepareParams
from gpt2_instruct.stages import log

SHOWN_WARNINGS = 20  # warnings printed on stderr; all are counted in the metrics


def prepare(params: PrepareParams, raw: Path, out_dir: Path, metrics: Path) -> dict[str, Any]:
    """Validate, split and write train/val/test; report duplicates and overlap (not fatal).

    Data warnings (``data.DataWarning``: a key repeated with the same value, a blank
    ``input``) go to stderr (the first 20) and are counted in the metrics.
    """
    warnings: list[DataWarning] = []
    entries = load_entries(raw, warnings)
    for warning in warnings[:SHOWN_WARNINGS]:
        log(f"prepare: WARNING: {warning}")
    if len(warnings) > SHOWN_WARNINGS:
        log(f"prepare: WARNING: ... and {len(warnings) - SHOWN_WARNINGS} more warnings")
    try:
        split = split_entries(
            entries,
            train_fraction=params.train_fraction,
            test_fraction=params.test_fraction,
            shuffle=params.shuffle,
            seed=params.seed,
        )
    except ValueError as err:  # e.g. too few entries for a non-empty test split
        raise DataError(f"{raw}: {err}") from err
    with atomic_dir(out_dir) as tmp:
        for name in SPLITS:
            write_entries(tmp / f"{name}.json", getattr(split, name))
    report = {
        "entries": len(entries),
        **{f"{name}_entries": len(getattr(split, name)) for name in SPLITS},
        "duplicate_pairs": len(find_duplicates(entries)),
        "test_prompts_seen_in_train": overlap(split.train, split.test),
        "val_prompts_seen_in_train": overlap(split.train, split.val),
        "warnings": len(warnings),
        **{f"warnings_{kind}": sum(w.kind == kind for w in warnings) for kind in WARNING_KINDS},
    }
    write_json(metrics, report)
    log(f"prepare: {report}")
    return report
