"""`python -m agentkv serve` for real: a server subprocess on loopback, the official openai
client and httpx, outputs compared with the same chain run in-process through AgentMemory."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import httpx
import pytest
from openai import OpenAI

from agentkv import AgentMemory
from conftest import MODEL_PATH, SYSTEM, make_llm

ROOT = Path(__file__).resolve().parent.parent
ROLES = {"planner": "You plan.", "coder": "You write Python.", "critic": "You review code."}
TASKS = ["Plan a function that merges intervals.", "Write it.", "Review it in one line."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, cache_dir: Path, workers: int, threads: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(cache_dir.parent / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentkv", "serve", MODEL_PATH, "--cache-dir", str(cache_dir),
             "--port", str(self.port), "--workers", str(workers), "--threads", str(threads),
             "--n-ctx", "4096", "--chat-format", "gemma"],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.log.name).read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            self.stop()
            raise RuntimeError("server did not come up in 180 s")
        self.client = OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                             timeout=300)

    def get(self, path: str) -> dict:
        r = httpx.get(self.url + path, timeout=300)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    served = Served(tmp_path_factory.mktemp("serve") / "cache", workers=1, threads=2)
    yield served
    served.stop()


def opening(agent: str, task: str) -> str:
    return f"{SYSTEM}\n{ROLES[agent]} {task}"


def team_chain(ask, rounds: int = 2) -> Dict[str, List[str]]:
    """planner -> coder -> critic, ``rounds`` times; each agent keeps its own conversation."""
    histories: Dict[str, list] = {a: [] for a in ROLES}
    answers: Dict[str, List[str]] = {a: [] for a in ROLES}
    for r in range(rounds):
        for agent, task in zip(ROLES, TASKS):
            text = opening(agent, task) if r == 0 else f"Round {r + 1}: {task}"
            histories[agent].append({"role": "user", "content": text})
            answer = ask(agent, histories[agent], r)
            histories[agent].append({"role": "assistant", "content": answer})
            answers[agent].append(answer)
    return answers


def in_process(tmp_path, threads: int, rounds: int = 2) -> Dict[str, List[str]]:
    llm = make_llm(n_threads=threads, n_threads_batch=threads)
    with AgentMemory(llm, cache_dir=tmp_path / "inproc") as mem:
        return team_chain(lambda agent, messages, r: mem.create_chat_completion(
            agent, messages=messages, temperature=0, max_tokens=24)["choices"][0]["message"]["content"],
            rounds)


def test_a_team_over_http_equals_the_team_in_process(server, tmp_path):
    client = server.client
    cached: List[int] = []

    def ask(agent, messages, r):
        if agent == "coder":  # streamed, as chat UIs do
            text = ""
            for chunk in client.chat.completions.create(
                    model="gemma", messages=messages, temperature=0, max_tokens=24, stream=True,
                    stream_options={"include_usage": True}, extra_headers={"X-Agent-Id": agent}):
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                elif chunk.usage is not None:
                    cached.append(chunk.usage.prompt_tokens_details.cached_tokens)
            return text
        out = client.chat.completions.create(model="gemma", messages=messages, temperature=0,
                                             max_tokens=24, user=agent)
        cached.append(out.usage.prompt_tokens_details.cached_tokens)
        return out.choices[0].message.content

    over_http = team_chain(ask)
    assert over_http == in_process(tmp_path, threads=2)
    # the critic starts from the system prompt's first 512 tokens, stored when the coder
    # evaluated them too (a shared prefix); returning agents restore their whole history
    assert cached[:3] == [0, 0, 512] and all(c > 900 for c in cached[3:])
    stats = server.get("/v1/stats")["total"]
    assert stats["hits"]["cold"] == 2 and stats["hits"]["prefix"] == 1
    assert stats["hits"]["ram"] + stats["hits"]["live"] == 3
    agents = {a["id"]: a for a in server.get("/v1/agents")["data"]}
    assert set(ROLES) <= set(agents) and agents["critic"]["tier"] == "live"
    models = server.get("/v1/models")["data"]
    assert models[0]["id"] == Path(MODEL_PATH).name.removesuffix(".gguf")


def test_bad_requests_get_openai_errors_and_change_nothing(server):
    client = server.client
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                   max_tokens=4, temperature=0, user="keeper")
    before = {a["id"]: a["n_tokens"] for a in server.get("/v1/agents")["data"]}
    url = server.url + "/v1/chat/completions"
    cases = [
        (b"{not json", "JSON"),
        (json.dumps({"messages": "hello"}).encode(), "messages"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}],
                     "temperature": "hot"}).encode(), "temperature"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}],
                     "max_tokens": -1}).encode(), "max_tokens"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "user": "a" * 300}).encode(),
         "user"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}],
                     "user": "bad\x07id"}).encode(), "control"),
        (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), "role"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 3}).encode(), "n > 1"),
    ]
    for raw, needle in cases:
        r = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 400, (needle, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and needle in err["message"] + str(err["param"])
    r = httpx.post(server.url + "/v1/completions", timeout=120, headers={"X-Agent-Id": "keeper"},
                   json={"prompt": "word " * 6000, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.delete(server.url + "/v1/agents/nobody", timeout=60).status_code == 404
    after = {a["id"]: a["n_tokens"] for a in server.get("/v1/agents")["data"]}
    assert after == before
    out = client.completions.create(model="m", prompt="Hello", max_tokens=4, temperature=0)
    assert out.choices[0].text is not None  # the server still serves; anonymous is not kept
    assert {a["id"] for a in server.get("/v1/agents")["data"]} == set(before)


def test_a_client_that_leaves_mid_stream_frees_the_worker_and_keeps_the_kv(server):
    messages = [{"role": "user", "content": SYSTEM + "\nList one hundred rules."}]
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120,
                      headers={"X-Agent-Id": "talker"},
                      json={"messages": messages, "max_tokens": 400, "temperature": 0,
                            "stream": True}) as r:
        assert r.status_code == 200
        lines = 0
        for line in r.iter_lines():
            lines += line.startswith("data: ")
            if lines == 3:
                break  # the client goes away
    t0 = time.monotonic()
    out = server.client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, user="other")
    assert time.monotonic() - t0 < 60 and out.choices
    talker = [a for a in server.get("/v1/agents")["data"] if a["id"] == "talker"]
    assert talker and talker[0]["n_tokens"] > 900  # the prompt's KV was committed
    back = server.client.chat.completions.create(
        model="m", messages=messages + [{"role": "assistant", "content": "1."},
                                        {"role": "user", "content": "Go on."}],
        max_tokens=4, temperature=0, user="talker")
    assert back.usage.agentkv["source"] in ("ram", "disk") and \
        back.usage.prompt_tokens_details.cached_tokens > 900
    assert httpx.delete(server.url + "/v1/agents/talker", timeout=60).json()["deleted"] is True
    assert "talker" not in {a["id"] for a in server.get("/v1/agents")["data"]}


def test_two_workers_run_agents_at_once_and_hand_agents_over_exactly(tmp_path):
    served = Served(tmp_path / "cache", workers=2, threads=2)
    try:
        client = served.client
        spans: Dict[str, tuple] = {}

        def run(agent):
            t0 = time.monotonic()
            raw = client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": opening(agent, TASKS[0])}],
                max_tokens=48, temperature=0, user=agent)
            spans[agent] = (t0, time.monotonic(), raw.headers["x-agentkv-worker"], raw.parse())

        threads = [threading.Thread(target=run, args=(a,)) for a in ("planner", "coder")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        (a0, a1, wa, _), (b0, b1, wb, _) = spans["planner"], spans["coder"]
        assert wa != wb and a0 < b1 and b0 < a1  # on both workers, overlapping in time

        # The agent on worker 0 takes its next turn while worker 0 is busy with a long turn
        # of a new agent (a new agent goes to the first free worker): it moves to worker 1
        # and is restored there from the shared disk, exactly.
        mover = "planner" if wa == "0" else "coder"
        busy = threading.Thread(target=lambda: client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": opening("critic", TASKS[2])}],
            max_tokens=200, temperature=0, user="critic"))
        busy.start()
        time.sleep(1.0)
        task = TASKS[0]
        history = [{"role": "user", "content": opening(mover, task)},
                   {"role": "assistant", "content": spans[mover][3].choices[0].message.content},
                   {"role": "user", "content": "Round 2: " + task}]
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=history, max_tokens=24, temperature=0, user=mover)
        moved = raw.parse()
        busy.join(300)
        assert raw.headers["x-agentkv-worker"] == "1"
        assert moved.usage.agentkv["source"] == "disk"
        assert moved.usage.prompt_tokens_details.cached_tokens > 900
        stats = served.get("/v1/stats")
        assert len(stats["workers"]) == 2 and stats["total"]["hits"]["disk"] >= 1

        # the reference: the mover's two turns in-process with one thread (each worker's)
        llm = make_llm(n_threads=1, n_threads_batch=1)
        with AgentMemory(llm, cache_dir=tmp_path / "inproc") as mem:
            first = mem.create_chat_completion(mover, messages=history[:1], temperature=0,
                                               max_tokens=48)["choices"][0]["message"]["content"]
            second = mem.create_chat_completion(mover, messages=history, temperature=0,
                                                max_tokens=24)["choices"][0]["message"]["content"]
        assert first == history[1]["content"]
        assert second == moved.choices[0].message.content
    finally:
        served.stop()


def test_the_openai_client_example_runs_against_the_server(server):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "openai_client_team.py"),
                          "--base-url", server.url + "/v1", "--rounds", "2", "--max-tokens", "6"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("round 2")]
    assert len(lines) == 3 and all("from restored KV" in line for line in lines)
    assert "held: " in out.stdout


def test_serve_without_the_server_extra_names_it(tmp_path):
    """Where starlette is not installed (blocked here in a subprocess), serve says what to install."""
    code = ("import sys; sys.modules['starlette'] = None\n"
            "from agentkv.cli import main\n"
            f"sys.exit(main(['serve', {MODEL_PATH!r}, '--cache-dir', {str(tmp_path)!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 2 and "pip install 'agentkv[server]'" in out.stderr
    assert not any(tmp_path.iterdir())  # nothing was created


def test_a_worker_that_dies_is_replaced_and_its_agents_come_back_from_disk(server):
    import os
    import signal
    client = server.client
    msgs = [{"role": "user", "content": SYSTEM + "\nName one rule."}]
    first = client.chat.completions.create(model="m", messages=msgs, max_tokens=8,
                                           temperature=0, user="survivor")
    evicted = httpx.post(server.url + "/v1/agents/survivor/evict", timeout=60).json()
    assert evicted["evicted"] is True  # its KV is on disk
    pid = server.get("/health")["pids"][0]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        health = httpx.get(server.url + "/health", timeout=10)
        if health.status_code == 200 and health.json()["pids"][0] not in (None, pid):
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the worker was not replaced within 180 s")
    back = client.chat.completions.create(
        model="m", temperature=0, max_tokens=8, user="survivor",
        messages=msgs + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "Another one."}])
    assert back.usage.agentkv["source"] == "disk"
    assert back.usage.prompt_tokens_details.cached_tokens > 900
