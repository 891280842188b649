"""GPT-2's byte-level BPE through tiktoken, built from ``encoder.json`` + ``vocab.bpe``.

tiktoken's own ``get_encoding("gpt2")`` downloads these files at run time; we
build the same ``Encoding`` from files the pipeline fetched (and pinned), so
tokenizing works offline and is a tracked dependency of the stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PATTERN  # GPT-2's split regex

from gpt2_instruct.safe_json import read_json

ENDOFTEXT = "<|endoftext|>"
MAX_MERGES_BYTES = 8 * 1024 * 1024  # GPT-2's vocab.bpe is 456,318 bytes
ENCODER_JSON = "encoder.json"
VOCAB_BPE = "vocab.bpe"
# tiktoken's pins for OpenAI's published GPT-2 encoding files.
BPE_SHA256 = {
    ENCODER_JSON: "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    VOCAB_BPE: "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"


@dataclass(frozen=True)
class Tokenizer:
    """A tiktoken encoding plus the id of ``<|endoftext|>`` (GPT-2's EOS and pad)."""

    encoding: tiktoken.Encoding

    @property
    def eot_id(self) -> int:
        return self.encoding.eot_token

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        """Encode text; ``<|endoftext|>`` inside the text is plain text, not the EOS token.

        Data sets are untrusted: a literal ``<|endoftext|>`` in an answer must not
        end the example early, so special tokens are never parsed from text.
        """
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.encoding.decode_bytes(ids)


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2 writes each byte as a printable character; map those characters back.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted
    to code points 256 and up, in byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1),
        *range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1),
    ]
    decoder = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in decoder.values())
    for offset, byte in enumerate(shifted):
        decoder[chr(256 + offset)] = byte
    return decoder


class TokenizerError(ValueError):
    """BPE files that are missing, malformed or disagree with each other."""


def _read_merges(merges_path: Path) -> list[str]:
    """``vocab.bpe``'s merge lines (the first line is a version), size-capped and strict UTF-8."""
    with merges_path.open("rb") as handle:
        data = handle.read(MAX_MERGES_BYTES + 1)
    if len(data) > MAX_MERGES_BYTES:
        raise TokenizerError(f"{merges_path}: larger than {MAX_MERGES_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TokenizerError(f"{merges_path}: not valid UTF-8 ({err.reason})") from None
    return [line for line in text.split("\n")[1:] if line]


def _mergeable_ranks(encoding_dir: Path) -> dict[bytes, int]:
    """Token bytes -> rank from ``encoder.json``, checked against the merges in ``vocab.bpe``.

    In GPT-2 a token's id is its merge rank, so ``encoder.json`` alone gives the
    ranks; ``vocab.bpe`` must list exactly the merges that build ids 256 and up.
    """
    encoder_path, merges_path = encoding_dir / ENCODER_JSON, encoding_dir / VOCAB_BPE
    byte_decoder = _gpt2_byte_decoder()

    def to_bytes(token: str, source: Path) -> bytes:
        try:
            return bytes(byte_decoder[ch] for ch in token)
        except KeyError as err:
            raise TokenizerError(f"{source}: token {token!r} is not GPT-2 byte-level text") from err

    encoder = read_json(encoder_path, duplicates="error")
    if not isinstance(encoder, dict):
        raise TokenizerError(f"{encoder_path}: expected a JSON object of token -> id")
    encoder.pop(ENDOFTEXT, None)
    bad = next((t for t, i in encoder.items() if type(i) is not int), None)
    if bad is not None:
        raise TokenizerError(f"{encoder_path}: entry {bad!r}: the id must be an integer")
    ranks = {to_bytes(token, encoder_path): rank for token, rank in encoder.items()}
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{encoder_path}: token ids are not 0..{len(ranks) - 1} without gaps")
    single_bytes = sorted(token for token, rank in ranks.items() if rank < 256)
    if single_bytes != [bytes([b]) for b in range(256)]:
        raise TokenizerError(f"{encoder_path}: ids 0..255 must be the 256 single bytes")

    merges = _read_merges(merges_path)
    if len(merges) != len(ranks) - 256:
        raise TokenizerError(
            f"{merges_path}: {len(merges)} merges, but {encoder_path} has {len(ranks) - 256}"
        )
    for line_no, line in enumerate(merges, start=2):
        parts = line.split()
        merged = b"".join(to_bytes(p, merges_path) for p in parts)
        if len(parts) != 2 or ranks.get(merged) != 256 + line_no - 2:
            raise TokenizerError(
                f"{merges_path}: line {line_no} ({line!r}) disagrees with {encoder_path}"
            )
    return ranks


def load_tokenizer(encoding_dir: str | Path) -> Tokenizer:
    """Build GPT-2's tokenizer from ``encoder.json`` and ``vocab.bpe`` in ``encoding_dir``.

    ``<|endoftext|>`` gets the id right after the mergeable ranks (50256 for GPT-2).
    """
    encoding_dir = Path(encoding_dir)
    for name in (ENCODER_JSON, VOCAB_BPE):
        if not (encoding_dir / name).is_file():
            raise TokenizerError(f"{encoding_dir / name}: BPE file not found")
    ranks = _mergeable_ranks(encoding_dir)
    encoding = tiktoken.Encoding(
        name="gpt2-local",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: len(ranks)},
    )
    return Tokenizer(encoding)
