"""Pieces at rest: float16 K and V rows transcoded to a quantized row format and back.

``AgentMemory(at_rest="q8_0" | "q4_0" | "q4_1" | "iq4_nl")`` stores the float16 KV of a live
f16 cache in that format on disk and restores it to float16: smaller, not exact (opt-in; see
``benchmarks/kv_density.py --quality`` for what it costs). Only float16 tensors are transcoded, each
layer's bytes of a piece as one run of values (rows of 32-value groups: K, and V with flash
attention on; along the cells of each dimension for a transposed V); tensors of other types
(a live q8_0 cache) and cell records are stored as they are.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from ..errors import ConfigError, CorruptEntry
from .._format.pieces import LazyPiece, Piece, Shape, piece_regions

__all__ = ["CODES", "code_of", "to_rest", "from_rest", "RestPiece"]

GGML_F16 = 1
CODES: Dict[str, int] = {"q8_0": 1, "q4_0": 2, "q4_1": 3, "iq4_nl": 4}
_NAMES = {v: k for k, v in CODES.items()}


def code_of(at_rest: Optional[str]) -> int:
    """The header code of an at-rest format (0: exact); ConfigError for unknown names."""
    if at_rest is None or at_rest == "exact":
        return 0
    if at_rest not in CODES:
        raise ConfigError(f"at_rest={at_rest!r} is not a format; use None (exact) or one of "
                          f"{', '.join(CODES)}")
    return CODES[at_rest]


def _transcoded(n: int, t: int) -> bool:
    return t == GGML_F16 and n % 64 == 0  # whole groups of 32 float16 values


def to_rest(shape: Shape, piece: Piece, code: int) -> Piece:
    """``piece`` with its float16 tensors in the at-rest format ``code``."""
    if code == 0:
        return piece
    from .._quant import kernels as quant
    fmt = _NAMES[code]
    data = np.frombuffer(piece.data, dtype=np.uint8)
    parts: List[np.ndarray] = [data[:piece.cells_len]]
    for off, n, t in piece_regions(shape, piece):
        region = data[off:off + n]
        parts.append(np.frombuffer(quant.encode(region, fmt), np.uint8) if _transcoded(n, t) else region)
    return Piece(piece.cache, piece.stream, piece.pos0, piece.count, piece.cells_len,
                 np.concatenate(parts))


class RestPiece(LazyPiece):
    """A piece still in its at-rest form, its sizes checked: :func:`~agentkv._format.pieces.assemble`
    decodes it straight into its places in the blob (no float16 copy of its own).

    ``data`` is ``(src, fmt, runs)``: the at-rest bytes, the format, and per K/V region the
    ``(offset in src, stored size, float16 size, transcoded)``.
    """

    @property
    def nbytes(self) -> int:
        return self.cells_len + sum(n for _, _, n, _ in self.data[2])

    def read_into(self, views: List[memoryview]) -> None:
        from .._quant import kernels as quant
        src, fmt, runs = self.data
        if len(views) != 1 + len(runs) or memoryview(views[0]).nbytes != self.cells_len:
            raise CorruptEntry("at-rest piece regions do not match its shape")
        np.frombuffer(views[0], dtype=np.uint8)[:] = src[:self.cells_len]
        for view, (i, size, n, transcoded) in zip(views[1:], runs):
            out = np.frombuffer(view, dtype=np.uint8)
            if out.nbytes != n:
                raise CorruptEntry("at-rest piece regions do not match its shape")
            if transcoded:
                quant.decode(src[i:i + size], fmt, out=out)
            else:
                out[:] = src[i:i + size]


def from_rest(shape: Shape, piece: Piece, code: int, lazy: bool = False) -> Piece:
    """The float16 piece back from its at-rest form (raises CorruptEntry on a size mismatch).

    ``lazy``: a :class:`RestPiece` that assembly decodes in place (streams whose V is not
    transposed; others are decoded here)."""
    if code == 0:
        return piece
    from .._quant import kernels as quant
    fmt = _NAMES[code]
    src = np.frombuffer(piece.data, dtype=np.uint8)
    regions = piece_regions(shape, piece)
    runs = []
    i = piece.cells_len
    for off, n, t in regions:
        size = quant.encoded_size(n // 2, fmt) if _transcoded(n, t) else n
        if i + size > src.size:
            raise CorruptEntry("at-rest piece is shorter than its shape says")
        runs.append((i, size, n, _transcoded(n, t)))
        i += size
    if i != src.size:
        raise CorruptEntry("at-rest piece is longer than its shape says")
    rest = RestPiece(piece.cache, piece.stream, piece.pos0, piece.count, piece.cells_len,
                     (src, fmt, runs))
    if lazy and not shape.caches[piece.cache][piece.stream].v_trans:  # type: ignore[union-attr]
        return rest
    out = np.empty(rest.nbytes, dtype=np.uint8)
    views = [out[:piece.cells_len].data] + [out[off:off + n].data
                                                   for off, n, _ in regions]
    rest.read_into(views)
    return Piece(piece.cache, piece.stream, piece.pos0, piece.count, piece.cells_len, out)
