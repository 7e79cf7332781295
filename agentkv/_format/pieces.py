"""Token blocks of a sequence state: cut a blob into pieces, assemble pieces back.

A blob is its shape plus, per stream, a run of cells (shape.py: :class:`Shape`,
:class:`Piece`). Cutting a stream into pieces and concatenating them back
in order restores the blob byte for byte; nothing else is in the format.

The format itself (parsing, checking, padding a blob) is :mod:`agentkv._format.seqstate`; this module
only cuts along its cells and puts the cuts back together, which is what the disk store keeps.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import CorruptEntry
from .seqstate import (CELL_BYTES, CELL_DTYPE, LAYER_HEADER_BYTES, SEQ_MAGIC, SeqState,
                       StreamSection, parse)
from .shape import (FilePiece, LazyPiece, Piece, Shape, StreamShape, piece_regions,
                    shape_of)

__all__ = ["StreamShape", "Shape", "Piece", "LazyPiece", "FilePiece", "PieceViews", "shape_of",
           "split_views", "assemble", "piece_regions"]


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


def _by_stream(shape: Shape, pieces: Sequence[Piece]) -> Dict[Tuple[int, int], List[Piece]]:
    """The pieces by (cache, stream), each checked against its stream's shape."""
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
    return by_stream


def _blob_size(shape: Shape, by_stream: Dict[Tuple[int, int], List[Piece]]) -> int:
    total = 8
    for ci, streams in enumerate(shape.caches):
        total += 4
        for si, sh in enumerate(streams):
            total += 4
            ps = by_stream.get((ci, si), [])
            if sh is not None and ps:
                total += 8 + LAYER_HEADER_BYTES * (len(sh.k) + len(sh.v))
                total += sum(p.cells_len + p.count * sh.data_per_cell for p in ps)
    return total


class _Assembly:
    """Writes a blob front to back into ``buf``: headers and eager pieces' bytes as it goes;
    a LazyPiece's regions are noted (in its byte order) and made at the end; padding cells'
    rows are skipped (the buffer is zeros there). ``wrote`` collects what was written."""

    def __init__(self, buf: np.ndarray, wrote: List[Tuple[int, int]]) -> None:
        self.buf = buf
        self.o = 0
        self.wrote = wrote
        self.regions: Dict[int, Tuple[Piece, List[Tuple[int, int]]]] = {}

    def mark(self, a: int, b: int) -> None:
        if self.wrote and self.wrote[-1][1] == a:
            self.wrote[-1] = (self.wrote[-1][0], b)
        elif b > a:
            self.wrote.append((a, b))

    def put(self, raw: Any) -> None:
        arr = np.frombuffer(raw, dtype=np.uint8)
        self.buf[self.o:self.o + arr.size] = arr
        self.mark(self.o, self.o + arr.size)
        self.o += arr.size

    def later(self, p: Piece, n: int) -> None:
        """``n`` bytes of lazy piece ``p`` go here, made by :meth:`finish`."""
        self.regions.setdefault(id(p), (p, []))[1].append((self.o, n))
        self.mark(self.o, self.o + n)
        self.o += n

    def stream(self, sh: StreamShape, ps: List[Piece]) -> None:
        """One stream's section: cell records, then each K and each V layer's rows."""
        n = sum(p.count for p in ps)
        self.put(struct.pack("<I", n))
        datas = [None if isinstance(p, LazyPiece) else np.frombuffer(p.data, dtype=np.uint8)
                 for p in ps]
        for p, d in zip(ps, datas):
            if d is None:
                if sh.v_trans:
                    raise ValueError("a piece with transposed V rows cannot be read in place")
                self.later(p, p.cells_len)
            else:
                self.put(d[:p.cells_len])
        self.put(struct.pack("<II", int(sh.v_trans), len(sh.k)))
        offs = [p.cells_len for p in ps]  # read cursor inside each piece
        for t, row in sh.k:
            self.put(struct.pack("<iQ", t, row))
            self._rows(ps, datas, offs, row)
        for hdr in sh.v:
            if sh.v_trans:
                self.put(struct.pack("<iII", *hdr))
                self._transposed(ps, datas, offs, n, hdr[1], hdr[2])
            else:
                self.put(struct.pack("<iQ", *hdr))
                self._rows(ps, datas, offs, hdr[1])

    def _rows(self, ps: List[Piece], datas: List[Optional[np.ndarray]], offs: List[int],
              row: int) -> None:
        """One layer's rows, a row per cell, piece after piece."""
        for j, (p, d) in enumerate(zip(ps, datas)):
            if isinstance(p, _Pad):
                self.o += p.count * row  # stays zero
            elif d is None:
                self.later(p, p.count * row)
            else:
                self.put(d[offs[j]: offs[j] + p.count * row])
                offs[j] += p.count * row

    def _transposed(self, ps: List[Piece], datas: List[Optional[np.ndarray]], offs: List[int],
                    n: int, el: int, n_embd: int) -> None:
        """One transposed V layer: ``n_embd`` rows of every cell's element, pieces side by side."""
        o = self.o
        dst = self.buf[o: o + n_embd * n * el].reshape(n_embd, n * el)
        self.mark(o, o + n_embd * n * el)
        col = 0
        for j, (p, d) in enumerate(zip(ps, datas)):
            w = p.count * el
            if not isinstance(p, _Pad):
                assert d is not None  # lazy pieces of transposed streams were refused
                dst[:, col:col + w] = d[offs[j]: offs[j] + n_embd * w].reshape(n_embd, w)
                offs[j] += n_embd * w
            col += w
        self.o += n_embd * n * el

    def finish(self) -> None:
        """Make the lazy pieces' bytes in their regions (read from their files, checked)."""
        for p, regs in self.regions.values():
            assert isinstance(p, LazyPiece)
            p.read_into([self.buf[a:a + n].data for a, n in regs])


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
    by_stream = _by_stream(shape, pieces)
    for ci, new_pos_min in (window_start or {}).items():
        keys = [k for k in by_stream if k[0] == ci]
        if len(keys) != 1:
            raise ValueError(f"cache {ci} has {len(keys)} streams with cells; cannot pad it")
        pad = _pad_piece(ci, keys[0][1], by_stream[keys[0]][0], new_pos_min, shape.seq_id)
        if pad is not None:
            by_stream[keys[0]].insert(0, pad)
    total = _blob_size(shape, by_stream)
    if out is not None:
        buf = out(total)
    else:
        padded = any(isinstance(p, _Pad) for ps in by_stream.values() for p in ps)
        buf = (np.zeros if padded else np.empty)(total, dtype=np.uint8)  # calloc: pads cost no writes
    a = _Assembly(buf, [] if written is None else written)
    a.put(struct.pack("<Ii", SEQ_MAGIC, shape.seq_id))
    for ci, streams in enumerate(shape.caches):
        a.put(struct.pack("<I", len(streams)))
        for si, sh in enumerate(streams):
            ps = by_stream.get((ci, si), [])
            if sh is None or not ps:
                a.put(struct.pack("<I", 0))
            else:
                a.stream(sh, ps)
    assert a.o == total
    a.finish()
    return buf
