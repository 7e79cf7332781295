"""Where each agent's KV is: :class:`Residency` moves it between the context, RAM and disk.

One agent is *live* (its KV is in the llama context); evicted agents' snapshots sit in the RAM
tier (an LRU under the RAM budget), and every snapshot taken is queued to disk behind the turn.
A returning agent comes back from the shared tier when another worker ran it since, else from
RAM, else from disk; what RAM pushes out is durable before it is dropped.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, List, Optional, Tuple

from .._format import layout
from .._format.snapshot import Snapshot
from .._llama.engine import Engine
from .._store.disk import agent_key
from .._store.shared import Remote
from ..errors import CorruptEntry, RestoreFailed
from ..stats import TurnRecord
from .counters import Counters
from .prefetch import Prefetcher
from .ram import RamTier
from .saves import Saves
from .tiers import Tiers

__all__ = ["Residency"]

log = logging.getLogger("agentkv.memory")


class Residency:
    """The live agent, the RAM tier and the moves between them and the tiers behind.
    Not thread-safe: the memory's context lock is held around every call."""

    def __init__(self, engine: Engine, ram: RamTier, tiers: Tiers, saves: Saves,
                 counters: Counters, ram_images: bool) -> None:
        self.engine = engine
        self.ram = ram
        self._tiers = tiers
        self._saves = saves
        self._counters = counters
        self._ram_images = ram_images  # keep RAM snapshots in the layout a restore loads
        self.live: Optional[str] = None
        self.live_saved: Optional[Snapshot] = None  # snapshot of the live state, if current
        self.live_since = 0.0  # wall-clock end of the live agent's last turn
        self.lease: Optional[str] = None  # the shared tier's lease of the turn's agent
        self._pushed_out: List[Tuple[str, Snapshot]] = []  # what RAM pushed out this turn
        self.prefetcher = Prefetcher(
            tiers, counters, lambda: ram.budget - ram.nbytes, saves.writer.yield_point,
            (lambda stored, n: layout.assemble_image(engine.model, stored, n, engine.n_threads()))
            if ram_images else None)

    def drop_live(self) -> None:
        """Empty the context, unwritten."""
        self.engine.clear()
        self.live, self.live_saved = None, None

    def drop_local(self, agent_id: str) -> bool:
        """Drop the agent's live KV and RAM snapshot, unwritten; True if there was either."""
        dropped = False
        if self.live == agent_id:
            self.drop_live()
            dropped = True
        self.prefetcher.drop(agent_id)
        return self.ram.pop(agent_id) is not None or dropped

    def prefetch(self, agent_id: str, wait: bool = False) -> bool:
        """Read the agent's stored state into RAM in the background, making room for it first:
        RAM snapshots already on disk go, least recently used first, while the state would not
        fit the RAM budget otherwise (``wait``: a snapshot whose save is still running counts
        as room too; the prefetch thread waits for the save to land and drops it then, so
        that the turn asking ends at once). True if the read was asked for, or is not needed
        (live, in RAM, unknown, larger than the budget); False if there is no room yet."""
        if self.live == agent_id or self.ram.peek(agent_id) is not None:
            return True
        size = next((n for r, n in self._tiers.store.agents() if r.name == agent_id), None)
        if size is None or size > self.ram.budget:
            return True
        later: List[Tuple[str, Snapshot]] = []  # dropped once their saves have landed
        freed = 0
        for victim, entry in self.ram.items():
            if self.ram.nbytes - freed + self.prefetcher.nbytes + size <= self.ram.budget:
                break
            if self._saves.is_durable(victim):
                self.ram.pop(victim)
            elif wait:
                later.append((victim, entry.snap))
                freed += entry.snap.nbytes
        if self.ram.nbytes - freed + self.prefetcher.nbytes + size > self.ram.budget:
            return False
        self.prefetcher.request(agent_id, (lambda: self._drop_when_durable(later)) if later
                                else None)
        return True

    def _drop_when_durable(self, snaps: List[Tuple[str, Snapshot]]) -> None:
        """On the prefetch thread: drop these RAM snapshots once their saves have landed
        (unless the agent has a newer one by then)."""
        for victim, snap in snaps:
            self._saves.writer.wait(victim, release=False)
            if self._saves.is_durable(victim):
                self.ram.pop_if(victim, snap)

    def settle(self) -> None:
        """End of a turn: what RAM pushed out during it is made durable now."""
        while self._pushed_out:
            victim, pushed = self._pushed_out.pop()
            self._saves.rewrite_if_lost(victim, pushed)
            self._saves.writer.wait(victim)
        self.live_since = time.time()

    def activate(self, agent_id: str) -> TurnRecord:
        """Give the context to the agent: the live one goes to RAM, the agent comes back
        from the first tier that has it (its record says which, and what it cost)."""
        remote, self.lease = self._tiers.newer_shared(agent_id, self._saves.version(agent_id))
        if self.live == agent_id:
            if remote is None:
                return TurnRecord(agent_id, "live")
            self.engine.clear()  # another worker ran it since: this copy is behind
            self.live, self.live_saved = None, None
        t0 = time.perf_counter()
        entry = self.ram.pop(agent_id)  # first: its RAM slot goes to the agent leaving
        held, held_from = (None, "ram") if entry is None else (entry.snap, "ram")
        if held is None and remote is None:  # a state read ahead of its turn, if newest
            self._saves.writer.wait(agent_id)
            held = self.prefetcher.take(agent_id, self._saves.version(agent_id))
            held_from = "prefetch"
        self.evict_live(defer=True)
        t1 = time.perf_counter()
        if held is None or remote is not None:
            self._saves.writer.wait(agent_id)  # a snapshot of it may be on its way to disk
        self._saves.writer.hold()  # until the first token: background saves yield
        try:
            source = self._restore(agent_id, held, remote, held_from)
        except BaseException:
            self._saves.writer.release()
            raise
        t2 = time.perf_counter()
        self.live = agent_id
        self.prefetcher.drop(agent_id)  # a copy read meanwhile is not needed (nor newest)
        return TurnRecord(agent_id, source, restore_seconds=t2 - t1, save_seconds=t1 - t0)

    def _restore(self, agent_id: str, held: Optional[Snapshot], remote: Optional[Remote],
                 held_from: str = "ram") -> str:
        """Restore the agent from the first tier that has it: the shared tier when another
        worker ran it since, else what RAM holds (``held``: its RAM snapshot, or a state
        prefetched from disk), else disk; "cold" if none does."""
        tiers = self._tiers
        sources: List[Tuple[str, Callable[[], Optional[Snapshot]]]] = [
            (held_from, lambda: held), ("disk", lambda: tiers.read_disk(agent_id))]
        if remote is not None:
            sources.insert(0, ("shared", lambda: tiers.read_shared(agent_id, remote)))
        for source, read in sources:
            snap = read()
            if snap is None:
                continue
            try:
                self.engine.restore(snap)
            except (CorruptEntry, RestoreFailed) as exc:
                self.engine.clear()
                if source == "disk" and isinstance(exc, CorruptEntry):  # found reading it in
                    log.warning("agent %r: stored KV is damaged (%s)", agent_id, exc)
                    tiers.drop_damaged(exc, agent_key(agent_id))
                else:
                    log.warning("agent %r: restoring its KV from %s failed (%s)",
                                agent_id, source, exc)
                    self._counters.add(rejected=1)
                continue
            self._saves.set_version(agent_id, snap.version)
            return source
        self.engine.clear()
        if remote is not None:  # the next save must be newer than what the shared tier holds
            self._saves.set_version(agent_id, (remote.record.gen, ""))
        return "cold"

    def evict_live(self, defer: bool = False) -> None:
        """Snapshot the live agent into RAM; what RAM pushes out is made durable first
        (``defer``: at the end of the turn that evicts it, outside its time to first token)."""
        agent_id = self.live
        if agent_id is None:
            return
        t0 = time.perf_counter()
        snap = self.live_saved
        if snap is None:
            snap = self._saves.queue(agent_id, self.engine.snapshot(image=self._ram_images))
        self.live, self.live_saved = None, None
        self._counters.add(save_seconds=time.perf_counter() - t0)
        for victim, pushed in self.ram.put(agent_id, snap, self.live_since):
            if defer:  # held until then too: unmapping a snapshot's pages takes a while
                self._pushed_out.append((victim, pushed))
            else:
                self._saves.rewrite_if_lost(victim, pushed)
                self._saves.writer.wait(victim)

    def save_live(self) -> None:
        """Snapshot the live agent (kept as its current snapshot) and queue its disk write."""
        if self.live is not None and self.live_saved is None:
            t0 = time.perf_counter()
            lease, self.lease = self.lease, None  # released when this save is published
            snap = self.engine.snapshot(image=self._ram_images)
            self.live_saved = self._saves.queue(self.live, snap, lease)
            self._counters.add(save_seconds=time.perf_counter() - t0)

    def flush(self) -> None:
        self.save_live()
        for agent_id, entry in self.ram.items():
            self._saves.rewrite_if_lost(agent_id, entry.snap)
        self._saves.writer.drain()
