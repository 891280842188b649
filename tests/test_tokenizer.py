"""GPT-2's BPE from encoder.json + vocab.bpe: a tiny hand-made pair, then the real files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken_ext.openai_public import r50k_pat_str

from gpt2_instruct.data import PROMPT_STYLES, format_prompt, load_entries
from gpt2_instruct.safe_json import JSONError
from gpt2_instruct.tokenizer import (
    BPE_SHA256,
    ENCODER_JSON,
    ENDOFTEXT,
    VOCAB_BPE,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
)

MERGES = [("t", "h"), ("th", "e")]
TH, THE, EOT = 256, 257, 258


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, write_bpe) -> Path:
    return write_bpe(tmp_path_factory.mktemp("bpe"), MERGES)


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> Tokenizer:
    return load_tokenizer(tiny_dir)


def _byte_id(byte: int) -> int:
    """A single byte's id in GPT-2's encoder.json: printable bytes first, then the rest."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    shifted = [b for b in range(256) if b not in printable]
    return printable.index(byte) if byte in printable else len(printable) + shifted.index(byte)


# ------------------------------------------------------------------ tiny files
def test_tiny_tokenizer_loads(tiny):
    assert tiny.vocab_size == 259
    assert tiny.eot_id == EOT


def test_byte_ids_follow_encoder_json(tiny):
    assert tiny.encode("!") == [0]
    assert tiny.encode("a") == [ord("a") - ord("!")]
    assert tiny.encode("\n") == [_byte_id(10)] == [188 + 10]
    assert tiny.encode(" ") == [188 + 32]
    assert tiny.encode("é") == [_byte_id(0xC3), _byte_id(0xA9)]


def test_merges_are_applied(tiny):
    assert tiny.encode("the") == [THE]
    assert tiny.encode("th") == [TH]
    assert tiny.encode("ht") == [_byte_id(ord("h")), _byte_id(ord("t"))]
    assert tiny.encode("tthe") == [_byte_id(ord("t")), THE]
    # " the": the space is its own byte here (no "Ġ t" merge), "the" still merges
    assert tiny.encode(" the") == [_byte_id(ord(" ")), THE]
    assert tiny.decode([THE, TH]) == "theth"


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_round_trip_arbitrary_unicode(tiny, text):
    ids = tiny.encode(text)
    assert all(0 <= i < EOT for i in ids)
    assert tiny.decode(ids) == text
    assert tiny.decode_bytes(ids) == text.encode("utf-8")


def test_endoftext_in_text_is_plain_text(tiny):
    text = f"a{ENDOFTEXT}b"
    ids = tiny.encode(text)
    assert EOT not in ids
    assert len(ids) == len(text)  # one id per character: no merge applies here
    assert tiny.decode(ids) == text
    assert tiny.decode([EOT]) == ENDOFTEXT


def test_gpt2_pattern_splits_before_merging(tiny):
    # GPT-2's pre-tokenizer cuts "'th" into "'t" + "h", so the "t h" merge cannot apply
    assert tiny.encode("'th") == [_byte_id(ord("'")), _byte_id(ord("t")), _byte_id(ord("h"))]
    assert tiny.encode("'x th") == [
        _byte_id(ord("'")),
        _byte_id(ord("x")),
        _byte_id(ord(" ")),
        TH,
    ]


# --------------------------------------------------------- inconsistent files
def _copy_pair(tiny_dir: Path, target: Path) -> Path:
    target.mkdir()
    for name in (ENCODER_JSON, VOCAB_BPE):
        (target / name).write_bytes((tiny_dir / name).read_bytes())
    return target


def _edit_encoder(directory: Path, edit) -> None:
    path = directory / ENCODER_JSON
    encoder = json.loads(path.read_text(encoding="utf-8"))
    edit(encoder)
    path.write_text(json.dumps(encoder), encoding="utf-8")


def test_merge_line_disagreeing_with_encoder_json(tiny_dir, tmp_path):
    bad = _copy_pair(tiny_dir, tmp_path / "bad")
    (bad / VOCAB_BPE).write_text("#version: 0.2\nt h\nh e\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"line 3 \('h e'\) disagrees with") as info:
        load_tokenizer(bad)
    assert str(bad / VOCAB_BPE) in str(info.value)


def test_merges_in_the_wrong_order(tiny_dir, tmp_path):
    bad = _copy_pair(tiny_dir, tmp_path / "bad")
    (bad / VOCAB_BPE).write_text("#version: 0.2\nth e\nt h\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="line 2"):
        load_tokenizer(bad)


def test_merge_line_with_three_parts(tiny_dir, tmp_path):
    bad = _copy_pair(tiny_dir, tmp_path / "bad")
    (bad / VOCAB_BPE).write_text("#version: 0.2\nt h\nt h e\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="line 3"):
        load_tokenizer(bad)


def test_wrong_number_of_merges(tiny_dir, tmp_path):
    bad = _copy_pair(tiny_dir, tmp_path / "bad")
    (bad / VOCAB_BPE).write_text("#version: 0.2\nt h\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="1 merges, but") as info:
        load_tokenizer(bad)
    assert str(bad / ENCODER_JSON) in str(info.value)
    assert "has 2" in str(info.value)


def test_gap_in_ids(tiny_dir, tmp_path):
    bad = _copy_pair(tiny_dir, tmp_path / "bad")
    _edit_encoder(bad, lambda e: e.update({"the": 300}))
    with pytest.raises(TokenizerError, match="without gaps") as info:
        load_tokenizer(bad)
    assert str(bad / ENCODER_JSON) in str(info.value)


def test_duplicate_ids(tiny_dir, tmp_path):
    bad = _copy_pair(tiny_dir, tmp_path / "bad")
    _edit_encoder(bad, lambda e: e.update({"the": TH}))
    with pytest.raises(TokenizerError, match="without gaps"):
        load_tokenizer(bad)


def test_token_that_is_not_byte_level_text(tiny_dir, tmp_path):
    bad = _copy_pair(tiny_dir, tmp_path / "bad")
    _edit_encoder(bad, lambda e: e.update({"t h": e.pop("th")}))  # a raw space is not a byte char
    with pytest.raises(TokenizerError, match="not GPT-2 byte-level text"):
        load_tokenizer(bad)


def test_encoder_json_not_an_object(tiny_dir, tmp_path):
    bad = _copy_pair(tiny_dir, tmp_path / "bad")
    (bad / ENCODER_JSON).write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(TokenizerError, match="JSON object"):
        load_tokenizer(bad)


@pytest.mark.parametrize("name", [ENCODER_JSON, VOCAB_BPE])
def test_missing_file_names_the_path(tiny_dir, tmp_path, name):
    bad = _copy_pair(tiny_dir, tmp_path / "bad")
    (bad / name).unlink()
    with pytest.raises(TokenizerError, match="BPE file not found") as info:
        load_tokenizer(bad)
    assert str(bad / name) in str(info.value)


def test_encoder_json_missing_a_single_byte_is_rejected(tmp_path, write_bpe):
    bad = write_bpe(tmp_path / "bad", [("t", "h"), ("th", "e")])

    def drop_z(encoder):
        del encoder["z"]  # bytes above 'z' move down one id; "th" becomes id 255
        for token, rank in list(encoder.items()):
            if rank > ord("z") - ord("!"):
                encoder[token] = rank - 1

    _edit_encoder(bad, drop_z)
    (bad / VOCAB_BPE).write_text("#version: 0.2\nth e\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=ENCODER_JSON):
        load_tokenizer(bad)


# ------------------------------------------------------------------ real files
@pytest.fixture(scope="module")
def real_dir(shared_data) -> Path:
    directory = shared_data / "gpt2-encoding"
    if not (directory / ENCODER_JSON).is_file():
        pytest.skip(f"{directory} not present")
    return directory


@pytest.fixture(scope="module")
def real(real_dir) -> Tokenizer:
    return load_tokenizer(real_dir)


@pytest.fixture(scope="module")
def reference(real_dir, tmp_path_factory) -> tiktoken.Encoding:
    """tiktoken's own GPT-2 construction from the same files (its cache kept in tmp)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken-cache")))
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(real_dir / VOCAB_BPE),
            encoder_json_file=str(real_dir / ENCODER_JSON),
            vocab_bpe_hash=BPE_SHA256[VOCAB_BPE],
            encoder_json_hash=BPE_SHA256[ENCODER_JSON],
        )
    return tiktoken.Encoding(
        name="gpt2-reference",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256},
    )


@pytest.fixture(scope="module")
def real_texts(shared_data) -> list[str]:
    entries = load_entries(shared_data / "instruction-data.json")
    texts = []
    for entry in entries[:: max(1, len(entries) // 150)]:
        texts += [entry.instruction, entry.input, entry.output]
    return [t for t in texts if t]


def test_real_files_match_tiktokens_pins(real_dir):
    for name in (ENCODER_JSON, VOCAB_BPE):
        digest = hashlib.sha256((real_dir / name).read_bytes()).hexdigest()
        assert digest == BPE_SHA256[name], name


def test_real_vocab_and_known_ids(real):
    assert real.vocab_size == 50257
    assert real.eot_id == 50256
    assert real.encode("Hello, world!") == [15496, 11, 995, 0]
    assert real.encode(" the") == [262]
    assert real.encode("\n\n") == [628]
    assert real.decode([15496, 11, 995, 0]) == "Hello, world!"


def test_real_vocab_equals_tiktokens_construction(real, reference):
    assert real.vocab_size == reference.n_vocab
    assert real.eot_id == reference.eot_token
    for token_id in range(50256):
        assert real.encoding.decode_single_token_bytes(
            token_id
        ) == reference.decode_single_token_bytes(token_id), token_id


def test_real_encoding_equals_reference_on_the_data_set(real, reference, real_texts):
    assert len(real_texts) >= 300
    for text in real_texts:
        ids = real.encode(text)
        assert ids == reference.encode_ordinary(text), text
        assert real.decode(ids) == text


@pytest.mark.parametrize("style", PROMPT_STYLES)
def test_real_encoding_equals_reference_on_formatted_prompts(real, reference, shared_data, style):
    entries = load_entries(shared_data / "instruction-data.json")[:100]
    for entry in entries:
        text = format_prompt(entry, style) + entry.output
        assert real.encode(text) == reference.encode_ordinary(text)


def test_real_endoftext_in_text_is_plain_text(real, reference):
    text = f"Answer.{ENDOFTEXT}More"
    ids = real.encode(text)
    assert 50256 not in ids
    assert ids == reference.encode_ordinary(text)
    assert reference.encode(text, allowed_special="all") != ids  # the special reading differs


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (ENCODER_JSON, b"[" * 100_000, "nested"),
        (ENCODER_JSON, b'{"a": 1' + b"0" * 5000 + b"}", "number"),
        (ENCODER_JSON, b'{"a": 0, "a": 1}', "repeats the key 'a'"),
        (ENCODER_JSON, b'{"a": null}', "entry 'a': the id must be an integer"),
        (ENCODER_JSON, b'{"a": 1.5}', "entry 'a': the id must be an integer"),
        (ENCODER_JSON, b"\xff\xfe{}", "UTF-8"),
        (VOCAB_BPE, b"#version: 0.2\n\xff h\n", "not valid UTF-8"),
    ],
)
def test_hostile_bpe_files_fail_with_one_clear_error(tiny_dir, tmp_path, name, content, message):
    """Every malformed BPE file is one error naming the file, never a crash or a hang."""
    bad = _copy_pair(tiny_dir, tmp_path / "bad")
    (bad / name).write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        load_tokenizer(bad)
    assert str(bad / name) in str(info.value)
    assert isinstance(info.value, TokenizerError | JSONError)


# ----------------------------------------------- tiktoken's loader, on our terms
def test_vocab_bpe_without_a_final_newline_is_rejected(tiny_dir, tmp_path):
    """tiktoken's reader drops the last line unread: it would silently lose a merge."""
    bad = _copy_pair(tiny_dir, tmp_path / "bad")
    (bad / VOCAB_BPE).write_text("#version: 0.2\nt h\nth e", encoding="utf-8")
    with pytest.raises(TokenizerError, match="does not end with a newline") as info:
        load_tokenizer(bad)
    assert str(bad / VOCAB_BPE) in str(info.value)


def test_blank_merge_line_names_the_line(tiny_dir, tmp_path):
    bad = _copy_pair(tiny_dir, tmp_path / "bad")
    (bad / VOCAB_BPE).write_text("#version: 0.2\nt h\n\nth e\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"line 3 \(''\) is not a merge of two tokens"):
        load_tokenizer(bad)


def test_single_bytes_out_of_gpt2_order_are_rejected(tiny_dir, tmp_path):
    bad = _copy_pair(tiny_dir, tmp_path / "bad")
    _edit_encoder(bad, lambda e: e.update({"!": e['"'], '"': e["!"]}))  # swap ids 0 and 1
    with pytest.raises(TokenizerError, match="not the single bytes in GPT-2's order") as info:
        load_tokenizer(bad)
    assert str(bad / ENCODER_JSON) in str(info.value)


def test_tiktoken_reads_only_our_local_files_and_caches_nothing(tiny_dir, tmp_path, monkeypatch):
    """tiktoken's reader fetches anything with ``://`` and caches what it reads: neither here."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    read: list[str] = []
    real_read = tiktoken.load.read_file

    def spy(blobpath: str) -> bytes:
        read.append(blobpath)
        return real_read(blobpath)

    def no_network(*args, **kwargs):
        raise AssertionError(f"tiktoken went to the network: {args}")

    monkeypatch.setattr(tiktoken.load, "read_file", spy)
    monkeypatch.setattr("requests.get", no_network)
    tokenizer = load_tokenizer(tiny_dir)
    assert tokenizer.encode("the") == [THE]
    assert sorted(read) == sorted([str(tiny_dir / VOCAB_BPE), str(tiny_dir / ENCODER_JSON)])
    assert list(cache.iterdir()) == []  # nothing cached, so nothing stale can come back
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(cache)  # put back


def test_a_changed_file_at_the_same_path_gives_the_new_ranks(tmp_path, write_bpe):
    """With tiktoken's cache on, the second load would hand back the first file's ranks."""
    directory = write_bpe(tmp_path / "bpe", [("t", "h")])
    assert load_tokenizer(directory).encode("th") == [256]
    write_bpe(directory, [("h", "e")])
    changed = load_tokenizer(directory)
    assert changed.encode("he") == [256]
    assert changed.encode("th") == [_byte_id(ord("t")), _byte_id(ord("h"))]


def test_ranks_are_checked_even_when_tiktoken_does_not_assert(tiny_dir, monkeypatch):
    """tiktoken's own agreement check is an ``assert``, gone under ``python -O``."""

    real = tiktoken.load.data_gym_to_mergeable_bpe_ranks

    def skipped_assert(**kwargs):
        ranks = real(**kwargs)
        ranks[b"th"], ranks[b"the"] = ranks[b"the"], ranks[b"th"]  # as if the check were off
        return ranks

    monkeypatch.setattr(tiktoken.load, "data_gym_to_mergeable_bpe_ranks", skipped_assert)
    with pytest.raises(TokenizerError, match="ranks from it differ from") as info:
        load_tokenizer(tiny_dir)
    assert str(tiny_dir / ENCODER_JSON) in str(info.value)


def test_real_ranks_equal_encoder_json_ids(real_dir, real):
    """tiktoken's construction from vocab.bpe gives every token encoder.json's own id."""
    order = _gpt2_bytes_in_order()  # printable bytes stand for themselves, the rest shift
    chars = {chr(b): b for b in order[:188]} | {chr(256 + i): b for i, b in enumerate(order[188:])}
    encoder = json.loads((real_dir / ENCODER_JSON).read_text(encoding="utf-8"))
    encoder.pop(ENDOFTEXT)
    assert len(encoder) == 50256
    for token, token_id in encoder.items():
        expected = bytes(chars[ch] for ch in token)
        assert real.encoding.decode_single_token_bytes(token_id) == expected, token_id


def _gpt2_bytes_in_order() -> list[int]:
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    return printable + [b for b in range(256) if b not in printable]
