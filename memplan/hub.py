"""A model's config.json by its Hugging Face name (``--model meta-llama/Llama-3.1-8B``).

Looked up, in order, where ``huggingface_hub`` itself keeps it, without importing it: the hub
cache is ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE``, else ``HF_HOME/hub``, else
``XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``
(``huggingface_hub.constants``); a repository ``owner/name`` is cached in
``models--owner--name``, whose ``refs/main`` holds the commit of the ``main`` revision and
``snapshots/<commit>/config.json`` the file (``huggingface_hub.file_download``,
``try_to_load_from_cache``). When it is not cached, and ``huggingface_hub`` is installed and the
hub is not set offline (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``), only config.json is
downloaded, into that cache (``hf_hub_download(repo, "config.json")``: a few KiB, no weights).
Otherwise one line says how to get it. Pure Python: no torch, and ``huggingface_hub`` only when
a download is needed.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path

from memplan.errors import ConfigError

# huggingface_hub.utils.validate_repo_id: "name" or "namespace/name", 1-96 characters each of
# [A-Za-z0-9_.-], not starting or ending with "-" or ".", without "--" or "..".
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"(?:{_PART}/)?{_PART}")
CONFIG = "config.json"
ETAG_TIMEOUT_S = 10  # huggingface_hub's DEFAULT_ETAG_TIMEOUT
CONNECT_TIMEOUT_S = 3


def is_repo_id(name: str) -> bool:
    """Whether ``name`` can be a Hugging Face repository id (``owner/name`` or ``name``)."""
    return (bool(REPO_ID.fullmatch(name)) and "--" not in name and ".." not in name
            and not name.endswith(".git"))


def cache_dir() -> Path:
    """The hub cache that ``huggingface_hub`` uses with the current environment."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface")
    legacy = os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    cache = os.environ.get("HF_HUB_CACHE") or legacy
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def offline() -> bool:
    """Whether the hub is set offline (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` true)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def cached_config(repo_id: str, cache: Path | None = None) -> Path | None:
    """config.json of the ``main`` revision of ``repo_id`` in the hub cache, or None."""
    folder = (cache or cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    try:
        commit = (folder / "refs" / "main").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not re.fullmatch(r"[0-9a-zA-Z]+", commit):  # a commit hash, never a path
        return None
    path = folder / "snapshots" / commit / CONFIG
    return path if path.is_file() else None


def how_to_get(repo_id: str) -> str:
    """The way to get a config by hand: download it and give --config."""
    return (f"download https://huggingface.co/{repo_id}/resolve/main/config.json (or "
            f"`hf download {repo_id} config.json`) and pass --config config.json")


def config_path(repo_id: str) -> Path:
    """config.json of ``repo_id``: from the hub cache, else downloaded alone, else refused.

    Raises:
        ConfigError: one line naming the repository and how to get its config.
    """
    cache = cache_dir()
    found = cached_config(repo_id, cache)
    if found is not None:
        return found
    where = f"not in the Hugging Face cache ({cache})"
    if offline():
        raise ConfigError(f"{repo_id}: config.json is {where} and the hub is set offline "
                          f"(HF_HUB_OFFLINE); {how_to_get(repo_id)}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ConfigError(f"{repo_id}: config.json is {where}; pip install huggingface_hub to "
                          f"fetch it, or {how_to_get(repo_id)}") from None
    unreachable = no_route()
    if unreachable:
        raise ConfigError(f"{repo_id}: config.json is {where}, and the Hugging Face Hub cannot "
                          f"be reached ({unreachable}); {how_to_get(repo_id)}")
    return download(repo_id, hf_hub_download, cache)


def no_route() -> str | None:
    """Why the hub's host cannot be reached, or None when it can (or a proxy is set).

    A quick TCP connection first, because ``hf_hub_download`` retries a dead network five times
    with backoff (about 25 s) before it gives up.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    host = re.sub(r"^[a-z]+://", "", endpoint).split("/")[0]
    name, _, port = host.partition(":")
    try:
        socket.create_connection((name, int(port or 443)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        return f"{name}: {getattr(exc, 'strerror', None) or exc}"
    return None


def download(repo_id: str, hf_hub_download, cache: Path) -> Path:
    """Fetch config.json alone with ``hf_hub_download``; every failure is one ConfigError."""
    quiet = logging.getLogger("huggingface_hub")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its retry warnings; the failure is said once, below
    try:
        return Path(hf_hub_download(repo_id, CONFIG, cache_dir=cache,
                                    etag_timeout=ETAG_TIMEOUT_S))
    except Exception as exc:  # network, authentication, a missing repository: all one answer
        kinds = {cls.__name__ for cls in type(exc).__mro__}
        how = how_to_get(repo_id)
        if "LocalEntryNotFoundError" in kinds or "OfflineModeIsEnabled" in kinds:
            line = (f"could not fetch config.json of {repo_id}: the Hugging Face Hub cannot be "
                    f"reached; {how}")
        elif "GatedRepoError" in kinds:
            line = (f"{repo_id} is gated on the Hugging Face Hub: accept its licence at "
                    f"https://huggingface.co/{repo_id} and log in (`hf auth login`), or {how}")
        elif "RepositoryNotFoundError" in kinds:
            line = (f"no model {repo_id} on the Hugging Face Hub (or it is private): check the "
                    f"name, or {how}")
        elif "EntryNotFoundError" in kinds:
            line = (f"{repo_id} on the Hugging Face Hub has no config.json: give the config of "
                    "a transformers model with --config")
        else:
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            line = (f"could not fetch config.json of {repo_id} from the Hugging Face Hub "
                    f"({type(exc).__name__}{': ' + first if first else ''}); {how}")
        raise ConfigError(line) from None
    finally:
        quiet.setLevel(level)
