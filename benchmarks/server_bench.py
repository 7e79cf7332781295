"""``python -m agentkv serve``: the HTTP overhead on a returning agent, and throughput by workers.

Command::

    .venv/bin/python benchmarks/server_bench.py --json server.json

1. TTFT of a returning agent's turn (a short new question on a ~1,000-token history, 3 agents
   taking turns, so every return is a restore from RAM) through the server (streamed, time to
   the first content chunk, measured by the client) against the same turns in-process through
   ``AgentMemory`` (time to its first streamed chunk). Medians over ``--rounds`` rounds.
2. Aggregate decode throughput: ``--agents`` agents each ask for ``--max-tokens`` tokens at the
   same time, over ``--waves`` waves; completion tokens over all agents per wall-clock second,
   with 1 worker (all threads) and with 2 workers (the threads split between them).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchutil import (Progress, add_common_args, load_llm, machine, machine_line,  # noqa: E402
                       parse_common, write_json)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = "You are a careful engineer on a team. " + " ".join(
    f"Rule {i}: state your assumptions and check step {i} twice." for i in range(70))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, cache: str, workers: int, threads: int, n_ctx: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentkv", "serve", model, "--cache-dir", cache,
             "--port", str(self.port), "--workers", str(workers), "--threads", str(threads),
             "--n-ctx", str(n_ctx), "--chat-format", "gemma"], cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # one client for every request, as an application keeps one (a new httpx client
        # loads its TLS context, ~30 ms, even for plain http)
        self.http = httpx.Client(timeout=600)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited")
            try:
                if self.http.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("the server did not come up")

    def stream_ttft(self, agent: str, messages: list, max_tokens: int) -> Dict[str, Any]:
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        t0 = time.perf_counter()
        first, text = None, ""
        with self.http.stream("POST", self.url + "/v1/chat/completions", json=body,
                              headers={"X-Agent-Id": agent}) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                if first is None and delta:
                    first = time.perf_counter() - t0
                text += delta
        return {"ttft_s": first, "text": text}

    def complete(self, agent: str, messages: list, max_tokens: int) -> int:
        r = self.http.post(self.url + "/v1/chat/completions", headers={"X-Agent-Id": agent},
                           json={"messages": messages, "max_tokens": max_tokens, "temperature": 0})
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def opening(agent: str) -> list:
    return [{"role": "user", "content": f"{SYSTEM}\nYou are the {agent}. Introduce yourself."}]


def ttft(args: Any, progress: Progress) -> Dict[str, Any]:

    from agentkv import AgentMemory
    agents = ["planner", "coder", "critic"]
    result: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as root:
        server = Server(args.model, os.path.join(root, "http"), 1, args.threads, args.n_ctx)
        http: List[float] = []
        try:
            hist = {a: opening(a) for a in agents}
            for r in range(args.rounds + 1):
                for a in agents:
                    out = server.stream_ttft(a, hist[a], args.turn_tokens)
                    if r > 0:
                        http.append(out["ttft_s"])
                    hist[a] = hist[a] + [{"role": "assistant", "content": out["text"]},
                                         {"role": "user", "content": f"Question {r + 1}: go on."}]
                    progress.step("http")
        finally:
            server.stop()
        llm = load_llm(args.model, args.n_ctx, args.threads, n_threads_batch=args.threads,
                       chat_format="gemma")
        local: List[float] = []
        with AgentMemory(llm, cache_dir=os.path.join(root, "local")) as mem:
            hist = {a: opening(a) for a in agents}
            for r in range(args.rounds + 1):
                for a in agents:
                    t0 = time.perf_counter()
                    first, text = None, ""
                    for chunk in mem.create_chat_completion(a, messages=hist[a], temperature=0,
                                                            max_tokens=args.turn_tokens,
                                                            stream=True):
                        delta = chunk["choices"][0]["delta"].get("content") or ""
                        if first is None and delta:
                            first = time.perf_counter() - t0
                        text += delta
                    if r > 0:
                        local.append(first)
                    hist[a] = hist[a] + [{"role": "assistant", "content": text},
                                         {"role": "user", "content": f"Question {r + 1}: go on."}]
                    progress.step("in-process")
        llm.close()
    result["http_ttft_ms"] = statistics.median(http) * 1e3
    result["inprocess_ttft_ms"] = statistics.median(local) * 1e3
    result["overhead_ms"] = result["http_ttft_ms"] - result["inprocess_ttft_ms"]
    result["returns"] = len(http)
    progress.log(f"returning-agent TTFT: HTTP {result['http_ttft_ms']:.1f} ms, in-process "
                 f"{result['inprocess_ttft_ms']:.1f} ms ({len(http)} returns each)")
    return result


def throughput(args: Any, workers: int, progress: Progress) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as root:
        server = Server(args.model, os.path.join(root, "c"), workers, args.threads, args.n_ctx)
        try:
            names = [f"agent{i}" for i in range(args.agents)]
            for a in names:  # each agent's history is evaluated once, before the clock starts
                server.complete(a, opening(a), 1)
            rates = []
            for w in range(args.waves):
                counts: Dict[str, int] = {}

                def one(a: str) -> None:
                    msgs = opening(a) + [{"role": "assistant", "content": "Hello."},
                                         {"role": "user", "content": f"Wave {w}: write a paragraph "
                                          "about testing."}]
                    counts[a] = server.complete(a, msgs, args.max_tokens)

                t0 = time.perf_counter()
                threads = [threading.Thread(target=one, args=(a,)) for a in names]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                rates.append(sum(counts.values()) / (time.perf_counter() - t0))
                progress.step(f"{workers} worker(s)")
        finally:
            server.stop()
    rate = statistics.median(rates)
    progress.log(f"{workers} worker(s), {args.threads // workers} thread(s) each: "
                 f"{rate:.1f} tokens/s over {args.agents} agents")
    return {"workers": workers, "threads_per_worker": args.threads // workers,
            "tokens_per_s": rate, "waves": rates}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap, repeats=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--turn-tokens", type=int, default=8)
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--waves", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--n-ctx", type=int, default=4096)
    args = parse_common(ap, argv)
    progress = Progress(6 * (args.rounds + 1) + 2 * args.waves, "server")
    report: Dict[str, Any] = {"machine": machine(), "model": os.path.basename(args.model),
                              "threads": args.threads}
    report["ttft"] = ttft(args, progress)
    report["throughput"] = [throughput(args, w, progress) for w in (1, 2)]
    one, two = report["throughput"]
    report["two_over_one"] = two["tokens_per_s"] / one["tokens_per_s"]
    print(f"\nreturning-agent TTFT: HTTP {report['ttft']['http_ttft_ms']:.1f} ms vs in-process "
          f"{report['ttft']['inprocess_ttft_ms']:.1f} ms (+{report['ttft']['overhead_ms']:.1f} ms)")
    print(f"aggregate: 1 worker {one['tokens_per_s']:.1f} tok/s, 2 workers "
          f"{two['tokens_per_s']:.1f} tok/s (x{report['two_over_one']:.2f})")
    print(machine_line(report["machine"]))
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
