"""Saves: every agent's turn reaches disk (and the shared tier) behind the turn, in order.

:class:`Saves` numbers each save (a *generation*: the newest one wanted per agent, the newest
one that landed), stamps each snapshot with its *version* (the shared tier's generation, one
more than the state it continued, and a save id), and runs the writes on the write-behind
thread. A save superseded by a newer one or by a forget is skipped; a failed one is logged,
counted and written again later from RAM (:meth:`rewrite_if_lost`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import replace
from typing import Dict, Optional, Tuple

from .._format.snapshot import Snapshot
from .counters import Counters
from .tiers import Tiers, Version
from .writer import CutJob, Job, SaveJob, WriteBehind

__all__ = ["Saves"]

log = logging.getLogger("agentkv.memory")


class Saves:
    """The memory's saves; ``ram_budget`` only words the message of a failed one."""

    def __init__(self, tiers: Tiers, counters: Counters, ram_budget: int) -> None:
        self._tiers = tiers
        self._counters = counters
        self._ram_budget = ram_budget
        self._lock = threading.Lock()  # the maps below are shared with the writer thread
        self._generation = 0
        self._wanted: Dict[str, int] = {}  # agent -> generation that should reach disk
        self._durable: Dict[str, int] = {}  # agent -> generation that did
        self._versions: Dict[str, Version] = {}  # agent -> newest state this process holds
        # agent -> (write generation, the shared tier's lease token its publish releases)
        self._leases: Dict[str, Tuple[int, str]] = {}
        self.writer = WriteBehind(self._write)

    # -- versions -------------------------------------------------------------------------

    def version(self, agent_id: str) -> Optional[Version]:
        with self._lock:
            return self._versions.get(agent_id)

    def set_version(self, agent_id: str, version: Version) -> None:
        with self._lock:
            self._versions[agent_id] = version

    # -- queueing -------------------------------------------------------------------------

    def queue(self, agent_id: str, snap: Snapshot, lease: Optional[str] = None) -> Snapshot:
        """Queue the write of a new snapshot of the agent, stamped with its new version
        (saved with it, kept with it in RAM); ``lease`` is released when it is published."""
        with self._lock:
            self._generation += 1
            generation = self._generation
            self._wanted[agent_id] = generation
            version = (self._versions.get(agent_id, (0, ""))[0] + 1, uuid.uuid4().hex[:16])
            self._versions[agent_id] = version
            if lease is not None:
                self._leases[agent_id] = (generation, lease)
        snap = replace(snap, version=version)
        self.writer.submit(SaveJob(agent_id, snap, generation))
        return snap

    def queue_cut(self, snap: Snapshot) -> None:
        """Queue the store of a shared prefix."""
        self.writer.submit(CutJob(snap))

    def is_durable(self, agent_id: str) -> bool:
        with self._lock:
            wanted = self._wanted.get(agent_id)
            return wanted is None or self._durable.get(agent_id) == wanted

    def rewrite_if_lost(self, agent_id: str, snap: Snapshot) -> None:
        """Queue the write of a snapshot whose save failed (a full disk, since freed)."""
        self.writer.wait(agent_id)
        with self._lock:
            generation = self._wanted.get(agent_id)
            lost = generation is not None and self._durable.get(agent_id) != generation
        if lost and generation is not None:
            self.writer.submit(SaveJob(agent_id, snap, generation))

    def forget(self, agent_id: str, landed: bool = False) -> None:
        """Stop tracking the agent: its queued save is skipped; ``landed``: forget what
        reached disk too (another process owns the agent's newer state)."""
        with self._lock:
            self._wanted.pop(agent_id, None)
            self._versions.pop(agent_id, None)
            self._leases.pop(agent_id, None)
            if landed:
                self._durable.pop(agent_id, None)

    # -- the writer thread ----------------------------------------------------------------

    def _write(self, job: Job) -> None:
        """Put a job's snapshot on disk (and publish it) unless it was superseded. A failure
        is logged and counted, never raised (the turn has long answered)."""
        t0 = time.perf_counter()
        lease: Optional[str] = None
        agent_id = None if isinstance(job, CutJob) else job.agent_id
        try:
            if isinstance(job, CutJob):
                written = self._store_cut(job.snap)
            else:
                with self._lock:
                    if self._wanted.get(job.agent_id) != job.generation:
                        return
                    if self._leases.get(job.agent_id, (None, ""))[0] == job.generation:
                        lease = self._leases.pop(job.agent_id)[1]
                written, lease = self._store_turn(job, lease)
        except Exception as exc:  # noqa: BLE001
            self._tiers.store_failed(self._failure(agent_id), exc)
            return
        finally:
            shared = self._tiers.shared
            if lease is not None and shared is not None and agent_id is not None:
                shared.release(agent_id, lease)  # not published: let go
        if isinstance(job, SaveJob):
            with self._lock:
                self._durable[job.agent_id] = job.generation
        self._counters.add(bytes_written=written, save_seconds=time.perf_counter() - t0)

    def _store_turn(self, job: SaveJob, lease: Optional[str]) -> Tuple[int, Optional[str]]:
        """Write an agent's turn and publish it; (bytes written, the lease still held)."""
        tiers, pause = self._tiers, self.writer.yield_point
        sink: Optional[Dict[str, object]] = None if tiers.shared is None else {}
        r, written = tiers.store.put(job.agent_id, job.snap, tiers.fingerprint, pause,
                                     job.snap.version, sink)
        if tiers.shared is not None and sink is not None and r is not None:
            tiers.shared.publish(r, sink, lease, pause)
            lease = None
        return written, lease

    def _store_cut(self, snap: Snapshot) -> int:
        tiers, pause = self._tiers, self.writer.yield_point
        sink: Optional[Dict[str, object]] = None if tiers.shared is None else {}
        cut, written = tiers.store.put_cut(snap, tiers.fingerprint, pause, sink)
        if cut is not None and sink is not None and tiers.shared is not None:
            tiers.shared.publish_cut(cut, sink, pause)
        return written

    def _failure(self, agent_id: Optional[str]) -> str:
        if agent_id is None:
            return "storing a shared prefix"
        if self._ram_budget == 0:
            return (f"saving agent {agent_id!r} (ram_budget=0: once it leaves the context its "
                    "KV is gone, and its next turn prefills)")
        return (f"saving agent {agent_id!r} (its KV stays in RAM, and is written again by "
                "flush(), evict() or when RAM pushes it out)")
