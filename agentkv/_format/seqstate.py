"""llama.cpp's sequence-state format: parse it, check it, rebuild it with padding.

A blob from ``llama_state_seq_get_data(ctx, dst, size, seq_id)`` (llama.cpp of 2026-10, see
``src/llama-kv-cache.cpp`` ``state_write*``) is::

    u32 magic 0xaf143cd8 | i32 seq_id | cache section ...      (iSWA models: base, then SWA)

    cache section:  u32 n_stream, then per stream:
        u32 cell_count                                    (0: the stream is skipped)
        cell_count x (i32 pos | u32 n_seq_id | [cell ext] | n_seq_id x i32 seq_id)
        u32 v_trans | u32 n_layer
        n_layer x (i32 k_type | u64 k_row_size | cell_count * k_row_size bytes)
        v_trans == 0:  n_layer x (i32 v_type | u64 v_row_size | cell_count * v_row_size bytes)
        v_trans == 1:  n_layer x (i32 v_type | u32 v_el_size | u32 n_embd_v_gqa |
                                  n_embd_v_gqa x cell_count * v_el_size bytes)

Everything here is a pure function over bytes. The parser bounds-checks every length before it
uses it and raises :class:`CorruptEntry` on anything malformed: it never reads past the buffer.

Why padding exists: the writer drops the cells an SWA layer can no longer see, so a restored
SWA cache holds its last window at cell indices 0..W-1, while a context that was never evicted
holds the same window at indices equal to the positions. ggml's attention kernels partition the
KV by cell index (split-KV decode, tiles), so the two layouts round differently and the logits
drift. :func:`set_window_start` puts zero-filled, SWA-masked cells in front of the window so that the
restored cache splits the KV as the never-evicted layout does, and the arithmetic is bit for bit
the same (how many cells that takes is layout.load_from's).
The same function trims a whole-context dump's SWA cache down to the window plus a margin.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

import numpy as np

from ..errors import CorruptEntry

__all__ = ["SEQ_MAGIC", "CELL_DTYPE", "CELL_BYTES", "LAYER_HEADER_BYTES", "MAX_STREAMS", "StreamSection", "CacheSection", "SeqState",
           "parse", "set_window_start"]

SEQ_MAGIC = 0xAF143CD8
MAX_STREAMS = 256  # LLAMA_MAX_SEQ
_MAX_LAYERS = 4096
_MAX_CELLS = 1 << 26
_MAX_GGML_TYPE = 64
Buffer = Union[bytes, bytearray, memoryview, np.ndarray]  # what a state blob may come as
CELL_DTYPE = np.dtype([("pos", "<i4"), ("n_seq_id", "<u4"), ("seq_id", "<i4")])
CELL_BYTES = CELL_DTYPE.itemsize  # 12: a cell of one sequence and no extension
LAYER_HEADER_BYTES = 12  # a layer's (i32 type, u64 row size) or (i32 type, u32 el, u32 n_embd)


def byte_view(buf: Buffer) -> memoryview:
    """A flat byte view of any contiguous buffer, without a copy."""
    view = buf.data if isinstance(buf, np.ndarray) else memoryview(buf)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


@dataclass(frozen=True)
class Span:
    """One layer's K or V tensor bytes inside the blob: ``blob[start:end]``."""

    type: int
    start: int
    end: int
    row_size: int = 0  # K, and V when not transposed
    el_size: int = 0  # V transposed
    n_embd: int = 0  # V transposed


@dataclass(frozen=True)
class StreamSection:
    """One stream of one cache: its cells and its per-layer tensors."""

    cell_count: int
    pos: np.ndarray  # int32 positions in cell order
    v_trans: bool
    k: Tuple[Span, ...]
    v: Tuple[Span, ...]
    simple_cells: bool  # every cell is (pos, n_seq_id=1, seq_id) with no extension

    @property
    def pos_min(self) -> int:
        return int(self.pos.min()) if self.cell_count else -1

    @property
    def pos_max(self) -> int:
        return int(self.pos.max()) if self.cell_count else -1

    @property
    def is_contiguous(self) -> bool:
        """Cells hold positions pos_min, pos_min+1, ... in cell order."""
        if not self.cell_count:
            return True
        return bool(np.array_equal(self.pos, np.arange(self.pos[0], self.pos[0] + self.cell_count)))


@dataclass(frozen=True)
class CacheSection:
    """One KV cache (the base or the SWA cache of an iSWA model)."""

    start: int
    end: int
    streams: Tuple[Optional[StreamSection], ...]  # None where the stream holds no cells

    @property
    def cell_count(self) -> int:
        return sum(s.cell_count for s in self.streams if s is not None)

    def only_stream(self) -> Optional[StreamSection]:
        live = [s for s in self.streams if s is not None]
        return live[0] if len(live) == 1 else None


@dataclass(frozen=True)
class SeqState:
    """The parsed layout of one sequence-state blob."""

    seq_id: int
    caches: Tuple[CacheSection, ...]
    nbytes: int


class _Reader:
    __slots__ = ("buf", "off", "end")

    def __init__(self, buf: memoryview, off: int = 0) -> None:
        self.buf = buf
        self.off = off
        self.end = len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.off + n > self.end:
            raise CorruptEntry(f"sequence state truncated: {what} needs {n} bytes at offset {self.off}, "
                               f"{self.end - self.off} left")

    def unpack(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize(fmt)
        self.need(size, what)
        values = struct.unpack_from(fmt, self.buf, self.off)
        self.off += size
        return values

    def skip(self, n: int, what: str) -> Tuple[int, int]:
        self.need(n, what)
        start = self.off
        self.off += n
        return start, self.off


def _parse_cells(r: _Reader, cell_count: int, ext_size: int) -> Tuple[np.ndarray, bool]:
    # Fast path: a single-sequence blob without cell extensions has 12-byte cells.
    if ext_size == 0 and r.off + CELL_BYTES * cell_count <= r.end:
        cells = np.frombuffer(r.buf, dtype=CELL_DTYPE, count=cell_count, offset=r.off)
        if bool(np.all(cells["n_seq_id"] == 1)):
            r.off += CELL_BYTES * cell_count
            return cells["pos"].copy(), True
    pos = np.empty(cell_count, dtype=np.int32)
    for i in range(cell_count):
        p, n_seq = r.unpack("<iI", "cell")
        if n_seq > MAX_STREAMS:
            raise CorruptEntry(f"cell {i} claims {n_seq} sequence ids")
        r.skip(ext_size + 4 * n_seq, "cell sequence ids")
        pos[i] = p
    return pos, False


def _parse_stream(r: _Reader, cell_count: int, ext_size: int) -> StreamSection:
    if cell_count > _MAX_CELLS:
        raise CorruptEntry(f"stream claims {cell_count} cells")
    pos, simple = _parse_cells(r, cell_count, ext_size)
    v_trans, n_layer = r.unpack("<II", "v_trans/n_layer")
    if v_trans not in (0, 1) or not 0 < n_layer <= _MAX_LAYERS:
        raise CorruptEntry(f"bad layer header: v_trans={v_trans} n_layer={n_layer}")
    k: List[Span] = []
    for il in range(n_layer):
        t, row = r.unpack("<iQ", "K header")
        if not 0 <= t < _MAX_GGML_TYPE or row == 0 or row > 1 << 24:
            raise CorruptEntry(f"layer {il}: bad K type {t} or row size {row}")
        start, end = r.skip(cell_count * row, f"layer {il} K")
        k.append(Span(type=t, start=start, end=end, row_size=row))
    v: List[Span] = []
    for il in range(n_layer):
        if v_trans:
            t, el, n_embd = r.unpack("<iII", "V header")
            if not 0 <= t < _MAX_GGML_TYPE or el == 0 or el > 64 or not 0 < n_embd <= 1 << 20:
                raise CorruptEntry(f"layer {il}: bad transposed V header ({t}, {el}, {n_embd})")
            start, end = r.skip(n_embd * cell_count * el, f"layer {il} V")
            v.append(Span(type=t, start=start, end=end, el_size=el, n_embd=n_embd))
        else:
            t, row = r.unpack("<iQ", "V header")
            if not 0 <= t < _MAX_GGML_TYPE or row == 0 or row > 1 << 24:
                raise CorruptEntry(f"layer {il}: bad V type {t} or row size {row}")
            start, end = r.skip(cell_count * row, f"layer {il} V")
            v.append(Span(type=t, start=start, end=end, row_size=row))
    return StreamSection(cell_count, pos, bool(v_trans), tuple(k), tuple(v), simple)


def parse(blob: Buffer, ext_size: int = 0) -> SeqState:
    """Parse a sequence-state blob; raise :class:`CorruptEntry` if it is malformed.

    ``ext_size`` is the per-cell extension llama.cpp writes for M-RoPE models (0 otherwise).
    """
    buf = byte_view(blob)
    r = _Reader(buf)
    magic, seq_id = r.unpack("<Ii", "header")
    if magic != SEQ_MAGIC:
        raise CorruptEntry(f"not a llama.cpp sequence state (magic {magic:#010x})")
    caches: List[CacheSection] = []
    while r.off < r.end:
        start = r.off
        (n_stream,) = r.unpack("<I", "n_stream")
        if not 0 < n_stream <= MAX_STREAMS:
            raise CorruptEntry(f"bad stream count {n_stream}")
        streams: List[Optional[StreamSection]] = []
        for _ in range(n_stream):
            (cell_count,) = r.unpack("<I", "cell_count")
            streams.append(_parse_stream(r, cell_count, ext_size) if cell_count else None)
        caches.append(CacheSection(start, r.off, tuple(streams)))
        if len(caches) > 8:
            raise CorruptEntry("more cache sections than any llama.cpp memory writes")
    if not caches:
        raise CorruptEntry("sequence state holds no cache section")
    return SeqState(seq_id, tuple(caches), len(buf))


# One pass over the blob, front to back, on purpose (~55 lines past its docstring): every
# offset follows from the one before, and split up the offsets would travel between functions.
def set_window_start(blob: Buffer, state: SeqState, cache_index: int, new_pos_min: int,
              seq_id: Optional[int] = None, out: Optional[Callable[[int], np.ndarray]] = None,
              written: Optional[List[Tuple[int, int]]] = None, zero_below: int = 0
              ) -> np.ndarray:
    """A copy of ``blob`` whose cache ``cache_index`` starts at position ``new_pos_min``.

    Below the stream's first position, zero-filled cells are added in front (positions
    ``new_pos_min ..``); above it, the first cells are dropped. The cache must hold one stream
    of simple, contiguous cells. ``seq_id`` rewrites the blob's header (a whole-context dump
    says -1; a sequence restore wants the sequence it came from). ``out`` and ``written`` as
    in :func:`assemble`: a buffer that is zeros where the padding goes, and the byte ranges
    written into it. ``zero_below``: the rows of the cells below this position are left as
    ``out`` gave them (zeros) rather than copied (masked cells whose data no query reads).
    """
    cache = state.caches[cache_index]
    stream = cache.only_stream()
    if stream is None or not stream.simple_cells or not stream.is_contiguous:
        raise ValueError("set_window_start needs one stream of simple, contiguous cells")
    if not 0 <= new_pos_min <= stream.pos_max:
        raise ValueError(f"new_pos_min {new_pos_min} outside 0..{stream.pos_max}")
    src = np.frombuffer(blob, dtype=np.uint8)
    n_old = stream.cell_count
    delta = stream.pos_min - new_pos_min  # cells added (> 0) or dropped (< 0) in front
    n_new = n_old + delta
    grow = delta * (CELL_BYTES + sum((sp.end - sp.start) // n_old for sp in stream.k + stream.v))
    z = min(n_new, max(delta, 0, zero_below - new_pos_min))  # leading cells left zero
    if out is None:
        buf = np.zeros(src.nbytes + grow, dtype=np.uint8)  # calloc: padding costs no writes
    else:
        buf = out(src.nbytes + grow)
    wrote: List[Tuple[int, int]] = [] if written is None else written

    first = next(k for k, s in enumerate(cache.streams) if s is not None)
    cc_off = cache.start + 4 + 4 * first  # this stream's cell_count
    buf[:cc_off] = src[:cc_off]
    buf[cc_off:cc_off + 4] = np.frombuffer(struct.pack("<I", n_new), np.uint8)
    if seq_id is not None:
        buf[4:8] = np.frombuffer(struct.pack("<i", seq_id), np.uint8)
    i = o = cc_off + 4

    def copy_rows(o: int, i: int, n_rows: int, row: int) -> Tuple[int, int]:
        """Copy one tensor of ``n_rows`` x ``row`` bytes (cells along the rows) re-fronted."""
        s_rows = src[i:i + n_rows * n_old * row].reshape(n_rows, n_old * row)
        d_rows = buf[o:o + n_rows * n_new * row].reshape(n_rows, n_new * row)
        # the padding is left as it is (zeros); a transposed layer is marked whole
        wrote.append((o + (z * row if n_rows == 1 else 0), o + n_rows * n_new * row))
        d_rows[:, z * row:] = s_rows[:, (z - delta) * row:]
        return o + n_rows * n_new * row, i + n_rows * n_old * row

    seq = int(np.frombuffer(blob, dtype=CELL_DTYPE, count=1, offset=i)["seq_id"][0])
    cells = np.zeros(n_new, dtype=CELL_DTYPE)
    cells["pos"] = np.arange(new_pos_min, new_pos_min + n_new, dtype=np.int32)
    cells["n_seq_id"] = 1
    cells["seq_id"] = seq if seq_id is None else seq_id
    buf[o:o + CELL_BYTES * n_new] = np.frombuffer(cells.tobytes(), np.uint8)
    o, i = o + CELL_BYTES * n_new, i + CELL_BYTES * n_old
    wrote.append((0, o + 8))  # headers, other caches, this stream's cells
    buf[o:o + 8] = src[i:i + 8]  # v_trans, n_layer
    o, i = o + 8, i + 8
    for span in stream.k + stream.v:
        buf[o:o + LAYER_HEADER_BYTES] = src[i:i + LAYER_HEADER_BYTES]
        wrote.append((o, o + LAYER_HEADER_BYTES))
        o, i = o + LAYER_HEADER_BYTES, i + LAYER_HEADER_BYTES
        if span.el_size == 0:  # rows are cells
            o, i = copy_rows(o, i, 1, span.row_size)
        else:  # transposed V: rows are embedding dims, cells along each row
            o, i = copy_rows(o, i, span.n_embd, span.el_size)
    buf[o:] = src[i:]
    wrote.append((o, buf.nbytes))
    return buf
