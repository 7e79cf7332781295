"""RAM snapshots laid out for the restore: the same bytes, the padding on the zero page."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from agentkv._format import seqstate
from agentkv._format import pieces as seqpieces
from blobgen import joined
from agentkv._llama.engine import Engine
from agentkv._format import image as imagemod
from agentkv._format.image import RestoreImage, zero_runs
from agentkv._format import layout
from conftest import make_llm

PROMPT = "Layout food: " + " ".join(f"a pebble numbered {i} rolls downhill." for i in range(180))


@pytest.fixture(scope="module", params=["flash", "transposed"])
def snaps(request):
    llm = make_llm(flash_attn=request.param == "flash", n_ctx=2048)
    try:
        llm.create_completion(PROMPT, max_tokens=1, temperature=0)
        engine = Engine(llm)
        engine.block_tokens = 64
        laid, compact = engine.snapshot(image=True), engine.snapshot()
        whole = engine.state_bytes(-1).copy()
        # what a restore of the compact snapshot loads (layout.load_from's padding)
        loaded = bytes(layout.restore_bytes(engine.model, compact.state, compact.n_tokens,
                                            engine.buffers.image, engine.n_threads())[0])
        engine.buffers.image.zero()
        return laid, compact, loaded, request.param, whole
    finally:
        llm.close()


def owned_bytes(buf: np.ndarray) -> int:
    """Bytes of ``buf``'s pages this process owns alone (/proc/self/pagemap: present and
    exclusively mapped; the shared zero page is neither owned nor counted). Per page, so a
    neighbouring mapping the kernel merged with this one does not count."""
    page = mmap.PAGESIZE
    first, last = buf.ctypes.data // page, (buf.ctypes.data + buf.nbytes - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read((last - first + 1) * 8), dtype="<u8")
    present, exclusive = np.uint64(1 << 63), np.uint64(1 << 56)
    return int(np.count_nonzero(((entries & present) != 0) & ((entries & exclusive) != 0))) * page


def test_laid_state_is_what_a_restore_loads_and_splits_as_the_compact_one(snaps):
    laid, compact, loaded, _, _ = snaps
    assert isinstance(laid.state, RestoreImage) and not isinstance(compact.state, RestoreImage)
    assert np.array_equal(laid.tokens, compact.tokens)
    assert np.array_equal(laid.logits, compact.logits)
    assert bytes(laid.state.buf) == loaded
    st = laid.state
    own = seqstate.parse(st.buf)  # the parse it carries is its own
    assert (st.parsed.seq_id, st.parsed.nbytes) == (own.seq_id, own.nbytes)
    for c, d in zip(st.parsed.caches, own.caches):
        assert (c.start, c.end, len(c.streams)) == (d.start, d.end, len(d.streams))
        for x, y in zip(c.streams, d.streams):
            assert (x.cell_count, x.k, x.v, x.v_trans) == (y.cell_count, y.k, y.v, y.v_trans)
            assert np.array_equal(x.pos, y.pos)
    assert bytes(seqstate.set_window_start(st.buf, st.parsed, st.cache, st.window_start)) == bytes(compact.state)
    shape_a, parts_a = laid.state.split_views(64)
    shape_b, parts_b = seqpieces.split_views(compact.state, 64)
    assert shape_a == shape_b
    assert [(p.cache, p.stream, p.pos0, p.count, p.cells_len) for p in parts_a] == \
           [(p.cache, p.stream, p.pos0, p.count, p.cells_len) for p in parts_b]
    assert all(bytes(p.piece().data) == bytes(q.piece().data) for p, q in zip(parts_a, parts_b))


def test_laid_padding_costs_no_ram(snaps):
    laid, compact, loaded, mode, _ = snaps
    st = laid.state
    page = mmap.PAGESIZE
    runs = zero_runs(st.parsed, st.cache, st.window_start)
    # the zero runs are the padding cells' rows: all the layout adds but their cell records
    assert sum(b - a for a, b in runs) == len(loaded) - len(compact.state) - 12 * (st.window_start - st.load_from)
    # owned: the compact bytes, plus at most the partial pages at the ends of the zero runs
    assert len(compact.state) <= st.nbytes <= len(compact.state) + 2 * page * len(runs) + page
    if mode == "flash":  # rows are cells: the zero runs are long, and their pages never resident
        assert st.buf.nbytes - st.nbytes >= sum(b - a for a, b in runs) - 2 * page * len(runs)
        assert 0 < owned_bytes(st.buf) <= st.nbytes
    assert not np.any(st.buf[[a + (b - a) // 2 for a, b in runs]])


@pytest.mark.parametrize("start", [0, 1, 63, 64, 65])
def test_split_parts_start_at_matches_set_front(snaps, start):
    """split_views(window_start=p) cuts exactly the blocks set_window_start(p) would be cut into."""
    _, _, loaded, _, _ = snaps
    parsed = seqstate.parse(loaded)
    swa = parsed.caches[1].only_stream()
    p = swa.pos_max - 700 + start
    want_shape, want = joined(seqpieces.split_views(seqstate.set_window_start(loaded, parsed, 1, p), 64))
    shape, got = seqpieces.split_views(loaded, 64, parsed, window_start={1: p})
    assert shape == want_shape
    assert [(q.cache, q.pos0, q.count, bytes(q.piece().data)) for q in got] == \
           [(q.cache, q.pos0, q.count, bytes(q.data)) for q in want]
    with pytest.raises(ValueError, match="cannot start"):
        seqpieces.split_views(loaded, 64, parsed, window_start={1: swa.pos_max + 1})


def test_lay_out_rebuilds_the_snapshot_and_falls_back_where_the_kernel_cannot(snaps, monkeypatch):
    laid, compact, loaded, _, whole = snaps
    again = imagemod.build_image(whole, seqstate.parse(whole), 1, laid.state.window_start, 0,
                                 laid.state.load_from)
    assert bytes(again.buf) == loaded
    # the never-evicted layout (load_from 0) is the same data with every masked cell in front
    full = imagemod.build_image(whole, seqstate.parse(whole), 1, laid.state.window_start, 0)
    assert full.load_from == 0 and full.buf.nbytes >= again.buf.nbytes
    assert bytes(seqstate.set_window_start(full.buf, full.parsed, 1, again.load_from)) == loaded
    # a dump whose SWA run starts above position 0 (a restored context's): the same layout,
    # the cells it lacks in front added as padding
    cparsed = seqstate.parse(compact.state)
    from_compact = imagemod.build_image(compact.state, cparsed, 1, laid.state.window_start, 0,
                                        laid.state.load_from)
    assert bytes(from_compact.buf) == loaded and from_compact.load_from == laid.state.load_from
    with pytest.raises(ValueError, match="holding the window"):  # the window is not all there
        imagemod.build_image(compact.state, cparsed, 1, laid.state.window_start - 1, 0)
    monkeypatch.setattr(imagemod.ZERO_PAGE, "supported", None)
    monkeypatch.setattr(imagemod.ZERO_PAGE, "advice", 12345)  # an advice no kernel knows
    assert imagemod.build_image(whole, seqstate.parse(whole), 1, laid.state.window_start, 0) is None
    assert imagemod.ZERO_PAGE.supported is False  # learnt once: later snapshots stay compact at once


def test_a_restored_agent_is_kept_laid_out_again_and_stays_exact(tmp_path):
    """The snapshot of a context that was itself restored (its SWA cells start at the restore's
    padding, not at 0) is laid out too: a second RAM return loads it with no copy of ours, and
    answers as an agent that never left the context."""
    from agentkv import AgentMemory
    from conftest import last_logits
    llm = make_llm(n_ctx=2048)
    try:
        prompts = [PROMPT, " Then a stone rolls too.", " And a leaf."]
        ref, text = [], ""
        for p in prompts:  # never evicted: llama-cpp-python reuses the prefix it holds
            text += p
            text += llm.create_completion(text, max_tokens=6, temperature=0)["choices"][0]["text"]
            ref.append(text)
        ref_logits = last_logits(llm)
        llm.reset()
        got, text, layouts = [], "", []
        with AgentMemory(llm, cache_dir=tmp_path, ram_budget="1GiB") as mem:
            for p in prompts:
                text += p
                text += mem.create_completion("a", text, max_tokens=6,
                                              temperature=0)["choices"][0]["text"]
                got.append(text)
                logits = last_logits(llm)
                mem.create_completion("b", "A different agent.", max_tokens=2, temperature=0)
                layouts.append(mem.inspect().ram_layout("a"))
            hits = mem.stats().hits
        assert got == ref and np.array_equal(logits, ref_logits)
        assert layouts == ["image"] * 3 and hits["ram"] >= 2
    finally:
        llm.close()
