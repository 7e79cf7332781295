"""What the disk store stands on: diskcache rows of raw bytes only, a write lock shared by every
process using the cache, and a read buffer reused from one restore to the next."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from typing import Iterator

import diskcache
import numpy as np

from .errors import CorruptEntry

__all__ = ["SafeDisk", "StoreLock", "Arena"]

log = logging.getLogger(__name__)


class SafeDisk(diskcache.Disk):
    """A diskcache ``Disk`` that stores and returns raw bytes only, never pickles."""

    def get(self, key, raw):  # type: ignore[override]
        if not raw:
            raise CorruptEntry("cache index holds a pickled key; refusing to unpickle it")
        return super().get(key, raw)

    def store(self, value, read, key=diskcache.core.UNKNOWN):  # type: ignore[override]
        if type(value) is not bytes:
            raise TypeError(f"SafeDisk stores bytes only, not {type(value).__name__}")
        return super().store(value, read, key)

    def fetch(self, mode, filename, value, read):  # type: ignore[override]
        if mode not in (diskcache.core.MODE_RAW, diskcache.core.MODE_BINARY):
            raise CorruptEntry(f"cache row has mode {mode}; only raw bytes are read back")
        result = super().fetch(mode, filename, value, read)
        if not read and not isinstance(result, bytes):
            raise CorruptEntry(f"cache row holds {type(result).__name__}, not bytes")
        return result


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

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock for the block (not reentrant; raises TimeoutError after ``timeout``)."""
        token = self._acquire()
        try:
            yield
        finally:
            self._release(token)

    def _acquire(self) -> bytes:
        token = f"{os.getpid()}:{socket.gethostname()}:{os.urandom(8).hex()}".encode()
        deadline = time.monotonic() + self._timeout
        while not self._cache.add(self.KEY, token, expire=self._expire):
            self._break_dead_lock()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the store lock of {self._where} was not freed in "
                                   f"{self._timeout:.0f} s")
            time.sleep(0.002)
        return token

    def _break_dead_lock(self) -> None:
        """Free the lock of a holder on this host that no longer runs (killed mid-write)."""
        held = self._cache.get(self.KEY)
        if held is None:
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
        with self._cache.transact():
            if self._cache.get(self.KEY) == token:
                self._cache.delete(self.KEY)


class Arena:
    """A read buffer reused from one restore to the next: payloads read into it cost no page
    faults (a fresh 20 MB buffer takes ~5k of them). Views handed out stay valid until
    :meth:`reset`; a read that does not fit goes to a buffer of its own, and the next reset
    grows the arena to what the last round needed."""

    def __init__(self) -> None:
        self._buf = np.empty(0, dtype=np.uint8)
        self._used = 0
        self._wanted = 0

    def reset(self) -> None:
        if self._wanted > self._buf.nbytes:
            self._buf = np.empty(self._wanted + (self._wanted >> 4), dtype=np.uint8)
        self._used = self._wanted = 0

    def take(self, nbytes: int) -> np.ndarray:
        self._wanted += nbytes
        if self._used + nbytes > self._buf.nbytes:
            return np.empty(nbytes, dtype=np.uint8)
        view = self._buf[self._used:self._used + nbytes]
        self._used += nbytes
        return view
