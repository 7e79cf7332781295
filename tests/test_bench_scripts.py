"""The benchmark scripts run end to end at toy sizes and write what BENCHMARKS.md reads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agent_memory_bench_measures_agentkv_naive_and_floor(tmp_path):
    bench = load("agent_memory_bench")
    out, png = tmp_path / "ttft.json", tmp_path / "ttft.png"
    assert bench.main(["--agents", "2", "--ram-slots", "0", "--rounds", "2", "--ctx-tokens", "200",
                       "--turn-tokens", "8", "--max-tokens", "2", "--cold-disk", "--peers", "all",
                       "--cache-root", str(tmp_path), "--json", str(out), "--plot", str(png)]) == 0
    doc = json.loads(out.read_text())
    assert doc["machine"]["versions"]["llama_cpp_python"]
    assert doc["hits"]["disk"] == 4 and doc["hits"]["cold"] == 2  # no RAM: every return reads disk
    for kind in ("resume", "turn"):
        row = doc["summary"][kind]["disk"]
        assert row["returns"] == 2
        assert row["floor"]["median_ms"] > 0 and row["agentkv_over_floor"] > 0
        assert row["naive"]["median_ms"] > 0
    returns = [t for t in doc["turns"] if t["mode"] == "agentkv" and t["kind"] != "build"]
    assert all(t["evaluated"] == (0 if t["kind"] == "resume" else 8) for t in returns)
    assert all(t["bytes_read"] > 0 and t["floor_read_s"] > 0 for t in returns)
    assert png.stat().st_size > 0
    for kind in ("resume", "turn"):  # the peers ran the same prompts on the same Llama
        for peer in ("ram", "disk"):
            row = doc["peers"][kind][peer]
            assert row["returns"] == 2 and row["same_prompts"]
            assert row["peer"]["median_ms"] > 0 and row["naive_over_peer"] > 0


def test_turn_beside_save_times_both_kinds_of_turn(tmp_path):
    bench = load("turn_beside_save")
    out = tmp_path / "beside.json"
    assert bench.main(["--agents", "2", "--ctx-tokens", "300", "--turns", "4", "--max-tokens", "3",
                       "--cache-root", str(tmp_path), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [t["beside_save"] for t in doc["turns"]] == [True, False, False, True]
    assert all(t["source"] == "disk" and t["generated"] >= 3 for t in doc["turns"])
    assert doc["summary"]["decode_s_ms_beside"] > 0 and doc["summary"]["decode_s_ms_alone"] > 0


def test_draft_bench_measures_speed_and_identity(tmp_path):
    bench = load("draft_bench")
    out = tmp_path / "draft.json"
    assert bench.main(["--repeats", "1", "--max-tokens", "24", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    speed = doc["speed"]
    assert set(speed) == {"rewrite", "quote", "repeat", "new", "story", "compare"}
    for row in speed.values():
        assert row["plain_tok_s"] > 0 and row["draft_tok_s"] > 0 and row["tokens"] > 1
        assert row["speedup"] == row["draft_tok_s"] / row["plain_tok_s"]
    assert sum(r["drafted"] for r in speed.values() if r["kind"] == "copy") > 0
    assert bench.main(["--identity", "4", "--max-tokens", "16", "--json", str(out)]) == 0
    ident = json.loads(out.read_text())["identity"]
    assert ident["turns"] == 4 and 0 <= ident["identical"] <= 4
    assert ident["by_kind"]["copy"]["turns"] == 2 and ident["drafted"] > 0


def test_agent_memory_bench_measures_the_shared_tier(tmp_path):
    """--shared: two workers on one real redis-server; every return comes from Redis, full
    (a worker's first sight of the agent) or delta, against naive and the warm disk."""
    from redis_server import start_redis
    server = start_redis(tmp_path / "redis")
    try:
        bench = load("agent_memory_bench")
        out = tmp_path / "shared.json"
        assert bench.main(["--agents", "2", "--ram-slots", "0", "--rounds", "3",
                           "--ctx-tokens", "600", "--turn-tokens", "8", "--max-tokens", "2",
                           "--cache-root", str(tmp_path), "--shared", server.url,
                           "--json", str(out)]) == 0
        doc = json.loads(out.read_text())
        rows = [t for t in doc["shared_turns"] if t["kind"] != "build"]
        assert rows and all(t["tier"] == "shared" for t in rows)
        assert {t["fetch"] for t in rows} == {"full", "delta"}
        assert all(t["shared_bytes_read"] > 0 for t in rows)
        full = [t["shared_bytes_read"] for t in rows if t["fetch"] == "full"]
        delta = [t["shared_bytes_read"] for t in rows if t["fetch"] == "delta"]
        assert max(delta) < min(full)  # a worker that saw an older turn reads only what changed
        summary = doc["shared_summary"]
        assert summary["resume/full"]["speedup_vs_naive"] > 0
        assert doc["shared_totals"]["shared_errors"] == 0
        assert not list(server.client.scan_iter())  # the benchmark's namespace is gone
    finally:
        server.stop()


def test_agent_memory_bench_measures_new_agents_sharing_a_system_prompt(tmp_path):
    """--new-agents: a new agent's first turn starts from the members' stored system prompt."""
    bench = load("agent_memory_bench")
    out = tmp_path / "new.json"
    assert bench.main(["--agents", "2", "--rounds", "2", "--ctx-tokens", "600", "--turn-tokens",
                       "0", "--max-tokens", "2", "--new-agents", "1", "--system-tokens", "540",
                       "--cache-root",
                       str(tmp_path), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    new = doc["new_agents"]
    assert new["system_tokens"] == 540 and new["tiers"] == ["prefix"]
    assert 0 < new["evaluated_median"] <= new["bound"] < new["prompt_tokens"]
    assert new["cold_evaluated_median"] == new["prompt_tokens"]
    assert new["prefix"]["median_ms"] > 0 and new["cold"]["median_ms"] > 0
    assert {t["mode"] for t in doc["new_agent_turns"]} == {"prefix", "cold"}


def test_kv_density_measures_bytes_restores_team_saves_and_quality(tmp_path):
    bench = load("kv_density")
    out, png = tmp_path / "density.json", tmp_path / "density.png"
    assert bench.main(["--ctx-tokens", "300", "--modes", "f16,at-rest-q8_0", "--repeats", "1",
                       "--team", "2", "--system-tokens", "520", "--task-tokens", "20",
                       "--saves-tokens", "300", "--save-step", "20", "--save-turns", "2",
                       "--quality", "--quality-formats", "q8_0", "--continue", "4",
                       "--workdir", str(tmp_path), "--json", str(out), "--plot", str(png)]) == 0
    doc = json.loads(out.read_text())
    assert doc["machine"]["versions"]["agentkv"]
    f16, q8 = doc["modes"]
    assert f16["mode"] == "f16" and q8["mode"] == "at-rest-q8_0"
    assert q8["kv_smaller_than_f16"] > 1.5 and q8["disk_bytes"] < f16["disk_bytes"]
    assert all(r["restore_ms"] > 0 and r["prefill_ms"] > 0 for r in doc["modes"])
    assert set(doc["quality"]["formats"]) == {"exact", "1-ulp", "q8_0"}
    assert doc["quality"]["formats"]["exact"]["top1"] == 1.0 and q8["quality"]["kl"] >= 0
    team = doc["teams"][0]
    assert team["team"] == 2 and team["cuts"] == [512]  # the shared prefix, stored once
    assert team["sum_of_states"] > team["disk_bytes"] * 0.5
    assert len(doc["saves"]["per_save_bytes"]) == 2 and doc["saves"]["bytes_per_token"] > 0
    assert png.stat().st_size > 0
