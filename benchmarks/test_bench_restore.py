"""Restore vs re-prefill at 512, 2,000 and 4,000 tokens; save; block assembly; transcode.

    .venv/bin/python -m pytest benchmarks --benchmark-only --benchmark-json bench.json
    # transcode only, every at-rest format, native kernels against their numpy twins:
    .venv/bin/python -m pytest benchmarks --benchmark-only -k transcode --benchmark-json transcode.json
    # each benchmark once, untimed (a check that the suite runs):
    .venv/bin/python -m pytest -q benchmarks --benchmark-disable -x

pytest-benchmark prints min/max/mean/median per benchmark and writes the machine
(``machine_info``) into its JSON. Transcode rows carry ``extra_info`` fmt, backend
(native / numpy), isa, and mb_s: MB/s of float16 (encode's input, decode's output) at the
median, over ``AGENTKV_BENCH_TRANSCODE_MB`` (default 8) MB of KV-like f16 rows.

Each agentkv benchmark asserts that what it timed really was the path it names (source and
prompt tokens evaluated from ``mem.last_turn``), so a silent prefill cannot pass as a restore.
The bare llama.cpp calls (``seq_get_data`` / ``seq_set_data``) are the floor to compare with.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import benchutil as bu
from agentkv import AgentMemory
from agentkv._quant import kernels as quant
from conftest import PREFILL_ROUNDS, ROUNDS, SIZES


def two_agents(llm, cache_dir, ram_budget, tokens):
    """A memory holding agent "a" (n tokens, evicted) and a small live agent "b"."""
    mem = AgentMemory(llm, cache_dir=cache_dir, ram_budget=ram_budget)
    mem.create_completion("a", tokens, max_tokens=1, temperature=0)
    history = [int(t) for t in llm.input_ids[: llm.n_tokens]]
    mem.create_completion("b", tokens[:8], max_tokens=1, temperature=0)
    return mem, history


@pytest.mark.parametrize("tier", ["ram", "disk"])
@pytest.mark.parametrize("n", SIZES)
def test_resume(benchmark, bench_llm, context, tmp_path, n, tier):
    """A returning agent's TTFT-critical path: snapshot the live agent, restore, sample."""
    mem, history = two_agents(bench_llm, tmp_path, "1GiB" if tier == "ram" else 0, context(n))
    benchmark.extra_info.update(tokens=n, tier=tier)
    try:
        def switch_away():
            with mem.agent("b"):
                pass

        benchmark.pedantic(lambda: mem.create_completion("a", history, max_tokens=1, temperature=0),
                           setup=switch_away, rounds=ROUNDS, iterations=1, warmup_rounds=1)
        assert mem.last_turn.source == tier
        assert mem.last_turn.prompt_tokens_evaluated == 0
    finally:
        mem.close()


@pytest.mark.parametrize("n", SIZES)
def test_reprefill(benchmark, bench_llm, context, n):
    """The naive baseline: the same history evaluated from scratch, first token sampled."""
    tokens = context(n)
    benchmark.extra_info.update(tokens=n)
    benchmark.pedantic(lambda: bench_llm.create_completion(tokens, max_tokens=1, temperature=0),
                       setup=lambda: bu.clear_kv(bench_llm), rounds=PREFILL_ROUNDS, iterations=1)


@pytest.mark.parametrize("n", SIZES)
def test_save(benchmark, bench_llm, context, tmp_path, n):
    """Evicting the live agent: snapshot, write to disk, wait for the write."""
    mem, _ = two_agents(bench_llm, tmp_path, 0, context(n))
    benchmark.extra_info.update(tokens=n)
    try:
        def make_a_live():
            with mem.agent("a"):
                pass

        benchmark.pedantic(lambda: mem.evict("a"), setup=make_a_live, rounds=ROUNDS, iterations=1)
        assert mem.stats().bytes_written > 0
    finally:
        mem.close()


@pytest.mark.parametrize("n", SIZES)
def test_bare_get_data(benchmark, bench_llm, context, n):
    """Floor of a save: one bare llama_state_seq_get_data."""
    bu.clear_kv(bench_llm)
    bench_llm.eval(context(n))
    benchmark.extra_info.update(tokens=n)
    blob = benchmark.pedantic(lambda: bu.seq_state(bench_llm), rounds=ROUNDS, iterations=1)
    assert blob.nbytes > 0


@pytest.mark.parametrize("n", SIZES)
def test_bare_set_data(benchmark, bench_llm, context, n):
    """Floor of a restore: one bare llama_state_seq_set_data of the same state, from RAM."""
    bu.clear_kv(bench_llm)
    bench_llm.eval(context(n))
    blob = bu.seq_state(bench_llm)
    benchmark.extra_info.update(tokens=n, state_bytes=int(blob.nbytes))
    times = []
    benchmark.pedantic(lambda: times.append(bu.bare_set_data(bench_llm, blob)), rounds=ROUNDS,
                       iterations=1)
    assert times


BACKENDS = {"native": quant.NATIVE, "numpy": quant.TWIN}
# KV-like float16 input: 256-value rows (Gemma 3 270M's head size), heavy-tailed like real K/V
TRANSCODE_MB = float(os.environ.get("AGENTKV_BENCH_TRANSCODE_MB", "8"))


@pytest.fixture(scope="module")
def kv_rows() -> np.ndarray:
    n = int(TRANSCODE_MB * 1e6 / 2) // 256 * 256
    rng = np.random.default_rng(0)
    return (rng.standard_normal(n) * rng.gamma(1.0, 1.0, n)).astype(np.float16)


def _kernels(backend: str):
    k = BACKENDS[backend]
    if k is None:
        pytest.skip("native kernels not built")
    return k


def _record_mb_s(benchmark, nbytes: int) -> None:
    """MB/s of float16 (encode's input, decode's output) at the median, when timed."""
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["mb_s"] = nbytes / stats.stats.median / 1e6


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_transcode_encode(benchmark, kv_rows, fmt, backend):
    """f16 KV rows -> an at-rest format (agentkv._quant.kernels.encode), native or numpy twin."""
    k = _kernels(backend)
    out = np.empty(quant.encoded_size(kv_rows.size, fmt), dtype=np.uint8)
    benchmark.extra_info.update(values=int(kv_rows.size), fmt=fmt, backend=backend,
                                isa=k.isa, f16_bytes=int(kv_rows.nbytes))
    got = benchmark(quant.encode, kv_rows, fmt, out=out, kernels=k)
    _record_mb_s(benchmark, kv_rows.nbytes)
    assert got.nbytes < kv_rows.nbytes


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_transcode_decode(benchmark, kv_rows, fmt, backend):
    """An at-rest format -> f16 rows for the live context (agentkv._quant.kernels.decode)."""
    k = _kernels(backend)
    packed = quant.encode(kv_rows, fmt)
    out = np.empty(kv_rows.size, dtype=np.float16)
    benchmark.extra_info.update(values=int(kv_rows.size), fmt=fmt, backend=backend,
                                isa=k.isa, f16_bytes=int(kv_rows.nbytes))
    got = benchmark(quant.decode, packed, fmt, out=out, kernels=k)
    _record_mb_s(benchmark, kv_rows.nbytes)
    assert got.size == kv_rows.size


@pytest.mark.parametrize("n", SIZES)
def test_block_assembly(benchmark, bench_llm, context, n):
    """Blocks -> one sequence state: the state of n tokens split into 256-token blocks, then
    assembled back (what a restore from disk does after reading the blocks)."""
    from agentkv._format import pieces as seqpieces
    bu.clear_kv(bench_llm)
    bench_llm.eval(context(n))
    blob = bu.seq_state(bench_llm)
    shape, views = seqpieces.split_views(blob, 256)
    pieces = [v.piece() for v in views]
    benchmark.extra_info.update(tokens=n, pieces=len(pieces))
    out = benchmark(seqpieces.assemble, shape, pieces)
    assert bytes(out) == bytes(blob)
