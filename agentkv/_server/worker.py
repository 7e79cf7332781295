"""One worker process of ``python -m agentkv serve``: a ``Llama``, an ``AgentMemory`` on the
shared cache_dir, and a loop over the front's messages (JSON over a pipe, never pickle).

Messages from the front (``type``): ``turn`` (run a chat or completion as an agent; ``stale``
says this worker's own copy of the agent, if any, is older than the disk's), ``discard`` (drop
this process's copy of an agent: another worker now has its newest turn), ``cancel`` (stop the
turn being streamed: the client went away), ``query`` (agents, stats), ``forget``, ``evict``,
``stop``. Replies carry the request's ``id``: ``chunk`` (streamed), ``response``, ``error``,
``result``, ``done`` (what the turn restored and evaluated), ``end`` (the worker is free), and
for a kept agent ``durable`` once its turn is on disk (saves run behind, as in-process): only
then does the front hand the agent to another worker.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import threading
from typing import Any, Deque, Dict, Optional

from ..errors import AgentKVError, UnknownAgent

log = logging.getLogger(__name__)


def _send(conn: Any, msg: Dict[str, Any]) -> None:
    conn.send_bytes(json.dumps(msg, separators=(",", ":")).encode())


def _recv(conn: Any) -> Dict[str, Any]:
    return json.loads(conn.recv_bytes())


def main(conn: Any, config: str) -> None:
    """Entry point of a worker process (multiprocessing, spawn)."""
    cfg = json.loads(config)
    logging.basicConfig(level=cfg.get("log_level", "WARNING"),
                        format=f"worker{cfg['index']} %(levelname)s %(name)s: %(message)s")
    try:
        from llama_cpp import Llama

        from ..memory import AgentMemory
        llm = Llama(model_path=cfg["model"], n_ctx=cfg["n_ctx"], n_threads=cfg["threads"],
                    n_threads_batch=cfg["threads"], flash_attn=cfg["flash_attn"],
                    chat_format=cfg.get("chat_format"), type_k=cfg.get("type_k"),
                    type_v=cfg.get("type_v"), n_batch=cfg.get("n_batch", 512), verbose=False)
        mem = AgentMemory(llm, cache_dir=cfg["cache_dir"], ram_budget=cfg["ram_budget"],
                          disk_budget=cfg["disk_budget"], at_rest=cfg.get("at_rest"),
                          draft=cfg.get("draft"), shared=cfg.get("shared"))
    except Exception as exc:  # noqa: BLE001 - reported to the front, which exits with it
        _send(conn, {"type": "fatal", "error": f"{type(exc).__name__}: {exc}"})
        return
    _send(conn, {"type": "ready", "n_ctx": llm.n_ctx(), "pid": os.getpid()})
    try:
        Worker(conn, mem, cfg["index"]).serve()
    finally:
        mem.close()


class Worker:
    def __init__(self, conn: Any, mem: Any, index: int) -> None:
        self.conn, self.mem, self.index = conn, mem, index
        self.deferred: Deque[Dict[str, Any]] = collections.deque()
        self._send_lock = threading.Lock()  # the turn's thread and durable reports

    def send(self, msg: Dict[str, Any]) -> None:
        with self._send_lock:
            _send(self.conn, msg)

    def serve(self) -> None:
        while True:
            try:
                msg = self.deferred.popleft() if self.deferred else _recv(self.conn)
            except (EOFError, OSError):
                return  # the front is gone
            kind = msg.get("type")
            if kind == "stop":
                return
            try:
                if kind == "turn":
                    self.turn(msg)
                elif kind == "discard":
                    self.mem.discard_local(msg["agent"])
                elif kind != "cancel":  # a cancel for a turn that has ended: nothing to do
                    self.answer(msg)
            except (EOFError, BrokenPipeError):
                return

    def answer(self, msg: Dict[str, Any]) -> None:
        """A query, forget or evict: one ``result`` (or ``error``), then ``end``."""
        kind, rid = msg.get("type"), msg.get("id")
        try:
            if kind == "query" and msg.get("what") == "agents":
                data: Any = [dataclasses.asdict(a) for a in self.mem.agents()]
            elif kind == "query" and msg.get("what") == "stats":
                stats = self.mem.stats()
                data = dataclasses.asdict(stats)
                data["draft_rejected"] = stats.draft_rejected
            elif kind == "forget":
                try:
                    self.mem.forget(msg["agent"])
                    data = {"known": True}
                except UnknownAgent:
                    data = {"known": False}
            elif kind == "evict":
                try:
                    data = {"known": True, "evicted": self.mem.evict(msg["agent"])}
                except UnknownAgent:
                    data = {"known": False, "evicted": False}
            else:
                raise ValueError(f"unknown message {kind!r}")
            self.send({"type": "result", "id": rid, "data": data})
        except (EOFError, BrokenPipeError):
            raise
        except Exception as exc:  # noqa: BLE001 - reported, the worker goes on
            log.exception("%s failed", kind)
            self.send({"type": "error", "id": rid, "status": 500,
                              "message": f"{type(exc).__name__}: {exc}"})
        self.send({"type": "end", "id": rid})

    def between_chunks(self, rid: Any) -> bool:
        """Read what the front sent meanwhile; True if this turn is cancelled. Queries are
        answered at once (they only read); anything else waits for the turn's end."""
        cancelled = False
        while self.conn.poll():
            msg = _recv(self.conn)
            if msg.get("type") == "cancel" and msg.get("id") == rid:
                cancelled = True
            elif msg.get("type") == "query":
                self.answer(msg)
            else:
                self.deferred.append(msg)
        return cancelled

    def turn(self, msg: Dict[str, Any]) -> None:
        rid, call, stream = msg["id"], dict(msg["call"]), bool(msg.get("stream"))
        agent: Optional[str] = msg.get("agent")
        keep = agent is not None
        if agent is None:  # not kept: a throwaway agent that still gets shared prefixes
            agent = f"agentkv-anonymous-{self.index}-{rid}"
        mem = self.mem
        try:
            if keep and msg.get("stale"):
                mem.discard_local(agent)
            if msg["kind"] == "chat":
                out = mem.create_chat_completion(agent, stream=stream, **call)
            else:
                prompt = call.pop("prompt")
                out = mem.create_completion(agent, prompt, stream=stream, **call)
            if stream:
                for chunk in out:
                    self.send({"type": "chunk", "id": rid, "data": chunk})
                    if self.between_chunks(rid):
                        out.close()  # the turn ends here; its KV so far is saved
                        break
            else:
                self.send({"type": "response", "id": rid, "data": out})
        except (EOFError, BrokenPipeError):
            raise
        except ValueError as exc:  # llama-cpp-python: the prompt does not fit the context
            message = str(exc)
            code = "context_length_exceeded" if "context window" in message else None
            self.send({"type": "error", "id": rid, "status": 400, "message": message,
                              "code": code})
        except AgentKVError as exc:
            self.send({"type": "error", "id": rid, "status": 400, "message": str(exc)})
        except Exception as exc:  # noqa: BLE001 - reported, the worker goes on
            log.exception("turn of %r failed", agent)
            self.send({"type": "error", "id": rid, "status": 500,
                              "message": f"{type(exc).__name__}: {exc}"})
        turn = mem.last_turn if mem.last_turn is not None and mem.last_turn.agent_id == agent \
            else None
        usage = None
        if turn is not None:
            usage = {"source": turn.source, "evaluated": turn.prompt_tokens_evaluated,
                     "restored": turn.prompt_tokens_restored, "draft_tokens": turn.draft_tokens,
                     "draft_accepted": turn.draft_accepted}
        self.send({"type": "done", "id": rid, "agentkv": usage, "worker": self.index})
        if keep:  # the front hands the agent to another worker only once this arrives
            threading.Thread(target=self.report_durable, args=(agent,), daemon=True,
                             name="agentkv-durable").start()
        else:
            try:
                mem.forget(agent)
            except UnknownAgent:
                pass
            except Exception:  # noqa: BLE001 - the store logs and counts its own failures
                log.exception("after the turn of %r", agent)
        self.send({"type": "end", "id": rid})

    def report_durable(self, agent: str) -> None:
        """Tell the front when the agent's turn is on disk (the save runs behind, as in-process)."""
        try:
            ok = self.mem.wait_durable(agent, timeout=600)
        except Exception:  # noqa: BLE001 - reported as not durable; the front goes on
            log.exception("waiting for the save of %r", agent)
            ok = False
        try:
            self.send({"type": "durable", "agent": agent, "ok": ok})
        except (OSError, ValueError):
            pass
