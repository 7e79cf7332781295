"""The one place AgentMemory's counters change: :class:`Counters`.

Three threads count: the turn's (restores, prompts, drafts), the writer's (bytes written,
save time) and the shared tier's client (bytes sent and read, refusals). Each adds through
:meth:`Counters.add`; a turn's own figures reach the totals once, when it ends
(:meth:`Counters.end_turn`), from its :class:`~agentkv.TurnRecord`.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Union

from ..stats import MemoryStats, TurnRecord

__all__ = ["Counters"]

# what a TurnRecord adds to MemoryStats when its turn ends (same names on both)
_TURN_FIELDS = ("prompt_tokens_evaluated", "prompt_tokens_restored", "draft_tokens",
                "draft_accepted", "restore_seconds")


class Counters:
    """MemoryStats' totals under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = MemoryStats()

    def add(self, **deltas: Union[int, float]) -> None:
        """Add to named totals (``bytes_written=n``, ``rejected=1``, ...)."""
        with self._lock:
            for name, d in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + d)

    def end_turn(self, record: TurnRecord) -> None:
        """A turn ended: count it under its final source, with its own figures."""
        with self._lock:
            s = self._stats
            s.turns += 1
            s.hits[record.source] += 1
            for name in _TURN_FIELDS:
                setattr(s, name, getattr(s, name) + getattr(record, name))

    def copy(self) -> MemoryStats:
        """The totals now (a copy; the tier sizes are the caller's to fill in)."""
        with self._lock:
            return replace(self._stats, hits=dict(self._stats.hits))
