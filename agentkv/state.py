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
drift. :func:`set_front` puts zero-filled, SWA-masked cells in front of the window so that the
restored cache has the never-evicted layout again, and the arithmetic is bit for bit the same.
The same function trims a whole-context dump's SWA cache down to the window plus a margin.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import CorruptEntry

__all__ = ["SEQ_MAGIC", "StreamSection", "CacheSection", "SeqState", "parse", "set_front",
           "StreamShape", "Shape", "Piece", "LazyPiece", "FilePiece", "PieceParts", "shape_of", "split",
           "split_parts", "assemble",
           "piece_regions"]

SEQ_MAGIC = 0xAF143CD8
_MAX_STREAMS = 256  # LLAMA_MAX_SEQ
_MAX_LAYERS = 4096
_MAX_CELLS = 1 << 26
_MAX_GGML_TYPE = 64
_CELL_DTYPE = np.dtype([("pos", "<i4"), ("n_seq_id", "<u4"), ("seq_id", "<i4")])


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
    if ext_size == 0 and r.off + 12 * cell_count <= r.end:
        cells = np.frombuffer(r.buf, dtype=_CELL_DTYPE, count=cell_count, offset=r.off)
        if bool(np.all(cells["n_seq_id"] == 1)):
            r.off += 12 * cell_count
            return cells["pos"].copy(), True
    pos = np.empty(cell_count, dtype=np.int32)
    for i in range(cell_count):
        p, n_seq = r.unpack("<iI", "cell")
        if n_seq > _MAX_STREAMS:
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


def parse(blob: bytes, ext_size: int = 0) -> SeqState:
    """Parse a sequence-state blob; raise :class:`CorruptEntry` if it is malformed.

    ``ext_size`` is the per-cell extension llama.cpp writes for M-RoPE models (0 otherwise).
    """
    buf = memoryview(blob).cast("B")
    r = _Reader(buf)
    magic, seq_id = r.unpack("<Ii", "header")
    if magic != SEQ_MAGIC:
        raise CorruptEntry(f"not a llama.cpp sequence state (magic {magic:#010x})")
    caches: List[CacheSection] = []
    while r.off < r.end:
        start = r.off
        (n_stream,) = r.unpack("<I", "n_stream")
        if not 0 < n_stream <= _MAX_STREAMS:
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


def set_front(blob: bytes, state: SeqState, cache_index: int, new_pos_min: int,
              seq_id: Optional[int] = None, out: Optional[Callable[[int], np.ndarray]] = None,
              written: Optional[List[Tuple[int, int]]] = None) -> np.ndarray:
    """A copy of ``blob`` whose cache ``cache_index`` starts at position ``new_pos_min``.

    Below the stream's first position, zero-filled cells are added in front (positions
    ``new_pos_min ..``); above it, the first cells are dropped. The cache must hold one stream
    of simple, contiguous cells. ``seq_id`` rewrites the blob's header (a whole-context dump
    says -1; a sequence restore wants the sequence it came from). ``out`` and ``written`` as
    in :func:`assemble`: a buffer that is zeros where the padding goes, and the byte ranges
    written into it.
    """
    cache = state.caches[cache_index]
    stream = cache.only_stream()
    if stream is None or not stream.simple_cells or not stream.is_contiguous:
        raise ValueError("set_front needs one stream of simple, contiguous cells")
    if not 0 <= new_pos_min <= stream.pos_max:
        raise ValueError(f"new_pos_min {new_pos_min} outside 0..{stream.pos_max}")
    src = np.frombuffer(blob, dtype=np.uint8)
    n_old = stream.cell_count
    delta = stream.pos_min - new_pos_min  # cells added (> 0) or dropped (< 0) in front
    n_new = n_old + delta
    grow = delta * (12 + sum((sp.end - sp.start) // n_old for sp in stream.k + stream.v))
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
        wrote.append((o + (max(delta, 0) * row if n_rows == 1 else 0), o + n_rows * n_new * row))
        if delta >= 0:
            d_rows[:, delta * row:] = s_rows
        else:
            d_rows[:, :] = s_rows[:, -delta * row:]
        return o + n_rows * n_new * row, i + n_rows * n_old * row

    seq = int(np.frombuffer(blob, dtype=_CELL_DTYPE, count=1, offset=i)["seq_id"][0])
    cells = np.zeros(n_new, dtype=_CELL_DTYPE)
    cells["pos"] = np.arange(new_pos_min, new_pos_min + n_new, dtype=np.int32)
    cells["n_seq_id"] = 1
    cells["seq_id"] = seq if seq_id is None else seq_id
    buf[o:o + 12 * n_new] = np.frombuffer(cells.tobytes(), np.uint8)
    o, i = o + 12 * n_new, i + 12 * n_old
    wrote.append((0, o + 8))  # headers, other caches, this stream's cells
    buf[o:o + 8] = src[i:i + 8]  # v_trans, n_layer
    o, i = o + 8, i + 8
    for span in stream.k + stream.v:
        buf[o:o + 12] = src[i:i + 12]  # (i32 type, u64 row size) or (i32, u32 el, u32 n_embd)
        wrote.append((o, o + 12))
        o, i = o + 12, i + 12
        if span.el_size == 0:  # rows are cells
            o, i = copy_rows(o, i, 1, span.row_size)
        else:  # transposed V: rows are embedding dims, cells along each row
            o, i = copy_rows(o, i, span.n_embd, span.el_size)
    buf[o:] = src[i:]
    wrote.append((o, buf.nbytes))
    return buf


# -- split into token blocks / assemble back ----------------------------------------------------
#
# A blob is its *shape* (the seq id and, per cache and stream, the layer headers) plus, per
# stream, a run of cells with one row of bytes per cell in every tensor. A :class:`Piece` is a
# cell range of one stream with all of its bytes: the raw cell records, then each K layer's
# rows, then each V layer's rows (a transposed V layer contributes its ``n_embd`` rows' slices
# for the range, one after another). Cutting a stream into pieces and concatenating them back
# in order restores the blob byte for byte; nothing else is in the format.


@dataclass(frozen=True)
class StreamShape:
    """The layer headers of one non-empty stream.

    ``k`` holds (type, row_size) per layer; ``v`` holds (type, row_size) per layer, or
    (type, el_size, n_embd) when ``v_trans``.
    """

    v_trans: bool
    k: Tuple[Tuple[int, int], ...]
    v: Tuple[Tuple[int, ...], ...]

    @property
    def data_per_cell(self) -> int:
        """Tensor bytes one cell owns across all layers."""
        k = sum(row for _, row in self.k)
        v = sum(el * n for _, el, n in self.v) if self.v_trans else sum(row for _, row in self.v)
        return k + v

    def to_json(self) -> Dict[str, Any]:
        return {"v_trans": self.v_trans, "k": [list(x) for x in self.k], "v": [list(x) for x in self.v]}

    @classmethod
    def from_json(cls, d: Any) -> "StreamShape":
        try:
            v_trans = d["v_trans"]
            k = tuple((int(t), int(r)) for t, r in d["k"])
            v = tuple(tuple(int(x) for x in row) for row in d["v"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptEntry(f"stream shape does not parse: {exc}") from exc
        if not isinstance(v_trans, bool) or not k or len(v) != len(k) or \
                any(len(row) != (3 if v_trans else 2) for row in v):
            raise CorruptEntry("stream shape is inconsistent")
        return cls(v_trans, k, v)


@dataclass(frozen=True)
class Shape:
    """Everything of a blob but its cells and tensor rows: ``caches[c][s]`` is the shape of
    stream ``s`` of cache ``c`` (None where that stream is empty)."""

    seq_id: int
    caches: Tuple[Tuple[Optional[StreamShape], ...], ...]

    def to_json(self) -> Dict[str, Any]:
        return {"seq_id": self.seq_id,
                "caches": [[None if s is None else s.to_json() for s in c] for c in self.caches]}

    @classmethod
    def from_json(cls, d: Any) -> "Shape":
        try:
            seq_id = int(d["seq_id"])
            caches = tuple(tuple(None if s is None else StreamShape.from_json(s) for s in c)
                           for c in d["caches"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptEntry(f"state shape does not parse: {exc}") from exc
        if not caches or len(caches) > 8 or any(not 0 < len(c) <= _MAX_STREAMS for c in caches):
            raise CorruptEntry("state shape has an impossible cache or stream count")
        return cls(seq_id, caches)


@dataclass(frozen=True)
class Piece:
    """A run of ``count`` cells of stream ``stream`` of cache ``cache``, first position
    ``pos0``, with its bytes: ``cells_len`` bytes of cell records, then the tensor rows."""

    cache: int
    stream: int
    pos0: int
    count: int
    cells_len: int
    data: Any  # a contiguous uint8 buffer

    @property
    def nbytes(self) -> int:
        return memoryview(self.data).nbytes


class LazyPiece(Piece):
    """A piece whose bytes :func:`assemble` has made straight in their places in the blob:
    it notes the piece's regions there (cell records, then each K and each V layer's rows:
    the piece's byte order) and calls ``read_into`` with a view of each. ``nbytes`` is the
    length the piece has once made."""

    def read_into(self, views: List[memoryview]) -> None:
        raise NotImplementedError


class FilePiece(LazyPiece):
    """A piece whose bytes are still in a file: :func:`assemble` reads them straight into
    their places in the blob (one copy, by the kernel) and then calls ``verify``.

    ``data`` is ``(file, offset, length, verify)``: an open binary file, where the piece's
    bytes start in it and how many there are, and a callable given the views that were
    filled (in the piece's byte order) that raises CorruptEntry if they are not the bytes
    the piece was stored with.
    """

    @property
    def nbytes(self) -> int:
        return int(self.data[2])

    def read_into(self, views: List[memoryview]) -> None:
        f, offset, length, verify = self.data
        if sum(v.nbytes for v in views) != length:
            raise CorruptEntry("piece regions do not add up to the piece's length")
        try:
            fd = f.fileno()
            todo = list(views)
            pos = offset
            while todo:
                got = os.preadv(fd, todo[:1024], pos)
                if got <= 0:
                    raise CorruptEntry("stored piece ends before its length")
                pos += got
                while todo and got >= todo[0].nbytes:
                    got -= todo[0].nbytes
                    todo.pop(0)
                if got:
                    todo[0] = todo[0][got:]
            verify(views)
        finally:
            f.close()


def piece_regions(shape: Shape, piece: Piece) -> List[Tuple[int, int, int]]:
    """(offset, nbytes, ggml type) of each K then V layer's bytes inside ``piece.data``."""
    sh = shape.caches[piece.cache][piece.stream]
    if sh is None:
        raise CorruptEntry(f"piece names empty stream {piece.stream} of cache {piece.cache}")
    out = []
    off = piece.cells_len
    for t, row in sh.k:
        out.append((off, piece.count * row, t))
        off += piece.count * row
    for hdr in sh.v:
        n = hdr[2] * piece.count * hdr[1] if sh.v_trans else piece.count * hdr[1]
        out.append((off, n, hdr[0]))
        off += n
    return out


def _stream_shape(st: StreamSection) -> StreamShape:
    k = tuple((sp.type, sp.row_size) for sp in st.k)
    if st.v_trans:
        v: Tuple[Tuple[int, ...], ...] = tuple((sp.type, sp.el_size, sp.n_embd) for sp in st.v)
    else:
        v = tuple((sp.type, sp.row_size) for sp in st.v)
    return StreamShape(st.v_trans, k, v)


def shape_of(state: SeqState) -> Shape:
    return Shape(state.seq_id, tuple(tuple(None if s is None else _stream_shape(s) for s in c.streams)
                                      for c in state.caches))


def _cuts(st: StreamSection, block_tokens: int, a0: int = 0) -> List[int]:
    """Cell indices where a stream is cut, from cell ``a0`` on: where positions cross a
    multiple of block_tokens. Streams that are not simple and contiguous stay whole."""
    n = st.cell_count
    if block_tokens <= 0 or not st.simple_cells or not st.is_contiguous:
        return [a0, n]
    first = st.pos_min
    cuts = [a0]
    nxt = ((first + a0) // block_tokens + 1) * block_tokens
    while nxt - first < n:
        cuts.append(nxt - first)
        nxt += block_tokens
    cuts.append(n)
    return cuts


def _cell_offsets(blob: np.ndarray, start: int, st: StreamSection, ext_size: int) -> np.ndarray:
    """Byte offset of every cell record (and one past the last), relative to ``start``."""
    if st.simple_cells:
        return np.arange(st.cell_count + 1, dtype=np.int64) * 12
    offs = np.empty(st.cell_count + 1, dtype=np.int64)
    off = 0
    for i in range(st.cell_count):
        offs[i] = off
        n_seq = int(np.frombuffer(blob, dtype="<u4", count=1, offset=start + off + 4)[0])
        off += 8 + ext_size + 4 * n_seq
    offs[-1] = off
    return offs


@dataclass(frozen=True)
class PieceParts:
    """A :class:`Piece` not joined yet: its bytes are ``parts``, views of the blob (a
    transposed V layer's slice is a copy), in the order a piece holds them."""

    cache: int
    stream: int
    pos0: int
    count: int
    cells_len: int
    parts: Tuple[np.ndarray, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def piece(self) -> Piece:
        return Piece(self.cache, self.stream, self.pos0, self.count, self.cells_len,
                     np.concatenate(self.parts))


def split(blob: Any, block_tokens: int, state: Optional[SeqState] = None,
          ext_size: int = 0) -> Tuple[Shape, List[Piece]]:
    """Cut ``blob`` into pieces along multiples of ``block_tokens`` positions.

    Returns the blob's shape and its pieces in blob order; :func:`assemble` of the two gives
    ``blob`` back byte for byte. A piece covers a whole token block when ``pos0`` is a
    multiple of ``block_tokens`` and ``count == block_tokens``; the first and last piece of a
    stream may be partial. Streams that are not a simple, contiguous run stay one piece.
    """
    shape, parts = split_parts(blob, block_tokens, state, ext_size)
    return shape, [p.piece() for p in parts]


def split_parts(blob: Any, block_tokens: int, state: Optional[SeqState] = None,
                ext_size: int = 0, start_at: Optional[Dict[int, int]] = None
                ) -> Tuple[Shape, List[PieceParts]]:
    """:func:`split` without joining each piece's bytes (no copy of the blob).

    ``start_at`` maps a cache index to the first position to keep of its (one, simple,
    contiguous) stream: the pieces are then those of the blob :func:`set_front` would give
    with that position (a laid-out state split as its compact form, see laid.py).
    """
    src = np.frombuffer(blob, dtype=np.uint8)
    if state is None:
        state = parse(src, ext_size)
    pieces: List[PieceParts] = []
    for ci, cache in enumerate(state.caches):
        # Stream sections are contiguous in the blob: the cells start 4 bytes after the
        # stream's cell_count, which follows the cache's n_stream (and earlier streams).
        off = cache.start + 4
        for si, st in enumerate(cache.streams):
            off += 4  # cell_count
            if st is None:
                continue
            offs = _cell_offsets(src, off, st, ext_size)
            cells_start = off
            spans = st.k + st.v
            a0 = 0
            if start_at and ci in start_at:
                if not st.simple_cells or not st.is_contiguous \
                        or not st.pos_min <= start_at[ci] <= st.pos_max:
                    raise ValueError(f"cache {ci} cannot start at position {start_at[ci]}")
                a0 = start_at[ci] - st.pos_min
            for a, b in zip((cuts := _cuts(st, block_tokens, a0))[:-1], cuts[1:]):
                parts = [src[cells_start + offs[a]: cells_start + offs[b]]]
                for sp in spans:
                    if sp.el_size == 0:
                        parts.append(src[sp.start + a * sp.row_size: sp.start + b * sp.row_size])
                    else:
                        rows = src[sp.start:sp.end].reshape(sp.n_embd, st.cell_count * sp.el_size)
                        parts.append(rows[:, a * sp.el_size: b * sp.el_size].reshape(-1))
                pieces.append(PieceParts(ci, si, int(st.pos[a]), b - a, int(offs[b] - offs[a]),
                                         tuple(parts)))
            off = (spans[-1].end if spans else cells_start + int(offs[-1]))
    return shape_of(state), pieces


class _Pad(Piece):
    """Masked zero cells put in front of a stream by :func:`assemble` (``data``: the cell
    records only; the tensor rows are the zeros of a calloc'd buffer)."""

    @property
    def nbytes(self) -> int:  # not used for the size check
        return self.cells_len


def _pad_piece(cache: int, stream: int, first: Piece, new_pos_min: int,
               seq_id: int) -> Optional[_Pad]:
    count = first.pos0 - new_pos_min
    if count <= 0:
        return None
    if first.cells_len != 12 * first.count:
        raise ValueError("only streams of simple cells can be padded")
    seq = seq_id if isinstance(first, LazyPiece) else \
        int(np.frombuffer(first.data, dtype=_CELL_DTYPE, count=1)["seq_id"][0])
    cells = np.zeros(count, dtype=_CELL_DTYPE)
    cells["pos"] = np.arange(new_pos_min, first.pos0, dtype=np.int32)
    cells["n_seq_id"] = 1
    cells["seq_id"] = seq
    return _Pad(cache, stream, new_pos_min, count, 12 * count, cells.view(np.uint8))


def assemble(shape: Shape, pieces: Sequence[Piece],
             front: Optional[Dict[int, int]] = None,
             out: Optional[Callable[[int], np.ndarray]] = None,
             written: Optional[List[Tuple[int, int]]] = None) -> np.ndarray:
    """The blob made of ``shape`` and ``pieces`` (each stream's pieces in position order).

    ``front`` maps a cache index to a first position: that cache's stream gets masked,
    zero-filled cells in front of its pieces down to it (what :func:`set_front` does to a
    blob, without a second copy). ``out(nbytes)``, when given, supplies the buffer to
    assemble into; it must be zeros wherever padding goes. ``written`` collects the byte
    ranges the assembly wrote (padding aside). Raises CorruptEntry when the pieces do not
    fit the shape (wrong stream, wrong size).
    """
    by_stream: Dict[Tuple[int, int], List[Piece]] = {}
    for p in pieces:
        if not 0 <= p.cache < len(shape.caches) or not 0 <= p.stream < len(shape.caches[p.cache]):
            raise CorruptEntry(f"piece names cache {p.cache} stream {p.stream}, not in the shape")
        sh = shape.caches[p.cache][p.stream]
        if sh is None or p.count <= 0 or p.cells_len < 0 or \
                p.nbytes != p.cells_len + p.count * sh.data_per_cell:
            raise CorruptEntry(f"piece of {p.count} cells has {p.nbytes} bytes; its stream's "
                               "shape wants another size")
        by_stream.setdefault((p.cache, p.stream), []).append(p)
    for ci, new_pos_min in (front or {}).items():
        keys = [k for k in by_stream if k[0] == ci]
        if len(keys) != 1:
            raise ValueError(f"cache {ci} has {len(keys)} streams with cells; cannot pad it")
        pad = _pad_piece(ci, keys[0][1], by_stream[keys[0]][0], new_pos_min, shape.seq_id)
        if pad is not None:
            by_stream[keys[0]].insert(0, pad)

    def size(p: Piece, sh: StreamShape) -> int:
        return p.cells_len + p.count * sh.data_per_cell

    total = 8
    for ci, streams in enumerate(shape.caches):
        total += 4
        for si, sh in enumerate(streams):
            total += 4
            ps = by_stream.get((ci, si), [])
            if sh is not None and ps:
                total += 8 + 12 * len(sh.k) + 12 * len(sh.v) + sum(size(p, sh) for p in ps)
    padded = any(isinstance(p, _Pad) for ps in by_stream.values() for p in ps)
    if out is not None:
        buf = out(total)
    else:
        buf = (np.zeros if padded else np.empty)(total, dtype=np.uint8)  # calloc: pads cost no writes
    wrote: List[Tuple[int, int]] = [] if written is None else written
    regions: Dict[int, Tuple[Piece, List[Tuple[int, int]]]] = {}
    o = 0

    def mark(a: int, b: int) -> None:
        if wrote and wrote[-1][1] == a:
            wrote[-1] = (wrote[-1][0], b)
        elif b > a:
            wrote.append((a, b))

    def put(raw: Any) -> None:
        nonlocal o
        arr = np.frombuffer(raw, dtype=np.uint8)
        buf[o:o + arr.size] = arr
        mark(o, o + arr.size)
        o += arr.size

    put(struct.pack("<Ii", SEQ_MAGIC, shape.seq_id))
    for ci, streams in enumerate(shape.caches):
        put(struct.pack("<I", len(streams)))
        for si, sh in enumerate(streams):
            ps = by_stream.get((ci, si), [])
            if sh is None or not ps:
                put(struct.pack("<I", 0))
                continue
            n = sum(p.count for p in ps)
            put(struct.pack("<I", n))
            # a LazyPiece's regions are noted here (in its byte order) and made in the end
            datas = [None if isinstance(p, LazyPiece) else np.frombuffer(p.data, dtype=np.uint8)
                     for p in ps]
            for p, d in zip(ps, datas):
                if d is None:
                    if sh.v_trans:
                        raise ValueError("a piece with transposed V rows cannot be read in place")
                    regions.setdefault(id(p), (p, []))[1].append((o, p.cells_len))
                    mark(o, o + p.cells_len)
                    o += p.cells_len
                    continue
                put(d[:p.cells_len])
            put(struct.pack("<II", int(sh.v_trans), len(sh.k)))
            offs = [p.cells_len for p in ps]  # read cursor inside each piece
            pads = [isinstance(p, _Pad) for p in ps]

            def rows(row: int) -> None:
                nonlocal o
                for j, (p, d) in enumerate(zip(ps, datas)):
                    if pads[j]:
                        o += p.count * row  # stays zero
                        continue
                    if d is None:
                        regions[id(p)][1].append((o, p.count * row))
                        mark(o, o + p.count * row)
                        o += p.count * row
                        continue
                    put(d[offs[j]: offs[j] + p.count * row])
                    offs[j] += p.count * row

            for t, row in sh.k:
                put(struct.pack("<iQ", t, row))
                rows(row)
            for hdr in sh.v:
                if sh.v_trans:
                    t, el, n_embd = hdr
                    put(struct.pack("<iII", t, el, n_embd))
                    dst = buf[o: o + n_embd * n * el].reshape(n_embd, n * el)
                    mark(o, o + n_embd * n * el)
                    col = 0
                    for j, (p, d) in enumerate(zip(ps, datas)):
                        w = p.count * el
                        if not pads[j]:
                            dst[:, col:col + w] = d[offs[j]: offs[j] + n_embd * w].reshape(n_embd, w)
                            offs[j] += n_embd * w
                        col += w
                    o += n_embd * n * el
                else:
                    t, row = hdr
                    put(struct.pack("<iQ", t, row))
                    rows(row)
    assert o == total
    for p, regs in regions.values():
        p.read_into([memoryview(buf[a:a + n]) for a, n in regs])  # type: ignore[attr-defined]
    return buf
