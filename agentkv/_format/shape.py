"""The shapes and pieces of a sequence state: what the store keeps of a blob.

A blob is its *shape* (the seq id and, per cache and stream, the layer headers) plus, per
stream, a run of cells with one row of bytes per cell in every tensor. A :class:`Piece` is a
cell range of one stream with all of its bytes: the raw cell records, then each K layer's
rows, then each V layer's rows (a transposed V layer contributes its ``n_embd`` rows' slices
for the range, one after another). pieces.py cuts blobs into pieces and assembles them back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..errors import CorruptEntry
from .seqstate import MAX_STREAMS, SeqState, StreamSection

__all__ = ["StreamShape", "Shape", "Piece", "LazyPiece", "FilePiece", "shape_of", "piece_regions"]


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
