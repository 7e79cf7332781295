"""The disk store's in-memory index: its records, least recently used first, and the payloads
they hold, reference-counted (shared blocks are held by several records and counted once)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, List

from .records import Record

__all__ = ["RecordIndex"]


class RecordIndex:
    """Records by key and the bytes of the payloads they hold.

    ``nbytes`` is what the disk budget bounds: every payload some record holds, once. Not
    thread-safe; the store holds its lock around every use.
    """

    def __init__(self) -> None:
        self.records: "OrderedDict[str, Record]" = OrderedDict()  # key -> record, LRU first
        self._refs: Dict[str, int] = {}  # payload key -> records holding it
        self._sizes: Dict[str, int] = {}  # payload key -> bytes (held payloads only)
        self.nbytes = 0

    def add(self, key: str, r: Record, size_of: Callable[[str], int]) -> None:
        """Index ``r`` under ``key`` as the most recently used; ``size_of`` gives the bytes of
        a payload no record held until now."""
        self.records[key] = r
        self.records.move_to_end(key)
        for k in r.keys():
            if self._refs.get(k, 0) == 0:
                self._sizes[k] = size_of(k)
                self.nbytes += self._sizes[k]
            self._refs[k] = self._refs.get(k, 0) + 1

    def remove(self, key: str) -> List[str]:
        """Drop a record; return the payload keys nothing else holds now."""
        r = self.records.pop(key, None)
        if r is None:
            return []
        freed = []
        for k in r.keys():
            self._refs[k] -= 1
            if self._refs[k] == 0:
                del self._refs[k]
                self.nbytes -= self._sizes.pop(k, 0)
                freed.append(k)
        return freed

    def holds(self, payload_key: str) -> bool:
        return payload_key in self._refs

    def bytes_of(self, r: Record) -> int:
        """Bytes of the payloads ``r`` holds (shared ones counted in full)."""
        return sum(self._sizes.get(k, 0) for k in r.keys())

    def touch(self, key: str) -> None:
        """Make the record under ``key`` the most recently used, if it is indexed."""
        if key in self.records:
            self.records.move_to_end(key)
