"""Shared fixtures: small checkpoints and data the tests build themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data set and BPE files beside the checkout; skip cleanly when absent."""
    if not (SHARED_DATA / "instruction-data.json").is_file():
        pytest.skip(f"{SHARED_DATA} not present (fresh clone without ../shared)")
    return SHARED_DATA
