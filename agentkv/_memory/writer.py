"""Write-behind: snapshots go to disk on a background thread, in the order they were taken."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Dict, Optional, Tuple

from .._format.snapshot import Snapshot

__all__ = ["WriteBehind"]

log = logging.getLogger(__name__)

_STOP = object()


class WriteBehind:
    """One worker thread calling ``write(agent_id, snapshot, generation)`` for each job.

    Jobs run first in, first out, so a newer snapshot of an agent always lands after an
    older one. :meth:`wait` blocks until an agent's newest submitted job has run; a failure of
    ``write`` is logged, never raised into the thread that submitted the job.
    """

    def __init__(self, write: Callable[[str, Snapshot, int], None]) -> None:
        self._write = write
        self._queue: "queue.Queue[object]" = queue.Queue()
        self._pending: Dict[str, Tuple[int, threading.Event]] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="agentkv-writer", daemon=True)
        self._thread.start()

    def submit(self, agent_id: str, snap: Snapshot, generation: int) -> None:
        done = threading.Event()
        with self._lock:
            self._pending[agent_id] = (generation, done)
        self._queue.put((agent_id, snap, generation, done))

    def wait(self, agent_id: str, timeout: Optional[float] = None) -> None:
        with self._lock:
            entry = self._pending.get(agent_id)
        if entry is not None:
            entry[1].wait(timeout)

    def drain(self) -> None:
        """Block until every submitted job has run."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is _STOP:
                    return
                agent_id, snap, generation, done = job  # type: ignore[misc]
                try:
                    self._write(agent_id, snap, generation)
                except Exception:  # noqa: BLE001 - a failed write must not kill the writer
                    log.exception("writing agent %r to disk failed", agent_id)
                finally:
                    done.set()
                    with self._lock:
                        if self._pending.get(agent_id, (None, None))[1] is done:
                            del self._pending[agent_id]
            finally:
                self._queue.task_done()
