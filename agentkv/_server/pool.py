"""The front's view of its workers: processes, pipes, who is busy, who served an agent last.

Every agent has one lock: its turns run one at a time, on whichever worker is free (the one
that served it last when that one is free too: its KV may still be live there). When an agent
moves, the worker that held it drops its copy (``discard``) and the new one reads the agent's
newest turn from the shared cache_dir, where the last worker put it before releasing the agent.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import multiprocessing
import threading
from typing import Any, Callable, Dict, List, Optional

from .worker import main as worker_main

log = logging.getLogger(__name__)


class WorkerDied(RuntimeError):
    pass


class Handle:
    """One worker process and the requests in flight on it."""

    def __init__(self, index: int, config: Dict[str, Any]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.index = index
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=worker_main, args=(child, json.dumps(config)),
                                name=f"agentkv-worker-{index}", daemon=True)
        self.proc.start()
        child.close()
        self.alive = False
        self.busy = False
        self.pid: Optional[int] = None
        self.inbox: Dict[int, asyncio.Queue] = {}
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.on_durable: Optional[Callable[[int, str], None]] = None  # (worker, agent)
        self.on_lost: Optional[Callable[[int], None]] = None  # the process is gone
        self._send_lock = threading.Lock()

    def wait_ready(self, timeout: float) -> Dict[str, Any]:
        if not self.conn.poll(timeout):
            raise WorkerDied(f"worker {self.index} did not start within {timeout:.0f} s")
        msg = json.loads(self.conn.recv_bytes())
        if msg.get("type") != "ready":
            raise WorkerDied(f"worker {self.index} failed to start: {msg.get('error')}")
        self.alive, self.pid = True, msg.get("pid")
        return msg

    def start_reader(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        threading.Thread(target=self._read, name=f"agentkv-reader-{self.index}",
                         daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                msg = json.loads(self.conn.recv_bytes())
            except (EOFError, OSError, ValueError):
                break
            if msg.get("type") == "durable":
                if self.on_durable is not None and self.loop is not None:
                    self.loop.call_soon_threadsafe(self.on_durable, self.index, msg["agent"])
                continue
            self._deliver(msg.get("id"), msg)
        self.alive = False
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._gone)
        log.error("worker %d (pid %s) is gone", self.index, self.pid)
        for rid in list(self.inbox):
            self._deliver(rid, {"type": "error", "status": 503, "message": "the worker died"})
            self._deliver(rid, {"type": "end"})

    def _gone(self) -> None:
        if self.on_durable is not None:
            self.on_durable(self.index, "")  # "" : every agent this worker held
        if self.on_lost is not None:
            self.on_lost(self.index)

    def _deliver(self, rid: Any, msg: Dict[str, Any]) -> None:
        box = self.inbox.get(rid)
        if box is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(box.put_nowait, msg)

    def send(self, msg: Dict[str, Any]) -> None:
        with self._send_lock:
            self.conn.send_bytes(json.dumps(msg, separators=(",", ":")).encode())

    def stop(self, timeout: float = 30.0) -> None:
        try:
            if self.proc.is_alive():
                self.send({"type": "stop"})
        except (OSError, ValueError):
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


class Lease:
    """A worker held for one request (and the agent's lock, if it has an agent)."""

    def __init__(self, pool: "Pool", worker: Handle, agent: Optional[str], rid: int) -> None:
        self.pool, self.worker, self.agent, self.rid = pool, worker, agent, rid
        self.box: asyncio.Queue = asyncio.Queue()
        worker.inbox[rid] = self.box
        self.released = False

    async def next(self) -> Dict[str, Any]:
        return await self.box.get()

    async def drain(self) -> None:
        """Wait for the worker's ``end`` (the agent's KV is on disk), then let both go."""
        if self.released:
            return
        try:
            while True:
                msg = await self.box.get()
                if msg.get("type") == "end":
                    break
        finally:
            self.release()

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.worker.inbox.pop(self.rid, None)
        self.pool._free(self)


class Pool:
    def __init__(self, config: Dict[str, Any], workers: int, start_timeout: float = 600.0) -> None:
        self.config, self.start_timeout = config, start_timeout
        self.handles = [Handle(i, dict(config, index=i)) for i in range(workers)]
        self._restarting: Dict[int, int] = {}  # worker index -> failed starts in a row
        self._stopping = False
        self.max_restarts = 3
        try:
            self.n_ctx = [h.wait_ready(start_timeout) for h in self.handles][0]["n_ctx"]
        except BaseException:
            self.stop()
            raise
        self._ids = itertools.count(1)
        self._agent_locks: Dict[str, asyncio.Lock] = {}
        self.last_worker: Dict[str, int] = {}
        self._durable: Dict[str, asyncio.Event] = {}  # set once the agent's last turn is on disk
        self._idle: Optional[asyncio.Condition] = None
        self._loop: Any = None
        self.handover_timeout = 120.0

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._idle = asyncio.Condition()
        self._loop = loop
        for h in self.handles:
            self._watch(h)

    def _watch(self, h: Handle) -> None:
        h.on_durable = self._on_durable
        h.on_lost = self._lost
        h.start_reader(self._loop)

    def _lost(self, index: int) -> None:
        """A worker died (a crash, the OOM killer): start another in its place. Its agents'
        newest saved turns are on disk; a turn it was running answered 503."""
        if self._stopping or index in self._restarting:
            return
        self._restarting[index] = 0
        asyncio.ensure_future(self._replace(index))

    async def _replace(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            log.warning("worker %d: starting a new one", index)
            try:
                handle = await loop.run_in_executor(None, self._start, index)
            except WorkerDied as exc:
                failures = self._restarting[index] = self._restarting[index] + 1
                log.error("worker %d could not be restarted (%s)", index, exc)
                if failures >= self.max_restarts:
                    log.error("worker %d: giving up after %d failed starts", index, failures)
                    break
                await asyncio.sleep(min(30.0, 2.0 ** failures))
                continue
            old, self.handles[index] = self.handles[index], handle
            old.stop(timeout=1.0)
            self._watch(handle)
            break
        self._restarting.pop(index, None)
        await self._wake()

    def _start(self, index: int) -> Handle:
        handle = Handle(index, dict(self.config, index=index))
        try:
            handle.wait_ready(self.start_timeout)
        except BaseException:
            handle.stop(timeout=1.0)
            raise
        return handle

    def _on_durable(self, worker: int, agent: str) -> None:
        for a in ([agent] if agent else [a for a, w in self.last_worker.items() if w == worker]):
            event = self._durable.get(a)
            if event is not None and self.last_worker.get(a) == worker:
                event.set()

    @property
    def alive(self) -> List[Handle]:
        return [h for h in self.handles if h.alive]

    def lock_of(self, agent: str) -> asyncio.Lock:
        lock = self._agent_locks.get(agent)
        if lock is None:
            lock = self._agent_locks[agent] = asyncio.Lock()
        return lock

    async def lease(self, agent: Optional[str]) -> Lease:
        """A free worker for one request of ``agent`` (waits for the agent's previous turn)."""
        assert self._idle is not None
        if agent is not None:
            await self.lock_of(agent).acquire()
        try:
            async with self._idle:
                while True:
                    if not self.alive and not self._restarting:
                        raise WorkerDied("no worker is running")
                    free = [h for h in self.alive if not h.busy]
                    if free:
                        break
                    await self._idle.wait()
                last = self.last_worker.get(agent) if agent is not None else None
                worker = next((h for h in free if h.index == last), free[0])
                worker.busy = True
        except BaseException:
            if agent is not None:
                self.lock_of(agent).release()
            raise
        return Lease(self, worker, agent, next(self._ids))

    async def hand_over(self, lease: Lease) -> bool:
        """Make ``lease``'s worker the one serving its agent; True if the agent comes from
        another worker. Then its last turn must be on disk first (saves run behind the turn:
        this waits for that worker's ``durable``), and that worker's copy is told to go: this
        worker reads the newer one from disk."""
        agent = lease.agent
        if agent is None:
            return False
        last = self.last_worker.get(agent)
        moved = last is not None and last != lease.worker.index
        if moved:
            event = self._durable.get(agent)
            if event is not None and not event.is_set():
                try:
                    await asyncio.wait_for(event.wait(), self.handover_timeout)
                except asyncio.TimeoutError:
                    log.warning("agent %r: worker %d did not report its save within %.0f s; "
                                "worker %d goes on from what the disk holds", agent, last,
                                self.handover_timeout, lease.worker.index)
            previous = self.handles[last]  # type: ignore[index]
            if previous.alive:
                previous.send({"type": "discard", "agent": agent})
        self.last_worker[agent] = lease.worker.index
        self._durable[agent] = asyncio.Event()  # this turn's save is pending
        return moved

    def forgotten(self, agent: str) -> None:
        """The agent is gone from every worker and the disk: no worker serves it now."""
        self.last_worker.pop(agent, None)
        self._durable.pop(agent, None)

    def _free(self, lease: Lease) -> None:
        lease.worker.busy = False
        if lease.agent is not None:
            lock = self._agent_locks.get(lease.agent)
            if lock is not None and lock.locked():
                lock.release()
        asyncio.ensure_future(self._wake())

    async def _wake(self) -> None:
        assert self._idle is not None
        async with self._idle:
            self._idle.notify_all()

    async def ask_all(self, msg: Dict[str, Any]) -> List[Dict[str, Any]]:
        """Send a query, forget or evict to every live worker (busy ones answer between the
        chunks of their stream); their results, in worker order."""
        async def one(h: Handle) -> Dict[str, Any]:
            rid = next(self._ids)
            box: asyncio.Queue = asyncio.Queue()
            h.inbox[rid] = box
            try:
                h.send(dict(msg, id=rid))
                result: Dict[str, Any] = {"worker": h.index}
                while True:
                    reply = await box.get()
                    if reply.get("type") == "result":
                        result["data"] = reply["data"]
                        if msg.get("type") == "query":
                            return result  # queries answer with no end of their own mid-turn
                    elif reply.get("type") == "error":
                        result["error"] = reply.get("message")
                    if reply.get("type") == "end":
                        return result
            finally:
                h.inbox.pop(rid, None)
        return list(await asyncio.gather(*(one(h) for h in self.alive)))

    def stop(self) -> None:
        self._stopping = True
        for h in self.handles:
            h.stop()
