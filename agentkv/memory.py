"""AgentMemory: persistent per-agent KV over one wrapped ``Llama``.

A turn for agent A, from the caller's side (``mem.create_chat_completion("A", ...)``):

1. take the context (one turn at a time, whatever the thread);
2. if A is live, nothing moves; otherwise the live agent's snapshot moves into the RAM tier
   and A is restored from RAM, else from disk, else from the longest stored prefix of its
   prompt (the engine asks when the prompt is known), else A starts cold;
3. run the call through the ordinary ``Llama`` API; ``Llama.generate`` prefix-matches A's
   restored tokens and evaluates only the new suffix;
4. snapshot A (its incremental disk write is queued behind) and release the context. A stays
   live until another agent needs the context; switching away from it then moves no bytes.

Snapshots leaving RAM wait for their disk write, so the RAM budget bounds memory; every agent
is on disk after each of its turns (a crash loses at most the turn in flight).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import uuid
import weakref
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from ._store.atrest import code_of
from .config import MemoryConfig, SizeLike
from ._llama.draft import DraftLike, NgramDraft, draft_config
from ._llama.engine import Engine, hash_file
from .errors import (ConfigError, CorruptEntry, FingerprintMismatch, InvalidAgentId, MemoryClosed,
                     NotACache, RestoreFailed, TurnInProgress, UnknownAgent)
from ._memory.ram import RamTier
from ._store.shared import RedisTier, Remote, SharedTier, shared_config
from ._format.snapshot import Snapshot
from .stats import AgentInfo, MemoryStats, TurnRecord
from ._store.disk import DiskStore, NoDisk, agent_key
from ._memory.writer import WriteBehind

_DEFAULT: Any = object()  # "the memory's own setting" for per-call options

__all__ = ["AgentMemory"]

log = logging.getLogger(__name__)

def _flush_at_exit(mem: "AgentMemory") -> Callable[[], None]:
    """An exit hook that lets the writer finish the saves queued when the interpreter exits
    without close() (the writer is a daemon thread, stopped at exit); holds no reference."""
    ref = weakref.ref(mem)

    def flush() -> None:
        m = ref()
        if m is not None and not m._closed:
            m._writer_may_run.set()
            m._writer.drain()
    return flush


def _check_agent_id(agent_id: Any) -> str:
    if not isinstance(agent_id, str):
        raise InvalidAgentId(f"agent id must be a str, not {type(agent_id).__name__}")
    if not agent_id:
        raise InvalidAgentId("agent id must not be empty")
    return agent_id


class AgentMemory:
    """Keeps every agent's KV for one ``Llama``: live, in RAM, on disk.

    >>> mem = AgentMemory(llm, cache_dir="~/.cache/agentkv", ram_budget="1GiB")  # doctest: +SKIP
    >>> mem.create_chat_completion("coder", messages=[...], temperature=0)      # doctest: +SKIP

    Args:
        llm: the ``llama_cpp.Llama`` to wrap; keep calling its API inside ``agent()`` blocks.
        cache_dir: folder of the disk tier; reopen it to find the agents again.
        ram_budget: bytes (or "512MiB") of evicted agents' snapshots kept in RAM.
        disk_budget: bytes (or "20GiB") of KV kept on disk.
        block_tokens: positions per stored block: the unit of sharing and of incremental
            saves (a save writes the blocks completed since the last one, plus a tail).
        share_prefixes: restore a new agent from the longest stored prefix of its prompt
            (another agent's blocks count), and store a prefix that agents share, with the
            window an SWA model needs, the first time a second agent evaluates it.
            True (default): only KV that a cold prefill of the new agent's prompt computes
            bit for bit is shared: positions another agent evaluated in its first prefill (or
            in a prefill continuing one), cut at a multiple of ``n_batch``; the new agent's
            output then equals a cold run of its own prompt. ``"any"``: share every stored
            block whose tokens match (a forked conversation restores the other agent's
            turns too); the output then equals a run that evaluated the prefix the way the
            other agent did, which can differ from a cold run in the last bits of the logits
            (and so, at a near-tie, in a token). False: no sharing.
        at_rest: None (default: exact) or a quantized row format for float16 KV on disk:
            "q8_0", "q4_0", "q4_1" or "iq4_nl" (ggml's layouts). Smaller and not exact:
            restores from disk are close to, not equal to, a never-evicted agent (RAM restores
            stay exact); benchmarks/kv_quality.py measures the difference. Logits are not
            carried on disk in this mode (a resume replays the last token on the restored
            KV). Part of the fingerprint: KV stored under another setting is not restored.
        ram_laid_out: keep RAM snapshots of sliding-window models in the layout a restore
            loads, their padding on the kernel's zero page (agentkv/laid.py): a return from
            RAM is then one ``set_data``, at the price of laying the snapshot out at the end
            of every turn (~8 ms at 4,000 tokens on a 2-vCPU VM). False keeps them compact
            and lays them out at restore (~2 ms more time to first token at 4,000 tokens).
        draft: self-draft decoding of greedy turns (``temperature=0`` or ``top_k=1``):
            None (default) or "ngram" (prompt lookup in the agent's own history, verified
            in one batch; agentkv/draft.py), or an :class:`~agentkv.NgramDraft` to tune it.
            Turns with other sampling settings decode normally. Faster on turns that copy
            from their context; a drafted greedy output can differ from an undrafted one at
            a near-tie (batch rounding), so it is opt-in. Per call: ``draft=False`` (or
            "ngram") as a keyword of ``create_completion``/``create_chat_completion``/``agent``.
        shared: None (default), a ``redis://host:port/db`` URL or a
            :class:`~agentkv.SharedTier`: a tier shared by workers and machines (Redis or
            Valkey; ``pip install 'agentkv[redis]'``). Every save also publishes the agent's
            new blocks and its manifest there; a turn whose agent another worker ran since
            restores that worker's newest turn from it. Local tiers stay in front of it, and
            a slow or dead server costs at most its timeout (README: several workers).
    """

    def __init__(self, llm: Any, cache_dir: Union[str, Path] = "~/.cache/agentkv",
                 ram_budget: SizeLike = "1GiB", disk_budget: SizeLike = "20GiB",
                 block_tokens: int = 256, share_prefixes: Union[bool, str] = True,
                 at_rest: Optional[str] = None, ram_laid_out: bool = True,
                 draft: DraftLike = None, shared: Union[None, str, SharedTier] = None) -> None:
        self._engine = Engine(llm)  # NotALlama first: nothing else is touched on bad input
        if not isinstance(ram_laid_out, bool):
            raise ConfigError(f"ram_laid_out must be True or False, not {ram_laid_out!r}")
        self._laid = ram_laid_out
        self._draft = draft_config(draft)
        if share_prefixes not in (True, False, "any"):
            raise ConfigError(f"share_prefixes must be True, False or 'any', not {share_prefixes!r}")
        self._config = MemoryConfig.create(cache_dir, ram_budget, disk_budget, block_tokens)
        rest = code_of(at_rest)
        shared_cfg = shared_config(shared)
        # the client (redis missing: ConfigError naming the extra); keys bound below
        self._shared = None if shared_cfg is None else RedisTier(shared_cfg, b"", self._count)
        self._closed = True  # until the end of __init__
        self._take_over(llm)  # a previous memory of this Llama flushes its agents first
        self._engine.check_format()  # UnsupportedLlamaCpp before anything is written
        self._store = self._open_store(rest)
        self._rest = rest
        self._fingerprint = self._make_fingerprint()
        if self._shared is not None:
            self._shared.bind(self._fingerprint)
        self._ram = RamTier(self._config.ram_budget)
        self._stats = MemoryStats()
        self._lock = threading.Lock()  # the context: one turn at a time
        self._owner: Optional[int] = None
        self._state_lock = threading.Lock()  # _wanted and counters shared with the writer
        self._wanted: Dict[str, int] = {}  # agent -> generation that should reach disk
        self._durable: Dict[str, int] = {}  # agent -> generation that did
        # agent -> (generation, save id) of the newest state this process holds of it
        self._versions: Dict[str, Tuple[int, str]] = {}
        # agent -> (write generation, the lease token its publish releases)
        self._leases: Dict[str, Tuple[int, str]] = {}
        self._lease: Optional[str] = None  # the shared tier's lease of the turn's agent
        self._generation = 0
        self._last_used: Dict[str, float] = {}
        self._live: Optional[str] = None
        self._live_saved: Optional[Snapshot] = None  # snapshot of the live state, if current
        self._live_size = 0  # last measured size of the live state (agents())
        self._pushed_out: List[Any] = []  # (agent, snapshot) RAM pushed out this turn
        self._turn_record: Optional[TurnRecord] = None
        self.last_turn: Optional[TurnRecord] = None
        self._engine.install()
        self._engine.clear()  # whatever the Llama held belongs to no agent
        self._engine.on_prompt = self._count_prompt
        self._engine.block_tokens = self._config.block_tokens
        self._align = 0 if share_prefixes == "any" else int(llm.n_batch)
        if share_prefixes:
            self._engine.on_cold_prompt = self._restore_prefix
            self._engine.plan_cut = self._plan_cut
            self._engine.on_cut = self._store_cut
        # Cleared from a restore until the turn's first token (or its end): background saves
        # yield to the returning agent's time to first token.
        self._writer_may_run = threading.Event()
        self._writer_may_run.set()
        self._engine.on_first_token = self._writer_may_run.set
        self._engine.on_draft = self._count_draft
        self._writer = WriteBehind(self._persist)
        self._warned_cache = False
        self._at_exit = _flush_at_exit(self)
        atexit.register(self._at_exit)
        self._closed = False
        log.debug("agentkv memory at %s (fingerprint %s)", self._config.cache_dir,
                  self._fingerprint.hex())

    def _open_store(self, rest: int) -> Union[DiskStore, NoDisk]:
        """The disk tier; a folder that cannot be opened (a full disk, an I/O error) leaves
        agents in the context and RAM only, with a warning. A folder that is not agentkv's
        (NotACache) or cannot be written (ConfigError) is the caller's to fix: raised."""
        cfg = self._config
        try:
            return DiskStore(cfg.cache_dir, cfg.disk_budget, cfg.block_tokens, rest)
        except (ConfigError, NotACache):
            raise
        except Exception as exc:  # noqa: BLE001 - sqlite3 and OS errors of a broken disk
            log.warning("the cache folder %s cannot be opened (%s: %s); agents are kept in the "
                        "context and RAM only", cfg.cache_dir, type(exc).__name__, exc)
            return NoDisk(cfg.cache_dir, f"{type(exc).__name__}: {exc}")

    def _make_fingerprint(self) -> bytes:
        def cached_hash(path: str) -> str:
            return self._store.model_hash(path, hash_file)
        self._adapters_seen = self._engine.adapters_version
        return self._engine.fingerprint(cached_hash(self._engine.model_path), cached_hash,
                                        at_rest=self._rest)

    # -- public API -----------------------------------------------------------------------

    @property
    def llm(self) -> Any:
        return self._engine.llm

    @property
    def fingerprint(self) -> str:
        """Hex of the fingerprint stored KV must match to be restored here."""
        return self._fingerprint.hex()

    @contextmanager
    def agent(self, agent_id: str, draft: Any = _DEFAULT) -> Iterator[Any]:
        """Give the context to ``agent_id`` for a block; yields the wrapped ``Llama``.
        ``draft`` overrides the memory's drafting setting for the block.

        >>> with mem.agent("planner") as live:                      # doctest: +SKIP
        ...     live.create_chat_completion(messages=[...])
        """
        with self._turn(agent_id, self._draft_for(draft)) as llm:
            yield llm

    def create_completion(self, agent_id: str, prompt: Any, **kwargs: Any) -> Any:
        """``Llama.create_completion`` as ``agent_id``; same return shape, ``stream=True`` too.
        ``draft=`` (False, "ngram") overrides the memory's drafting setting for this call."""
        draft = self._draft_for(kwargs.pop("draft", _DEFAULT))
        return self._call(agent_id, lambda llm: llm.create_completion(prompt, **kwargs),
                          bool(kwargs.get("stream")), draft)

    def create_chat_completion(self, agent_id: str, messages: Any = None, **kwargs: Any) -> Any:
        """``Llama.create_chat_completion`` as ``agent_id``; same return shape, ``stream=True`` too.
        ``draft=`` (False, "ngram") overrides the memory's drafting setting for this call."""
        draft = self._draft_for(kwargs.pop("draft", _DEFAULT))
        if messages is not None:
            kwargs["messages"] = messages
        return self._call(agent_id, lambda llm: llm.create_chat_completion(**kwargs),
                          bool(kwargs.get("stream")), draft)

    def _draft_for(self, value: Any) -> Optional[NgramDraft]:
        return self._draft if value is _DEFAULT else draft_config(value)

    def stats(self) -> MemoryStats:
        """A copy of the counters, with the current tier sizes."""
        with self._state_lock:
            s = replace(self._stats, hits=dict(self._stats.hits))
        s.ram_bytes = self._ram.nbytes
        s.disk_bytes = self._store.nbytes
        s.disk_db_bytes = self._store.db_bytes()
        ids = {m.name for m, _ in self._store.agents() if m.fingerprint == self._fingerprint.hex()}
        ids.update(aid for aid, _ in self._ram.items())
        if self._live is not None:
            ids.add(self._live)
        s.agents = len(ids)
        return s

    def agents(self) -> List[AgentInfo]:
        """Every agent held, live, in RAM or on disk (this fingerprint), sorted by id."""
        infos: Dict[str, AgentInfo] = {}
        for m, nbytes in self._store.agents():
            if m.fingerprint == self._fingerprint.hex():
                infos[m.name] = AgentInfo(m.name, m.n_tokens, "disk", nbytes, m.last_used)
        for aid, snap in self._ram.items():
            infos[aid] = AgentInfo(aid, snap.n_tokens, "ram", snap.nbytes,
                                   self._last_used.get(aid, 0.0))
        live = self._live
        if live is not None:
            infos[live] = AgentInfo(live, self._engine.n_tokens, "live", self._live_nbytes(),
                                    self._last_used.get(live, 0.0))
        return [infos[k] for k in sorted(infos)]

    def _live_nbytes(self) -> int:
        """Size of the live agent's state; measured only by a thread that may touch the context
        (another thread may be decoding in it), else the last size measured."""
        if self._owner == threading.get_ident():
            self._live_size = self._engine.state_size()
        elif self._lock.acquire(blocking=False):
            try:
                self._live_size = self._engine.state_size()
            finally:
                self._lock.release()
        return self._live_size

    def evict(self, agent_id: str) -> bool:
        """Move the agent's KV out of the context and RAM to disk (waits for the write).

        Returns True when its KV is on disk. When the write failed (a full disk, logged) the
        KV stays in RAM and False is returned: nothing is dropped before it is durable.
        """
        _check_agent_id(agent_id)
        with self._exclusive():
            known = False
            if self._live == agent_id:
                self._evict_live()
                known = True
            held = self._ram.peek(agent_id)
            if held is not None:
                self._rewrite_if_lost(agent_id, held)  # a save that failed gets another try
            self._wait_writer(agent_id)
            durable = self._is_durable(agent_id)
            if held is not None:
                known = True
                if not durable:
                    log.warning("agent %r: its KV could not be written to disk; it stays in RAM",
                                agent_id)
                    return False
                self._ram.pop(agent_id)
            if not known and not self._store.has_agent(agent_id):
                raise UnknownAgent(f"no agent {agent_id!r} in this memory")
            return durable

    def forget(self, agent_id: str) -> None:
        """Delete the agent's KV from every tier; its payload goes unless another agent uses it."""
        _check_agent_id(agent_id)
        with self._exclusive():
            known = False
            if self._live == agent_id:
                self._engine.clear()
                self._live, self._live_saved = None, None
                known = True
            if self._ram.pop(agent_id) is not None:
                known = True
            with self._state_lock:
                self._wanted.pop(agent_id, None)
            self._wait_writer(agent_id)
            try:
                known = self._store.drop(agent_id) or known
            except Exception as exc:  # noqa: BLE001
                self._store_failed(f"deleting agent {agent_id!r} from disk", exc)
            self._last_used.pop(agent_id, None)
            with self._state_lock:
                self._versions.pop(agent_id, None)
                self._leases.pop(agent_id, None)
            if self._shared is not None:
                self._shared.forget(agent_id)
            if not known:
                raise UnknownAgent(f"no agent {agent_id!r} in this memory")

    def discard_local(self, agent_id: str) -> bool:
        """Drop this process's copies of the agent (its live KV, its RAM snapshot) without
        writing them, keeping what the disk holds: for processes sharing a cache_dir, when
        another one has run the agent since (its newer turn is on disk, and this copy must
        neither be restored nor written over it). True if there was a copy to drop."""
        _check_agent_id(agent_id)
        with self._exclusive():
            self._wait_writer(agent_id)
            dropped = False
            if self._live == agent_id:
                self._engine.clear()
                self._live, self._live_saved = None, None
                dropped = True
            dropped = self._ram.pop(agent_id) is not None or dropped
            with self._state_lock:
                self._wanted.pop(agent_id, None)
                self._durable.pop(agent_id, None)
                self._versions.pop(agent_id, None)
                self._leases.pop(agent_id, None)
            return dropped

    def wait_durable(self, agent_id: str, timeout: Optional[float] = None) -> bool:
        """Wait (from any thread, without taking the context) until the agent's newest saved
        turn is on disk, or ``timeout`` seconds; True if it is. Background saves still yield to
        a returning agent's first token meanwhile."""
        self._writer.wait(agent_id, timeout)
        return self._is_durable(agent_id)

    def flush(self) -> None:
        """Write the live agent and every RAM snapshot to disk; return when they are there."""
        with self._exclusive():
            self._flush_locked()

    def close(self) -> None:
        """Flush, stop the writer and hand the ``Llama`` back untouched. Idempotent."""
        if self._closed:
            return
        with self._exclusive(check_open=False):
            if self._closed:
                return
            try:
                self._flush_locked()
            finally:
                self._writer.close()
                self._engine.uninstall()
                self._store.close()
                if self._shared is not None:
                    self._shared.close()
                atexit.unregister(self._at_exit)
                self._closed = True

    def __enter__(self) -> "AgentMemory":
        self._check_open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"live={self._live!r}"
        return f"AgentMemory({self._config.cache_dir}, {state})"

    def _take_over(self, llm: Any) -> None:
        """A Llama serves one AgentMemory at a time: an open predecessor is flushed and closed."""
        previous = getattr(llm, "_agentkv_memory", None)
        previous = previous() if previous is not None else None
        if previous is not None and not previous._closed:
            log.warning("this Llama was wrapped by another open AgentMemory (%s); closing it",
                        previous._config.cache_dir)
            previous.close()
        llm._agentkv_memory = weakref.ref(self)

    # -- turns ----------------------------------------------------------------------------

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
        _check_agent_id(agent_id)
        with self._exclusive():
            self._check_settings()
            record = self._activate(agent_id)
            self._live_saved = None  # the turn may change the live state
            self._turn_record = record
            with self._state_lock:
                self._stats.turns += 1
                self._stats.hits[record.source] += 1
            llm = self._engine.llm
            own_cache = getattr(llm, "cache", None)
            if own_cache is not None:  # Llama would load its own state over the restored KV
                if not self._warned_cache:
                    log.warning("this Llama has a cache set (llm.set_cache); agentkv turns run "
                                "without it, and it is put back after each turn")
                    self._warned_cache = True
                llm.cache = None
            self._engine.draft = draft
            try:
                yield llm
                self._save_live()  # durable after every turn; the next switch moves no bytes
            finally:
                self._engine.draft = None
                if self._lease is not None and self._shared is not None:  # nothing to publish
                    self._shared.release(agent_id, self._lease)
                    self._lease = None
                if own_cache is not None:
                    llm.cache = own_cache
                self._writer_may_run.set()  # the turn made no token (or made them all)
                self._engine.zero_restore_buffer()  # ready for the next disk restore, outside its TTFT
                while self._pushed_out:  # what RAM pushed out is durable before the next turn
                    victim, pushed = self._pushed_out.pop()
                    self._rewrite_if_lost(victim, pushed)
                    self._wait_writer(victim)
                self._turn_record = None
                self._last_used[agent_id] = time.time()
                self.last_turn = record

    def _check_settings(self) -> None:
        """Adapters set on the context since the fingerprint was made change the KV it computes:
        every agent held so far goes to disk under the old fingerprint, the RAM tier and the
        context are emptied, and the new settings get a fingerprint of their own."""
        if self._engine.adapters_version == self._adapters_seen:
            return
        fingerprint = self._make_fingerprint()
        if fingerprint == self._fingerprint:
            return
        log.warning("LoRA adapters or a control vector changed on this context: agents held "
                    "so far stay on disk under the old settings")
        self._flush_locked()
        self._ram.clear()
        self._engine.clear()
        self._live, self._live_saved = None, None
        self._fingerprint = fingerprint
        if self._shared is not None:
            self._shared.bind(fingerprint)

    def _call(self, agent_id: str, call: Callable[[Any], Any], stream: bool,
              draft: Optional[NgramDraft]) -> Any:
        if not stream:
            with self._turn(agent_id, draft) as llm:
                return call(llm)
        _check_agent_id(agent_id)
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

    def _count_prompt(self, evaluated: int, reused: int) -> None:
        record = self._turn_record
        if record is None:
            return
        record.prompt_tokens_evaluated += evaluated
        restored = reused if record._generates == 0 and record.source not in ("live", "cold") else 0
        record.prompt_tokens_restored += restored
        record._generates += 1
        with self._state_lock:
            self._stats.prompt_tokens_evaluated += evaluated
            self._stats.prompt_tokens_restored += restored

    def _count_draft(self, drafted: int, kept: int) -> None:
        record = self._turn_record
        if record is not None:
            record.draft_tokens += drafted
            record.draft_accepted += kept
        with self._state_lock:
            self._stats.draft_tokens += drafted
            self._stats.draft_accepted += kept

    # -- moving KV between tiers ----------------------------------------------------------

    def _activate(self, agent_id: str) -> TurnRecord:
        remote = self._newer_shared(agent_id)
        if self._live == agent_id:
            if remote is None:
                return TurnRecord(agent_id, "live")
            self._engine.clear()  # another worker ran it since: this copy is behind
            self._live, self._live_saved = None, None
        t0 = time.perf_counter()
        held = self._ram.pop(agent_id)  # first: its RAM slot goes to the agent leaving
        self._evict_live(defer=True)
        t1 = time.perf_counter()
        if held is None or remote is not None:
            self._wait_writer(agent_id)  # a snapshot of it may still be on its way to disk
        self._writer_may_run.clear()  # until the first token: background saves yield
        try:
            source = self._restore(agent_id, held, remote)
        except BaseException:
            self._writer_may_run.set()
            raise
        t2 = time.perf_counter()
        self._live = agent_id
        with self._state_lock:
            self._stats.restore_seconds += t2 - t1
        return TurnRecord(agent_id, source, restore_seconds=t2 - t1, save_seconds=t1 - t0)

    def _queue_save(self, agent_id: str, snap: Snapshot, lease: Optional[str] = None) -> Snapshot:
        """Queue the write of a new snapshot of the agent, stamped with a new version (the
        generation the shared tier compares: one more than the state it continued; saved
        with it, kept with it in RAM); ``lease`` is released when it is published."""
        with self._state_lock:
            self._generation += 1
            self._wanted[agent_id] = self._generation
            version = (self._versions.get(agent_id, (0, ""))[0] + 1, uuid.uuid4().hex[:16])
            self._versions[agent_id] = version
            if lease is not None:
                self._leases[agent_id] = (self._generation, lease)
            generation = self._generation
        snap = replace(snap, version=version)
        self._writer.submit(agent_id, snap, generation)
        return snap

    def _evict_live(self, defer: bool = False) -> None:
        """Snapshot the live agent into RAM; what RAM pushes out is made durable first
        (``defer``: at the end of the turn that evicts it, outside its time to first token)."""
        agent_id = self._live
        if agent_id is None:
            return
        t0 = time.perf_counter()
        snap = self._live_saved
        if snap is None:
            snap = self._queue_save(agent_id, self._engine.snapshot(laid=self._laid))
        self._live, self._live_saved = None, None
        with self._state_lock:
            self._stats.save_seconds += time.perf_counter() - t0
        for victim, pushed in self._ram.put(agent_id, snap):
            if defer:  # held until then too: unmapping a snapshot's pages takes a while
                self._pushed_out.append((victim, pushed))
            else:
                self._rewrite_if_lost(victim, pushed)
                self._wait_writer(victim)

    def _restore(self, agent_id: str, held: Optional[Snapshot], remote: Optional[Remote]) -> str:
        """Restore the agent from the first tier that has it: the shared tier when another
        worker ran it since, else RAM, else disk; "cold" if none does."""
        sources: List[Tuple[str, Callable[[], Optional[Snapshot]]]] = [
            ("ram", lambda: held), ("disk", lambda: self._read_disk(agent_id))]
        if remote is not None:
            sources.insert(0, ("shared", lambda: self._read_shared(agent_id, remote)))
        for source, read in sources:
            snap = read()
            if snap is None:
                continue
            try:
                self._engine.restore(snap)
            except (CorruptEntry, RestoreFailed) as exc:
                self._engine.clear()
                if source == "disk" and isinstance(exc, CorruptEntry):  # found reading it in
                    log.warning("agent %r: stored KV is damaged (%s)", agent_id, exc)
                    self._drop_damaged(exc, agent_key(agent_id))
                else:
                    log.warning("agent %r: restoring its KV from %s failed (%s)",
                                agent_id, source, exc)
                    self._count(rejected=1)
                continue
            self._versions[agent_id] = snap.version
            return source
        self._engine.clear()
        if remote is not None:  # the next save must be newer than what the shared tier holds
            self._versions[agent_id] = (remote.record.gen, "")
        return "cold"

    def _newer_shared(self, agent_id: str) -> Optional[Remote]:
        """Take the agent's lease on the shared tier and read its manifest there; return it
        when it is newer than the state this process holds (another worker ran the agent
        since), else None (the same or an older state; or no shared tier, or it is away)."""
        if self._shared is None:
            return None
        remote, self._lease = self._shared.claim(agent_id)
        if remote is None:
            return None
        mine = self._versions.get(agent_id)
        if mine is None:
            m = self._store.manifest(agent_id)
            if m is not None and m.fingerprint == self._fingerprint.hex():
                mine = (m.gen, m.sid)
        theirs = remote.version
        if mine is not None and (mine[0] > theirs[0] or mine == theirs):
            return None  # ours, or newer than it (published when the tier comes back)
        return remote

    def _read_shared(self, agent_id: str, remote: Remote) -> Optional[Snapshot]:
        """The agent's newest turn from the shared tier: its manifest's payloads this store
        lacks are fetched, then everything is checked as a disk read is. None if that fails
        (logged, counted; a damaged payload is deleted there)."""
        shared = self._shared
        assert shared is not None
        fetched: Dict[str, Any] = {}
        try:
            fetched = shared.fetch(self._store.missing(remote.record.keys()))
            snap, _ = self._store.get(agent_id, self._fingerprint, scratch=True,
                                      remote=(remote.raw, fetched))
        except (CorruptEntry, FingerprintMismatch) as exc:
            self._shared_damage(agent_id, exc, fetched)
            return None
        except Exception as exc:  # noqa: BLE001 - the local store failed, not the data
            self._store_failed(f"reading agent {agent_id!r} from the shared tier", exc)
            return None
        return snap

    def _shared_damage(self, agent_id: str, exc: BaseException, fetched: Dict[str, Any]) -> None:
        """A read from the shared tier failed its checks: count it; a payload that is gone
        is an eviction, a damaged one is deleted there (a later save sends it again)."""
        payload = getattr(exc, "payload", None)
        if payload in fetched and fetched[payload] is None:
            log.info("agent %r: a payload of its shared state is gone from the shared tier "
                     "(expired or evicted); restoring from what remains", agent_id)
            self._count(shared_missing=1)
            return
        log.warning("agent %r: its state on the shared tier failed its checks (%s)", agent_id, exc)
        self._count(rejected=1)
        if payload in fetched and self._shared is not None:
            self._shared.discard(payload)

    def _read_disk(self, agent_id: str) -> Optional[Snapshot]:
        try:
            snap, nread = self._store.get(agent_id, self._fingerprint, scratch=True)
        except FingerprintMismatch as exc:
            log.warning("agent %r: stored KV not restored: %s", agent_id, exc)
            self._count(rejected=1)
            return None
        except CorruptEntry as exc:
            log.warning("agent %r: stored KV is damaged (%s); prefilling", agent_id, exc)
            self._drop_damaged(exc, agent_key(agent_id))
            return None
        except Exception as exc:  # noqa: BLE001 - the store failed, not the data
            self._store_failed(f"reading agent {agent_id!r}", exc)
            return None
        self._count(bytes_read=nread)
        return snap

    def _drop_damaged(self, exc: CorruptEntry, record: Optional[str]) -> None:
        """Damage found: drop the damaged payload with every record naming it (the next save
        that holds those bytes writes them again), else the record that failed."""
        self._count(rejected=1)
        try:
            dropped: List[str] = []
            if exc.payload is not None:
                dropped = self._store.discard_damaged(exc.payload)
            key = exc.record or record
            if key is not None and key not in dropped:
                self._store.drop_record(key)
        except Exception as err:  # noqa: BLE001 - a full disk refuses deletes too
            self._store_failed("dropping a damaged entry", err)

    def _store_failed(self, what: str, exc: BaseException) -> None:
        """The store raised (a full disk, a damaged database, a lock held too long): log it,
        count it, and go on without the disk for this step."""
        self._count(store_errors=1)
        try:
            if self._store.recover(exc):
                return
        except Exception as err:  # noqa: BLE001
            log.warning("agentkv: the damaged cache database could not be replaced: %s", err)
        log.warning("agentkv: %s failed (%s: %s); going on without the disk tier for it", what,
                    type(exc).__name__, exc)

    def _count(self, **deltas: Any) -> None:
        """Add to the shared counters (the writer thread counts too)."""
        with self._state_lock:
            for name, d in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + d)

    def _save_live(self) -> None:
        """Snapshot the live agent (kept as its current snapshot) and queue its disk write."""
        if self._live is not None and self._live_saved is None:
            t0 = time.perf_counter()
            lease, self._lease = self._lease, None  # released when this save is published
            self._live_saved = self._queue_save(self._live, self._engine.snapshot(laid=self._laid),
                                                lease)
            with self._state_lock:
                self._stats.save_seconds += time.perf_counter() - t0

    def _flush_locked(self) -> None:
        self._save_live()
        for agent_id, snap in self._ram.items():
            self._rewrite_if_lost(agent_id, snap)
        self._wait_writer()

    def _is_durable(self, agent_id: str) -> bool:
        with self._state_lock:
            wanted = self._wanted.get(agent_id)
            return wanted is None or self._durable.get(agent_id) == wanted

    def _rewrite_if_lost(self, agent_id: str, snap: Snapshot) -> None:
        """Queue the write of a snapshot whose save failed (a full disk, since freed)."""
        self._writer.wait(agent_id)
        with self._state_lock:
            generation = self._wanted.get(agent_id)
            lost = generation is not None and self._durable.get(agent_id) != generation
        if lost:
            self._writer.submit(agent_id, snap, generation)

    # -- shared prefixes ------------------------------------------------------------------

    def _restore_prefix(self, prompt: Any) -> None:
        """Engine hook, cold context: restore the longest stored prefix of the prompt."""
        record = self._turn_record
        if record is None or record.source != "cold" or record._generates:
            return
        self._wait_writer()  # a state on its way to disk may hold the prefix
        t0 = time.perf_counter()
        source = None
        fetched: Dict[str, Any] = {}
        extra: List[Any] = []
        shared = self._shared

        def fetch(keys: List[str]) -> Dict[str, Any]:
            assert shared is not None
            fetched.update(shared.fetch(keys))
            return fetched
        try:
            if shared is not None:
                extra = shared.cuts(self._store.chain_of(prompt, self._fingerprint))
            snap, nread, source = self._store.find_prefix(
                prompt, self._fingerprint, self._engine.n_swa, scratch=True, align=self._align,
                extra=extra, fetch=fetch if extra else None)
            if snap is None:
                return
            self._engine.restore(snap)
        except (CorruptEntry, FingerprintMismatch, RestoreFailed) as exc:
            self._engine.clear()
            if getattr(exc, "payload", None) in fetched:  # read from the shared tier
                self._shared_damage(record.agent_id, exc, fetched)
                return
            log.warning("agent %r: a stored prefix failed its checks (%s); prefilling",
                        record.agent_id, exc)
            if isinstance(exc, CorruptEntry):
                self._drop_damaged(exc, source)
            else:
                self._count(rejected=1)
            return
        except Exception as exc:  # noqa: BLE001 - the store failed, not the data
            self._engine.clear()
            self._store_failed(f"looking up a stored prefix for agent {record.agent_id!r}", exc)
            return
        dt = time.perf_counter() - t0
        record.source = "prefix"
        record.restore_seconds += dt
        remote = sum(len(v) for v in fetched.values() if v is not None)
        with self._state_lock:
            self._stats.hits["cold"] -= 1
            self._stats.hits["prefix"] += 1
            self._stats.bytes_read += max(0, nread - remote)  # the shared tier counts its own
            self._stats.restore_seconds += dt

    def _plan_cut(self, prompt: Any, reuse: int) -> int:
        """Engine hook: where to store a prefix this prompt shares with stored states."""
        B = self._config.block_tokens
        if reuse > 0 or len(prompt) < B:
            return 0  # only a context evaluated from the start can store a shared prefix
        self._wait_writer()
        try:
            return self._store.plan_cut(prompt, self._fingerprint, self._engine.n_swa,
                                        self._align)
        except Exception as exc:  # noqa: BLE001
            self._store_failed("planning a shared prefix", exc)
            return 0

    def _store_cut(self, n_tokens: int) -> None:
        """Engine hook: the context holds a shared prefix of ``n_tokens``; store it."""
        t0 = time.perf_counter()
        snap = self._engine.snapshot(margin=0)
        self._writer.submit(("cut", n_tokens), snap, 0)
        with self._state_lock:
            self._stats.save_seconds += time.perf_counter() - t0

    def _wait_writer(self, agent_id: Optional[str] = None) -> None:
        """Wait until the agent's queued save (or every queued save) is on disk. The writer
        may run from here on: a writer paused for a first token would make this wait ~0.5 s
        per block."""
        self._writer_may_run.set()
        if agent_id is None:
            self._writer.drain()
        else:
            self._writer.wait(agent_id)

    def _yield_to_restores(self) -> None:
        """Writer thread: wait while a returning agent waits for its first token (bounded, so
        a save is never starved by a long prefill)."""
        self._writer_may_run.wait(timeout=0.5)

    def _persist(self, agent_id: Any, snap: Snapshot, generation: int) -> None:
        """Writer thread: put the snapshot on disk unless a newer one or a forget superseded it.
        A failure is logged and counted, never raised (the turn has long answered)."""
        t0 = time.perf_counter()
        sink: Optional[Dict[str, Any]] = None if self._shared is None else {}
        lease: Optional[str] = None
        try:
            if isinstance(agent_id, tuple):  # a shared prefix
                cut, written = self._store.put_cut(snap, self._fingerprint,
                                                   self._yield_to_restores, sink)
                if cut is not None and sink is not None and self._shared is not None:
                    self._shared.publish_cut(cut, sink, self._yield_to_restores)
            else:
                with self._state_lock:
                    if self._wanted.get(agent_id) != generation:
                        return
                    if self._leases.get(agent_id, (None,))[0] == generation:
                        lease = self._leases.pop(agent_id)[1]
                r, written = self._store.put(agent_id, snap, self._fingerprint,
                                             self._yield_to_restores, snap.version, sink)
                if self._shared is not None and sink is not None and r is not None:
                    self._shared.publish(r, sink, lease, self._yield_to_restores)
                    lease = None
        except Exception as exc:  # noqa: BLE001
            if isinstance(agent_id, tuple):
                what = "storing a shared prefix"
            elif self._config.ram_budget == 0:
                what = (f"saving agent {agent_id!r} (ram_budget=0: once it leaves the context "
                        "its KV is gone, and its next turn prefills)")
            else:
                what = (f"saving agent {agent_id!r} (its KV stays in RAM, and is written again "
                        "by flush(), evict() or when RAM pushes it out)")
            self._store_failed(what, exc)
            return
        finally:
            if lease is not None and self._shared is not None:  # not published: let go
                self._shared.release(agent_id, lease)
        with self._state_lock:
            if not isinstance(agent_id, tuple):
                self._durable[agent_id] = generation
            self._stats.bytes_written += written
            self._stats.save_seconds += time.perf_counter() - t0
