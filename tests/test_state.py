"""The sequence-state parser, on real blobs and on damaged ones."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from agentkv import CorruptEntry
from agentkv._format import seqstate
from agentkv._format import pieces as seqpieces
from blobgen import joined
from agentkv._llama.engine import Engine
from agentkv._format.snapshot import check_state
from conftest import make_llm

PROMPT = "Parser food: " + " ".join(f"token soup {i}." for i in range(140))


@pytest.fixture(scope="module", params=["flash", "transposed"])
def blob(request):
    llm = make_llm(flash_attn=request.param == "flash", n_ctx=2048)
    try:
        llm.create_completion(PROMPT, max_tokens=1, temperature=0)
        engine = Engine(llm)
        n = engine.n_tokens
        return bytes(engine.state_bytes(0)), n, bytes(engine.snapshot().state), request.param, None
    finally:
        llm.close()


def test_parse_real_blob(blob):
    raw, n, _, mode, _ = blob
    parsed = seqstate.parse(raw)
    base, swa = parsed.caches[0].only_stream(), parsed.caches[1].only_stream()
    assert (base.cell_count, base.pos_min, base.pos_max) == (n, 0, n - 1)
    assert (swa.cell_count, swa.pos_min, swa.pos_max) == (512, n - 512, n - 1)
    assert base.v_trans == (mode == "transposed")
    assert parsed.nbytes == len(raw)


def test_set_front_pads_and_trims_back_to_the_same_bytes(blob):
    raw, n, margin_blob, _, _ = blob
    parsed = seqstate.parse(raw)
    padded = seqstate.set_window_start(raw, parsed, 1, 0)
    p2 = seqstate.parse(padded)
    assert p2.caches[1].only_stream().cell_count == n
    assert bytes(seqstate.set_window_start(padded, p2, 1, n - 512)) == raw
    # the engine's snapshot keeps 64 positions more than the next token's window needs,
    # from a multiple of the block size (1 for this engine)
    swa = check_state(margin_blob, n).caches[1].only_stream()
    assert swa.pos_min == n - 511 - 64


def check_padded_into_buffer(compact, n, mode, pad_into):
    """``pad_into(out, written)`` pads ``compact`` to position 0 in a given buffer: it must give
    the same bytes as a fresh one and report every range it wrote, padding rows aside."""
    want = bytes(seqstate.set_window_start(compact, seqstate.parse(compact), 1, 0))
    buf = np.zeros(len(want) + 100, dtype=np.uint8)
    wrote: list = []
    got = pad_into(lambda k: buf[:k], wrote)
    assert bytes(got) == want and got.base is buf
    for a, b in wrote:  # zeroing what it wrote leaves zeros everywhere
        buf[a:b] = 0
    assert not buf.any()
    if mode == "flash":  # the padding rows were never written (a transposed V is marked whole)
        floor = check_state(compact, n).caches[1].only_stream().pos_min
        assert sum(b - a for a, b in wrote) == len(compact) + 12 * floor


def test_set_front_into_a_given_buffer_reports_what_it_wrote(blob):
    _, n, compact, mode, _ = blob
    check_padded_into_buffer(compact, n, mode, lambda out, written: seqstate.set_window_start(
        compact, seqstate.parse(compact), 1, 0, out=out, written=written))


def test_assemble_into_a_given_buffer_reports_what_it_wrote(blob):
    _, n, compact, mode, _ = blob
    shape, pieces = joined(seqpieces.split_views(compact, 256))
    check_padded_into_buffer(compact, n, mode, lambda out, written: seqpieces.assemble(
        shape, pieces, window_start={1: 0}, out=out, written=written))


@pytest.mark.parametrize("block_tokens", [1, 16, 100, 256, 4096])
def test_real_blobs_split_and_assemble_byte_for_byte(blob, block_tokens):
    raw, _, margin_blob, _, _ = blob
    for b in (raw, bytes(margin_blob)):
        shape, pieces = joined(seqpieces.split_views(b, block_tokens))
        assert bytes(seqpieces.assemble(shape, pieces)) == b
        # assembling with padding gives what set_window_start gives the assembled blob
        padded = seqpieces.assemble(shape, pieces, window_start={1: 0})
        assert bytes(padded) == bytes(seqstate.set_window_start(b, seqstate.parse(b), 1, 0))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_parser_never_crashes_on_damage(blob, data):
    raw, _, _, _, _ = blob
    buf = bytearray(raw[: 1 << 16] if data.draw(st.booleans()) else raw)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    try:
        seqstate.parse(bytes(buf[:cut]))
    except CorruptEntry:
        pass
