"""AgentMemory: persistent per-agent KV over one wrapped ``Llama``.

A turn for agent A, from the caller's side (``mem.create_chat_completion("A", ...)``):

1. take the context (one turn at a time, whatever the thread);
2. if A is live, nothing moves; otherwise the live agent's snapshot moves into the RAM tier
   and A is restored from RAM, else from disk, else from the longest stored prefix of its
   prompt (the turn's policy, asked by the engine when the prompt is known), else A starts cold;
3. run the call through the ordinary ``Llama`` API; ``Llama.generate`` prefix-matches A's
   restored tokens and evaluates only the new suffix;
4. snapshot A (its incremental disk write is queued behind) and release the context. A stays
   live until another agent needs the context; switching away from it then moves no bytes.

Snapshots leaving RAM wait for their disk write, so the RAM budget bounds memory; every agent
is on disk after each of its turns (a crash loses at most the turn in flight).

The parts (agentkv/_memory/): the RAM tier (ram.py), the disk and shared tiers as a turn
reads them (tiers.py), the saves behind the turns (saves.py, writer.py), the turn's decisions
inside ``generate`` (policy.py), the counters (counters.py) and the read-only inspection.
"""

from __future__ import annotations

import atexit
import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Literal, Optional, Tuple, Union, overload

from llama_cpp import llama_types

from ._format.buffers import Buffers
from ._llama.draft import DraftLike, NgramDraft, draft_config
from ._llama.engine import Engine
from ._llama.settings import compute
from ._memory.counters import Counters
from ._memory.inspection import Inspection
from ._memory.policy import Sharing
from ._memory.prefetch import NextAgent
from ._memory.ram import RamTier
from ._memory.residency import Residency
from ._memory.saves import Saves
from ._memory.tiers import Tiers
from ._memory.turns import TurnRunner, check_agent_id, flush_at_exit
from ._store.atrest import code_of
from ._store.shared import RedisTier
from .config import MemoryConfig, SharedTier, SizeLike, shared_config
from .errors import ConfigError, UnknownAgent
from .stats import AgentInfo, MemoryStats, TurnRecord

_DEFAULT: Any = object()  # "the memory's own setting" for per-call options

__all__ = ["AgentMemory"]

log = logging.getLogger(__name__)


class AgentMemory(TurnRunner):
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
            stay exact); benchmarks/kv_density.py --quality measures it. Logits are not
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
        prefetch: predict the next agent from the order of recent turns (the one that
            followed the current agent the last time: round-robin teams, fixed chains) and
            read its KV from disk into RAM during the current turn (:meth:`prefetch`).
    """
    def __init__(self, llm: Any, cache_dir: Union[str, Path] = "~/.cache/agentkv",
                 ram_budget: SizeLike = "1GiB", disk_budget: SizeLike = "20GiB",
                 block_tokens: int = 256, share_prefixes: Union[bool, str] = True,
                 at_rest: Optional[str] = None, ram_laid_out: bool = True,
                 draft: DraftLike = None, shared: Union[None, str, SharedTier] = None,
                 prefetch: bool = False) -> None:
        buffers = Buffers()
        self._engine = Engine(llm, buffers=buffers)  # NotALlama first: nothing else is touched
        if not isinstance(ram_laid_out, bool):
            raise ConfigError(f"ram_laid_out must be True or False, not {ram_laid_out!r}")
        self._ram_images = ram_laid_out
        self._draft = draft_config(draft)
        if not isinstance(prefetch, bool):
            raise ConfigError(f"prefetch must be True or False, not {prefetch!r}")
        self._next = NextAgent() if prefetch else None
        if share_prefixes not in (True, False, "any"):
            raise ConfigError(f"share_prefixes must be True, False or 'any', not {share_prefixes!r}")
        cfg = self._config = MemoryConfig.create(cache_dir, ram_budget, disk_budget, block_tokens)
        self._engine.block_tokens = cfg.block_tokens
        self._rest = code_of(at_rest)
        shared_cfg = shared_config(shared)
        self._counters = Counters()
        # the client (redis missing: ConfigError naming the extra); keys bound below
        client = None if shared_cfg is None else RedisTier(shared_cfg, b"", self._counters.add,
                                                            machine=compute())
        self._closed = True  # until the end of __init__
        self._take_over(llm)  # a previous memory of this Llama flushes its agents first
        self._engine.check_format()  # UnsupportedLlamaCpp before anything is written
        store = self._open_store(buffers)
        self._tiers = Tiers(store, client, self._make_fingerprint(store), self._counters)
        self._tiers.rebind(self._tiers.fingerprint)
        self._saves = Saves(self._tiers, self._counters, cfg.ram_budget)
        self._sharing = Sharing.of(share_prefixes, llm.n_batch, cfg.block_tokens)
        self._lock = threading.Lock()  # the context: one turn at a time
        self._owner: Optional[int] = None
        self._res = Residency(self._engine, RamTier(cfg.ram_budget), self._tiers, self._saves,
                              self._counters, ram_laid_out)
        self._live_size = 0  # last measured size of the live state (agents())
        self.last_turn: Optional[TurnRecord] = None
        self._engine.install()
        self._engine.clear()  # whatever the Llama held belongs to no agent
        self._warned_cache = False
        self._at_exit = flush_at_exit(self)
        atexit.register(self._at_exit)
        self._closed = False
        log.debug("agentkv memory at %s (fingerprint %s)", cfg.cache_dir, self.fingerprint)

    # -- public API -----------------------------------------------------------------------

    @property
    def llm(self) -> Any:
        return self._engine.llm

    @property
    def fingerprint(self) -> str:
        """Hex of the fingerprint stored KV must match to be restored here."""
        return self._tiers.fingerprint.hex()

    @contextmanager
    def agent(self, agent_id: str, draft: Any = _DEFAULT) -> Iterator[Any]:
        """Give the context to ``agent_id`` for a block; yields the wrapped ``Llama``.
        ``draft`` overrides the memory's drafting setting for the block.

        >>> with mem.agent("planner") as live:                      # doctest: +SKIP
        ...     live.create_chat_completion(messages=[...])
        """
        with self._turn(agent_id, self._draft_for(draft)) as llm:
            yield llm

    @overload
    def create_completion(self, agent_id: str, prompt: Any, *, stream: Literal[False] = ...,
                          **kwargs: Any) -> llama_types.CreateCompletionResponse: ...

    @overload
    def create_completion(self, agent_id: str, prompt: Any, *, stream: Literal[True],
                          **kwargs: Any) -> Iterator[llama_types.CreateCompletionStreamResponse]: ...

    def create_completion(self, agent_id: str, prompt: Any, *, stream: bool = False,
                          **kwargs: Any) -> Any:
        """``Llama.create_completion`` as ``agent_id``; same return shape, ``stream=True`` too.
        ``draft=`` (False, "ngram") overrides the memory's drafting setting for this call."""
        draft = self._draft_for(kwargs.pop("draft", _DEFAULT))
        return self._call(agent_id, lambda llm: llm.create_completion(prompt, stream=stream,
                                                                      **kwargs),
                          stream, draft)

    @overload
    def create_chat_completion(self, agent_id: str, messages: Any = ..., *,
                               stream: Literal[False] = ..., **kwargs: Any
                               ) -> llama_types.CreateChatCompletionResponse: ...

    @overload
    def create_chat_completion(self, agent_id: str, messages: Any = ..., *,
                               stream: Literal[True], **kwargs: Any
                               ) -> Iterator[llama_types.CreateChatCompletionStreamResponse]: ...

    def create_chat_completion(self, agent_id: str, messages: Any = None, *, stream: bool = False,
                               **kwargs: Any) -> Any:
        """``Llama.create_chat_completion`` as ``agent_id``; same return shape, ``stream=True`` too.
        ``draft=`` (False, "ngram") overrides the memory's drafting setting for this call."""
        draft = self._draft_for(kwargs.pop("draft", _DEFAULT))
        if messages is not None:
            kwargs["messages"] = messages
        return self._call(agent_id, lambda llm: llm.create_chat_completion(stream=stream,
                                                                           **kwargs),
                          stream, draft)

    def _draft_for(self, value: Any) -> Optional[NgramDraft]:
        return self._draft if value is _DEFAULT else draft_config(value)

    def stats(self) -> MemoryStats:
        """A copy of the counters, with the current tier sizes."""
        s = self._counters.copy()
        store = self._tiers.store
        s.ram_bytes = self._res.ram.nbytes + self._res.prefetcher.nbytes
        s.disk_bytes = store.nbytes
        s.disk_db_bytes = store.db_bytes()
        ids = {m.name for m, _ in store.agents() if m.fingerprint == self.fingerprint}
        ids.update(aid for aid, _ in self._res.ram.items())
        if self._res.live is not None:
            ids.add(self._res.live)
        s.agents = len(ids)
        return s

    def agents(self) -> List[AgentInfo]:
        """Every agent held, live, in RAM or on disk (this fingerprint), sorted by id."""
        infos: Dict[str, AgentInfo] = {}
        for m, nbytes in self._tiers.store.agents():
            if m.fingerprint == self.fingerprint:
                infos[m.name] = AgentInfo(m.name, m.n_tokens, "disk", nbytes, m.last_used)
        for aid, entry in self._res.ram.items():
            infos[aid] = AgentInfo(aid, entry.snap.n_tokens, "ram", entry.snap.nbytes,
                                   entry.last_used)
        live = self._res.live
        if live is not None:
            infos[live] = AgentInfo(live, self._engine.n_tokens, "live", self._live_nbytes(),
                                    self._res.live_since)
        return [infos[k] for k in sorted(infos)]

    def prefetch(self, agent_id: str) -> None:
        """Read the agent's KV from disk into RAM in the background, while another agent's
        turn runs (the read waits while a returning agent waits for its first token); returns
        at once. It stays within the RAM budget: durable RAM snapshots, least recently used
        first, make room for it, and an agent larger than the budget is not prefetched. The agent's next turn
        then restores from RAM (``hits["prefetch"]``) instead of reading the disk inside its
        time to first token. ``AgentMemory(prefetch=True)`` does this by itself for the agent
        predicted to come next (the one that followed the current agent the last time)."""
        check_agent_id(agent_id)
        if self._owner == threading.get_ident():  # inside this thread's turn
            self._res.prefetch(agent_id)
            return
        with self._exclusive():  # RAM may make room for it: another thread's turn ends first
            self._res.prefetch(agent_id)

    def inspect(self) -> Inspection:
        """A read-only view of what this memory holds (records, blocks, layouts, the live
        context): for tests, benchmarks and debugging. See :class:`~agentkv.Inspection`."""
        return Inspection(self)

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
        check_agent_id(agent_id)
        with self._exclusive():
            known = False
            if self._res.live == agent_id:
                self._res.evict_live()
                known = True
            held = self._res.ram.peek(agent_id)
            if held is not None:
                self._saves.rewrite_if_lost(agent_id, held)  # a failed save gets another try
            self._saves.writer.wait(agent_id)
            durable = self._saves.is_durable(agent_id)
            if held is not None:
                known = True
                if not durable:
                    log.warning("agent %r: its KV could not be written to disk; it stays in RAM",
                                agent_id)
                    return False
                self._res.ram.pop(agent_id)
            if not known and not self._tiers.store.has_agent(agent_id):
                raise UnknownAgent(f"no agent {agent_id!r} in this memory")
            return durable

    def forget(self, agent_id: str) -> None:
        """Delete the agent's KV from every tier; its payload goes unless another agent uses it."""
        check_agent_id(agent_id)
        with self._exclusive():
            known = self._res.drop_local(agent_id)
            self._saves.forget(agent_id)
            self._saves.writer.wait(agent_id)
            try:
                known = self._tiers.store.drop(agent_id) or known
            except Exception as exc:  # noqa: BLE001
                self._tiers.store_failed(f"deleting agent {agent_id!r} from disk", exc)
            if self._tiers.shared is not None:
                self._tiers.shared.forget(agent_id)
            if not known:
                raise UnknownAgent(f"no agent {agent_id!r} in this memory")

    def discard_local(self, agent_id: str) -> bool:
        """Drop this process's copies of the agent (its live KV, its RAM snapshot) without
        writing them, keeping what the disk holds: for processes sharing a cache_dir, when
        another one has run the agent since (its newer turn is on disk, and this copy must
        neither be restored nor written over it). True if there was a copy to drop."""
        check_agent_id(agent_id)
        with self._exclusive():
            self._saves.writer.wait(agent_id)
            dropped = self._res.drop_local(agent_id)
            self._saves.forget(agent_id, landed=True)
            return dropped

    def wait_durable(self, agent_id: str, timeout: Optional[float] = None) -> bool:
        """Wait (from any thread, without taking the context) until the agent's newest saved
        turn is on disk, or ``timeout`` seconds; True if it is. Background saves still yield to
        a returning agent's first token meanwhile."""
        self._saves.writer.wait(agent_id, timeout, release=False)
        return self._saves.is_durable(agent_id)

    def flush(self) -> None:
        """Write the live agent and every RAM snapshot to disk; return when they are there."""
        with self._exclusive():
            self._res.flush()

    def gc(self) -> Tuple[int, int]:
        """Delete what the disk tier holds for nothing: payloads no record names (left by a
        save that was killed or failed) and files no database row names. Returns how many
        of each went; ``python -m agentkv gc`` does the same to a folder."""
        with self._exclusive():
            self._saves.writer.drain()
            try:
                return self._tiers.store.collect(), self._tiers.store.sweep()
            except Exception as exc:  # noqa: BLE001
                self._tiers.store_failed("collecting unreferenced payloads", exc)
                return 0, 0

    def close(self) -> None:
        """Flush, stop the writer and hand the ``Llama`` back untouched. Idempotent."""
        if self._closed:
            return
        with self._exclusive(check_open=False):
            if self._closed:
                return
            try:
                self._res.flush()
            finally:
                self._saves.writer.close()
                self._res.prefetcher.close()
                self._engine.uninstall()
                self._tiers.store.close()
                if self._tiers.shared is not None:
                    self._tiers.shared.close()
                atexit.unregister(self._at_exit)
                self._closed = True

    def __enter__(self) -> "AgentMemory":
        self._check_open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"live={self._res.live!r}"
        return f"AgentMemory({self._config.cache_dir}, {state})"









