"""GPT-2's byte-level BPE through tiktoken, built from ``encoder.json`` + ``vocab.bpe``.

tiktoken's own ``get_encoding("gpt2")`` downloads these files at run time; we
build the same ``Encoding`` from files the pipeline fetched (and pinned), so
tokenizing works offline and is a tracked dependency of the stages. The ranks are
tiktoken's own construction (``tiktoken.load.data_gym_to_mergeable_bpe_ranks``), run on
files we have checked first (size, strict UTF-8, shape), so a bad file is one
:class:`TokenizerError` naming it rather than tiktoken's bare assert or KeyError.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import tiktoken
import tiktoken.load
from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PATTERN  # GPT-2's split regex

from gpt2_instruct.safe_json import read_json

ENDOFTEXT = "<|endoftext|>"
MAX_MERGES_BYTES = 8 * 1024 * 1024  # GPT-2's vocab.bpe is 456,318 bytes
MAX_ENCODER_BYTES = 16 * 1024 * 1024  # GPT-2's encoder.json is 1,042,301 bytes
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


def _read_merges(merges_path: Path, byte_decoder: dict[str, int]) -> list[tuple[str, bytes]]:
    """``vocab.bpe``'s merges: each line and the bytes it makes, checked line by line.

    Size-capped and strict UTF-8; the first line is a version. Every other line must be
    two GPT-2 byte-level tokens, and the file must end with a newline: tiktoken's reader
    drops the last line unread, so without one it would silently lose a merge.
    """
    with merges_path.open("rb") as handle:
        data = handle.read(MAX_MERGES_BYTES + 1)
    if len(data) > MAX_MERGES_BYTES:
        raise TokenizerError(f"{merges_path}: larger than {MAX_MERGES_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TokenizerError(f"{merges_path}: not valid UTF-8 ({err.reason})") from None
    if not text.endswith("\n"):
        raise TokenizerError(f"{merges_path}: does not end with a newline (a truncated file?)")
    merges = []
    for line_no, line in enumerate(text.split("\n")[1:-1], start=2):
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(
                f"{merges_path}: line {line_no} ({line!r}) is not a merge of two tokens"
            )
        token = b"".join(_to_bytes(part, merges_path, byte_decoder) for part in parts)
        merges.append((line, token))
    return merges


def _to_bytes(token: str, source: Path, byte_decoder: dict[str, int]) -> bytes:
    try:
        return bytes(byte_decoder[ch] for ch in token)
    except KeyError as err:
        raise TokenizerError(f"{source}: token {token!r} is not GPT-2 byte-level text") from err


def _encoder_ranks(encoder_path: Path, byte_decoder: dict[str, int]) -> dict[bytes, int]:
    """Token bytes -> id from ``encoder.json`` (without ``<|endoftext|>``), checked.

    Bounded and strict (``read_json``: size, depth, UTF-8, no repeated key); the ids must
    be integers 0..n-1 without gaps, ids 0..255 the 256 single bytes.
    """
    encoder = read_json(encoder_path, max_bytes=MAX_ENCODER_BYTES, duplicates="error")
    if not isinstance(encoder, dict):
        raise TokenizerError(f"{encoder_path}: expected a JSON object of token -> id")
    encoder.pop(ENDOFTEXT, None)
    bad = next((t for t, i in encoder.items() if type(i) is not int), None)
    if bad is not None:
        raise TokenizerError(f"{encoder_path}: entry {bad!r}: the id must be an integer")
    ranks = {_to_bytes(token, encoder_path, byte_decoder): rank for token, rank in encoder.items()}
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{encoder_path}: token ids are not 0..{len(ranks) - 1} without gaps")
    single_bytes = sorted(token for token, rank in ranks.items() if rank < 256)
    if single_bytes != [bytes([b]) for b in range(256)]:
        raise TokenizerError(f"{encoder_path}: ids 0..255 must be the 256 single bytes")
    return ranks


_TIKTOKEN_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _tiktoken_cache_off() -> Iterator[None]:
    """Stop tiktoken's reader from caching what it reads (``TIKTOKEN_CACHE_DIR=""``).

    It otherwise copies every file into $TIKTOKEN_CACHE_DIR (or the temp dir's
    data-gym-cache), keyed by the path's name, and without a hash hands back that copy
    the next time: a changed file at the same path would give the old ranks. The
    variable is its only switch, so it is set for the call and put back after.
    """
    with _TIKTOKEN_ENV_LOCK:
        saved = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = ""
        try:
            yield
        finally:
            if saved is None:
                del os.environ["TIKTOKEN_CACHE_DIR"]
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = saved


def _mismatch(
    encoder_path: Path,
    merges_path: Path,
    encoder: dict[bytes, int],
    merges: list[tuple[str, bytes]],
) -> TokenizerError:
    """Say where ``encoder.json`` and ``vocab.bpe`` disagree (they do: tiktoken said so)."""
    if len(merges) != len(encoder) - 256:
        return TokenizerError(
            f"{merges_path}: {len(merges)} merges, but {encoder_path} has {len(encoder) - 256}"
        )
    gpt2_order = _gpt2_byte_decoder().values()  # tiktoken ranks single bytes in this order
    for rank, byte in enumerate(gpt2_order):
        if encoder[bytes([byte])] != rank:
            return TokenizerError(
                f"{encoder_path}: ids 0..255 are not the single bytes in GPT-2's order "
                f"(byte {byte} has id {encoder[bytes([byte])]}, not {rank})"
            )
    for line_no, (line, token) in enumerate(merges, start=2):
        if encoder.get(token) != 256 + line_no - 2:
            return TokenizerError(
                f"{merges_path}: line {line_no} ({line!r}) disagrees with {encoder_path}"
            )
    return TokenizerError(f"{merges_path}: tiktoken's ranks from it differ from {encoder_path}")


def _mergeable_ranks(encoding_dir: Path) -> dict[bytes, int]:
    """Token bytes -> rank: tiktoken's construction, on files checked beforehand.

    In GPT-2 a token's id is its merge rank: tiktoken builds the ranks from ``vocab.bpe``
    and requires ``encoder.json`` to hold the same ids. The checks before it name the file
    and line at fault; the comparison after it holds under ``python -O`` too (tiktoken's
    own is an ``assert``). tiktoken only opens the two paths (a name with ``://`` would be
    fetched, but a ``Path`` never contains one: it folds ``//``), its cache switched off.
    """
    encoder_path, merges_path = encoding_dir / ENCODER_JSON, encoding_dir / VOCAB_BPE
    byte_decoder = _gpt2_byte_decoder()
    encoder = _encoder_ranks(encoder_path, byte_decoder)
    merges = _read_merges(merges_path, byte_decoder)
    if len(merges) != len(encoder) - 256:
        raise _mismatch(encoder_path, merges_path, encoder, merges)
    try:
        with _tiktoken_cache_off():
            ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
                vocab_bpe_file=os.fspath(merges_path), encoder_json_file=os.fspath(encoder_path)
            )
    except AssertionError:  # tiktoken's check that the two files agree
        raise _mismatch(encoder_path, merges_path, encoder, merges) from None
    except (KeyError, ValueError) as err:  # a file changed since the checks above
        problem = f"tiktoken cannot read the BPE files ({err!r})"
        raise TokenizerError(f"{encoding_dir}: {problem}") from err
    if ranks != encoder:
        raise _mismatch(encoder_path, merges_path, encoder, merges)
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
