"""The disk tier: checksummed snapshot payloads and agent manifests on diskcache.

Layout of the diskcache under ``cache_dir`` (keys are strings, values raw bytes)::

    kv/<xxh3-128 hex>      a snapshot payload (snapshot.py), named by its own digest
    agent/<xxh3-128 hex>   an agent's manifest (JSON): its id, its payload key, size, fingerprint
    model/<xxh3-128 hex>   a cached content hash of a GGUF file, keyed by path, size and mtime

Agent ids are hashed into keys, and diskcache names its files at random, so no id ever becomes a
path. Write order makes a crash harmless: diskcache writes the payload file before it commits
the row, and the manifest that points at a payload is written after the payload; a torn payload
fails its digest anyway. Reads never unpickle: :class:`SafeDisk` refuses any row that is not
raw bytes under a string key.

The budget is a byte-counted LRU over agents: the index of manifests is loaded once at open
and kept in step with every write, so the store never scans for its size.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import diskcache
import xxhash

from .errors import CorruptEntry, FingerprintMismatch
from .snapshot import Snapshot, content_key, decode, encode

__all__ = ["DiskStore", "Manifest", "SafeDisk", "agent_key"]

log = logging.getLogger(__name__)

_MANIFEST_VERSION = 1


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


def agent_key(agent_id: str) -> str:
    return "agent/" + xxhash.xxh3_128_hexdigest(agent_id.encode("utf-8", "surrogatepass"))


@dataclass
class Manifest:
    """Where an agent's KV lives on disk.

    Attributes:
        agent_id: the agent's id, as given.
        kv: the store key of its payload.
        n_tokens: tokens the payload holds.
        nbytes: size of the payload.
        fingerprint: hex of the fingerprint it was written under.
        saved_at: wall-clock time of the write.
        last_used: wall-clock time of the last write or read (in memory; saved with writes).
    """

    agent_id: str
    kv: str
    n_tokens: int
    nbytes: int
    fingerprint: str
    saved_at: float
    last_used: float

    def to_bytes(self) -> bytes:
        return json.dumps({
            "v": _MANIFEST_VERSION, "agent": self.agent_id, "kv": self.kv,
            "n_tokens": self.n_tokens, "nbytes": self.nbytes, "fp": self.fingerprint,
            "saved_at": self.saved_at,
        }).encode("utf-8", "surrogatepass")

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Manifest":
        try:
            d = json.loads(raw.decode("utf-8", "surrogatepass"))
            if d.get("v") != _MANIFEST_VERSION:
                raise CorruptEntry(f"manifest version {d.get('v')!r} is not supported")
            m = cls(agent_id=d["agent"], kv=d["kv"], n_tokens=int(d["n_tokens"]),
                    nbytes=int(d["nbytes"]), fingerprint=d["fp"], saved_at=float(d["saved_at"]),
                    last_used=float(d["saved_at"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptEntry(f"manifest does not parse: {exc}") from exc
        if not isinstance(m.agent_id, str) or not isinstance(m.kv, str) or not m.kv.startswith("kv/"):
            raise CorruptEntry("manifest fields have the wrong types")
        return m


class DiskStore:
    """Snapshots on disk, one manifest per agent, under a byte budget."""

    def __init__(self, directory: Path, budget: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.budget = budget
        self._cache = diskcache.Cache(
            str(directory), disk=SafeDisk, eviction_policy="none", size_limit=1 << 62,
            cull_limit=0, statistics=False, tag_index=False)
        self._lock = threading.RLock()
        self._index: "OrderedDict[str, Manifest]" = OrderedDict()  # LRU first
        self._refs: Dict[str, int] = {}  # payload key -> manifests pointing at it
        self._sizes: Dict[str, int] = {}  # payload key -> bytes
        self._bytes = 0
        self._load_index()

    # -- index ----------------------------------------------------------------------------

    def _load_index(self) -> None:
        found: List[Manifest] = []
        for key in list(self._cache.iterkeys()):
            if not isinstance(key, str) or not key.startswith("agent/"):
                continue
            try:
                raw = self._cache.get(key)
                if raw is None:
                    continue
                m = Manifest.from_bytes(raw)
                if agent_key(m.agent_id) != key:
                    raise CorruptEntry("manifest is stored under another agent's key")
            except CorruptEntry as exc:
                log.warning("ignoring unreadable manifest %s: %s", key, exc)
                continue
            found.append(m)
        for m in sorted(found, key=lambda m: m.saved_at):
            self._index_add(m)

    def _index_add(self, m: Manifest) -> None:
        self._index[m.agent_id] = m
        self._index.move_to_end(m.agent_id)
        if self._refs.get(m.kv, 0) == 0:
            self._sizes[m.kv] = m.nbytes
            self._bytes += m.nbytes
        self._refs[m.kv] = self._refs.get(m.kv, 0) + 1

    def _index_remove(self, agent_id: str) -> Optional[str]:
        """Drop the agent from the index; return its payload key if nothing else uses it."""
        m = self._index.pop(agent_id, None)
        if m is None:
            return None
        self._refs[m.kv] -= 1
        if self._refs[m.kv] > 0:
            return None
        del self._refs[m.kv]
        self._bytes -= self._sizes.pop(m.kv, 0)
        return m.kv

    # -- queries --------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes of payloads the store holds (the quantity the budget bounds)."""
        return self._bytes

    def manifests(self) -> List[Manifest]:
        with self._lock:
            return list(self._index.values())

    def manifest(self, agent_id: str) -> Optional[Manifest]:
        with self._lock:
            return self._index.get(agent_id)

    # -- writes ---------------------------------------------------------------------------

    def put(self, agent_id: str, snap: Snapshot, fingerprint: bytes) -> Tuple[Optional[Manifest], int]:
        """Persist ``snap`` as the agent's KV; return its manifest and the bytes written.

        Returns ``(None, 0)`` when the payload alone exceeds the budget (logged).
        """
        payload = encode(snap, fingerprint)
        if len(payload) > self.budget:
            log.warning("agent %r: %d bytes of KV exceed disk_budget=%d; not persisted",
                        agent_id, len(payload), self.budget)
            self.drop(agent_id)
            return None, 0
        kv = "kv/" + content_key(payload)
        written = 0
        if kv not in self._cache:
            self._cache.set(kv, payload)
            written = len(payload)
        now = time.time()
        m = Manifest(agent_id, kv, snap.n_tokens, len(payload), fingerprint.hex(), now, now)
        self._cache.set(agent_key(agent_id), m.to_bytes())  # the index row, written last
        with self._lock:
            old = self._index_remove(agent_id)
            self._index_add(m)
            if old is not None and old != kv:
                self._cache.delete(old)
            self._enforce_budget(keep=agent_id)
        return m, written

    def _enforce_budget(self, keep: str) -> None:
        while self._bytes > self.budget and len(self._index) > 1:
            victim = next(a for a in self._index if a != keep)
            log.info("disk budget: evicting agent %r (%d bytes)", victim, self._index[victim].nbytes)
            self._drop_locked(victim)

    def drop(self, agent_id: str) -> bool:
        """Remove the agent's manifest and its payload if unshared; True if it was stored."""
        with self._lock:
            return self._drop_locked(agent_id)

    def _drop_locked(self, agent_id: str) -> bool:
        known = agent_id in self._index
        kv = self._index_remove(agent_id)
        self._cache.delete(agent_key(agent_id))
        if kv is not None:
            self._cache.delete(kv)
        return known

    # -- reads ----------------------------------------------------------------------------

    def get(self, agent_id: str, fingerprint: bytes) -> Tuple[Optional[Snapshot], int]:
        """The agent's stored snapshot (checked) and the bytes read; ``(None, 0)`` if none.

        Raises CorruptEntry or FingerprintMismatch; the caller decides what to drop.
        """
        for attempt in range(2):  # a concurrent writer may replace the payload under us
            raw = self._cache.get(agent_key(agent_id))
            if raw is None:
                with self._lock:
                    if agent_id in self._index:  # removed by another process
                        self._index_remove(agent_id)
                return None, 0
            m = Manifest.from_bytes(raw)
            if m.agent_id != agent_id:
                raise CorruptEntry("manifest names another agent")
            if m.fingerprint != fingerprint.hex():
                raise FingerprintMismatch(
                    f"agent {agent_id!r} was saved by another model or context configuration")
            payload = self._cache.get(m.kv)
            if payload is not None:
                break
        else:
            raise CorruptEntry(f"payload {m.kv} of agent {agent_id!r} is missing")
        snap = decode(payload, fingerprint, key=m.kv[3:])
        with self._lock:
            if agent_id in self._index:
                self._index[agent_id].last_used = time.time()
                self._index.move_to_end(agent_id)
            else:  # written by another process since we opened
                self._index_add(m)
        return snap, len(payload)

    # -- model hashes ---------------------------------------------------------------------

    def model_hash(self, path: str, compute: Callable[[str], str]) -> str:
        """Content hash of a model file, cached by (path, size, mtime)."""
        st = os.stat(path)
        ident = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}"
        key = "model/" + xxhash.xxh3_128_hexdigest(ident.encode("utf-8", "surrogateescape"))
        try:
            cached = self._cache.get(key)
            if cached is not None:
                value = cached.decode("ascii")
                if len(value) == 32 and all(c in "0123456789abcdef" for c in value):
                    return value
        except (CorruptEntry, UnicodeDecodeError):
            pass
        value = compute(path)
        self._cache.set(key, value.encode("ascii"))
        return value

    def close(self) -> None:
        self._cache.close()
