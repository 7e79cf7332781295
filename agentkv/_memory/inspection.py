"""A read-only look inside an AgentMemory: :class:`Inspection` (``mem.inspect()``).

What tests, benchmarks and a curious user need to see without reaching into privates: an
agent's stored record and its blocks, the shared cuts, what the store would collect, the
layout of a RAM snapshot, the live context's tokens and state size. Nothing here changes
what the memory holds (the context is read under the memory's lock).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, Union

import numpy as np

from .._format.image import RestoreImage
from .._format.snapshot import Snapshot
from .._store.disk import DiskStore, NoDisk
from .._store.records import Record

if TYPE_CHECKING:  # pragma: no cover
    from ..memory import AgentMemory

__all__ = ["Inspection"]


class Inspection:
    """A read-only view of one memory (see the module's docstring). Records are the store's
    own frozen values; do not hold them across writes."""

    def __init__(self, mem: "AgentMemory") -> None:
        self._mem = mem

    @property
    def _store(self) -> Union[DiskStore, NoDisk]:
        return self._mem._tiers.store

    # -- the disk tier --------------------------------------------------------------------

    def record(self, agent_id: str) -> Optional[Record]:
        """The agent's manifest on disk (chain keys, block keys, tail key, shape), or None."""
        return self._store.manifest(agent_id)

    def cuts(self) -> List[Record]:
        """The shared prefixes stored on disk."""
        return self._store.cuts()

    def stored(self, agent_id: str, in_place: bool = False) -> Optional[Snapshot]:
        """The agent's state read back from disk and checked, as pieces (``in_place``: as a
        restore reads them, decoded into place when assembled), or None."""
        snap, _ = self._store.get(agent_id, self._mem._tiers.fingerprint, scratch=in_place)
        return snap

    def bytes_on_disk(self) -> Dict[str, int]:
        """Bytes each agent's stored state takes on disk (shared blocks counted in full)."""
        fp = self._mem.fingerprint
        return {r.name: n for r, n in self._store.agents() if r.fingerprint == fp}

    def holds_payload(self, key: str) -> bool:
        """Is the payload ``key`` (``blk/...``, ``kv/...``, as a record names it) on disk?"""
        return not self._store.missing([key])

    def garbage(self) -> Tuple[int, int]:
        """(payloads no record holds, files no row names): what ``mem.gc()`` would delete.
        A save in flight is waited for (its new blocks are unheld until its record lands)."""
        return self._store.garbage()

    # -- RAM and the context --------------------------------------------------------------

    def ram_layout(self, agent_id: str) -> Optional[str]:
        """How the agent's RAM snapshot is kept: "image" (in the layout a restore loads, its
        padding on the zero page), "compact", or None if it is not in RAM."""
        snap = self._mem._res.ram.peek(agent_id)
        if snap is None:
            return None
        return "image" if isinstance(snap.state, RestoreImage) else "compact"

    def prefetched(self, agent_id: str) -> Optional[Tuple[str, int, int]]:
        """What a prefetch read ahead for the agent (waiting for a read in flight): its layout
        ("image" or "compact", as :meth:`ram_layout`), the bytes of RAM it owns and the bytes
        a restore loads from it; None if nothing is read ahead."""
        snap = self._mem._res.prefetcher.peek(agent_id)
        if snap is None:
            return None
        state = snap.state
        if isinstance(state, RestoreImage):
            return "image", state.nbytes, int(state.buf.nbytes)
        size = memoryview(state).nbytes  # type: ignore[arg-type]  # a blob, never pieces here
        return "compact", size, size

    def live(self) -> Tuple[Optional[str], np.ndarray]:
        """The agent whose KV the context holds (None: none) and its tokens."""
        with self._mem._exclusive():
            return self._mem._res.live, self._mem._engine.tokens()

    def live_state_bytes(self) -> int:
        """Bytes of the snapshot the live agent's turn would leave in RAM (compact)."""
        with self._mem._exclusive():
            return self._mem._engine.snapshot().nbytes

    def saves_held(self) -> bool:
        """Are background saves holding back now (a returning agent waits for its first
        token)? They are from its restore to its first token, and at no other time."""
        return self._mem._saves.writer.held

    def restore_buffer(self) -> Tuple[int, bool]:
        """(bytes, reads as zeros) of the buffer restores lay states out in: it must read as
        zeros after every turn (its padding is what the never-evicted layout holds)."""
        with self._mem._exclusive():
            image = self._mem._engine.buffers.image
            return image.nbytes, not image.any()

