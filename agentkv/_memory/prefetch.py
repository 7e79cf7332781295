"""Prefetch: an agent's state read from disk into RAM while another agent's turn runs.

:class:`Prefetcher` runs in the background. ``request(agent_id)`` returns at once; once a
returning agent has its first token (the writer's pacing), one thread asks the kernel to read
the agent's payloads ahead, so that the disk reads them into the page cache while the turn
decodes; a second thread, in Linux's idle scheduling class (its CPU is only what the decode
leaves, and all of it once the turn ends or a restore waits for it), reads them into one
blob, checks it as a restore does and keeps it, within what the RAM budget leaves free. The
agent's next activation takes it (:meth:`take`, waiting for a read in flight) instead of
reading the disk inside its time to first token. A prefetched state is only used if it is the
agent's newest (its version is the one this process holds); anything that fails is dropped
quietly, and the turn reads the disk as it would have (where damage is handled).

:class:`NextAgent` predicts whom to prefetch: the agent that followed the current one the
last time it ran (round-robin teams and fixed chains such as planner -> coder -> critic).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from .._format import pieces as seqpieces
from .._format.buffers import ReadArena
from .._format.snapshot import Snapshot, StoredPieces
from .counters import Counters
from .tiers import Tiers, Version

__all__ = ["NextAgent", "Prefetcher"]

log = logging.getLogger("agentkv.memory")


def _lower_priority() -> None:
    """Put the calling thread (only it) in Linux's idle scheduling class: it then runs only
    on a core nothing else wants, so a read ahead never takes CPU from the turn's decode, and
    runs at full speed once the turn is over or a restore waits for it. (Its own disk reads
    are then idle-class I/O too, which a busy disk serves last: the opener's readahead, in the
    normal class, has asked for them already.) Elsewhere: nothing."""
    if not hasattr(os, "SCHED_IDLE"):
        return
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:  # a sandbox may refuse it: the reads then run in the normal class
        log.debug("prefetch thread stays in the normal scheduling class: %s", exc)


class NextAgent:
    """Who comes after whom, learnt from the order of turns."""

    def __init__(self) -> None:
        self._after: Dict[str, str] = {}
        self._last: Optional[str] = None

    def turn(self, agent_id: str) -> Optional[str]:
        """``agent_id``'s turn begins: note it; return the agent predicted to come next."""
        if self._last is not None and self._last != agent_id:
            self._after[self._last] = agent_id
        self._last = agent_id
        return self._after.get(agent_id)

    def forget(self, agent_id: str) -> None:
        self._after.pop(agent_id, None)
        for k in [k for k, v in self._after.items() if v == agent_id]:
            del self._after[k]


class Prefetcher:
    """Two background threads: an opener (normal scheduling class) asks the kernel to read
    the agent's payloads ahead; a reader (idle class) reads them into place and checks them.
    ``free_bytes()`` is what the RAM budget leaves now, and ``yield_point()`` waits while a
    restore holds the writer (the same pacing as saves)."""

    def __init__(self, tiers: Tiers, counters: Counters, free_bytes: Callable[[], int],
                 yield_point: Callable[[], None],
                 assemble: Optional[Callable[[StoredPieces, int], Any]] = None) -> None:
        self._tiers = tiers
        # (pieces, n_tokens) -> the one blob kept: by default compact; the memory passes the
        # restore's layout. Blocks are read straight into it (the reader's own arena holds
        # the rest of a read).
        self._assemble = assemble or (lambda st, _n: seqpieces.assemble(st.shape, st.pieces))
        self._arena = ReadArena()
        self._counters = counters
        self._free_bytes = free_bytes
        self._yield_point = yield_point
        self._lock = threading.Lock()
        self._ready: Dict[str, Snapshot] = {}
        self._busy: Dict[str, threading.Event] = {}
        self._epoch: Dict[str, int] = {}  # per agent: bumped by drop, so a read in flight is void
        self._queue: "queue.Queue[Optional[Tuple[str, int, Optional[Callable[[], None]]]]]" = \
            queue.Queue()
        # agents whose readahead was asked, handed from the opener to the reader
        self._reads: "queue.Queue[Optional[Tuple[str, int]]]" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="agentkv-prefetch", daemon=True)
        self._reader = threading.Thread(target=self._read_ahead, name="agentkv-prefetch-read",
                                        daemon=True)
        self._thread.start()
        self._reader.start()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._ready.values())

    def request(self, agent_id: str, first: Optional[Callable[[], None]] = None) -> None:
        """Read the agent's stored state in the background (at once if nothing else is);
        ``first`` runs on the prefetch thread before the read (making room for it)."""
        with self._lock:
            if agent_id in self._ready or agent_id in self._busy:
                return
            self._busy[agent_id] = threading.Event()
            epoch = self._epoch.get(agent_id, 0)
        self._queue.put((agent_id, epoch, first))

    def peek(self, agent_id: str) -> Optional[Snapshot]:
        """What was read ahead for the agent (waiting for a read in flight), left in place."""
        with self._lock:
            busy = self._busy.get(agent_id)
        if busy is not None:
            busy.wait()
        with self._lock:
            return self._ready.get(agent_id)

    def take(self, agent_id: str, version: Optional[Version]) -> Optional[Snapshot]:
        """The agent's prefetched state (waiting for a read in flight), if it is the newest:
        its version is ``version`` (None: this process holds none, the disk's is newest)."""
        with self._lock:
            busy = self._busy.get(agent_id)
        if busy is not None:
            busy.wait()
        with self._lock:
            snap = self._ready.pop(agent_id, None)
        if snap is None or (version is not None and snap.version != version):
            return None
        return snap

    def drop(self, agent_id: Optional[str] = None) -> None:
        """Forget what was prefetched (of one agent, or all): the RAM it holds goes."""
        with self._lock:
            for a in list(self._ready) + list(self._busy) if agent_id is None else [agent_id]:
                self._ready.pop(a, None)
                self._epoch[a] = self._epoch.get(a, 0) + 1

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._reader.join()
        self.drop()

    def _run(self) -> None:
        """The opener (normal class, little CPU): asks the kernel to read the agent's payloads
        into the page cache, so that the disk works while the turn decodes, and hands the
        agent to the reader."""
        while True:
            item = self._queue.get()
            if item is None:
                self._reads.put(None)
                return
            agent_id, epoch, first = item
            try:
                if first is not None:
                    first()
                self._yield_point()
                self._tiers.store.read_ahead(agent_id)
            except Exception as exc:  # noqa: BLE001 - the reader reads what it can
                log.debug("readahead of agent %r failed: %s", agent_id, exc)
            self._reads.put((agent_id, epoch))

    def _read_ahead(self) -> None:
        """The reader (idle class): reads and checks the agent's state, and keeps it."""
        _lower_priority()
        while True:
            item = self._reads.get()
            if item is None:
                return
            agent_id, epoch = item
            try:
                snap = self._read(agent_id)
                if snap is not None:
                    with self._lock:
                        if self._epoch.get(agent_id, 0) == epoch:  # not dropped meanwhile
                            self._ready[agent_id] = snap
                    self._counters.add(prefetch_reads=1)
            except Exception as exc:  # noqa: BLE001 - the turn reads the disk itself then
                log.debug("prefetch of agent %r failed: %s", agent_id, exc)
            finally:
                with self._lock:
                    done = self._busy.pop(agent_id, None)
                if done is not None:
                    done.set()

    def _read(self, agent_id: str) -> Optional[Snapshot]:
        """The agent's stored state as one blob (assembled in the restore's layout where
        ``assemble`` was given: a RestoreImage, its padding on the zero page), or None (none,
        or no room)."""
        self._yield_point()
        t0, c0 = time.perf_counter(), time.thread_time()
        tiers = self._tiers
        record = tiers.store.manifest(agent_id)
        if record is None or record.fingerprint != tiers.fingerprint.hex():
            return None
        stored, nread = tiers.store.get(agent_id, tiers.fingerprint, arena=self._arena)
        if stored is None or not isinstance(stored.state, StoredPieces):
            return None
        self._yield_point()
        blob = self._assemble(stored.state, stored.n_tokens)  # not inside the agent's TTFT
        snap = Snapshot(stored.tokens, blob, stored.logits, stored.exact, stored.version)
        log.debug("prefetch of agent %r: %d bytes read and checked in %.1f ms (%.1f ms of CPU)",
                  agent_id, nread, (time.perf_counter() - t0) * 1e3,
                  (time.thread_time() - c0) * 1e3)
        if snap.nbytes > self._free_bytes() - self.nbytes:
            log.debug("agent %r not prefetched: its %d bytes do not fit the RAM budget",
                      agent_id, snap.nbytes)
            return None
        self._counters.add(prefetch_bytes=nread)
        return snap
