"""The RAM tier: snapshots of evicted agents, a byte-counted LRU."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import List, NamedTuple, Optional, Tuple

from .._format.snapshot import Snapshot

__all__ = ["RamEntry", "RamTier"]


class RamEntry(NamedTuple):
    snap: Snapshot
    last_used: float  # wall-clock time of the agent's last turn


class RamTier:
    """Snapshots by agent id, least recently used first, under ``budget`` bytes.

    The byte count changes with every put and pop; nothing is re-summed. The order of the
    entries is the tier's one LRU order; each entry carries its agent's last turn's time.
    The memory's context lock guards it, except for :meth:`pop_if`, which the prefetch thread
    calls too: every change is also made under the tier's own lock.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._items: "OrderedDict[str, RamEntry]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def peek(self, agent_id: str) -> Optional[Snapshot]:
        """The agent's snapshot without touching the LRU order."""
        entry = self._items.get(agent_id)
        return None if entry is None else entry.snap

    def items(self) -> List[Tuple[str, RamEntry]]:
        """Every entry, least recently used first."""
        with self._lock:
            return list(self._items.items())

    def put(self, agent_id: str, snap: Snapshot, last_used: float
            ) -> List[Tuple[str, Snapshot]]:
        """Keep ``snap`` as the agent's newest snapshot; return what left to fit the budget.

        A snapshot larger than the whole budget is returned at once (it never fits).
        """
        self.pop(agent_id)
        if snap.nbytes > self.budget:
            return [(agent_id, snap)]
        evicted: List[Tuple[str, Snapshot]] = []
        with self._lock:
            self._items[agent_id] = RamEntry(snap, last_used)
            self._bytes += snap.nbytes
            while self._bytes > self.budget:
                victim, old = self._items.popitem(last=False)
                self._bytes -= old.snap.nbytes
                evicted.append((victim, old.snap))
        return evicted

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def pop(self, agent_id: str) -> Optional[RamEntry]:
        with self._lock:
            entry = self._items.pop(agent_id, None)
            if entry is not None:
                self._bytes -= entry.snap.nbytes
            return entry

    def pop_if(self, agent_id: str, snap: Snapshot) -> bool:
        """Drop the agent's entry if it still holds ``snap`` (not a newer snapshot)."""
        with self._lock:
            entry = self._items.get(agent_id)
            if entry is None or entry.snap is not snap:
                return False
            del self._items[agent_id]
            self._bytes -= snap.nbytes
            return True
