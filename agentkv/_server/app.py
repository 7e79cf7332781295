"""The HTTP side of ``python -m agentkv serve``: OpenAI's endpoints and agentkv's own.

    POST /v1/chat/completions, POST /v1/completions   (stream=true: server-sent events)
    GET  /v1/models, GET /health
    GET  /v1/agents, DELETE /v1/agents/{id}, POST /v1/agents/{id}/evict, GET /v1/stats

A request's agent is its ``X-Agent-Id`` header, else its ``user`` field, else none (the turn
still starts from a stored shared prefix, and is not kept). ``usage`` reports
``prompt_tokens_details.cached_tokens`` (prompt tokens served from restored KV) and an
``agentkv`` object (where the KV came from, tokens evaluated and restored, drafting counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any, AsyncIterator, Dict, Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .pool import Lease, Pool, WorkerDied
from .requests import BadRequest, agent_of, chat_call, check_agent_id, completion_call

log = logging.getLogger(__name__)


def _error(exc: BadRequest) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _usage(response_usage: Optional[Dict[str, Any]], agentkv: Optional[Dict[str, Any]]
           ) -> Optional[Dict[str, Any]]:
    usage = dict(response_usage or {})
    if agentkv is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": agentkv["restored"]}
        usage["agentkv"] = agentkv
    return usage or None


class Server:
    def __init__(self, pool: Pool, model_name: str) -> None:
        self.pool, self.model_name = pool, model_name
        self.created = int(time.time())

    # -- OpenAI endpoints -------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    async def _generate(self, request: Request, kind: str) -> Response:
        try:
            body = await self._body(request)
            call, stream = (chat_call if kind == "chat" else completion_call)(body)
            agent = agent_of(request.headers.get("x-agent-id"), body)
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            lease = await self.pool.lease(agent)
        except BadRequest as exc:
            return _error(exc)
        except WorkerDied as exc:
            return _error(BadRequest(str(exc), status=503, kind="server_error"))
        try:
            stale = await self.pool.hand_over(lease)
            try:
                lease.worker.send({"type": "turn", "id": lease.rid, "kind": kind, "agent": agent,
                                   "call": call, "stream": stream, "stale": stale})
            except (OSError, ValueError):  # the worker died just now; it is being replaced
                lease.release()
                return _error(BadRequest("the worker died; retry", status=503, kind="server_error"))
            if stream:
                first = await lease.next()  # the first chunk, or an error before any
                if first.get("type") == "error":
                    asyncio.ensure_future(lease.drain())
                    return self._worker_error(first)
                headers = {"X-Agentkv-Worker": str(lease.worker.index)}
                return StreamingResponse(self._sse(lease, first, include_usage),
                                         media_type="text/event-stream", headers=headers)
            msg = await lease.next()
            if msg.get("type") == "error":
                asyncio.ensure_future(lease.drain())
                return self._worker_error(msg)
            done = await lease.next()
            asyncio.ensure_future(lease.drain())
            data = msg["data"]
            data["model"] = self.model_name
            data["usage"] = _usage(data.get("usage"), done.get("agentkv"))
            return JSONResponse(data, headers={"X-Agentkv-Worker": str(lease.worker.index)})
        except BaseException:
            asyncio.ensure_future(lease.drain())
            raise

    def _worker_error(self, msg: Dict[str, Any]) -> JSONResponse:
        status = int(msg.get("status", 500))
        kind = "invalid_request_error" if status < 500 else "server_error"
        return _error(BadRequest(msg.get("message", "the worker failed"), code=msg.get("code"),
                                 status=status, kind=kind))

    async def _sse(self, lease: Lease, first: Dict[str, Any], include_usage: bool
                   ) -> AsyncIterator[bytes]:
        """Chunks as server-sent events. A client that goes away cancels this generator: the
        worker is told to stop, and is freed once the turn's KV is on disk."""
        finished = False
        last: Dict[str, Any] = {}
        try:
            msg = first
            while True:
                kind = msg.get("type")
                if kind == "chunk":
                    last = msg["data"]
                    last["model"] = self.model_name
                    yield b"data: " + json.dumps(last).encode() + b"\n\n"
                elif kind == "error":
                    yield b"data: " + json.dumps(BadRequest(msg.get("message", "failed"),
                                                            kind="server_error").body()).encode() + b"\n\n"
                elif kind == "done":
                    finished = True
                    if include_usage:
                        tail: Dict[str, Any] = {
                            "id": last.get("id"), "object": last.get("object"),
                            "created": last.get("created"), "model": self.model_name,
                            "choices": [], "usage": _usage(None, msg.get("agentkv"))}
                        yield b"data: " + json.dumps(tail).encode() + b"\n\n"
                    yield b"data: [DONE]\n\n"
                    break
                elif kind == "end":
                    finished = True
                    lease.release()
                    yield b"data: [DONE]\n\n"
                    return
                msg = await lease.next()
        finally:
            if not finished:
                try:
                    lease.worker.send({"type": "cancel", "id": lease.rid})
                except (OSError, ValueError):
                    pass
            asyncio.ensure_future(lease.drain())

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created,
             "owned_by": "agentkv"}]})

    async def health(self, request: Request) -> Response:
        alive = len(self.pool.alive)
        status = "ok" if alive == len(self.pool.handles) else ("degraded" if alive else "down")
        return JSONResponse({"status": status, "workers": alive,
                             "workers_configured": len(self.pool.handles),
                             "pids": [h.pid if h.alive else None for h in self.pool.handles]},
                            status_code=200 if alive else 503)

    # -- agentkv's endpoints ----------------------------------------------------------------

    async def agents(self, request: Request) -> Response:
        """Every agent held: disk entries (shared), live or RAM entries from the worker that
        served the agent last (other workers' copies are stale by construction)."""
        merged: Dict[str, Dict[str, Any]] = {}
        for result in await self.pool.ask_all({"type": "query", "what": "agents"}):
            for a in result.get("data") or []:
                aid = a["agent_id"]
                owner = self.pool.last_worker.get(aid)
                mine = a["tier"] != "disk" and owner == result["worker"]
                if aid not in merged or mine:
                    a = dict(a, worker=result["worker"] if a["tier"] != "disk" else None)
                    merged[aid] = a
        data = [{"id": a["agent_id"], "object": "agent", "n_tokens": a["n_tokens"],
                 "tier": a["tier"], "bytes": a["nbytes"], "last_used": a["last_used"],
                 "worker": a["worker"]} for _, a in sorted(merged.items())]
        return JSONResponse({"object": "list", "data": data})

    async def stats(self, request: Request) -> Response:
        results = await self.pool.ask_all({"type": "query", "what": "stats"})
        workers = [dict(r.get("data") or {}, worker=r["worker"]) for r in results]
        total: Dict[str, Any] = {"hits": {}}
        for w in workers:
            for key, value in w.items():
                if key in ("worker", "agents", "disk_bytes", "disk_db_bytes"):
                    continue
                if key == "hits":
                    for src, n in value.items():
                        total["hits"][src] = total["hits"].get(src, 0) + n
                elif isinstance(value, (int, float)):
                    total[key] = total.get(key, 0) + value
        if workers:  # the disk tier is shared: its size is the same from every worker
            total["disk_bytes"] = workers[0].get("disk_bytes", 0)
            total["disk_db_bytes"] = workers[0].get("disk_db_bytes", 0)
        agents = await self.agents(request)
        total["agents"] = len(json.loads(bytes(agents.body))["data"])
        return JSONResponse({"total": total, "workers": workers})

    async def forget(self, request: Request) -> Response:
        return await self._agent_op(request, "forget")

    async def evict(self, request: Request) -> Response:
        return await self._agent_op(request, "evict")

    async def _agent_op(self, request: Request, op: str) -> Response:
        try:
            agent = check_agent_id(request.path_params["agent_id"], "agent id")
        except BadRequest as exc:
            return _error(exc)
        lock = self.pool.lock_of(agent)
        async with lock:  # after the agent's turn in flight, if any
            results = await self.pool.ask_all({"type": op, "agent": agent})
            known = any((r.get("data") or {}).get("known") for r in results)
            if op == "forget":
                self.pool.forgotten(agent)
        if not known:
            return _error(BadRequest(f"no agent {agent!r}", status=404, code="agent_not_found",
                                     param="agent_id"))
        body: Dict[str, Any] = {"id": agent, "object": "agent"}
        if op == "forget":
            body["deleted"] = True
        else:
            body["evicted"] = any((r.get("data") or {}).get("evicted") for r in results)
        return JSONResponse(body)

    # -- plumbing -----------------------------------------------------------------------------

    async def _body(self, request: Request) -> Dict[str, Any]:
        raw = await request.body()
        if len(raw) > 64 << 20:
            raise BadRequest("the request body is larger than 64 MiB", status=413)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/agents", self.agents, methods=["GET"]),
            Route("/v1/agents/{agent_id:path}/evict", self.evict, methods=["POST"]),
            Route("/v1/agents/{agent_id:path}", self.forget, methods=["DELETE"]),
            Route("/v1/stats", self.stats, methods=["GET"]),
        ]

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            self.pool.attach(asyncio.get_running_loop())
            yield

        return Starlette(routes=routes, lifespan=lifespan)
