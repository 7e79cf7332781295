"""Token blocks of a sequence state: cut a blob into pieces, assemble pieces back.

A blob is its *shape* (the seq id and, per cache and stream, the layer headers) plus, per
stream, a run of cells with one row of bytes per cell in every tensor. A :class:`Piece` is a
cell range of one stream with all of its bytes: the raw cell records, then each K layer's
rows, then each V layer's rows (a transposed V layer contributes its ``n_embd`` rows' slices
for the range, one after another). Cutting a stream into pieces and concatenating them back
in order restores the blob byte for byte; nothing else is in the format.

The format itself (parsing, checking, padding a blob) is :mod:`agentkv._format.seqstate`; this module
only cuts along its cells and puts the cuts back together, which is what the disk store keeps.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import CorruptEntry
from .seqstate import (CELL_BYTES, CELL_DTYPE, LAYER_HEADER_BYTES, MAX_STREAMS, SEQ_MAGIC,
                       SeqState, StreamSection, parse)

__all__ = ["StreamShape", "Shape", "Piece", "LazyPiece", "FilePiece", "PieceViews", "shape_of",
           "split_views", "assemble", "piece_regions"]


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
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
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
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise CorruptEntry(f"state shape does not parse: {exc}") from exc
        if not caches or len(caches) > 8 or any(not 0 < len(c) <= MAX_STREAMS for c in caches):
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
        except CorruptEntry as exc:
            exc.payload = exc.payload or getattr(verify, "payload", None)
            raise
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
        return np.arange(st.cell_count + 1, dtype=np.int64) * CELL_BYTES
    offs = np.empty(st.cell_count + 1, dtype=np.int64)
    off = 0
    for i in range(st.cell_count):
        offs[i] = off
        n_seq = int(np.frombuffer(blob, dtype="<u4", count=1, offset=start + off + 4)[0])
        off += 8 + ext_size + 4 * n_seq
    offs[-1] = off
    return offs


@dataclass(frozen=True)
class PieceViews:
    """A :class:`Piece` not joined yet: its bytes are ``views`` of the blob (a transposed V
    layer's slice is a copy), in the order a piece holds them."""

    cache: int
    stream: int
    pos0: int
    count: int
    cells_len: int
    views: Tuple[np.ndarray, ...]

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.views)

    def piece(self) -> Piece:
        return Piece(self.cache, self.stream, self.pos0, self.count, self.cells_len,
                     np.concatenate(self.views))


def split_views(blob: Any, block_tokens: int, state: Optional[SeqState] = None,
                ext_size: int = 0, window_start: Optional[Dict[int, int]] = None
                ) -> Tuple[Shape, List[PieceViews]]:
    """Cut ``blob`` into pieces along multiples of ``block_tokens`` positions, each piece's
    bytes left as views of the blob (no copy; :meth:`PieceViews.piece` joins them).

    Returns the blob's shape and its pieces in blob order; :func:`assemble` of the shape and
    the joined pieces gives ``blob`` back byte for byte. A piece covers a whole token block
    when ``pos0`` is a multiple of ``block_tokens`` and ``count == block_tokens``; the first
    and last piece of a stream may be partial. Streams that are not a simple, contiguous run
    stay one piece.

    ``window_start`` maps a cache index to the first position to keep of its (one, simple,
    contiguous) stream: the pieces are then those of the blob :func:`set_window_start` would give
    with that position (a laid-out state split as its compact form, see laid.py).
    """
    src = np.frombuffer(blob, dtype=np.uint8)
    if state is None:
        state = parse(src, ext_size)
    pieces: List[PieceViews] = []
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
            if window_start and ci in window_start:
                if not st.simple_cells or not st.is_contiguous \
                        or not st.pos_min <= window_start[ci] <= st.pos_max:
                    raise ValueError(f"cache {ci} cannot start at position {window_start[ci]}")
                a0 = window_start[ci] - st.pos_min
            for a, b in zip((cuts := _cuts(st, block_tokens, a0))[:-1], cuts[1:]):
                parts = [src[cells_start + offs[a]: cells_start + offs[b]]]
                for sp in spans:
                    if sp.el_size == 0:
                        parts.append(src[sp.start + a * sp.row_size: sp.start + b * sp.row_size])
                    else:
                        rows = src[sp.start:sp.end].reshape(sp.n_embd, st.cell_count * sp.el_size)
                        parts.append(rows[:, a * sp.el_size: b * sp.el_size].reshape(-1))
                pieces.append(PieceViews(ci, si, int(st.pos[a]), b - a, int(offs[b] - offs[a]),
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
    if first.cells_len != CELL_BYTES * first.count:
        raise ValueError("only streams of simple cells can be padded")
    seq = seq_id if isinstance(first, LazyPiece) else \
        int(np.frombuffer(first.data, dtype=CELL_DTYPE, count=1)["seq_id"][0])
    cells = np.zeros(count, dtype=CELL_DTYPE)
    cells["pos"] = np.arange(new_pos_min, first.pos0, dtype=np.int32)
    cells["n_seq_id"] = 1
    cells["seq_id"] = seq
    return _Pad(cache, stream, new_pos_min, count, CELL_BYTES * count, cells.view(np.uint8))


def assemble(shape: Shape, pieces: Sequence[Piece],
             window_start: Optional[Dict[int, int]] = None,
             out: Optional[Callable[[int], np.ndarray]] = None,
             written: Optional[List[Tuple[int, int]]] = None) -> np.ndarray:
    """The blob made of ``shape`` and ``pieces`` (each stream's pieces in position order).

    ``window_start`` maps a cache index to a first position: that cache's stream gets masked,
    zero-filled cells in front of its pieces down to it (what :func:`set_window_start` does to a
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
    for ci, new_pos_min in (window_start or {}).items():
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
                total += 8 + LAYER_HEADER_BYTES * (len(sh.k) + len(sh.v)) + sum(size(p, sh) for p in ps)
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
