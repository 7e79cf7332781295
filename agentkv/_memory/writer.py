"""Write-behind: snapshots go to disk on a background thread, in the order they were taken,
giving way to a returning agent's time to first token."""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

from .._format.snapshot import Snapshot

__all__ = ["SaveJob", "CutJob", "Job", "WriteBehind"]

log = logging.getLogger(__name__)

YIELD_SECONDS = 0.5  # longest a save waits for a first token at each step (never starved)


@dataclass(frozen=True)
class SaveJob:
    """Put ``snap`` on disk as agent ``agent_id``'s newest turn, unless save ``generation``
    was superseded by the time it runs."""

    agent_id: str
    snap: Snapshot
    generation: int


@dataclass(frozen=True)
class CutJob:
    """Store the shared prefix ``snap`` holds (a cut: whole blocks and their SWA window)."""

    snap: Snapshot


Job = Union[SaveJob, CutJob]


class WriteBehind:
    """One worker thread calling ``write(job)`` for each job, first in, first out (a newer
    snapshot of an agent always lands after an older one).

    :meth:`wait` blocks until an agent's newest save has run, :meth:`drain` until every job
    has; a failure of ``write`` is logged, never raised into the thread that submitted the job.
    ``write`` calls :meth:`yield_point` between its steps: from :meth:`hold` (a restore
    began) until :meth:`release` (its first token, or the end of its turn) each step waits,
    at most :data:`YIELD_SECONDS`. Waiting for the writer releases it first: a writer held
    while the turn waits for it would cost that turn ~0.5 s per block.
    """

    def __init__(self, write: Callable[[Job], None]) -> None:
        self._write = write
        self._queue: "queue.Queue[Optional[Tuple[Job, threading.Event]]]" = queue.Queue()  # None: stop
        self._pending: Dict[str, threading.Event] = {}  # agent -> its newest save's event
        self._lock = threading.Lock()
        self._may_run = threading.Event()
        self._may_run.set()
        self._thread = threading.Thread(target=self._run, name="agentkv-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        done = threading.Event()
        if isinstance(job, SaveJob):
            with self._lock:
                self._pending[job.agent_id] = done
        self._queue.put((job, done))

    # -- pacing ---------------------------------------------------------------------------

    def hold(self) -> None:
        """A restore begins: saves wait from their next step on."""
        log.debug("saves yield until the returning agent's first token")
        self._may_run.clear()

    def release(self) -> None:
        """Saves go on (the first token is out, or the turn ended)."""
        if not self._may_run.is_set():
            log.debug("saves resume")
            self._may_run.set()

    @property
    def held(self) -> bool:
        return not self._may_run.is_set()

    def yield_point(self) -> None:
        """Writer thread, between steps of a save: wait while a restore holds the writer."""
        self._may_run.wait(timeout=YIELD_SECONDS)

    # -- waiting --------------------------------------------------------------------------

    def wait(self, agent_id: str, timeout: Optional[float] = None, release: bool = True) -> None:
        """Until the agent's newest submitted save has run (or ``timeout`` seconds);
        ``release=False`` for a waiter that is not a turn (saves still yield to one)."""
        with self._lock:
            done = self._pending.get(agent_id)
        if done is not None:
            if release:
                self.release()
            log.debug("waiting for agent %r's save", agent_id)
            done.wait(timeout)

    def drain(self) -> None:
        """Until every submitted job has run."""
        self.release()
        log.debug("waiting for every queued save")
        self._queue.join()

    def close(self) -> None:
        self.release()
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                job, done = item
                try:
                    self._write(job)
                except Exception:  # noqa: BLE001 - a failed write must not kill the writer
                    log.exception("a background save failed")
                finally:
                    done.set()
                    if isinstance(job, SaveJob):
                        with self._lock:
                            if self._pending.get(job.agent_id) is done:
                                del self._pending[job.agent_id]
            finally:
                self._queue.task_done()
