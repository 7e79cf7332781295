"""The RAM tier: snapshots of evicted agents, a byte-counted LRU."""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Tuple

from .._format.snapshot import Snapshot

__all__ = ["RamTier"]


class RamTier:
    """Snapshots by agent id, least recently used first, under ``budget`` bytes.

    The byte count changes with every put and pop; nothing is re-summed.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._items: "OrderedDict[str, Snapshot]" = OrderedDict()
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __contains__(self, agent_id: str) -> bool:
        return agent_id in self._items

    def __len__(self) -> int:
        return len(self._items)

    def peek(self, agent_id: str) -> Optional[Snapshot]:
        """The agent's snapshot without touching the LRU order."""
        return self._items.get(agent_id)

    def items(self) -> List[Tuple[str, Snapshot]]:
        return list(self._items.items())

    def put(self, agent_id: str, snap: Snapshot) -> List[Tuple[str, Snapshot]]:
        """Keep ``snap`` as the agent's newest snapshot; return what left to fit the budget.

        A snapshot larger than the whole budget is returned at once (it never fits).
        """
        self.pop(agent_id)
        if snap.nbytes > self.budget:
            return [(agent_id, snap)]
        self._items[agent_id] = snap
        self._bytes += snap.nbytes
        evicted: List[Tuple[str, Snapshot]] = []
        while self._bytes > self.budget:
            victim, old = self._items.popitem(last=False)
            self._bytes -= old.nbytes
            evicted.append((victim, old))
        return evicted

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0

    def pop(self, agent_id: str) -> Optional[Snapshot]:
        snap = self._items.pop(agent_id, None)
        if snap is not None:
            self._bytes -= snap.nbytes
        return snap
