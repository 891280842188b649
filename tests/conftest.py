"""Shared fixtures: small checkpoints and data the tests build themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpt2_instruct.cpu import settle_vector_math

# What devices.configure does first in every CPU process (stages, CLI, benches): MKL's vector
# math on its accurate path, so results repeat from one test process to the next.
settle_vector_math()

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data set and BPE files beside the checkout; skip cleanly when absent."""
    if not (SHARED_DATA / "instruction-data.json").is_file():
        pytest.skip(f"{SHARED_DATA} not present (fresh clone without ../shared)")
    return SHARED_DATA


def gpt2_byte_chars() -> list[str]:
    """GPT-2's byte-level characters in encoder.json order.

    Printable bytes '!'..'~', '¡'..'¬', '®'..'ÿ' stand for themselves (ids 0..187);
    the other 68 bytes are chr(256 + n) in byte order (ids 188..255).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(shifted))]


@pytest.fixture(scope="session")
def write_bpe():
    """Factory: write a tiny GPT-2-format BPE (256 bytes + ``merges`` + <|endoftext|>).

    ``merges`` are pairs of GPT-2 byte-level strings ("Ċ" is the newline byte); returns
    the directory holding ``encoder.json`` and ``vocab.bpe``.
    """

    def write(directory: Path, merges: list[tuple[str, str]]) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        encoder = {ch: i for i, ch in enumerate(gpt2_byte_chars())}
        for left, right in merges:
            encoder[left + right] = len(encoder)
        encoder["<|endoftext|>"] = len(encoder)
        (directory / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
        lines = ["#version: 0.2", *(f"{left} {right}" for left, right in merges)]
        (directory / "vocab.bpe").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return directory

    return write


@pytest.fixture
def no_dns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No name resolves (as offline): the hosts asked for, in order."""
    import socket

    lookups: list[str] = []

    def fail(host: str, *args: object, **kwargs: object) -> object:
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    return lookups
