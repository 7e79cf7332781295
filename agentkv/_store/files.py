"""What the disk store stands on: diskcache rows of raw bytes only, a write lock shared by every
process using the cache, and a read buffer reused from one restore to the next."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Set

import diskcache

from ..errors import ConfigError, CorruptEntry, NotACache, StoreBusy

__all__ = ["SafeDisk", "StoreLock", "claim", "check_database", "database_damage",
           "move_aside", "open_regular", "MARKER", "DB_NAME"]

log = logging.getLogger(__name__)


class Chunks:
    """Buffers to write in order, as a file whose ``read`` hands each one out whole (no copy):
    ``Cache.set(key, Chunks(parts), read=True)`` writes a payload without joining it first.
    A join of megabytes holds the GIL throughout, and a turn decoding meanwhile waits for it
    (up to the 5 ms switch interval per token)."""

    def __init__(self, parts: Sequence[Any]) -> None:
        views = [v for v in (memoryview(p).cast("B") for p in parts) if v.nbytes]
        self.nbytes = sum(v.nbytes for v in views)
        self._views = views
        self._parts = iter(views)  # an empty one would read as EOF: left out

    def __bytes__(self) -> bytes:
        return b"".join(self._views)

    def read(self, size: int = -1) -> Any:
        return next(self._parts, b"")


class SafeDisk(diskcache.Disk):
    """A diskcache ``Disk`` that stores and returns raw bytes only, never pickles.

    Values of a file's size are written through :class:`Chunks`: diskcache's own path for
    ``bytes`` iterates a ``BytesIO`` by lines, one ``write`` per newline byte (~1/256 of
    random KV data), 5x slower and in Python.
    """

    def get(self, key, raw):
        if not raw:
            raise CorruptEntry("cache index holds a pickled key; refusing to unpickle it")
        return super().get(key, raw)

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if read and isinstance(value, Chunks):  # a small one is a row, as bytes would be
            if value.nbytes < self.min_file_size:
                return super().store(bytes(value), False, key)
            return super().store(value, True, key)
        if type(value) is not bytes:
            raise TypeError(f"SafeDisk stores bytes only, not {type(value).__name__}")
        if len(value) >= self.min_file_size:
            return super().store(Chunks([value]), True, key)
        return super().store(value, read, key)

    def fetch(self, mode, filename, value, read):
        if mode == diskcache.core.MODE_RAW:
            result = super().fetch(mode, filename, value, read)
            if not isinstance(result, bytes):
                raise CorruptEntry(f"cache row holds {type(result).__name__}, not bytes")
            return result
        if mode != diskcache.core.MODE_BINARY or not isinstance(filename, str):
            raise CorruptEntry(f"cache row has mode {mode}; only raw bytes are read back")
        f = open_regular(os.path.join(self._directory, filename))
        if read:
            return f
        with f:
            return f.read()

    def _write(self, full_path, iterator, mode, encoding=None):
        """diskcache's write, minus what a failed one leaves: a half-written file that no row
        names (a full disk), removed at once instead of by the next ``gc``."""
        try:
            return super()._write(full_path, iterator, mode, encoding)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(full_path)
            raise


def open_regular(path: str):
    """``open(path, "rb")`` for regular files only: a FIFO, device or symlink put in place of a
    payload raises CorruptEntry instead of blocking the reader or reading another file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CorruptEntry(f"payload file {path} cannot be opened: {exc}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptEntry(f"payload file {path} is not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class StoreLock:
    """The cross-process write lock of one cache: a row every writer adds before its first
    block and deletes after its record. The row expires (``expire`` seconds), so a holder
    killed mid-write frees it in time; a holder on this host that is gone frees it at once."""

    KEY = "lock/store"

    def __init__(self, cache: diskcache.Cache, where: str, expire: float = 30.0,
                 timeout: float = 120.0) -> None:
        self._cache = cache
        self._where = where
        self._expire = expire
        self._timeout = timeout
        self._token: Optional[bytes] = None
        self._renewed = 0.0
        self._unreleased: Set[bytes] = set()

    @contextlib.contextmanager
    def held(self, timeout: Optional[float] = None) -> Iterator[None]:
        """Hold the lock for the block (not reentrant; raises StoreBusy after ``timeout``
        seconds, by default the lock's own)."""
        token = self._acquire(self._timeout if timeout is None else timeout)
        self._token, self._renewed = token, time.monotonic()
        try:
            yield
        finally:
            self._token = None
            self._release(token)

    def renew(self) -> None:
        """Called by a holder between steps of its work: pushes the expiry back (at most every
        quarter of it), so a live holder never loses the lock to a waiter."""
        token = self._token
        if token is None or time.monotonic() - self._renewed < self._expire / 4:
            return
        with self._cache.transact():
            if self._cache.get(self.KEY) == token:
                self._cache.touch(self.KEY, expire=self._expire)
        self._renewed = time.monotonic()

    def _acquire(self, timeout: float) -> bytes:
        token = f"{os.getpid()}:{socket.gethostname()}:{os.urandom(8).hex()}".encode()
        deadline = time.monotonic() + timeout
        while not self._cache.add(self.KEY, token, expire=self._expire):
            self._break_dead_lock()
            if time.monotonic() > deadline:
                raise StoreBusy(f"the store lock of {self._where} was not freed in "
                                f"{timeout:.0f} s")
            time.sleep(0.002)
        return token

    def _break_dead_lock(self) -> None:
        """Free the lock of a holder on this host that no longer runs (killed mid-write), or
        one this process failed to release (its release hit a full disk)."""
        held = self._cache.get(self.KEY)
        if held is None:
            return
        if held in self._unreleased:
            with self._cache.transact():
                if self._cache.get(self.KEY) == held:
                    self._cache.delete(self.KEY)
            self._unreleased.discard(held)
            return
        try:
            pid_s, host, _ = held.decode().split(":", 2)
            pid = int(pid_s)
        except (UnicodeDecodeError, ValueError):
            return
        if host != socket.gethostname() or pid == os.getpid():
            return
        try:
            os.kill(pid, 0)
            return  # alive (or not ours to signal): wait for it
        except ProcessLookupError:
            pass
        except PermissionError:
            return
        with self._cache.transact():
            if self._cache.get(self.KEY) == held:
                log.warning("freeing the store lock of process %d, which is gone", pid)
                self._cache.delete(self.KEY)

    def _release(self, token: bytes) -> None:
        try:
            with self._cache.transact():
                if self._cache.get(self.KEY) == token:
                    self._cache.delete(self.KEY)
        except Exception:
            self._unreleased.add(token)  # freed by this process's next acquire
            raise


# -- the cache folder -------------------------------------------------------------------------

MARKER = "cache.db.agentkv"  # written when agentkv makes a folder its cache (diskcache's check
# skips names holding "cache.db", so gc never removes it)
_MARKER_TEXT = b"agentkv cache folder: agentkv writes and deletes files here (gc included)\n"
DB_NAME = "cache.db"
_CACHE_COLUMNS = {"rowid", "key", "raw", "store_time", "expire_time", "access_time",
                  "access_count", "tag", "size", "mode", "filename", "value"}


def _looks_like_legacy_cache(names: List[str]) -> bool:
    """A folder written by agentkv before it marked its folders: diskcache's files only."""
    if DB_NAME not in names:
        return False
    for name in names:
        if name.startswith(DB_NAME):
            continue
        if len(name) == 2 and all(c in "0123456789abcdef" for c in name):
            continue
        return False
    return True


def claim(directory: Path, create: bool) -> None:
    """Make sure ``directory`` is an agentkv cache before anything is written or deleted there.

    A folder with agentkv's marker is one; so is a folder of diskcache files only (caches
    written before the marker existed: the marker is added). A missing or empty folder becomes
    one if ``create``. Anything else raises NotACache, and nothing is touched.
    """
    marker = directory / MARKER
    try:
        if marker.is_file():
            return
        names = sorted(os.listdir(directory)) if directory.is_dir() else None
    except OSError as exc:
        raise ConfigError(f"cache_dir {directory} cannot be read: {exc}") from exc
    if names is None and directory.exists():
        raise ConfigError(f"cache_dir {directory} is not a directory")
    if names and not _looks_like_legacy_cache(names):
        raise NotACache(f"{directory} holds other files and no agentkv cache; agentkv only "
                        "makes an empty or new folder its cache (it deletes files there)")
    if not names and not create:
        raise NotACache(f"{directory} is not an agentkv cache (it is empty or missing)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ConfigError(f"cache_dir {directory} is not writable by this process")
        tmp = directory / f".{MARKER}.{os.getpid()}"
        tmp.write_bytes(_MARKER_TEXT)
        os.replace(tmp, marker)
    except ConfigError:
        raise
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
            raise ConfigError(f"cache_dir {directory} cannot be made a cache: {exc}") from exc
        raise  # a full disk, an I/O error: the memory opens without its disk tier


def database_damage(exc: BaseException) -> Optional[str]:
    """What is wrong with the database if ``exc`` says it is damaged (not merely full, locked
    or unwritable), else None."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    text = str(exc).lower()
    if code in (11, 26) or any(s in text for s in (
            "malformed", "not a database", "no such table", "no such column",
            "has no column named", "file is encrypted", "database corrupt")):
        return str(exc)
    return None


def check_database(path: Path) -> Optional[str]:
    """None if the SQLite file at ``path`` (if any) is sound, else what is wrong with it.
    Opens it read-only: nothing is created or changed."""
    if not path.exists():
        return None
    if not path.is_file():
        return f"{path} is not a regular file"
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as exc:
        return database_damage(exc) or None
    try:
        result = con.execute("PRAGMA quick_check").fetchall()
        if result != [("ok",)]:
            return f"{path} failed SQLite's check: {result[0][0] if result else '?'}"
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "Cache" in tables:
            cols = {r[1] for r in con.execute("PRAGMA table_info(Cache)")} | {"rowid"}
            if not _CACHE_COLUMNS <= cols:
                return f"{path}: table Cache lacks columns {sorted(_CACHE_COLUMNS - cols)}"
        elif tables:
            return f"{path} holds no Cache table"
    except sqlite3.Error as exc:
        return database_damage(exc)
    finally:
        con.close()
    return None


def move_aside(path: Path) -> Path:
    """Rename a damaged database (and its journal files) out of the way, kept for its owner."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    dest = path.with_name(f"{path.name}.damaged-{stamp}-{os.getpid()}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if src.exists():
            os.replace(src, Path(str(dest) + suffix))
    return dest
