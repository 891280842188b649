"""fetch_gpt2's hub source through huggingface_hub, against a Hub on 127.0.0.1.

The server answers what ``hf_hub_download`` asks: HEAD and GET of
``/{repo}/resolve/{revision}/{file}`` with the headers huggingface_hub reads
(``X-Repo-Commit``, ``ETag``, ``Content-Length``) and the Hub's error codes
(``X-Error-Code``). The checkpoints are tiny GPT-2s written by transformers'
``save_pretrained``; the GPT-2 shape the stage checks is shrunk to theirs.
Every test has its own Hugging Face home (``HF_HOME``), set at run time: the stage
reads the environment when it runs, not when huggingface_hub was imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from gpt2_instruct.download import DownloadError
from gpt2_instruct.model import GPT2_CONFIGS, GPTConfig
from gpt2_instruct.params import FetchParams, ParamsError, load_params
from gpt2_instruct.stages import fetch_gpt2 as stage
from gpt2_instruct.tokenizer import ENCODER_JSON, VOCAB_BPE
from gpt2_instruct.weights import CONFIG_NAME, WEIGHTS_NAME, WeightsError, load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO = "openai-community/gpt2"
COMMIT_A = "a" * 40  # what "main" points at
COMMIT_B = "b" * 40  # an older commit with other weights, tagged "v1"
VOCAB = 260  # the tiny BPE below has 259 tokens
TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}
HF_VARS = (
    "HF_ENDPOINT",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN",
)


def _checkpoint(directory: Path, seed: int, **shape: int) -> dict[str, bytes]:
    """A tiny GPT-2 as transformers saves it: config.json + model.safetensors."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, **{**TINY, **shape}
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(directory, safe_serialization=True)
    return {name: (directory / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "a": _checkpoint(root / "a", seed=1),
        "b": _checkpoint(root / "b", seed=2),
        "wrong": _checkpoint(root / "wrong", seed=3, n_layer=1),
    }


@dataclass
class HubRepo:
    """A repository: refs (branch or tag -> commit) and each commit's files."""

    refs: dict[str, str]
    commits: dict[str, dict[str, bytes]]
    gated: bool = False


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None


@dataclass
class Hub:
    """A Hugging Face Hub on 127.0.0.1 that records every request it gets."""

    repos: dict[str, HubRepo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    token: str | None = None  # when set, requests without it get 401
    commit_header: bool = True  # False: a plain web server, not a Hub
    trickle: bool = False  # GET bodies at a few bytes a second
    stopping: threading.Event = field(default_factory=threading.Event)
    url: str = ""

    def gets(self, name: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.path.endswith(f"/{name}")]


def _etag(name: str, body: bytes) -> str:
    """The Hub's: the sha256 of an LFS file (the weights), the git blob sha1 of the others."""
    if name.endswith(".safetensors"):
        return hashlib.sha256(body).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _error(self, status: int, code: str | None, commit: str | None = None) -> None:
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _answer(self, body: bool) -> None:
            auth = self.headers.get("Authorization")
            hub.requests.append(Request(self.command, self.path, auth))
            match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", unquote(self.path))
            if match is None:
                return self._error(404, None)
            repo_id, revision, name = match.groups()
            if hub.token is not None and auth != f"Bearer {hub.token}":
                return self._error(401, None)
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound")
            if repo.gated:
                return self._error(403, "GatedRepo")
            commit = repo.refs.get(revision, revision)
            if commit not in repo.commits:
                return self._error(404, "RevisionNotFound")
            content = repo.commits[commit].get(name)
            if content is None:
                return self._error(404, "EntryNotFound", commit)
            self.send_response(200)
            if hub.commit_header:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{_etag(name, content)}"')
            self.send_header("Content-Length", str(len(content)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if not body:
                return None
            if not hub.trickle:
                self.wfile.write(content)
                return None
            for start in range(0, len(content), 16):
                if hub.stopping.wait(0.1):
                    break
                self.wfile.write(content[start : start + 16])
                self.wfile.flush()
            return None

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face home of this test's own, no token, online; no proxy for 127.0.0.1."""
    for var in HF_VARS:
        monkeypatch.delenv(var, raising=False)
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    return home


@pytest.fixture
def hub(checkpoints: dict[str, dict[str, bytes]], hf_env: Path) -> Iterator[Hub]:
    state = Hub()
    state.repos[REPO] = HubRepo(
        refs={"main": COMMIT_A, "v1": COMMIT_B},
        commits={COMMIT_A: checkpoints["a"], COMMIT_B: checkpoints["b"]},
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.stopping.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def bpe(tmp_path: Path, write_bpe, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny BPE on disk, pinned in place of GPT-2's; the GPT-2 shape shrunk to TINY's."""
    directory = write_bpe(tmp_path / "bpe", [("Ġ", "t"), ("h", "e")])
    pins = {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
        for name in (ENCODER_JSON, VOCAB_BPE)
    }
    monkeypatch.setattr(stage, "BPE_SHA256", pins)
    tiny = GPTConfig(
        vocab_size=VOCAB,
        context_length=TINY["n_positions"],
        n_embd=TINY["n_embd"],
        n_layer=TINY["n_layer"],
        n_head=TINY["n_head"],
    )
    monkeypatch.setitem(GPT2_CONFIGS, "gpt2", tiny)
    return directory


def _params(bpe: Path, **overrides: object) -> FetchParams:
    values: dict[str, object] = {"source": "hub", "model": "gpt2", "bpe_source": str(bpe)}
    return FetchParams(**{**values, **overrides})


def _run(params: FetchParams, out: Path) -> dict:
    stage.fetch_gpt2(params, out / "encoding", out / "base")
    return json.loads((out / "base" / stage.SOURCE_NAME).read_text(encoding="utf-8"))


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- downloads, the cache, what is recorded ---------------------------------------------------


def test_the_download_records_the_commit_and_each_files_sha256(
    hub: Hub, bpe: Path, checkpoints: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = _run(_params(bpe, hub_url=hub.url), tmp_path / "out")
    served = checkpoints["a"]
    assert record["repo_id"] == REPO and record["commit"] == COMMIT_A
    base = tmp_path / "out" / "base"
    for name, content in served.items():
        assert (base / name).read_bytes() == content
        assert record["files"][name] == {
            "sha256": hashlib.sha256(content).hexdigest(),
            "size": len(content),
        }
    assert sorted(p.name for p in base.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, "source.json"]
    assert load_model(base).config.n_layer == TINY["n_layer"]
    err = capsys.readouterr().err
    assert f"commit {COMMIT_A}" in err and f"-S fetch_gpt2.revision={COMMIT_A}" in err
    assert hashlib.sha256(served[WEIGHTS_NAME]).hexdigest() in err
    assert len(hub.gets(WEIGHTS_NAME)) == 1 and len(hub.gets(CONFIG_NAME)) == 1


def test_hf_token_is_sent_as_a_bearer_token(
    hub: Hub, bpe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.token = "hf_test_secret"
    with pytest.raises(DownloadError, match="HTTP 401") as info:
        _run(_params(bpe, hub_url=hub.url), tmp_path / "no-token")
    assert "HF_TOKEN" in str(info.value) and "\n" not in str(info.value)
    hub.requests.clear()
    monkeypatch.setenv("HF_TOKEN", hub.token)
    _run(_params(bpe, hub_url=hub.url), tmp_path / "out")
    assert hub.requests and {r.authorization for r in hub.requests} == {"Bearer hf_test_secret"}
    assert {r.method for r in hub.requests} == {"HEAD", "GET"}


def test_a_second_fetch_with_the_same_cache_downloads_nothing(
    hub: Hub, bpe: Path, checkpoints: dict, tmp_path: Path, hf_env: Path
) -> None:
    first = _run(_params(bpe, hub_url=hub.url), tmp_path / "one")
    assert len(hub.gets(WEIGHTS_NAME)) == 1
    assert (hf_env / "hub" / "models--openai-community--gpt2").is_dir()  # HF_HOME's cache
    hub.requests.clear()
    second = _run(_params(bpe, hub_url=hub.url), tmp_path / "two")
    assert second == first
    assert [r.method for r in hub.requests if r.method == "GET"] == []
    assert (tmp_path / "two/base" / WEIGHTS_NAME).read_bytes() == checkpoints["a"][WEIGHTS_NAME]


def test_offline_with_a_filled_cache_makes_no_request(
    hub: Hub, bpe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    online = _run(_params(bpe, hub_url=hub.url), tmp_path / "online")
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = _run(_params(bpe, hub_url=hub.url), tmp_path / "offline")
    assert hub.requests == []
    assert offline == online


def test_offline_with_an_empty_cache_is_one_clear_line(
    hub: Hub, bpe: Path, tmp_path: Path, hf_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    with pytest.raises(DownloadError) as info:
        _run(_params(bpe, hub_url=hub.url), out)
    message = str(info.value)
    assert "\n" not in message and hub.requests == []
    assert f"{REPO}@main config.json is not in the Hugging Face cache {hf_env / 'hub'}" in message
    assert "HF_HUB_OFFLINE" in message and "-S fetch_gpt2.source=local" in message
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []


@pytest.mark.parametrize(("revision", "commit"), [(COMMIT_B, COMMIT_B), ("v1", COMMIT_B)])
def test_a_pinned_revision_is_what_is_requested_and_recorded(
    hub: Hub, bpe: Path, checkpoints: dict, tmp_path: Path, revision: str, commit: str
) -> None:
    record = _run(_params(bpe, hub_url=hub.url, revision=revision), tmp_path / "out")
    assert record["commit"] == commit
    weights = checkpoints["b"][WEIGHTS_NAME]
    assert record["files"][WEIGHTS_NAME]["sha256"] == hashlib.sha256(weights).hexdigest()
    paths = {r.path for r in hub.requests}
    assert paths == {f"/{REPO}/resolve/{revision}/{name}" for name in (CONFIG_NAME, WEIGHTS_NAME)}


def test_a_pinned_commit_in_the_cache_needs_no_request_even_online(
    hub: Hub, bpe: Path, tmp_path: Path
) -> None:
    first = _run(_params(bpe, hub_url=hub.url, revision=COMMIT_B), tmp_path / "one")
    hub.requests.clear()
    second = _run(_params(bpe, hub_url=hub.url, revision=COMMIT_B), tmp_path / "two")
    assert hub.requests == [] and second == first
    main = _run(_params(bpe, hub_url=hub.url), tmp_path / "main")  # a branch is asked for
    assert main["commit"] == COMMIT_A and len(hub.gets(WEIGHTS_NAME)) == 1


# --- the endpoint: hub_url, HF_ENDPOINT -----------------------------------------------------


def test_hf_endpoint_is_used_while_hub_url_is_null(
    hub: Hub, bpe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert FetchParams().hub_url is None  # the default lets HF_ENDPOINT work
    monkeypatch.setenv("HF_ENDPOINT", hub.url + "/")
    record = _run(_params(bpe), tmp_path / "out")
    assert record["commit"] == COMMIT_A and len(hub.gets(WEIGHTS_NAME)) == 1


def test_hub_url_overrides_hf_endpoint(
    hub: Hub, bpe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    record = _run(_params(bpe, hub_url=hub.url), tmp_path / "out")
    assert record["commit"] == COMMIT_A


def test_a_web_server_that_is_not_a_hub_says_so(hub: Hub, bpe: Path, tmp_path: Path) -> None:
    hub.commit_header = False
    with pytest.raises(DownloadError, match="no X-Repo-Commit header") as info:
        _run(_params(bpe, hub_url=hub.url), tmp_path / "out")
    assert "source=local" in str(info.value) and hub.gets(WEIGHTS_NAME) == []


@pytest.mark.parametrize(
    ("setup", "overrides", "expected"),
    [
        ("none", {"model": "gpt2-large"}, "no repository openai-community/gpt2-large on"),
        ("none", {"revision": "v9"}, "has no revision 'v9' on"),
        ("no-weights", {}, "no such file in openai-community/gpt2 on"),
        ("gated", {}, "is gated (HTTP 403)"),
    ],
)
def test_hub_errors_are_one_clear_line(
    hub: Hub, bpe: Path, tmp_path: Path, setup: str, overrides: dict, expected: str
) -> None:
    repo = hub.repos[REPO]
    if setup == "no-weights":
        repo.commits[COMMIT_A] = {CONFIG_NAME: repo.commits[COMMIT_A][CONFIG_NAME]}
    repo.gated = setup == "gated"
    out = tmp_path / "out"
    with pytest.raises(DownloadError) as info:
        _run(_params(bpe, hub_url=hub.url, **overrides), out)
    message = str(info.value)
    assert expected in message and hub.url in message, message
    assert "\n" not in message and len(message) < 400, message
    assert not out.exists() or list(out.iterdir()) == []


# --- no network -------------------------------------------------------------------------------


def test_an_unreachable_hub_fails_fast_in_one_line(bpe: Path, tmp_path: Path, hf_env: Path) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(DownloadError) as info:
        _run(_params(bpe, hub_url=endpoint), tmp_path / "out")
    assert time.monotonic() - started < 3  # huggingface_hub alone retries for ~20 s
    message = str(info.value)
    assert message == (
        f"{endpoint}/{REPO}/resolve/main/{CONFIG_NAME}: cannot reach 127.0.0.1: "
        f"connection refused (not retried), and {REPO}@main {CONFIG_NAME} is not in the "
        f"Hugging Face cache {hf_env / 'hub'}. No network? {stage.HUB_OFFLINE_HINT}"
    )
    assert "-S fetch_gpt2.source=local -S fetch_gpt2.local_dir=" in message
    assert "HF_HUB_OFFLINE=1" in message


def test_a_hub_name_that_does_not_resolve_fails_fast(
    bpe: Path, tmp_path: Path, hf_env: Path, monkeypatch: pytest.MonkeyPatch, no_dns: list[str]
) -> None:
    lookups = no_dns
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"cannot reach hub\.example\.org: name not resolved"):
        _run(_params(bpe, hub_url="https://hub.example.org"), tmp_path / "out")
    assert time.monotonic() - started < 3
    assert set(lookups) == {"hub.example.org"} and len(lookups) <= 2  # not retried


def test_an_unreachable_hub_still_serves_the_cache(
    hub: Hub, bpe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    online = _run(_params(bpe, hub_url=hub.url), tmp_path / "online")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    offline = _run(_params(bpe, hub_url=endpoint), tmp_path / "offline")
    assert time.monotonic() - started < 3
    assert offline == online
    assert "trying the Hugging Face cache" in capsys.readouterr().err


def test_an_unreachable_bpe_source_fails_fast_naming_its_param(
    hub: Hub, bpe: Path, tmp_path: Path
) -> None:
    source = f"http://127.0.0.1:{_closed_port()}/gpt-2/encodings/main"
    started = time.monotonic()
    with pytest.raises(DownloadError) as info:
        _run(_params(bpe, hub_url=hub.url, bpe_source=source, retries=5), tmp_path / "out")
    assert time.monotonic() - started < 3
    assert str(info.value) == (
        f"{source}/{ENCODER_JSON}: cannot reach 127.0.0.1: connection refused (not retried). "
        f"No network? {stage.BPE_OFFLINE_HINT}"
    )
    assert hub.requests == []


def test_the_stage_script_reads_the_environment_and_fails_in_one_line(
    tmp_path: Path, hf_env: Path
) -> None:
    """As DVC runs it: a fresh process, HF_ENDPOINT from its environment, exit 1, one line."""
    real_bpe = REPO_ROOT.parent / "shared" / "data" / "gpt2-encoding"
    if not (real_bpe / ENCODER_JSON).is_file():
        pytest.skip(f"{real_bpe} not present (the stage pins GPT-2's real BPE files)")
    params = tmp_path / "params.yaml"
    params.write_text(f"fetch_gpt2:\n  model: gpt2\n  bpe_source: {real_bpe}\n", encoding="utf-8")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    env = {**os.environ, "HF_ENDPOINT": endpoint, "PYTHONPATH": str(REPO_ROOT / "src")}
    out = tmp_path / "out"
    started = time.monotonic()
    proc = subprocess.run(
        [
            *(sys.executable, str(REPO_ROOT / "stages" / "fetch_gpt2.py")),
            *("--params", str(params), "--encoding", str(out / "encoding")),
            *("--model", str(out / "base")),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1, proc.stderr
    assert errors == [
        f"error: {endpoint}/{REPO}/resolve/main/{CONFIG_NAME}: cannot reach 127.0.0.1: "
        f"connection refused (not retried), and {REPO}@main {CONFIG_NAME} is not in the "
        f"Hugging Face cache {hf_env / 'hub'}. No network? {stage.HUB_OFFLINE_HINT}"
    ], proc.stderr
    assert "Traceback" not in proc.stderr and "Retrying" not in proc.stderr
    assert not out.exists() or list(out.iterdir()) == []
    assert elapsed < 60, elapsed  # mostly importing torch: no retry waits


# --- the caps and checks that stay ----------------------------------------------------------


def test_weights_over_the_cap_are_refused_before_the_download(
    hub: Hub, bpe: Path, tmp_path: Path
) -> None:
    with pytest.raises(DownloadError, match=r"larger than the cap of 1,000 bytes \(max_bytes\)"):
        _run(_params(bpe, hub_url=hub.url, max_bytes=1000), tmp_path / "out")
    assert hub.gets(WEIGHTS_NAME) == []


def test_a_cached_file_over_the_cap_is_refused_offline(
    hub: Hub, bpe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run(_params(bpe, hub_url=hub.url), tmp_path / "one")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "two"
    with pytest.raises(DownloadError) as info:
        _run(_params(bpe, hub_url=hub.url, max_bytes=1000), out)
    assert str(info.value).startswith(f"{REPO}@main {WEIGHTS_NAME}: ")
    assert str(info.value).endswith("larger than the cap of 1,000 bytes (max_bytes)")
    assert not out.exists() or list(out.iterdir()) == []


def test_credentials_in_hub_url_never_appear(
    hub: Hub, bpe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with_password = hub.url.replace("http://", "http://user:hunter2@")
    _run(_params(bpe, hub_url=with_password), tmp_path / "out")
    hub.repos[REPO].gated = True
    with pytest.raises(DownloadError) as info:
        _run(_params(bpe, hub_url=with_password, revision="v1"), tmp_path / "gated")
    assert "hunter2" not in str(info.value) and "***@" in str(info.value)
    assert "hunter2" not in capsys.readouterr().err


def test_a_damaged_cache_copy_is_caught_by_its_sha256(
    hub: Hub, bpe: Path, tmp_path: Path, hf_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run(_params(bpe, hub_url=hub.url), tmp_path / "one")
    snapshot = hf_env / "hub/models--openai-community--gpt2/snapshots" / COMMIT_A / WEIGHTS_NAME
    blob = Path(os.path.realpath(snapshot))
    if blob == snapshot:
        pytest.skip("no symlinks here: huggingface_hub copies, the blob name is not kept")
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="the cached copy is damaged") as info:
        _run(_params(bpe, hub_url=hub.url), tmp_path / "two")
    assert str(blob) in str(info.value)


def test_a_checkpoint_of_another_shape_is_refused(
    hub: Hub, bpe: Path, checkpoints: dict, tmp_path: Path
) -> None:
    hub.repos[REPO].commits[COMMIT_A] = checkpoints["wrong"]
    out = tmp_path / "out"
    with pytest.raises(WeightsError, match=f"{REPO}@{COMMIT_A}: .*shape of gpt2"):
        _run(_params(bpe, hub_url=hub.url), out)
    assert not out.exists() or list(out.iterdir()) == []


def test_the_deadline_ends_a_trickling_download(hub: Hub, bpe: Path, tmp_path: Path) -> None:
    hub.trickle = True
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"config.json: gave up at the deadline of 1 s"):
        _run(_params(bpe, hub_url=hub.url, deadline_s=1), tmp_path / "out")
    assert time.monotonic() - started < 4


# --- params -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hub_url: ftp://mirror.example.org", "hub_url must be an http(s) URL"),
        ("hub_url: https://mirror.example.org/?x=1", "hub_url must not have a query"),
        ("revision: ''", "revision must be a branch, tag or commit sha"),
        ("revision: 'main branch'", "revision must be a branch, tag or commit sha"),
    ],
)
def test_bad_hub_params_are_rejected(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(f"fetch_gpt2:\n  {text}\n", encoding="utf-8")
    with pytest.raises(ParamsError, match=re.escape(expected)):
        load_params(path)
