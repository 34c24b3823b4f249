"""Push a directory to a Hub repo and pull a repo into a temporary directory, with `huggingface_hub`.

Design decisions:
- One commit per push, through `HfApi.create_commit` (after `create_repo(exist_ok=True)`, and
  `create_branch(exist_ok=True)` for a `--revision` other than main): the repo at that revision
  then holds exactly the directory's files (a file the revision has and the directory does not is
  deleted in the same commit; `.gitattributes` is the repo's own and stays). `parent_commit` pins
  the commit to the head that was read, so a concurrent push is refused, not merged blindly.
- Identical content makes no commit: the client skips files whose oid the server reports as
  unchanged and makes no empty commit, so the commit `create_commit` returns is the head read
  before; `PushResult.created` says which happened.
- A pull reads the repo's head commit first (`HfApi.model_info`) and downloads exactly that commit
  with `snapshot_download` into a fresh cache directory (never the user's cache, never a
  `local_dir`, whose `.cache/` folder would land among the files), yields it, and deletes it,
  whatever happens. The snapshot's files are links into the cache's `blobs/`, which
  `formats.directory_files` follows there and nowhere else. `.gitattributes` is not downloaded.
- Every request gets a time-out: the client sends most requests without one (`timeout=None`), and
  a server that stops answering would hang a push forever. A request hook gives each request
  that has none the client's own `HF_HUB_DOWNLOAD_TIMEOUT` (seconds, default 10) for connecting
  and between bytes, so nothing adapterhub-specific is to be learnt. The same hook counts the
  bytes a push sends over HTTP (LFS uploads and the commit), which is what the progress callback
  reports; with Xet (`hf_xet`), files go through its own transport and its own progress bars.
- Whatever goes wrong becomes one `HubError` line naming the repo and what to do: no token, a
  token refused (401) or without the right (403), a repo, revision or gated repo the token cannot
  read, an offline switch, a network failure or time-out mid-way. The client's own messages are
  paragraphs with URLs; the server's first error line is kept when it says more.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_session, get_token, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from huggingface_hub.utils import logging as hf_logging

from adapterhub.errors import AdapterhubError
from adapterhub.hub.card import CARD_FILE, CardInfo, read_card
from adapterhub.hub.ids import validate_hub_id

DEFAULT_BRANCH = "main"
# The repo's own git housekeeping: never deleted by a push, never stored by a pull.
_REPO_OWN_FILES = (".gitattributes",)
ProgressCallback = Callable[[int, int], None]  # (bytes sent, bytes of the files being pushed)


class HubError(AdapterhubError):
    """Something the Hub (or the way to it) refused; the message names the repo and what to do."""


@dataclass(frozen=True)
class PushResult:
    """Where a push landed. `created` is False when the content was already there (no commit made).

    `revision` is the branch committed to, or `refs/pr/N` with `pr_url` for a pull request.
    """

    endpoint: str
    repo_id: str
    revision: str
    commit_sha: str
    commit_url: str
    created: bool
    pr_url: str | None = None
    deleted: tuple[str, ...] = ()


@dataclass(frozen=True)
class PulledRepo:
    """A repo downloaded at one commit; `path` exists only inside `pulled_repo`'s `with` block."""

    endpoint: str
    repo_id: str
    revision: str
    commit_sha: str
    path: Path
    card: CardInfo | None
    gated: bool = False


def hub_endpoint(api: HfApi | None = None) -> str:
    """The Hub this process talks to: `HF_ENDPOINT`, else https://huggingface.co."""
    return (api.endpoint if api is not None else constants.ENDPOINT).rstrip("/")


def uploads_through_xet() -> bool:
    """Whether the client sends files through Xet: the client's own rule, `hf_xet` installed and
    `HF_HUB_DISABLE_XET` unset."""
    return not constants.HF_HUB_DISABLE_XET and importlib.util.find_spec("hf_xet") is not None


# ------------------------------------------------------------------ push


def push_folder(
    folder: Path,
    *,
    repo_id: str,
    message: str,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    api: HfApi | None = None,
    progress: ProgressCallback | None = None,
) -> PushResult:
    """Commit the files of `folder` to `repo_id` (created when missing) so the revision holds exactly them.

    `revision` is a branch (created from main when missing); with `create_pr` the commit opens a
    pull request against it (which must exist) instead. Raises `HubError` (see the module docstring).
    """
    validate_hub_id(repo_id, what="Hub repo")
    api = api or HfApi()
    branch = revision or DEFAULT_BRANCH
    endpoint = hub_endpoint(api)
    files = sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())
    total = sum((Path(folder) / f).stat().st_size for f in files)
    _refuse_offline(repo_id, "push to")
    if not (api.token or get_token()):
        raise HubError(
            f"cannot push to {repo_id}: no Hugging Face token; log in with `hf auth login` or set HF_TOKEN "
            f"to a token with write access (endpoint {endpoint})"
        )
    with _translated(repo_id, branch, "push to", endpoint), _client_session(progress, total, keep_xet_bars=True):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != DEFAULT_BRANCH and not create_pr:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        head = api.repo_info(repo_id, revision=branch, timeout=_read_timeout()).sha
        remote = set(api.list_repo_files(repo_id, revision=head))
        stale = sorted(remote - set(files) - set(_REPO_OWN_FILES))
        operations: list[Any] = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(Path(folder) / f)) for f in files]
        operations += [CommitOperationDelete(path_in_repo=f) for f in stale]
        info = api.create_commit(
            repo_id, operations, commit_message=message, revision=branch, create_pr=create_pr, parent_commit=head,
        )
    if progress is not None:
        progress(total, total)
    created = info.pr_url is not None or info.oid != head
    return PushResult(
        endpoint=endpoint, repo_id=repo_id, revision=info.pr_revision or branch, commit_sha=info.oid,
        commit_url=str(info.commit_url), created=created, pr_url=info.pr_url, deleted=tuple(stale) if created else (),
    )


# ------------------------------------------------------------------ pull


@contextlib.contextmanager
def pulled_repo(repo_id: str, revision: str | None = None, *, api: HfApi | None = None) -> Iterator[PulledRepo]:
    """Download `repo_id` at `revision` (default: main) into a temporary directory, yield it, remove it.

    The download is of one commit, read first, so the files and the commit sha agree. Raises
    `HubError` before yielding when the repo cannot be read (see the module docstring).
    """
    validate_hub_id(repo_id, what="Hub repo")
    api = api or HfApi()
    endpoint = hub_endpoint(api)
    wanted = revision or DEFAULT_BRANCH
    _refuse_offline(repo_id, "pull")
    scratch = Path(tempfile.mkdtemp(prefix="adapterhub-pull-"))
    try:
        with _translated(repo_id, wanted, "pull", endpoint), _client_session(None, 0, keep_xet_bars=False):
            info = api.model_info(repo_id, revision=wanted, timeout=_read_timeout())
            commit = info.sha
            snapshot = Path(snapshot_download(
                repo_id, revision=commit, cache_dir=scratch / "cache", token=api.token, endpoint=api.endpoint,
                ignore_patterns=list(_REPO_OWN_FILES),
            ))
        if not snapshot.is_dir() or not any(snapshot.iterdir()):
            raise HubError(f"cannot pull {repo_id}@{wanted}: the repo holds no files at commit {commit[:12]}")
        card_path = snapshot / CARD_FILE
        try:
            card = read_card(card_path) if card_path.is_file() else None
        except ValueError as exc:
            raise HubError(f"{repo_id}@{wanted}: its model card ({CARD_FILE}) does not parse: {_first_line(exc)}") from None
        yield PulledRepo(endpoint=endpoint, repo_id=repo_id, revision=wanted, commit_sha=commit, path=snapshot, card=card,
                         gated=bool(info.gated))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------ the client's session


def _read_timeout() -> float:
    return float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


class _CountingStream(httpx2.SyncByteStream):
    """A request body that reports each chunk as it is sent."""

    def __init__(self, inner: Any, on_bytes: Callable[[int], None]) -> None:
        self._inner = inner
        self._on_bytes = on_bytes

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._on_bytes(len(chunk))
            yield chunk

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()


class _RequestHook:
    """Gives every request without a time-out the client's own, and counts upload bytes for `progress`."""

    def __init__(self, progress: ProgressCallback | None, total: int) -> None:
        timeout = _read_timeout()
        self._timeout = httpx2.Timeout(timeout).as_dict()
        self._progress = progress
        self._total = total
        self._sent = 0
        self._lock = threading.Lock()

    def __call__(self, request: httpx2.Request) -> None:
        timeouts = request.extensions.get("timeout") or {}
        if not any(value is not None for value in timeouts.values()):
            request.extensions = {**request.extensions, "timeout": dict(self._timeout)}
        if self._progress is not None and (request.method == "PUT" or "/commit/" in request.url.path):
            request.stream = _CountingStream(request.stream, self._sent_bytes)

    def _sent_bytes(self, count: int) -> None:
        assert self._progress is not None
        with self._lock:
            self._sent = min(self._sent + count, self._total)
            sent = self._sent
        self._progress(sent, self._total)


@contextlib.contextmanager
def _client_session(progress: ProgressCallback | None, total: int, *, keep_xet_bars: bool) -> Iterator[None]:
    """The client's shared session with `_RequestHook` on it, and its logs and bars quieted.

    Its warnings ("No files have been modified …") would be noise around adapterhub's own line;
    its tqdm bars are kept only for Xet uploads (`keep_xet_bars`), which report nothing through HTTP.
    """
    session = get_session()
    hook = _RequestHook(progress, total)
    hooks = session.event_hooks
    session.event_hooks = {"request": [*hooks["request"], hook], "response": hooks["response"]}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars_were_on = not are_progress_bars_disabled()
    if bars_were_on and not (keep_xet_bars and uploads_through_xet()):
        disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_were_on and are_progress_bars_disabled():
            enable_progress_bars()
        current = session.event_hooks
        session.event_hooks = {"request": [h for h in current["request"] if h is not hook], "response": current["response"]}


# ------------------------------------------------------------------ errors


def _refuse_offline(repo_id: str, action: str) -> None:
    if constants.is_offline_mode():
        raise HubError(f"cannot {action} {repo_id}: HF_HUB_OFFLINE is set, so the Hugging Face client makes no requests; unset it")


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split("\n")[0].split())
    return text[:200] or type(exc).__name__


def _server_message(exc: HfHubHTTPError) -> str:
    """The server's own words (X-Error-Message or the JSON error), when it sent any."""
    return "; ".join(m for m in (getattr(exc, "server_message", None) or "").splitlines() if m.strip())[:200]


@contextlib.contextmanager
def _translated(repo_id: str, revision: str, action: str, endpoint: str) -> Iterator[None]:
    """Turn what the client raises into one `HubError` line (see the module docstring)."""
    where = f"{repo_id}@{revision}" if revision != DEFAULT_BRANCH else repo_id
    try:
        yield
    except HubError:
        raise
    except GatedRepoError:
        raise HubError(
            f"cannot {action} {where}: the repo is gated; request access on {endpoint}/{repo_id} and use a token "
            "of an account that was granted it (HF_TOKEN or `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise HubError(
            f"cannot {action} {where}: {repo_id} has no revision {revision!r}; give an existing branch, tag or commit"
        ) from None
    except RepositoryNotFoundError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401 and action != "pull":
            raise _auth_error(action, where, endpoint, exc) from None
        raise HubError(
            f"cannot {action} {where}: the repo does not exist on {endpoint}, or it is private and the token cannot "
            "read it; check the name, or log in (HF_TOKEN or `hf auth login`) as an account that can"
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise _auth_error(action, where, endpoint, exc) from None
        if status == 412:
            raise HubError(f"cannot {action} {where}: the branch changed while pushing (another commit landed); run the push again") from None
        detail = _server_message(exc) or _first_line(exc)
        raise HubError(f"cannot {action} {where}: the Hub answered {status}: {detail}") from None
    except OfflineModeIsEnabled:
        raise HubError(f"cannot {action} {where}: HF_HUB_OFFLINE is set, so the Hugging Face client makes no requests; unset it") from None
    except (httpx2.TransportError, LocalEntryNotFoundError, ConnectionError, TimeoutError) as exc:
        raise _network_error(action, where, endpoint, exc) from None
    except (RuntimeError, OSError) as exc:
        # The client wraps a failed LFS upload in RuntimeError, and a truncated download is an OSError.
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, (httpx2.TransportError, HfHubHTTPError)) or "Consistency check failed" in str(exc):
            raise _network_error(action, where, endpoint, cause or exc) from None
        raise
    except ValueError as exc:
        if str(exc).startswith("Invalid metadata in README.md"):
            details = "; ".join(line.lstrip("- ") for line in str(exc).splitlines()[1:] if line.strip())
            raise HubError(f"cannot {action} {where}: the Hub refused the model card's metadata: {details or _first_line(exc)}") from None
        raise


def _auth_error(action: str, where: str, endpoint: str, exc: HfHubHTTPError) -> HubError:
    status = exc.response.status_code if exc.response is not None else None
    said = _server_message(exc)
    said = f": {said}" if said else ""
    if status == 403:
        return HubError(
            f"cannot {action} {where}: the token has no write access there (403{said}); use a token with write "
            f"access to that owner (HF_TOKEN or `hf auth login`) on {endpoint}"
        )
    return HubError(
        f"cannot {action} {where}: {endpoint} refused the token (401{said}); log in again with `hf auth login` "
        "or set HF_TOKEN to a valid token"
    )


def _network_error(action: str, where: str, endpoint: str, exc: BaseException) -> HubError:
    kind = "timed out" if isinstance(exc, (httpx2.TimeoutException, TimeoutError)) else "failed"
    reason = _first_line(exc)
    if isinstance(exc, LocalEntryNotFoundError):
        reason = _first_line(exc.__cause__) if exc.__cause__ else "the Hub could not be reached"
    return HubError(
        f"cannot {action} {where}: the connection to {endpoint} {kind} mid-way ({type(exc).__name__}: {reason}); "
        "check the network (and HF_ENDPOINT) and run the command again"
    )
