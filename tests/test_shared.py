"""The shared tier (``AgentMemory(shared="redis://...")``) against a real redis-server: agents
that move between processes restore each other's turns exactly, a new worker finds a prefix
another one published, and a Redis that is slow, dead, restarted, tampered with or racing
another worker never costs a wrong answer or an exception."""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import xxhash

from agentkv import AgentMemory, ConfigError, SharedTier
from agentkv._store.records import Record
from conftest import QUESTIONS, SYSTEM, chat_chain, last_logits, make_llm
from redis_server import start_redis

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def server(redis_server):
    """The module's server, running and empty."""
    if redis_server.proc.poll() is not None:
        redis_server.start()
    redis_server.client.flushall()
    return redis_server


@pytest.fixture(scope="module")
def other_llm():
    llm = make_llm()
    yield llm
    llm.close()


class Worker:
    """tests/shared_worker.py in a process of its own: its Llama, its cache_dir."""

    def __init__(self, cache_dir: Path, url: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "shared_worker.py"), str(cache_dir), url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(HERE))
        self.lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._reply(120) == {"ready": True}

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def _reply(self, timeout: float) -> dict:
        try:
            return json.loads(self.lines.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"worker gave no answer in {timeout} s "
                                 f"(exit code {self.proc.poll()})") from None

    def send(self, **cmd) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._reply(300)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)


def reference_turns(llm, questions=QUESTIONS, system=SYSTEM, max_tokens=16):
    """A never-evicted run: each turn's answer and last-logits hash."""
    llm.reset()
    hashes = []

    def step(messages):
        out = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=max_tokens)
        hashes.append(xxhash.xxh3_128_hexdigest(last_logits(llm).tobytes()))
        return out
    return chat_chain(step, questions, system), hashes


def agent_keys(server, agent_id):
    """(manifest key, its record) of an agent on the server."""
    h = xxhash.xxh3_128_hexdigest(agent_id.encode())
    keys = [k for k in server.client.scan_iter(match=f"*agent/{h}")]
    assert len(keys) == 1, keys
    return keys[0], Record.from_bytes(server.client.hget(keys[0], "rec"))


def ask(mem, history, question, agent="planner", max_tokens=16):
    history.append({"role": "user", "content": question})
    out = mem.create_chat_completion(agent, messages=history, temperature=0,
                                     max_tokens=max_tokens)["choices"][0]["message"]["content"]
    history.append({"role": "assistant", "content": out})
    return out


# -- moving between processes ---------------------------------------------------------------

def test_turns_alternate_between_two_processes_exactly(llm, server, tmp_path):
    """Two worker processes, separate cache_dirs, one Redis: the agent's turns alternate, each
    one restored from the other worker's publish (the lease makes a worker wait for the
    previous turn's publish, no wait_durable needed), and every turn equals a never-evicted
    run, tokens and logits."""
    ref_answers, ref_hashes = reference_turns(llm)
    workers = [Worker(tmp_path / "w1", server.url), Worker(tmp_path / "w2", server.url)]
    results = []
    try:
        def step(messages):
            results.append(workers[len(results) % 2].send(
                op="chat", agent="planner", messages=messages, max_tokens=16))
            return {"choices": [{"message": {"content": results[-1]["answer"]}}]}
        answers = chat_chain(step)
        stats = [w.send(op="stats") for w in workers]
    finally:
        for w in workers:
            w.close()
    assert answers == ref_answers
    assert [r["logits"] for r in results] == ref_hashes
    # the first turn is cold; every later one came from the other worker, through Redis
    assert [r["source"] for r in results] == ["cold", "shared", "shared", "shared"]
    assert all(r["evaluated"] < 60 for r in results[1:])  # only the new question
    for s in stats:
        assert s["shared_bytes_read"] > 0 and s["shared_bytes_sent"] > 0
        assert s["shared_refused"] == 0 and s["shared_errors"] == 0 and s["rejected"] == 0
    assert stats[0]["hits"]["shared"] == 1 and stats[1]["hits"]["shared"] == 2


def test_a_new_worker_restores_a_prefix_another_published(llm, server, tmp_path):
    """A worker whose two agents share a system prompt publishes it as a shared prefix; a
    worker started later on an empty cache_dir restores it for a third agent, whose answer
    equals a cold run of its own prompt."""
    first = Worker(tmp_path / "w1", server.url)
    try:
        for name, q in (("a1", "Plan a trip to Rome."), ("a2", "Plan a trip to Oslo.")):
            first.send(op="chat", agent=name, max_tokens=4,
                       messages=[{"role": "user", "content": f"{SYSTEM}\n{q}"}])
        first.send(op="stats")  # after a turn: its saves and the prefix have been queued
    finally:
        first.close()  # closing flushes: everything is published
    assert list(server.client.scan_iter(match="*cut/*")), "no shared prefix was published"
    messages = [{"role": "user", "content": f"{SYSTEM}\nPlan a trip to Lima."}]
    llm.reset()
    ref = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=12)
    ref_hash = xxhash.xxh3_128_hexdigest(last_logits(llm).tobytes())
    fresh = Worker(tmp_path / "w3", server.url)
    try:
        got = fresh.send(op="chat", agent="b1", messages=messages, max_tokens=12)
        stats = fresh.send(op="stats")
    finally:
        fresh.close()
    assert got["source"] == "prefix" and stats["hits"]["prefix"] == 1
    assert stats["shared_bytes_read"] > 0 and stats["bytes_read"] == 0  # from Redis, not disk
    assert got["evaluated"] < 600  # the prefix (512 tokens of ~900) was not evaluated
    assert got["answer"] == ref["choices"][0]["message"]["content"]
    assert got["logits"] == ref_hash


# -- two memories in this process (two Llamas), for the faults --------------------------------

@pytest.fixture
def pair(llm, other_llm, server, tmp_path):
    """Two memories (this process, two Llamas, separate cache_dirs) on the server; short
    timeouts so that a dead server costs little."""
    opts = dict(timeout=0.5, wait=2.0)
    a = AgentMemory(llm, cache_dir=tmp_path / "a", shared=SharedTier(server.url, **opts))
    b = AgentMemory(other_llm, cache_dir=tmp_path / "b", shared=SharedTier(server.url, **opts))
    yield a, b
    for m in (a, b):
        m.close()


QS = ["Plan a trip to Rome.", "Now shorten it.", "Add a budget line."]


@pytest.fixture(scope="module")
def reference(llm):
    answers, _ = reference_turns(llm, QS, max_tokens=12)
    return answers


def first_message(q):
    return f"{SYSTEM}\n{q}"


def first_turn(mem, server, max_tokens=12):
    """Agent "planner"'s first turn on ``mem``, published: (history, answers, its manifest's
    key, its record, the key prefix of the namespace)."""
    history = []
    got = [ask(mem, history, first_message(QS[0]), max_tokens=max_tokens)]
    assert mem.wait_durable("planner", timeout=60)
    key, r = agent_keys(server, "planner")
    return history, got, key, r, key.decode().rsplit("agent/", 1)[0]


def test_a_damaged_block_is_refused_and_deleted(pair, server, reference):
    a, b = pair
    history, got, _, r, prefix = first_turn(a, server)
    block = r.blocks[0][0]
    good = server.client.get(prefix + block)
    server.client.set(prefix + block, good[:-5] + b"XXXXX")  # same length, wrong bytes
    got.append(ask(b, history, QS[1], max_tokens=12))  # b prefills: never the damaged KV
    assert b.last_turn.source in ("cold", "prefix")
    assert got == reference[:2]
    s = b.stats()
    assert s.rejected >= 1 and s.hits["shared"] == 0
    # deleted, then sent again by b's own save of the same (cold-prefilled) KV
    assert b.wait_durable("planner", timeout=60)
    assert server.client.get(prefix + block) == good


def test_a_deleted_block_prefills_and_a_foreign_manifest_is_ignored(pair, server, reference):
    a, b = pair
    history, got, key, r, prefix = first_turn(a, server)
    server.client.delete(prefix + r.tail)  # as an eviction by maxmemory would
    got.append(ask(b, history, QS[1], max_tokens=12))
    assert b.stats().shared_missing == 1 and b.last_turn.source != "shared"
    assert b.wait_durable("planner", timeout=60)
    # a manifest that is not a record at all: refused, counted, the local copy answers
    server.client.hset(key, mapping={"gen": b"99", "rec": b"{not a record"})
    got.append(ask(a, history, QS[2], max_tokens=12))
    assert got == reference
    assert a.stats().rejected >= 1


def test_a_race_between_two_workers_publishes_one_turn(pair, server, reference):
    """b runs the agent while a's turn of it is still open: b waits for a's lease (bounded),
    gives up, runs from the last published state and publishes; a's publish of the same
    generation is then refused (counted), and a's next turn continues from b's."""
    a, b = pair
    history = []
    ask(a, history, first_message(QS[0]), max_tokens=12)
    assert a.wait_durable("planner", timeout=60)
    turn2 = history + [{"role": "user", "content": QS[1]}]
    with a.agent("planner") as live:
        mine = live.create_chat_completion(messages=turn2, temperature=0, max_tokens=12)
        t0 = time.monotonic()
        theirs = b.create_chat_completion("planner", messages=turn2, temperature=0,
                                          max_tokens=12)
        assert time.monotonic() - t0 >= 2.0  # waited for a's lease until its wait ran out
        assert b.wait_durable("planner", timeout=60)  # b's turn is published first
    assert a.wait_durable("planner", timeout=60) and b.wait_durable("planner", timeout=60)
    for out in (mine, theirs):
        assert out["choices"][0]["message"]["content"] == reference[1]
    assert a.stats().shared_refused == 1 and b.stats().shared_refused == 0
    assert b.stats().shared_wait_seconds >= 2.0
    _, r = agent_keys(server, "planner")
    assert r.gen == 2
    history += [{"role": "user", "content": QS[1]},
                {"role": "assistant", "content": reference[1]}]
    assert ask(a, history, QS[2], max_tokens=12) == reference[2]
    assert a.last_turn.source == "shared"  # b's published turn, not a's refused one


def test_a_dead_hung_or_restarted_server_costs_a_bounded_wait(pair, server, reference):
    a, b = pair
    history = []
    got = [ask(a, history, first_message(QS[0]), max_tokens=12)]
    assert a.wait_durable("planner", timeout=60)
    server.pause()  # hung: every call times out (0.5 s), then the breaker skips Redis
    try:
        t0 = time.monotonic()
        got.append(ask(a, history, QS[1], max_tokens=12))
        assert a.wait_durable("planner", timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        server.resume()
    assert a.last_turn.source == "live" and a.stats().shared_errors >= 1
    assert elapsed < 10
    server.restart_empty()  # everything Redis held is gone
    # the breaker's backoff (1 s, doubling per failure, counted from the last one) runs out
    time.sleep(min(30.0, 2.0 ** (a.stats().shared_errors - 1)) + 0.2)
    got.append(ask(a, history, QS[2], max_tokens=12))  # publishing resumes
    assert a.wait_durable("planner", timeout=60)
    assert got == reference
    _, r = agent_keys(server, "planner")
    assert r.n_tokens > 0 and r.gen == 3


def test_killed_mid_turn_and_a_server_that_is_not_redis(pair, server, reference, llm, tmp_path):
    a, b = pair
    history = []
    got = [ask(a, history, first_message(QS[0]), max_tokens=12)]
    # killed while b restores a's turn or publishes its own: whichever it hits, b answers
    threading.Timer(0.05, server.kill).start()
    got.append(ask(b, history, QS[1], max_tokens=12))
    b.wait_durable("planner", timeout=60)
    assert got == reference[:2]
    assert b.stats().shared_errors >= 1
    # a port that answers, but not in Redis's protocol
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        stop = threading.Event()

        def garbage():
            listener.settimeout(0.2)
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                with conn:
                    conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n\x00\xff garbage")
        threading.Thread(target=garbage, daemon=True).start()
        a.close()
        with AgentMemory(llm, cache_dir=tmp_path / "a",
                         shared=SharedTier(f"redis://127.0.0.1:{port}/0", timeout=0.5)) as c:
            got.append(ask(c, history, QS[2], max_tokens=12))
            assert c.stats().shared_errors >= 1
        stop.set()
    assert got == reference


def test_namespaces_and_salts_keep_settings_and_tenants_apart(llm, other_llm, server, tmp_path):
    """A memory with other settings (q8_0 at rest: another fingerprint) under the same
    namespace finds the manifest and refuses it; a memory under another salt never sees it."""
    history = []
    with AgentMemory(llm, cache_dir=tmp_path / "a",
                     shared=SharedTier(server.url, namespace="team")) as a:
        ask(a, history, first_message(QS[0]), max_tokens=4)
    keys = {k.decode() for k in server.client.scan_iter()}
    assert any(k.startswith("team:agent/") for k in keys)
    assert any(k.startswith("team:blk/") for k in keys)
    with AgentMemory(other_llm, cache_dir=tmp_path / "b", at_rest="q8_0",
                     shared=SharedTier(server.url, namespace="team")) as b:
        ask(b, list(history), "Now shorten it.", max_tokens=4)
        assert b.last_turn.source == "cold" and b.stats().rejected == 1
    with AgentMemory(other_llm, cache_dir=tmp_path / "c",
                     shared=SharedTier(server.url, namespace="team", salt="tenant-2")) as c:
        ask(c, list(history), "Now shorten it.", max_tokens=4)
        assert c.last_turn.source == "cold" and c.stats().rejected == 0
    assert any(k.decode().startswith("team:" + xxhash.xxh3_64_hexdigest(b"tenant-2"))
               for k in server.client.scan_iter())


def test_bad_shared_settings_are_named(llm, tmp_path):
    for bad, what in (("localhost:6379", "redis:// URL"), (42, "shared must be")):
        with pytest.raises(ConfigError, match=what):
            AgentMemory(llm, cache_dir=tmp_path, shared=bad)
    with pytest.raises(ConfigError, match="timeout"):
        SharedTier("redis://127.0.0.1:1/0", timeout=0)
    with pytest.raises(ConfigError, match="ttl"):
        SharedTier("redis://127.0.0.1:1/0", ttl=1.5)
    with pytest.raises(ConfigError, match="not a Redis URL"):
        AgentMemory(llm, cache_dir=tmp_path, shared="http://127.0.0.1:1/")


def test_without_the_redis_client_the_extra_is_named(tmp_path):
    code = ("import sys; sys.modules['redis'] = None\n"
            "from agentkv import SharedTier\n"
            "from agentkv._store.shared import RedisTier\n"
            "from agentkv import ConfigError\n"
            "try:\n"
            "    RedisTier(SharedTier('redis://127.0.0.1:1/0'), b'')\n"
            "except ConfigError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=str(HERE.parent))
    assert "pip install 'agentkv[redis]'" in out.stdout, out.stderr


def test_publishes_send_only_what_redis_lacks(pair, server):
    """A save sends the blocks Redis lacks and its tail (the agent's earlier blocks are not
    sent again), and a worker restoring the agent reads the payloads its cache_dir lacks."""
    a, b = pair
    history = []
    ask(a, history, first_message(QS[0]), max_tokens=12)
    assert a.wait_durable("planner", timeout=60)
    first = a.stats().shared_bytes_sent
    _, r1 = agent_keys(server, "planner")
    ask(a, history, QS[1], max_tokens=12)
    assert a.wait_durable("planner", timeout=60)
    second = a.stats().shared_bytes_sent - first
    _, r2 = agent_keys(server, "planner")
    prefix = next(server.client.scan_iter(match="*agent/*")).decode().rsplit("agent/", 1)[0]
    new = set(r2.keys()) - set(r1.keys())
    assert second == sum(server.client.strlen(prefix + k) for k in new)
    assert 0 < second < first
    ask(b, history, QS[2], max_tokens=1)
    assert b.last_turn.source == "shared"
    assert b.stats().shared_bytes_read == sum(server.client.strlen(prefix + k) for k in r2.keys())


def test_ls_and_verify_read_the_shared_tier(pair, server):
    """``python -m agentkv ls|verify --shared URL``: what is there, and every payload checked;
    a tampered block makes verify name it and exit 1."""
    a, _ = pair
    _, _, _, r, prefix = first_turn(a, server, max_tokens=4)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "agentkv", *args], capture_output=True,
                              text=True, timeout=300, cwd=str(HERE.parent))
    ls = cli("ls", "--shared", server.url)
    assert ls.returncode == 0 and "planner" in ls.stdout and "agent" in ls.stdout
    ok = cli("verify", "--shared", server.url)
    assert ok.returncode == 0 and "planner: ok" in ok.stdout, ok.stdout + ok.stderr
    block = prefix + r.blocks[0][-1]
    data = server.client.get(block)
    server.client.set(block, data[:100] + bytes([data[100] ^ 1]) + data[101:])
    bad = cli("verify", "--shared", server.url)
    assert bad.returncode == 1 and "planner: DAMAGED" in bad.stdout, bad.stdout
    assert cli("ls", "--shared", "redis://127.0.0.1:1/0").returncode == 1  # nothing listens
    assert cli("ls").returncode == 2  # neither a cache_dir nor --shared
    a.forget("planner")  # every tier: the manifest on Redis too
    assert not list(server.client.scan_iter(match="*agent/*"))
