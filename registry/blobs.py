"""Content-addressed blob store on a local (or shared) disk.

Layout: `blobs/sha256/ab/cdef…` (the first two hex digits fan the files out). A write goes
to `blobs/tmp/` with the hash computed while copying, is fsynced, then renamed into place
and the directory fsynced: a blob is either complete at its address or absent, even across
SIGKILL or power loss. Identical content lands at the same address once.

Reads are verified: `verified_path` re-hashes the file and raises `CorruptBlobError` on a
mismatch, so bit rot or a hand-edited blob is detected before anyone loads it. A successful
check leaves a stamp (`blobs/verified/<sha256>`: size, mtime, ctime and inode); `materialize`
(the server's hot-load path, where hashing was most of a first load's time) accepts a blob
whose stat still matches its stamp without re-hashing it, as git trusts its index. Any write,
chmod or replacement of the file changes its ctime, so an edited blob is hashed again; a stamp is
only written for a file whose ctime is over 2 s old, so an edit within the same timestamp tick
as the check cannot go unnoticed ("racy git"). Silent media corruption under an unchanged inode
is caught by `export` and the first check, not by stamped reads.

Writers and GC coordinate with `flock` on `blobs/.lock`: each writer holds it shared from
its first blob write until its record is committed; GC takes it exclusively, so it never
deletes a blob that a running import is about to reference. The kernel drops the lock of a
killed process, so a SIGKILLed import leaves only unreferenced blobs, which the next GC removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from adapterhub.errors import AdapterhubError, CorruptBlobError, NotFoundError

_CHUNK = 4 * 1024 * 1024
_RACY_SECONDS = 2.0  # a stamp is written only for files whose ctime is older than this


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_file(path: Path) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class BlobStore:
    """Put/get files by sha256."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "sha256"
        self.tmp = root / "tmp"
        self.stamps = root / "verified"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.stamps.mkdir(parents=True, exist_ok=True)
        self._lock_path = root / ".lock"
        self._lock_path.touch(exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / sha256[2:]

    def has(self, sha256: str) -> bool:
        return self.path_for(sha256).exists()

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Held (shared) by an import from its first blob until its record commits."""
        with self._lock_path.open("rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def exclusive_lock(self) -> Iterator[None]:
        """Held by GC: no import is between writing blobs and committing its record."""
        with self._lock_path.open("rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def put_file(self, source: Path) -> tuple[str, int]:
        """Copy `source` in durably; returns (sha256, size). Call under `writer_lock`.

        `source` must be a regular file, not a symbolic link: the import resolved and checked
        its files first, so a file swapped for a link (or a FIFO) since then is refused here
        instead of read.
        """
        try:
            src_fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise AdapterhubError(f"cannot read {source}: {exc.strerror} (it must be a regular file, not a symbolic link)") from None
        with os.fdopen(src_fd, "rb") as src:
            if not stat.S_ISREG(os.fstat(src_fd).st_mode):
                raise AdapterhubError(f"{source} is not a regular file")
            return self._copy_in(src)

    def _copy_in(self, src: BinaryIO) -> tuple[str, int]:
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix="put-")
        tmp_path = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha256 = digest.hexdigest()
            final = self.path_for(sha256)
            if final.exists():
                tmp_path.unlink()
                return sha256, size
            final.parent.mkdir(exist_ok=True)
            os.chmod(tmp_path, 0o444)
            os.replace(tmp_path, final)
            _fsync_dir(final.parent)
            return sha256, size
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise

    def verified_path(self, sha256: str, *, trust_stamp: bool = False) -> Path:
        """The blob's path after checking its content still hashes to its address.

        With `trust_stamp`, a blob whose stat matches the stamp of an earlier successful check
        is not hashed again (see the module docstring for what that does and does not catch).
        """
        path = self.path_for(sha256)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise NotFoundError(f"blob {sha256[:12]}… is missing from {self.objects} (the store was altered outside adapterhub)") from None
        signature = f"{stat.st_size} {stat.st_mtime_ns} {stat.st_ctime_ns} {stat.st_ino}"
        stamp = self.stamps / sha256
        if trust_stamp:
            with contextlib.suppress(OSError):
                if stamp.read_text() == signature:
                    return path
        actual = hash_file(path)
        if actual != sha256:
            stamp.unlink(missing_ok=True)
            raise CorruptBlobError(
                f"blob {sha256[:12]}… is corrupt on disk: its content hashes to {actual[:12]}… ({path}); "
                "restore it from a backup or re-import the adapter"
            )
        if time.time_ns() - stat.st_ctime_ns > _RACY_SECONDS * 1e9:
            with contextlib.suppress(OSError):  # a lost stamp only costs a re-hash next time
                fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix="stamp-")
                with os.fdopen(fd, "w") as handle:
                    handle.write(signature)
                os.replace(tmp_name, stamp)
        return path

    def forget(self, sha256: str) -> None:
        """Drop the verification stamp of a blob (GC calls it for removed blobs)."""
        (self.stamps / sha256).unlink(missing_ok=True)

    def iter_blobs(self) -> Iterator[tuple[str, Path]]:
        for fan in self.objects.iterdir():
            if fan.is_dir():
                for blob in fan.iterdir():
                    yield fan.name + blob.name, blob

    def iter_temp_files(self) -> Iterator[Path]:
        yield from (p for p in self.tmp.iterdir() if p.is_file())
