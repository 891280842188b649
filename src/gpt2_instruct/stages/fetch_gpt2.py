"""Stage fetch_gpt2: GPT-2's BPE files and base weights (hub, local directory or random).

``source: hub`` goes through huggingface_hub (``hf_hub_download``), so the user's Hugging
Face setup applies, read when the stage runs: HF_TOKEN (gated or private repos, mirrors),
HF_ENDPOINT (while ``hub_url`` is null), HF_HOME / HF_HUB_CACHE (a model already in the
cache is not downloaded again) and HF_HUB_OFFLINE (no request at all: the cache, or one
clear error). The commit the revision resolved to and each file's sha256 are printed and
written to ``source.json`` beside the weights, so a run can be pinned to exactly those
bytes (``-S fetch_gpt2.revision=<commit>``).

Without network every source fails fast, in one line naming the URL and the way to run
offline; a Hub that cannot be reached still serves a model already in the cache, as
huggingface_hub itself would.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from gpt2_instruct.deadline import redact
from gpt2_instruct.download import (
    DownloadError,
    causes,
    copy_file,
    fetch,
    local_path,
    unreachable_message,
    unreachable_reason,
)
from gpt2_instruct.io import atomic_dir, remove_stale_temps, write_json
from gpt2_instruct.model import GPT2_CONFIGS, GPTConfig, GPTModel
from gpt2_instruct.params import FetchParams
from gpt2_instruct.stages import log
from gpt2_instruct.tokenizer import BPE_SHA256, ENCODER_JSON, VOCAB_BPE, load_tokenizer
from gpt2_instruct.weights import (
    CONFIG_KEY,
    CONFIG_NAME,
    WEIGHTS_NAME,
    WeightsError,
    load_model,
    save_model,
)

# Caps on what is downloaded. GPT-2's BPE files are fetched at their exact sizes (known
# by their sha256 pins; other pins get BPE_MAX_BYTES), a config.json (under 1 KB) at most
# CONFIG_MAX_BYTES, model.safetensors at most ``max_bytes`` or weights_max_bytes().
BPE_SIZES = {
    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783": 1_042_301,  # encoder.json
    "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5": 456_318,  # vocab.bpe
}
BPE_MAX_BYTES = 4 << 20
CONFIG_MAX_BYTES = 1 << 20

HUB_ORG = "openai-community"  # the Hub's GPT-2 repositories: openai-community/gpt2-medium...
DEFAULT_ENDPOINT = "https://huggingface.co"  # huggingface_hub's, when HF_ENDPOINT is unset
SOURCE_NAME = "source.json"  # beside the hub's weights: repository, commit, sha256 of each file
# How to run without network, named in the one-line error of an unreachable host.
BPE_OFFLINE_HINT = (
    "use a local copy: -S fetch_gpt2.bpe_source=<dir with encoder.json and vocab.bpe>"
)
LOCAL_HINT = "-S fetch_gpt2.local_dir=<dir with config.json and model.safetensors>"
HUB_OFFLINE_HINT = (
    f"use a local copy: -S fetch_gpt2.source=local {LOCAL_HINT}, or set HF_HUB_OFFLINE=1 "
    "with the model in the Hugging Face cache (HF_HOME)"
)
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_TRUE = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub reads as a true flag

T = TypeVar("T")


def weights_max_bytes(model: str | None) -> int:
    """Default cap on model.safetensors: 1.25 x the size of the Hub's file for ``model``.

    The Hub's files hold every weight in fp32 plus each layer's causal mask
    (context x context fp32): gpt2 548 MB, gpt2-medium 1.52 GB, gpt2-large 3.25 GB,
    gpt2-xl 6.43 GB. ``None`` (a local directory of any GPT-2): the largest, gpt2-xl's.
    """
    if model is None:
        return max(weights_max_bytes(name) for name in GPT2_CONFIGS)
    cfg = GPT2_CONFIGS[model]
    d, layers, ctx = cfg.n_embd, cfg.n_layer, cfg.context_length
    weights = cfg.vocab_size * d + ctx * d + layers * (12 * d * d + 13 * d) + 2 * d
    masks = layers * ctx * ctx
    return int(1.25 * 4 * (weights + masks)) + (1 << 20)


def _join(source: str, name: str) -> str:
    path = local_path(source)
    return str(path / name) if path is not None else f"{source.rstrip('/')}/{name}"


# --- the Hugging Face Hub ----------------------------------------------------------------


@dataclass(frozen=True)
class HubSetup:
    """The Hugging Face settings in force when the stage runs, passed to every call.

    huggingface_hub reads its environment once, at import; reading it again here makes a
    variable set later count too (a test, a notebook), and names in messages what is used.
    """

    endpoint: str
    cache_dir: str
    offline: bool


def hub_setup(hub_url: str | None) -> HubSetup:
    """``hub_url``, else HF_ENDPOINT; the cache as huggingface_hub finds it; HF_HUB_OFFLINE."""
    from huggingface_hub import constants

    env = os.environ
    endpoint = (hub_url or env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache = os.path.join(env.get("HF_HOME") or os.path.join(xdg, "huggingface"), "hub")
    flag = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE")
    offline = flag.strip().upper() in _TRUE if flag else bool(constants.HF_HUB_OFFLINE)
    return HubSetup(endpoint, os.path.expanduser(os.path.expandvars(cache)), offline)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _timed_out(err: BaseException) -> bool:
    """A timeout anywhere in the chain (socket, urllib3/requests or httpx's own class)."""
    return any(
        isinstance(cause, TimeoutError)
        or type(cause).__name__.endswith(("Timeout", "TimeoutError"))
        for cause in causes(err)
    )


def _hub_error(
    err: BaseException,
    *,
    what: str,
    setup: HubSetup,
    params: FetchParams,
    unreachable: tuple[str, str] | None,
) -> DownloadError | None:
    """One clear line for what huggingface_hub raised, or None for anything unexpected (a bug).

    ``what`` names the file (``openai-community/gpt2@main config.json``); ``unreachable``
    is the URL that could not be reached and why, when the cache was tried instead.
    """
    from huggingface_hub import utils as hub

    where = setup.endpoint
    repo = f"{HUB_ORG}/{params.model}"
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    http = f" (HTTP {status})" if status else ""
    if isinstance(err, hub.LocalEntryNotFoundError):  # before EntryNotFoundError: a subclass
        if unreachable is not None:
            missing = f", and {what} is not in the Hugging Face cache {setup.cache_dir}"
            return DownloadError(unreachable_message(*unreachable, HUB_OFFLINE_HINT, missing))
        if setup.offline:
            return DownloadError(
                f"{what} is not in the Hugging Face cache {setup.cache_dir}, and HF_HUB_OFFLINE "
                f"forbids downloading it: fill the cache on a machine with network (or unset "
                f"HF_HUB_OFFLINE), or -S fetch_gpt2.source=local {LOCAL_HINT}"
            )
        return DownloadError(f"{what}: not on {where} nor in the cache: {_first_line(err)}")
    if isinstance(err, hub.GatedRepoError):  # before RepositoryNotFoundError: a subclass
        return DownloadError(
            f"{what}: {repo} on {where} is gated{http}: accept its conditions on the Hub, "
            "then set HF_TOKEN to a token of that account"
        )
    if isinstance(err, hub.RepositoryNotFoundError):
        return DownloadError(
            f"{what}: no repository {repo} on {where}{http}; check hub_url / HF_ENDPOINT "
            "(a private repository needs HF_TOKEN)"
        )
    if isinstance(err, hub.RevisionNotFoundError):
        return DownloadError(
            f"{what}: {repo} has no revision {params.revision!r} on {where}{http}; set "
            "fetch_gpt2.revision to one of its branches, tags or commit shas"
        )
    if isinstance(err, hub.EntryNotFoundError):
        return DownloadError(f"{what}: no such file in {repo} on {where}{http}")
    if isinstance(err, hub.OfflineModeIsEnabled):
        return DownloadError(
            f"{what}: huggingface_hub is in offline mode (HF_HUB_OFFLINE was set when it was "
            "imported) and the file is not in the Hugging Face cache"
        )
    if isinstance(err, hub.HfHubHTTPError):
        if status == 401:
            return DownloadError(f"{what}: HTTP 401 from {where}: HF_TOKEN is missing or invalid")
        if status == 403:
            return DownloadError(f"{what}: HTTP 403 from {where}: HF_TOKEN's token has no access")
        return DownloadError(f"{what}: {where}: {_first_line(err)}")
    reason = unreachable_reason(err)
    if reason is not None:
        return DownloadError(unreachable_message(where, reason, HUB_OFFLINE_HINT))
    if _timed_out(err):
        return DownloadError(
            f"{what}: no answer from {where} within {params.timeout:g} s (fetch_gpt2.timeout)"
        )
    if isinstance(err, OSError) and err.filename is None:  # size check, bad metadata...
        return DownloadError(f"{what}: {_first_line(err)}")
    return None  # an OSError naming a path (a full disk) says enough; anything else is a bug


def _within_deadline(call: Callable[[], T], deadline_s: float, what: str) -> T:
    """``call()``, abandoned after ``deadline_s`` seconds (huggingface_hub has no overall limit).

    It runs in a daemon thread: at the deadline the stage fails and exits, which ends it;
    a partial download stays in the cache for huggingface_hub to resume or discard.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    worker = threading.Thread(target=run, name=f"fetch {what}", daemon=True)
    worker.start()
    worker.join(deadline_s)
    if worker.is_alive():
        raise DownloadError(f"{what}: gave up at the deadline of {deadline_s:g} s (deadline_s)")
    if error:
        raise error[0]
    return result[0]


def _check_remote(
    setup: HubSetup, params: FetchParams, caps: dict[str, int]
) -> tuple[str, str] | None:
    """Ask the Hub about both files before downloading; (URL, why) if it cannot be reached.

    One HEAD each, not retried: an unreachable host is known at once (huggingface_hub
    would retry it for half a minute), a file over its cap is refused before a byte of it
    is downloaded, and an endpoint that is not a Hub says so. None: the Hub answered.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    repo = f"{HUB_ORG}/{params.model}"
    for name, cap in caps.items():
        url = hf_hub_url(repo, name, revision=params.revision, endpoint=setup.endpoint)
        what = f"{repo}@{params.revision} {name}"
        try:
            meta = get_hf_file_metadata(url, timeout=params.timeout)
        except Exception as err:
            reason = unreachable_reason(err)
            if reason is not None:
                return url, reason
            mapped = _hub_error(err, what=what, setup=setup, params=params, unreachable=None)
            if mapped is None:
                raise
            raise mapped from err
        if meta.commit_hash is None:
            raise DownloadError(
                f"{redact(url)}: the answer has no X-Repo-Commit header: {setup.endpoint} is not "
                "a Hugging Face Hub (hub_url / HF_ENDPOINT); for files on a plain web server, "
                "-S fetch_gpt2.source=local -S fetch_gpt2.local_dir=<URL of their directory>"
            )
        if meta.size is not None and meta.size > cap:
            raise DownloadError(
                f"{what}: {meta.size:,} bytes on {setup.endpoint}, larger than the cap of "
                f"{cap:,} bytes" + (" (max_bytes)" if name == WEIGHTS_NAME else "")
            )
    return None


def _all_cached(setup: HubSetup, params: FetchParams) -> bool:
    """Both files of the revision are in the cache (a commit's files never change)."""
    from huggingface_hub import try_to_load_from_cache

    repo = f"{HUB_ORG}/{params.model}"
    return all(
        isinstance(
            try_to_load_from_cache(repo, name, cache_dir=setup.cache_dir, revision=params.revision),
            str,
        )
        for name in (CONFIG_NAME, WEIGHTS_NAME)
    )


def _hub_file(
    setup: HubSetup,
    params: FetchParams,
    name: str,
    *,
    offline: bool,
    unreachable: tuple[str, str] | None,
) -> Path:
    """The cached copy of one file (downloaded first unless offline); errors are one line."""
    from huggingface_hub import hf_hub_download

    repo = f"{HUB_ORG}/{params.model}"
    what = f"{repo}@{params.revision} {name}"

    def download() -> str:
        return hf_hub_download(
            repo,
            name,
            revision=params.revision,
            endpoint=setup.endpoint,
            cache_dir=setup.cache_dir,
            local_files_only=offline,
            etag_timeout=params.timeout,
        )

    try:
        return Path(_within_deadline(download, params.deadline_s, what))
    except Exception as err:
        if isinstance(err, DownloadError):
            raise
        mapped = _hub_error(err, what=what, setup=setup, params=params, unreachable=unreachable)
        if mapped is None:
            raise
        raise mapped from err


def fetch_from_hub(params: FetchParams, out: Path) -> dict[str, Any]:
    """config.json + model.safetensors of ``openai-community/<model>`` at ``revision``, in ``out``.

    Through huggingface_hub's cache: a file already there is not downloaded again, and
    with HF_HUB_OFFLINE nothing is requested at all. Each file is copied out of the cache
    under its cap and hashed on the way; a blob named by its sha256 (the Hub's LFS files)
    must match it. Returns the provenance record (repository, commit, sha256 and size of
    each file), which depends on those bytes only, not on the endpoint or the cache used.
    """
    setup = hub_setup(params.hub_url)
    repo = f"{HUB_ORG}/{params.model}"
    label = f"{repo}@{params.revision}"
    caps = {
        CONFIG_NAME: CONFIG_MAX_BYTES,
        WEIGHTS_NAME: params.max_bytes or weights_max_bytes(params.model),
    }
    unreachable = None
    pinned = _COMMIT_RE.fullmatch(params.revision) is not None and _all_cached(setup, params)
    if setup.offline or pinned:
        why = "HF_HUB_OFFLINE" if setup.offline else "a pinned commit, cached"
        log(f"fetch_gpt2: {why}: {label} from the cache {setup.cache_dir}, no request")
    else:
        unreachable = _check_remote(setup, params, caps)
        if unreachable is not None:
            url, reason = unreachable
            log(
                f"fetch_gpt2: {redact(url)}: {reason}; trying the Hugging Face cache "
                f"{setup.cache_dir}"
            )
    offline = setup.offline or pinned or unreachable is not None
    paths = {
        name: _hub_file(setup, params, name, offline=offline, unreachable=unreachable)
        for name in caps
    }
    commits = sorted({path.parent.name for path in paths.values()})
    if len(commits) != 1:
        raise DownloadError(
            f"{label}: {CONFIG_NAME} and {WEIGHTS_NAME} came from different commits "
            f"({', '.join(commits)}): the revision moved during the download; run again, or "
            "pin fetch_gpt2.revision to a commit sha"
        )
    commit = commits[0]
    if not _COMMIT_RE.fullmatch(commit):
        raise DownloadError(
            f"{paths[CONFIG_NAME]}: not in a snapshots/<commit> folder of the Hugging Face "
            "cache, so which commit it is cannot be told"
        )
    files: dict[str, dict[str, Any]] = {}
    for name, path in paths.items():
        digest = copy_file(path, out / name, max_bytes=caps[name], shown=f"{label} {name}")
        blob = Path(os.path.realpath(path)).name  # huggingface_hub names a blob by its etag
        if _SHA256_RE.fullmatch(blob) and blob != digest:
            raise DownloadError(
                f"{path}: sha256 {digest}, but the Hub's is {blob}: the cached copy is damaged; "
                f"delete {os.path.realpath(path)} and run again"
            )
        files[name] = {"sha256": digest, "size": (out / name).stat().st_size}
    via = "the Hugging Face cache" if offline else redact(setup.endpoint)
    log(f"fetch_gpt2: {label} is commit {commit} (from {via})")
    for name, entry in files.items():
        log(f"fetch_gpt2:   {name}: sha256 {entry['sha256']}, {entry['size']:,} bytes")
    if params.revision.lower() != commit:
        log(f"fetch_gpt2: to pin these bytes: -S fetch_gpt2.revision={commit}")
    return {"source": "hub", "repo_id": repo, "commit": commit, "files": files}


# --- the stage -----------------------------------------------------------------------------


def fetch_gpt2(params: FetchParams, encoding_out: Path, model_out: Path) -> None:
    """BPE files (sha256-pinned) and the base model as safetensors + config.json.

    Both outputs are built in temporary directories and put in place together at the
    end: when any part fails, neither output path is touched.
    """
    for stale in remove_stale_temps(encoding_out, model_out):
        log(f"fetch_gpt2: removed {stale}, left by an interrupted run")
    limits = {"timeout": params.timeout, "deadline_s": params.deadline_s}
    with atomic_dir(encoding_out) as enc_tmp, atomic_dir(model_out) as tmp:
        for name in (ENCODER_JSON, VOCAB_BPE):
            fetch(
                _join(params.bpe_source, name),
                enc_tmp / name,
                sha256=BPE_SHA256[name],
                size=BPE_SIZES.get(BPE_SHA256[name]),
                max_bytes=BPE_MAX_BYTES,
                retries=params.retries,
                offline_hint=BPE_OFFLINE_HINT,
                **limits,
            )
        tokenizer = load_tokenizer(enc_tmp)

        if params.source == "random":
            cfg = params.random
            torch.manual_seed(cfg.seed)
            model = GPTModel(
                GPTConfig(
                    vocab_size=tokenizer.vocab_size,
                    context_length=cfg.context_length,
                    n_embd=cfg.n_embd,
                    n_layer=cfg.n_layer,
                    n_head=cfg.n_head,
                )
            )
            save_model(model, tmp, extra_config={CONFIG_KEY: {"random_init": True}})
            source = "random model"
            log(
                "fetch_gpt2: WARNING: randomly initialised model, NOT pre-trained GPT-2 "
                f"({model.num_parameters():,} parameters) - for smoke tests and CI only"
            )
        else:
            record = None
            if params.source == "hub":
                record = fetch_from_hub(params, tmp)
                source = f"{record['repo_id']}@{record['commit']}"
            else:
                base = str(params.local_dir)
                local = local_path(base)
                source = str(local) if local is not None else redact(base)
                weights_cap = params.max_bytes or weights_max_bytes(None)
                for name, cap in ((CONFIG_NAME, CONFIG_MAX_BYTES), (WEIGHTS_NAME, weights_cap)):
                    fetch(
                        _join(base, name),
                        tmp / name,
                        max_bytes=cap,
                        retries=params.retries,
                        progress=True,
                        offline_hint=f"use a local copy: {LOCAL_HINT}",
                        **limits,
                    )
            try:
                model = load_model(tmp)  # checks every tensor name and shape against config.json
            except (WeightsError, ValueError) as err:
                # Name the user's files, not our temporary copies of them.
                raise WeightsError(str(err).replace(str(tmp), source)) from err
            expected = GPT2_CONFIGS[params.model]
            shape = (model.config.n_layer, model.config.n_embd)
            if params.source == "hub" and shape != (expected.n_layer, expected.n_embd):
                raise WeightsError(
                    f"{source}: checkpoint does not have the shape of {params.model}"
                )
            if record is not None:
                write_json(tmp / SOURCE_NAME, record)
            log(f"fetch_gpt2: {source} ({model.num_parameters():,} parameters)")
        if model.config.vocab_size < tokenizer.vocab_size:
            raise WeightsError(
                f"{source}: "
                f"{model.config.vocab_size} token embeddings, fewer than the tokenizer's "
                f"{tokenizer.vocab_size} tokens"
            )
