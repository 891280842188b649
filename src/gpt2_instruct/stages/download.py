"""Stage download: the raw data set, from a URL, a file:// URL or a local path."""

from __future__ import annotations

from pathlib import Path

from gpt2_instruct.download import fetch
from gpt2_instruct.params import DownloadParams
from gpt2_instruct.stages import log


def download(params: DownloadParams, out: Path) -> None:
    """Fetch the data set to ``out`` (checked against ``sha256`` when pinned, retried)."""
    fetch(
        params.url,
        out,
        sha256=params.sha256,
        timeout=params.timeout,
        retries=params.retries,
        progress=True,
    )
    log(f"download: {params.url} -> {out} ({out.stat().st_size:,} bytes)")
