"""Tests for gpt2_instruct.io: atomic writes, their file modes, stale temporaries."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpt2_instruct import stages
from gpt2_instruct.download import fetch
from gpt2_instruct.io import (
    atomic_dir,
    atomic_open,
    atomic_path,
    is_temp_name,
    remove_stale_temps,
    write_json,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o002, 0o077], ids=["umask022", "umask002", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test under a umask, restoring the previous one afterwards."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


# --- file modes ----------------------------------------------------------------------


def test_atomic_files_honour_the_umask(tmp_path: Path, umask: int) -> None:
    with atomic_path(tmp_path / "a.bin") as tmp:
        tmp.write_bytes(b"x")
    with atomic_open(tmp_path / "b.txt") as handle:
        handle.write("x")
    write_json(tmp_path / "c.json", {"x": 1})
    for name in ("a.bin", "b.txt", "c.json"):
        assert mode(tmp_path / name) == 0o666 & ~umask, name


def test_atomic_dirs_honour_the_umask_new_and_replaced(tmp_path: Path, umask: int) -> None:
    dest = tmp_path / "out"
    for round_ in range(2):  # a new directory, then one replacing it
        with atomic_dir(dest) as tmp:
            (tmp / "plain.txt").write_text(str(round_))
            with atomic_path(tmp / "inner.bin") as inner:
                inner.write_bytes(b"y")
        assert mode(dest) == 0o777 & ~umask
        assert mode(dest / "plain.txt") == 0o666 & ~umask
        assert mode(dest / "inner.bin") == 0o666 & ~umask
        assert (dest / "plain.txt").read_text() == str(round_)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp, no backup


def test_outputs_honour_the_umask_whatever_the_writer_did(tmp_path: Path, umask: int) -> None:
    """Writers that swap in a private file (safetensors: 0600 + rename) do not set the mode."""

    def private_write(path: Path, data: bytes) -> None:
        other = path.with_name(path.name + ".private")
        fd = os.open(other, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.close(fd)
        os.replace(other, path)

    with atomic_path(tmp_path / "w.safetensors") as tmp:
        private_write(tmp, b"w")
    assert mode(tmp_path / "w.safetensors") == 0o666 & ~umask
    with atomic_dir(tmp_path / "model") as tmp:
        private_write(tmp / "a.bin", b"a")
        (tmp / "sub").mkdir(mode=0o700)
        private_write(tmp / "sub" / "b.bin", b"b")
    assert mode(tmp_path / "model") == 0o777 & ~umask
    assert mode(tmp_path / "model" / "sub") == 0o777 & ~umask
    for name in ("a.bin", "sub/b.bin"):
        assert mode(tmp_path / "model" / name) == 0o666 & ~umask, name


def test_saved_weights_honour_the_umask(tmp_path: Path, umask: int) -> None:
    from gpt2_instruct.model import GPTConfig, GPTModel
    from gpt2_instruct.weights import save_model

    model = GPTModel(GPTConfig(vocab_size=16, context_length=8, n_embd=8, n_layer=1, n_head=2))
    with atomic_dir(tmp_path / "base") as tmp:
        save_model(model, tmp)
    for path in (tmp_path / "base", *(tmp_path / "base").iterdir()):
        expected = 0o777 if path.is_dir() else 0o666
        assert mode(path) == expected & ~umask, path.name


def test_a_fetched_file_honours_the_umask(tmp_path: Path, umask: int) -> None:
    src = tmp_path / "src.json"
    src.write_bytes(b"[]")
    src.chmod(0o600)  # the source's own mode is not copied
    out = fetch(str(src), tmp_path / "out" / "copy.json")
    assert mode(out) == 0o666 & ~umask


# --- stale temporaries ---------------------------------------------------------------


def test_temp_names_are_recognisable(tmp_path: Path) -> None:
    seen: list[str] = []
    with atomic_path(tmp_path / "w.json") as tmp:
        seen.append(tmp.name)
    with atomic_dir(tmp_path / "d") as tmp:
        seen.append(tmp.name)
    assert is_temp_name(seen[0], "w.json") and is_temp_name(seen[0])
    assert is_temp_name(seen[1], "d") and not is_temp_name(seen[1], "w.json")
    assert not is_temp_name("w.json") and not is_temp_name("w.json.tmp")
    assert not is_temp_name(".w.json.abc.tmp")  # not our token length


def test_failures_leave_no_temporaries(tmp_path: Path) -> None:
    dest, dest_dir = tmp_path / "f.bin", tmp_path / "d"
    dest.write_bytes(b"old")
    dest_dir.mkdir()
    (dest_dir / "keep").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_bytes(b"new")
        raise RuntimeError
    with pytest.raises(RuntimeError), atomic_dir(dest_dir) as tmp:
        (tmp / "x").write_text("new")
        raise RuntimeError
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in dest_dir.iterdir()) == ["keep"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.bin"]


def test_remove_stale_temps_removes_only_the_outputs_own(tmp_path: Path) -> None:
    out_file, out_dir = tmp_path / "data.json", tmp_path / "model"
    out_dir.mkdir()
    (out_dir / "weights.bin").write_bytes(b"w")
    stale = [
        tmp_path / ".data.json.k2j_9xq0.tmp",  # a killed atomic_path
        tmp_path / ".model.abcdefgh.tmp",  # a killed atomic_dir (a directory)
        tmp_path / ".model.old",  # the backup of an older atomic_dir
        out_dir / ".checkpoint.pt.zz00zz00.tmp",  # written in place inside an output dir
    ]
    kept = [
        tmp_path / ".other.json.abcdefgh.tmp",  # another output's: not this stage's business
        tmp_path / "data.json.tmp",  # not ours: no leading dot
        tmp_path / ".data.json.abc.tmp",  # not ours: wrong token
        out_dir / "notes.tmp",
    ]
    for path in stale[:1] + stale[3:] + kept:
        path.write_bytes(b"partial")
    for path in stale[1:3]:
        path.mkdir()
        (path / "inner").write_bytes(b"partial")
    target = tmp_path / "target.txt"
    target.write_text("not a temp")
    link = tmp_path / ".data.json.linklink.tmp"
    link.symlink_to(target)
    stale.append(link)

    removed = remove_stale_temps(out_file, out_dir, tmp_path / "missing" / "x.json")

    assert sorted(removed) == sorted(stale)
    assert not any(os.path.lexists(p) for p in stale)
    assert all(p.exists() for p in kept)
    assert target.read_text() == "not a temp"  # a link is removed, never followed
    assert (out_dir / "weights.bin").read_bytes() == b"w"
    assert remove_stale_temps(out_file, out_dir) == []


def test_run_stage_removes_stale_temps_beside_its_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    out = tmp_path / "data" / "out.json"
    out.parent.mkdir()
    stale = out.parent / ".out.json.a1b2c3d4.tmp"
    stale.write_bytes(b"partial")
    seen: list[bool] = []
    stages.run_stage(
        "test",
        {"out": str(out)},
        lambda p, a: seen.append(stale.exists()),
        ["--params", str(params)],
    )
    assert seen == [False]  # gone before the body ran
    assert str(stale) in capsys.readouterr().err
