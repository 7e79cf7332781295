"""The decisions a turn makes while ``generate`` runs: :class:`TurnPolicy`.

The engine adapts llama-cpp-python and asks (agentkv/_llama/hooks.py); this answers, for one
turn: restore the longest stored prefix of a cold agent's first prompt, evaluate a prefix
other agents share as its own segment and store it there (a *cut*), count what the turn
evaluated and drafted, and let background saves go on once the first token is out. A turn's
figures go into its :class:`~agentkv.TurnRecord`; the memory adds them to the totals once,
when the turn ends.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from .._llama.draft import NgramDraft
from .._llama.engine import Engine
from ..errors import CorruptEntry, FingerprintMismatch, RestoreFailed
from ..stats import TurnRecord
from .counters import Counters
from .saves import Saves
from .tiers import Fetched, Tiers

__all__ = ["Sharing", "TurnPolicy"]

log = logging.getLogger("agentkv.memory")


@dataclass(frozen=True)
class Sharing:
    """How prefixes are shared (AgentMemory's ``share_prefixes``): ``on`` at all; ``align``:
    only KV a cold prefill reproduces, cut at a multiple of it (``n_batch``), or 0 ("any")."""

    on: bool
    align: int
    block_tokens: int

    @classmethod
    def of(cls, share_prefixes: Union[bool, str], n_batch: int, block_tokens: int) -> "Sharing":
        return cls(bool(share_prefixes), 0 if share_prefixes == "any" else int(n_batch),
                   block_tokens)


class TurnPolicy:
    """The engine's hooks for one turn of ``record.agent_id``."""

    def __init__(self, record: TurnRecord, engine: Engine, tiers: Tiers, saves: Saves,
                 counters: Counters, sharing: Sharing, draft: Optional[NgramDraft]) -> None:
        self.record = record
        self.draft = draft
        self._engine = engine
        self._tiers = tiers
        self._saves = saves
        self._counters = counters
        self._sharing = sharing
        self._generates = 0  # generate calls so far in this turn
        self._nread = 0  # bytes the prefix restore read

    # -- counting -------------------------------------------------------------------------

    def prompt_started(self, evaluated: int, reused: int) -> None:
        record = self.record
        record.prompt_tokens_evaluated += evaluated
        if self._generates == 0 and record.source not in ("live", "cold"):
            record.prompt_tokens_restored += reused  # what the restore saved this prompt
        self._generates += 1

    def drafted(self, drafted: int, kept: int) -> None:
        self.record.draft_tokens += drafted
        self.record.draft_accepted += kept

    def first_token(self) -> None:
        self._saves.writer.release()

    # -- shared prefixes ------------------------------------------------------------------

    def cold_prompt(self, prompt: np.ndarray) -> None:
        """A cold agent's first prompt: restore the longest stored prefix of it."""
        record = self.record
        if not self._sharing.on or record.source != "cold" or self._generates:
            return
        self._saves.writer.drain()  # a state on its way to disk may hold the prefix
        t0 = time.perf_counter()
        fetched: Fetched = {}
        if not self._restore_prefix(prompt, fetched):
            return
        dt = time.perf_counter() - t0
        record.source = "prefix"
        record.restore_seconds += dt
        remote = sum(len(v) for v in fetched.values() if v is not None)
        self._counters.add(bytes_read=max(0, self._nread - remote))  # shared counts its own

    def _restore_prefix(self, prompt: np.ndarray, fetched: Fetched) -> bool:
        """Find and restore the prefix; False (context cleared, failure handled) if none."""
        agent_id = self.record.agent_id
        source = None
        try:
            snap, self._nread, source = self._tiers.find_prefix(
                prompt, self._engine.n_swa, self._sharing.align, fetched)
            if snap is None:
                return False
            self._engine.restore(snap)
            return True
        except (CorruptEntry, FingerprintMismatch, RestoreFailed) as exc:
            self._engine.clear()
            if getattr(exc, "payload", None) in fetched:  # read from the shared tier
                self._tiers.shared_damage(agent_id, exc, fetched)
                return False
            log.warning("agent %r: a stored prefix failed its checks (%s); prefilling",
                        agent_id, exc)
            if isinstance(exc, CorruptEntry):
                self._tiers.drop_damaged(exc, source)
            else:
                self._counters.add(rejected=1)
        except Exception as exc:  # noqa: BLE001 - the store failed, not the data
            self._engine.clear()
            self._tiers.store_failed(f"looking up a stored prefix for agent {agent_id!r}", exc)
        return False

    def cut_for(self, prompt: np.ndarray, reuse: int) -> int:
        """Where to store a prefix this prompt shares with stored states (0: nowhere). Only
        a context evaluated from the start can store one."""
        if not self._sharing.on or reuse > 0 or len(prompt) < self._sharing.block_tokens:
            return 0
        self._saves.writer.drain()
        return self._tiers.plan_cut(prompt, self._engine.n_swa, self._sharing.align)

    def cut_evaluated(self, n_tokens: int) -> None:
        """The context holds the shared prefix of ``n_tokens``: queue its store."""
        t0 = time.perf_counter()
        self._saves.queue_cut(self._engine.snapshot(margin=0))
        self._counters.add(save_seconds=time.perf_counter() - t0)
