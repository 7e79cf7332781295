"""layout.load_from: the minimal exact padding against a cell-by-cell model of ggml's split-KV
decode (the real kernel's proof is benchmarks/kv_equivalence.py --matrix)."""

from __future__ import annotations

import random

import pytest

from agentkv._format import layout


def _partition(q: int, W: int, shift: int, size: int, nth: int) -> list:
    """Where each window cell of the query at ``q`` goes: its split-KV chunk, cells ``shift``
    below their positions (llama.cpp's n_kv, ggml's ceil(n_kv / nth) chunks from 512 cells)."""
    n_kv = min(size, max(256, -(-(q - shift + 1) // 256) * 256))
    cs = -(-n_kv // nth) if n_kv >= 512 and nth > 1 else 1 << 40
    return [(p - shift) // cs for p in range(max(0, q - W + 1), q + 1)]


def _same_everywhere(n: int, W: int, shift: int, size: int, nth: int) -> bool:
    for q in range(n, size):
        a, b = _partition(q, W, 0, size, nth), _partition(q, W, shift, size, nth)
        if [x != y for x, y in zip(a, a[1:])] != [x != y for x, y in zip(b, b[1:])]:
            return False
    return True


def test_the_rule_matches_a_cell_by_cell_model():
    rng = random.Random(7)
    for _ in range(150):
        W, size = rng.choice([64, 128, 512]), rng.choice([1024, 1536, 2048])
        n = rng.randint(W, size - 1)
        nth = rng.choice([1, 2, 3, 4])
        model = layout.Model(W, True, 0, size, layout.SPLIT)
        ws = max(0, n - W + 1)
        first = layout.load_from(model, n, ws, nth)
        assert 0 <= first <= ws and first % 64 == 0
        assert _same_everywhere(n, W, first, size, nth)
        # and it is the largest such shift
        assert not any(_same_everywhere(n, W, s, size, nth)
                       for s in range(first + 64, ws // 64 * 64 + 1, 64))


@pytest.mark.parametrize("attention, want", [(layout.ORDERED, 3392), (layout.FIXED, 0)])
def test_quantized_needs_no_padding_and_unproven_cases_keep_the_full_layout(attention, want):
    model = layout.Model(512, True, 0, 8192, attention)
    assert layout.load_from(model, 4000, 3392, 2) == want
    assert layout.load_from(layout.Model(512, False, 0, 8192, layout.SPLIT), 4000, 3392, 2) == 3392


def test_two_threads_at_4000_tokens_pad_576_cells_not_3392():
    model = layout.Model(512, True, 0, 5120, layout.SPLIT)
    assert 3392 - layout.load_from(model, 4000, 3392, 2) == 576
    assert layout.load_from(model, 4000, 3392, 1) == 3392  # one thread: never split
