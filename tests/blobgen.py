"""A writer of synthetic llama.cpp sequence-state blobs, for property tests of the format code.

It writes what ``llama_kv_cache::state_write`` writes (see agentkv/state.py), with random
geometry: 1-2 caches, 1-3 streams, simple or multi-sequence cells, V transposed or not,
f16 / q8_0 / q4_0 rows.
"""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import strategies as st

# ggml type id -> (bytes per block, elements per block)
TYPES = {1: (2, 1), 8: (34, 32), 2: (18, 32)}


@st.composite
def blobs(draw, max_cells: int = 40):
    """(blob bytes, description) for a random but well-formed sequence state."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    out = [struct.pack("<Ii", 0xAF143CD8, draw(st.integers(-1, 3)))]
    n_caches = draw(st.integers(1, 2))
    n_embd = 32 * draw(st.integers(1, 3))
    n_layer = draw(st.integers(1, 3))
    v_trans = draw(st.booleans())
    k_type = draw(st.sampled_from(sorted(TYPES)))
    v_type = 1 if v_trans else draw(st.sampled_from(sorted(TYPES)))  # transposed V is f16
    multi = draw(st.booleans())
    for _ in range(n_caches):
        n_stream = draw(st.integers(1, 3))
        out.append(struct.pack("<I", n_stream))
        for _ in range(n_stream):
            count = draw(st.integers(0, max_cells))
            out.append(struct.pack("<I", count))
            if count == 0:
                continue
            pos0 = draw(st.integers(0, 300))
            contiguous = draw(st.booleans())
            for i in range(count):
                pos = pos0 + i if contiguous else pos0 + 2 * i + int(rng.integers(0, 2))
                ids = [0] if not multi else list(range(int(rng.integers(1, 3))))
                out.append(struct.pack("<iI", pos, len(ids)) + struct.pack(f"<{len(ids)}i", *ids))
            out.append(struct.pack("<II", int(v_trans), n_layer))
            kb, ke = TYPES[k_type]
            k_row = n_embd // ke * kb
            for _ in range(n_layer):
                out.append(struct.pack("<iQ", k_type, k_row) + rng.bytes(count * k_row))
            vb, ve = TYPES[v_type]
            for _ in range(n_layer):
                if v_trans:
                    out.append(struct.pack("<iII", v_type, 2, n_embd) + rng.bytes(n_embd * count * 2))
                else:
                    v_row = n_embd // ve * vb
                    out.append(struct.pack("<iQ", v_type, v_row) + rng.bytes(count * v_row))
    return b"".join(out)


def joined(split):
    """``split_views``' result with each piece's bytes joined: (shape, [Piece])."""
    shape, views = split
    return shape, [v.piece() for v in views]
