"""The turn machinery under :class:`agentkv.AgentMemory`: :class:`TurnRunner`.

One turn at a time holds the context (whatever the thread; a thread inside a turn that starts
another gets TurnInProgress). A turn activates its agent (agentkv/_memory/residency.py), gives
the engine the turn's policy for the duration of the caller's calls, saves the agent after
them, and ends by counting itself once, whatever happened.
"""

from __future__ import annotations

import logging
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Union

from .._llama.draft import NgramDraft
from .._format.buffers import Buffers
from .._llama.engine import Engine, hash_file
from .._llama.settings import compute
from .._store.disk import DiskStore, NoDisk
from ..config import MemoryConfig
from ..errors import ConfigError, InvalidAgentId, MemoryClosed, NotACache, TurnInProgress
from ..stats import TurnRecord
from .counters import Counters
from .policy import Sharing, TurnPolicy
from .prefetch import NextAgent
from .residency import Residency
from .saves import Saves
from .tiers import Tiers

__all__ = ["TurnRunner", "check_agent_id", "flush_at_exit"]

log = logging.getLogger("agentkv.memory")


def check_agent_id(agent_id: Any) -> str:
    if not isinstance(agent_id, str):
        raise InvalidAgentId(f"agent id must be a str, not {type(agent_id).__name__}")
    if not agent_id:
        raise InvalidAgentId("agent id must not be empty")
    return agent_id


def flush_at_exit(mem: "TurnRunner") -> Callable[[], None]:
    """An exit hook that lets the writer finish the saves queued when the interpreter exits
    without close() (the writer is a daemon thread, stopped at exit); holds no reference."""
    ref = weakref.ref(mem)

    def flush() -> None:
        m = ref()
        if m is not None and not m._closed:
            m._saves.writer.drain()
    return flush


class TurnRunner:
    """The context's lock and the life of a turn (AgentMemory builds the parts)."""

    _closed: bool
    _config: MemoryConfig
    _engine: Engine
    _tiers: Tiers
    _saves: Saves
    _res: Residency
    _counters: Counters
    _sharing: Sharing
    _lock: threading.Lock
    _owner: Optional[int]
    _adapters_seen: int
    _warned_cache: bool
    _rest: int
    _next: Optional[NextAgent]
    _prefetch_later: Optional[str] = None  # predicted next agent RAM had no room for yet
    last_turn: Optional[TurnRecord]

    def _open_store(self, buffers: Buffers) -> Union[DiskStore, NoDisk]:
        """The disk tier; a folder that cannot be opened (a full disk, an I/O error) leaves
        agents in the context and RAM only, with a warning. A folder that is not agentkv's
        (NotACache) or cannot be written (ConfigError) is the caller's to fix: raised."""
        cfg = self._config
        try:
            return DiskStore(cfg.cache_dir, cfg.disk_budget, cfg.block_tokens, self._rest,
                             machine=compute(), reads=buffers.reads)
        except (ConfigError, NotACache):
            raise
        except Exception as exc:  # noqa: BLE001 - sqlite3 and OS errors of a broken disk
            log.warning("the cache folder %s cannot be opened (%s: %s); agents are kept in the "
                        "context and RAM only", cfg.cache_dir, type(exc).__name__, exc)
            return NoDisk(cfg.cache_dir, f"{type(exc).__name__}: {exc}")

    def _make_fingerprint(self, store: Union[DiskStore, NoDisk]) -> bytes:
        def cached_hash(path: str) -> str:
            return store.model_hash(path, hash_file)
        self._adapters_seen = self._engine.adapters_version
        return self._engine.fingerprint(cached_hash(self._engine.model_path), cached_hash,
                                        at_rest=self._rest)

    def close(self) -> None:
        raise NotImplementedError

    def _take_over(self, llm: Any) -> None:
        """A Llama serves one AgentMemory at a time: an open predecessor is flushed and closed."""
        previous = getattr(llm, "_agentkv_memory", None)
        previous = previous() if previous is not None else None
        if previous is not None and not previous._closed:
            log.warning("this Llama was wrapped by another open AgentMemory (%s); closing it",
                        previous._config.cache_dir)
            previous.close()
        llm._agentkv_memory = weakref.ref(self)

    def _check_open(self) -> None:
        if self._closed:
            raise MemoryClosed("this AgentMemory is closed")

    @contextmanager
    def _exclusive(self, check_open: bool = True) -> Iterator[None]:
        if self._owner == threading.get_ident():
            raise TurnInProgress("this thread is inside a turn (an agent() block or an open "
                                 "stream); finish it before starting another")
        if check_open:
            self._check_open()
        self._lock.acquire()
        self._owner = threading.get_ident()
        try:
            if check_open:
                self._check_open()
            yield
        finally:
            self._owner = None
            self._lock.release()

    @contextmanager
    def _turn(self, agent_id: str, draft: Optional[NgramDraft] = None) -> Iterator[Any]:
        check_agent_id(agent_id)
        with self._exclusive():
            self._check_settings()
            record = self._res.activate(agent_id)
            self._res.live_saved = None  # the turn may change the live state
            self._predict_next(agent_id)
            llm = self._engine.llm
            own_cache = getattr(llm, "cache", None)
            if own_cache is not None:  # Llama would load its own state over the restored KV
                if not self._warned_cache:
                    log.warning("this Llama has a cache set (llm.set_cache); agentkv turns run "
                                "without it, and it is put back after each turn")
                    self._warned_cache = True
                llm.cache = None
            self._engine.hooks = TurnPolicy(record, self._engine, self._tiers, self._saves,
                                            self._counters, self._sharing, draft)
            try:
                yield llm
                self._res.save_live()  # durable after every turn; the next switch moves no bytes
            finally:
                self._engine.hooks = None
                if own_cache is not None:
                    llm.cache = own_cache
                self._end_turn(record)

    def _predict_next(self, agent_id: str) -> None:
        """With ``prefetch=True``: prefetch the agent predicted to come after this one, during
        this turn; when RAM has no room yet (the snapshot that would make it is still on its
        way to disk), at the end of the turn."""
        self._prefetch_later = None
        if self._next is None:
            return
        nxt = self._next.turn(agent_id)
        if nxt is not None and nxt != agent_id and not self._res.prefetch(nxt):
            self._prefetch_later = nxt

    def _end_turn(self, record: TurnRecord) -> None:
        """After a turn, answered or not: let go of what it held, ready the next restore,
        make what RAM pushed out durable, and count the turn (once, under its final source)."""
        res = self._res
        if res.lease is not None and self._tiers.shared is not None:  # nothing to publish
            self._tiers.shared.release(record.agent_id, res.lease)
            res.lease = None
        self._saves.writer.release()  # the turn made no token (or made them all)
        self._engine.buffers.after_turn()  # outside the next restore's time to first token
        res.settle()  # what RAM pushed out is durable before the next turn
        later = self._prefetch_later
        if later is not None:
            self._prefetch_later = None
            res.prefetch(later, wait=True)
        self.last_turn = record
        self._counters.end_turn(record)

    def _check_settings(self) -> None:
        """Adapters set on the context since the fingerprint was made change the KV it computes:
        every agent held so far goes to disk under the old fingerprint, the RAM tier and the
        context are emptied, and the new settings get a fingerprint of their own."""
        if self._engine.adapters_version == self._adapters_seen:
            return
        fingerprint = self._make_fingerprint(self._tiers.store)
        if fingerprint == self._tiers.fingerprint:
            return
        log.warning("LoRA adapters or a control vector changed on this context: agents held "
                    "so far stay on disk under the old settings")
        self._res.flush()
        self._res.ram.clear()
        self._res.prefetcher.drop()
        self._res.drop_live()
        self._tiers.rebind(fingerprint)

    def _call(self, agent_id: str, call: Callable[[Any], Any], stream: bool,
              draft: Optional[NgramDraft]) -> Any:
        if not stream:
            with self._turn(agent_id, draft) as llm:
                return call(llm)
        check_agent_id(agent_id)
        self._check_open()
        return self._stream(agent_id, call, draft)

    def _stream(self, agent_id: str, call: Callable[[Any], Any],
                draft: Optional[NgramDraft]) -> Iterator[Any]:
        # The turn holds the context until the stream is exhausted or closed.
        with self._turn(agent_id, draft) as llm:
            chunks = call(llm)
            try:
                yield from chunks
            finally:
                chunks.close()
