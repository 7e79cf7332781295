"""The restore layout: which bytes a snapshot keeps, and which bytes a restore loads.

An SWA model's context holds its sliding-window layers' cells at indices equal to their
positions; a sequence-state dump keeps only the window. ggml's attention kernels split the
KV by cell index, so an exact restore loads masked zero cells in front of the stored window,
as many as :func:`load_from` finds the kernels need (seqstate.py says why; at most the whole
*never-evicted* layout). This module is the one place that knows it:

- :func:`compact` trims a whole-context dump to what a snapshot keeps (the window plus a
  margin), or lays it out as a :class:`~agentkv._format.image.RestoreImage` for RAM;
- :func:`restore_bytes` gives, for any snapshot state (a blob, the pieces read from disk, a
  RAM image), the bytes ``llama_state_seq_set_data`` loads and the first position whose
  SWA-layer KV is real (the window start), built in the memory's reused image buffer.

Only a full-size SWA cache (``swa_full``) with one stream of simple, contiguous cells is laid
out; anything else is loaded as it is.

How much padding is enough (:func:`load_from`) is read from ggml's CPU kernels (llama.cpp as
llama-cpp-python 0.3.36 vendors it) and proven against them by ``benchmarks/kv_equivalence.py
--matrix``. A future query at position ``q`` attends, in an SWA layer, to the cells of positions
``q - n_swa + 1 .. q`` (the rest are masked, and a masked cell's data never reaches a result):

- flash attention with f16 (or f32) K and V of one type: a one-token decode over ``n_kv >= 512``
  cells splits the cells into ``ceil(n_kv / n_threads)``-cell chunks, one per thread, and merges
  the chunks' partial softmaxes in order (``ggml_compute_forward_flash_attn_ext_f16``), where
  ``n_kv`` is the highest used cell + 1 padded to 256 (``llama_kv_cache::get_n_kv``); a batch of
  64 or more queries walks tiles of 64 cells from cell 0 (``GGML_FA_TILE_KV``); anything else
  walks every cell in order. A restore whose cells sit ``shift`` cells lower than the
  never-evicted context's is exact when ``shift`` is a multiple of 64 and every future decode
  cuts its window at the same positions as the never-evicted context would, up to a full context;
- flash attention with other K/V types (q8_0, q4_0): every query walks every cell in order, so
  only the order matters and no padding is needed;
- anything else (flash attention off or undecided, a model the proof has not covered): the
  never-evicted layout itself (index == position).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, List, Optional, Tuple, Union

import numpy as np

from ..errors import CorruptEntry
from . import pieces as seqpieces
from . import seqstate
from .buffers import ZeroedBuffer
from .image import MappedOut, RestoreImage, build_image, seal
from .snapshot import StoredPieces, check_state

__all__ = ["Model", "SPLIT", "ORDERED", "FIXED", "assemble_image", "compact", "keep_from", "load_from",
           "restore_bytes"]

SPLIT = "split"  # flash attention, f16/f32 K and V of one type: split-KV decode, 64-cell tiles
ORDERED = "ordered"  # flash attention, other K/V types: cells walked in order, nothing else
FIXED = "fixed"  # anything else: the never-evicted layout, index == position
_TILE = 64  # GGML_FA_TILE_KV
_SPLIT_MIN = 512  # a one-query decode splits the KV from this many cells
_KV_PAD = 256  # llama_kv_cache::get_n_kv pads n_kv to this


@dataclass(frozen=True)
class Model:
    """What the layout depends on in a context: the SWA window (0: none), whether its SWA
    cache is full-size (``swa_full``), the sequence snapshots are taken of, the cache's cells
    (the context size) and how its attention walks them (SPLIT, ORDERED or FIXED)."""

    n_swa: int
    swa_full: bool
    seq_id: int = 0
    size: int = 0
    attention: str = FIXED


def _n_kv(used: int, size: int) -> int:
    return min(size, max(_KV_PAD, -(-used // _KV_PAD) * _KV_PAD))


def _cuts(n_kv: int, n_threads: int, lo: int, hi: int, shift: int) -> List[int]:
    """Positions in ``lo..hi`` where a one-query decode over ``n_kv`` cells starts a chunk,
    its cells sitting ``shift`` cells below their positions."""
    if n_kv < _SPLIT_MIN or n_threads <= 1:
        return []
    cs = -(-n_kv // n_threads)
    first = max(1, -(-(lo - shift) // cs))
    return [k * cs + shift for k in range(first, (n_kv - 1) // cs + 1) if k * cs + shift <= hi]


def _same_cuts(model: Model, n: int, shift: int, n_threads: int) -> bool:
    """Whether every one-query decode from position ``n`` to the context's end cuts its SWA
    window at the same positions with cells ``shift`` lower as with index == position."""
    q, W, size = n, model.n_swa, model.size
    while q < size:
        n0, n1 = _n_kv(q + 1, size), _n_kv(q - shift + 1, size)
        # the last query with these n_kv (either grows when its highest cell passes it)
        last = min(n0 - 1 if n0 < size else size - 1, n1 - 1 + shift if n1 < size else size - 1)
        lo, hi = q - W + 2, last  # a cut between two window cells, for some query q..last
        if _cuts(n0, n_threads, lo, hi, 0) != _cuts(n1, n_threads, lo, hi, shift):
            return False
        q = last + 1
    return True


@lru_cache(maxsize=512)  # a snapshot's save and its restores ask the same; the search is ~ms
def load_from(model: Model, n: int, window_start: int, n_threads: int) -> int:
    """The first position an exact restore of ``n`` tokens loads into an SWA cache whose real
    cells start at ``window_start`` (cells below it are masked zeros), for a context decoding
    with ``n_threads`` threads: 0 is the never-evicted layout, ``window_start`` no padding
    (also where the SWA cache is not full-size: it is loaded as it is)."""
    if model.n_swa <= 0 or window_start <= 0 or not model.swa_full or model.attention == ORDERED:
        return window_start
    if model.attention == FIXED:
        return 0
    for shift in range(window_start // _TILE * _TILE, 0, -_TILE):
        if _same_cuts(model, n, shift, n_threads):
            return shift
    return 0


def keep_from(model: Model, n: int, margin: int, block_tokens: int, window_start: int) -> int:
    """First position an SWA snapshot of ``n`` tokens keeps: ``margin`` positions more than
    the window the next token needs, from a multiple of ``block_tokens``, never below the
    context's own window start (0: keep everything)."""
    if model.n_swa <= 0:
        return 0
    B = max(1, block_tokens)
    return max(0, window_start, (max(0, n - model.n_swa + 1 - margin) // B) * B)


def compact(model: Model, whole: np.ndarray, n: int, start: int, image: bool, n_threads: int
            ) -> Union[None, np.ndarray, RestoreImage]:
    """A whole-context dump (``seq_id`` -1, SWA-masked cells included) of ``n`` tokens as a
    snapshot keeps it: the SWA cache from position ``start``. ``image``: as a RestoreImage
    (its padding on the zero page) laid out for a context decoding with ``n_threads``, where
    this model needs padding and the kernel can back it. None when the dump is not one this
    layout knows (the caller keeps the plain state)."""
    parsed = seqstate.parse(whole)
    swa = parsed.caches[-1].only_stream()
    base = parsed.caches[0].only_stream()
    if not (len(parsed.caches) == 2 and swa is not None and base is not None
            and swa.simple_cells and base.simple_cells and swa.is_contiguous
            and swa.pos_min <= start and swa.pos_max == n - 1):
        return None
    first = load_from(model, n, start, n_threads)
    if image and first < start:
        kept = build_image(whole, parsed, 1, start, model.seq_id, first)
        if kept is not None:
            return kept
    return seqstate.set_window_start(whole, parsed, 1, start, model.seq_id)


def assemble_image(model: Model, stored: StoredPieces, n: int, n_threads: int
                   ) -> Union[np.ndarray, RestoreImage]:
    """Stored pieces (a prefetch's read; blocks still in their files are read into place and
    checked there) assembled straight into the layout a restore loads for a context decoding
    with ``n_threads``: a RestoreImage in a private mapping whose padding is the zero page, so
    that the restore loads it with no copy and its RAM is the data's. A plain blob where this
    model needs no padding or the kernel cannot back it. Raises CorruptEntry as a restore's
    assembly does."""
    out = MappedOut()
    blob, window_start = _assemble(model, stored, n, out, n_threads)
    image = seal(out, window_start)
    return blob if image is None else image  # no padding: every page of the mapping is data


def restore_bytes(model: Model, state: Any, n: int, out: ZeroedBuffer, n_threads: int
                  ) -> Tuple[Any, int]:
    """The bytes a restore of ``state`` (``n`` tokens) into a context decoding with
    ``n_threads`` loads, checked, and their window start. Raises CorruptEntry when they do not
    hold positions ``0 .. n-1``."""
    if isinstance(state, RestoreImage):  # laid out and parsed when it was taken
        base = state.parsed.caches[0].only_stream()
        if base is None or base.cell_count != n:
            raise CorruptEntry(f"laid-out state does not hold the snapshot's {n} tokens")
        first = load_from(model, n, state.window_start, n_threads)
        if first == state.load_from:
            return state.buf, state.window_start
        # the thread count changed since it was laid out: lay it out again (one copy)
        return seqstate.set_window_start(state.buf, state.parsed, state.cache, first,
                                         out=out.take, written=out.written,
                                         zero_below=state.window_start), state.window_start
    if isinstance(state, StoredPieces):
        return _assemble(model, state, n, out, n_threads)
    return _pad(model, state, check_state(state, n), n, out, n_threads)


def _assemble(model: Model, stored: StoredPieces, n: int,
              out: Union[ZeroedBuffer, MappedOut], n_threads: int) -> Tuple[np.ndarray, int]:
    """Pieces read from disk assembled straight into the layout a restore loads (one copy)."""
    shape, pieces = stored.shape, stored.pieces
    last = len(shape.caches) - 1
    swa = [p for p in pieces if p.cache == last] if model.n_swa > 0 and last > 0 else []
    window_start = min((p.pos0 for p in swa), default=0)
    pad_to: Optional[dict] = None
    first = load_from(model, n, window_start, n_threads) if n > 0 else window_start
    if (first < window_start and len({p.stream for p in swa}) == 1
            and all(p.cells_len == seqstate.CELL_BYTES * p.count for p in swa)):
        pad_to = {last: first}
    try:
        blob = seqpieces.assemble(shape, pieces, pad_to, out=out.take, written=out.written)
    except CorruptEntry:
        raise  # keeps the key of the damaged payload
    except ValueError as exc:
        raise CorruptEntry(f"stored pieces do not assemble: {exc}") from exc
    parsed = check_state(blob, n)
    if pad_to is not None:
        stream = parsed.caches[last].only_stream()
        if stream is None or not stream.is_contiguous or stream.pos_min != first:
            raise CorruptEntry("stored SWA cells are not one contiguous run")
    return blob, window_start


def _pad(model: Model, blob: Any, parsed: seqstate.SeqState, n: int, out: ZeroedBuffer,
         n_threads: int) -> Tuple[Any, int]:
    """A compact blob padded to the layout a restore loads where this model needs it."""
    if n == 0 or model.n_swa <= 0 or len(parsed.caches) < 2:
        return blob, 0
    swa = parsed.caches[-1].only_stream()
    if swa is None or swa.pos_min <= 0:
        return blob, 0
    first = load_from(model, n, swa.pos_min, n_threads)
    if first < swa.pos_min and swa.simple_cells and swa.is_contiguous:
        return seqstate.set_window_start(blob, parsed, len(parsed.caches) - 1, first,
                                         out=out.take, written=out.written), swa.pos_min
    return blob, swa.pos_min
