"""The tiers behind RAM, as a turn reads them: the disk store and the shared tier, with what
a failure or damage there costs (a log line, a counter, the damaged entry dropped), never an
exception in the caller's turn."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from .._format.snapshot import Snapshot
from .._store.disk import DiskStore, NoDisk, agent_key
from .._store.shared import RedisTier, Remote
from ..errors import CorruptEntry, FingerprintMismatch
from .counters import Counters

__all__ = ["Tiers", "Version"]

log = logging.getLogger("agentkv.memory")

Version = Tuple[int, str]  # (generation, save id) of an agent's state: Record.gen, Record.sid
Fetched = Dict[str, Optional[bytes]]  # payloads read from the shared tier (None: gone there)


class Tiers:
    """The disk store and the shared tier (None: not configured) under one fingerprint."""

    def __init__(self, store: Union[DiskStore, NoDisk], shared: Optional[RedisTier],
                 fingerprint: bytes, counters: Counters) -> None:
        self.store = store
        self.shared = shared
        self.fingerprint = fingerprint
        self._count = counters.add

    def rebind(self, fingerprint: bytes) -> None:
        """The context's settings changed: stored KV must match a new fingerprint."""
        self.fingerprint = fingerprint
        if self.shared is not None:
            self.shared.bind(fingerprint)

    # -- failures -------------------------------------------------------------------------

    def store_failed(self, what: str, exc: BaseException) -> None:
        """The store raised (a full disk, a damaged database, a lock held too long): log it,
        count it, and go on without the disk for this step."""
        self._count(store_errors=1)
        try:
            if self.store.recover(exc):
                return
        except Exception as err:  # noqa: BLE001
            log.warning("agentkv: the damaged cache database could not be replaced: %s", err)
        log.warning("agentkv: %s failed (%s: %s); going on without the disk tier for it", what,
                    type(exc).__name__, exc)

    def drop_damaged(self, exc: CorruptEntry, record: Optional[str]) -> None:
        """Damage found: drop the damaged payload with every record naming it (the next save
        that holds those bytes writes them again), else the record that failed."""
        self._count(rejected=1)
        try:
            dropped: List[str] = []
            if exc.payload is not None:
                dropped = self.store.discard_damaged(exc.payload)
            key = exc.record or record
            if key is not None and key not in dropped:
                self.store.drop_record(key)
        except Exception as err:  # noqa: BLE001 - a full disk refuses deletes too
            self.store_failed("dropping a damaged entry", err)

    def shared_damage(self, agent_id: str, exc: BaseException, fetched: Fetched) -> None:
        """A read from the shared tier failed its checks: count it; a payload that is gone
        is an eviction, a damaged one is deleted there (a later save sends it again)."""
        payload = getattr(exc, "payload", None)
        if payload in fetched and fetched[payload] is None:
            log.info("agent %r: a payload of its shared state is gone from the shared tier "
                     "(expired or evicted); restoring from what remains", agent_id)
            self._count(shared_missing=1)
            return
        log.warning("agent %r: its state on the shared tier failed its checks (%s)", agent_id, exc)
        self._count(rejected=1)
        if payload in fetched and self.shared is not None:
            self.shared.discard(payload)

    # -- an agent's state -----------------------------------------------------------------

    def read_disk(self, agent_id: str) -> Optional[Snapshot]:
        """The agent's state from disk, checked; None if there is none or it fails."""
        try:
            snap, nread = self.store.get(agent_id, self.fingerprint, scratch=True)
        except FingerprintMismatch as exc:
            log.warning("agent %r: stored KV not restored: %s", agent_id, exc)
            self._count(rejected=1)
            return None
        except CorruptEntry as exc:
            log.warning("agent %r: stored KV is damaged (%s); prefilling", agent_id, exc)
            self.drop_damaged(exc, agent_key(agent_id))
            return None
        except Exception as exc:  # noqa: BLE001 - the store failed, not the data
            self.store_failed(f"reading agent {agent_id!r}", exc)
            return None
        self._count(bytes_read=nread)
        return snap

    def newer_shared(self, agent_id: str, mine: Optional[Version]
                     ) -> Tuple[Optional[Remote], Optional[str]]:
        """Take the agent's lease on the shared tier and read its manifest there: (the
        manifest when it is newer than ``mine``, the state this process holds, else None;
        the lease's token). ``(None, None)`` without a shared tier or when it is away."""
        if self.shared is None:
            return None, None
        remote, lease = self.shared.claim(agent_id)
        if remote is None:
            return None, lease
        if mine is None:
            m = self.store.manifest(agent_id)
            if m is not None and m.fingerprint == self.fingerprint.hex():
                mine = (m.gen, m.sid)
        theirs = remote.version
        if mine is not None and (mine[0] > theirs[0] or mine == theirs):
            return None, lease  # ours, or newer than it (published when the tier comes back)
        return remote, lease

    def read_shared(self, agent_id: str, remote: Remote) -> Optional[Snapshot]:
        """The agent's newest turn from the shared tier: its manifest's payloads this store
        lacks are fetched, then everything is checked as a disk read is. None if that fails
        (logged, counted; a damaged payload is deleted there)."""
        assert self.shared is not None
        fetched: Fetched = {}
        try:
            fetched = self.shared.fetch(self.store.missing(remote.record.keys()))
            snap, _ = self.store.get(agent_id, self.fingerprint, scratch=True,
                                     remote=(remote.raw, fetched))
        except (CorruptEntry, FingerprintMismatch) as exc:
            self.shared_damage(agent_id, exc, fetched)
            return None
        except Exception as exc:  # noqa: BLE001 - the local store failed, not the data
            self.store_failed(f"reading agent {agent_id!r} from the shared tier", exc)
            return None
        return snap

    # -- shared prefixes ------------------------------------------------------------------

    def find_prefix(self, prompt: np.ndarray, n_swa: int, align: int, fetched: Fetched
                    ) -> Tuple[Optional[Snapshot], int, Optional[str]]:
        """The longest stored prefix of ``prompt`` that restores exactly, on disk or (cuts)
        on the shared tier, whose payloads go to ``fetched``: (snapshot, bytes read, the key
        of the record it came from). Raises what the store raises."""
        shared = self.shared
        extra: List[Any] = []

        def fetch(keys: List[str]) -> Fetched:
            assert shared is not None
            fetched.update(shared.fetch(keys))
            return fetched
        if shared is not None:
            extra = shared.cuts(self.store.chain_of(prompt, self.fingerprint))
        return self.store.find_prefix(prompt, self.fingerprint, n_swa, scratch=True, align=align,
                                      extra=extra, fetch=fetch if extra else None)

    def plan_cut(self, prompt: np.ndarray, n_swa: int, align: int) -> int:
        """Where to store a prefix ``prompt`` shares with stored states (0: nowhere)."""
        try:
            return self.store.plan_cut(prompt, self.fingerprint, n_swa, align)
        except Exception as exc:  # noqa: BLE001
            self.store_failed("planning a shared prefix", exc)
            return 0
