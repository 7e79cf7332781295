"""The restore layout: which bytes a snapshot keeps, and which bytes a restore loads.

An SWA model's context holds its sliding-window layers' cells at indices equal to their
positions; a sequence-state dump keeps only the window. ggml's attention kernels split the
KV by cell index, so an exact restore loads the *never-evicted* layout: masked zero cells in
front of the stored window (seqstate.py says why). This module is the one place that knows it:

- :func:`compact` trims a whole-context dump to what a snapshot keeps (the window plus a
  margin), or lays it out as a :class:`~agentkv._format.image.RestoreImage` for RAM;
- :func:`restore_bytes` gives, for any snapshot state (a blob, the pieces read from disk, a
  RAM image), the bytes ``llama_state_seq_set_data`` loads and the first position whose
  SWA-layer KV is real (the window start), built in the memory's reused image buffer.

Only a full-size SWA cache (``swa_full``) with one stream of simple, contiguous cells is laid
out; anything else is loaded as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import numpy as np

from ..errors import CorruptEntry
from . import pieces as seqpieces
from . import seqstate
from .buffers import ZeroedBuffer
from .image import RestoreImage, build_image
from .snapshot import StoredPieces, check_state

__all__ = ["Model", "compact", "keep_from", "restore_bytes"]


@dataclass(frozen=True)
class Model:
    """What the layout depends on in a context: the SWA window (0: none), whether its SWA
    cache is full-size (``swa_full``), and the sequence snapshots are taken of."""

    n_swa: int
    swa_full: bool
    seq_id: int = 0


def keep_from(model: Model, n: int, margin: int, block_tokens: int, window_start: int) -> int:
    """First position an SWA snapshot of ``n`` tokens keeps: ``margin`` positions more than
    the window the next token needs, from a multiple of ``block_tokens``, never below the
    context's own window start (0: keep everything)."""
    if model.n_swa <= 0:
        return 0
    B = max(1, block_tokens)
    return max(0, window_start, (max(0, n - model.n_swa + 1 - margin) // B) * B)


def compact(model: Model, whole: np.ndarray, n: int, start: int, image: bool
            ) -> Union[None, np.ndarray, RestoreImage]:
    """A whole-context dump (``seq_id`` -1, SWA-masked cells included) of ``n`` tokens as a
    snapshot keeps it: the SWA cache from position ``start``. ``image``: as a RestoreImage
    (its padding on the zero page) where this model is laid out and the kernel can back it.
    None when the dump is not one this layout knows (the caller keeps the plain state)."""
    parsed = seqstate.parse(whole)
    swa = parsed.caches[-1].only_stream()
    base = parsed.caches[0].only_stream()
    if not (len(parsed.caches) == 2 and swa is not None and base is not None
            and swa.simple_cells and base.simple_cells and swa.is_contiguous
            and swa.pos_min <= start and swa.pos_max == n - 1):
        return None
    if image and model.swa_full and swa.pos_min == 0:
        kept = build_image(whole, parsed, 1, start, model.seq_id)
        if kept is not None:
            return kept
    return seqstate.set_window_start(whole, parsed, 1, start, model.seq_id)


def restore_bytes(model: Model, state: Any, n: int, out: ZeroedBuffer) -> Tuple[Any, int]:
    """The bytes a restore of ``state`` (``n`` tokens) loads, checked, and their window start.
    Raises CorruptEntry when they do not hold positions ``0 .. n-1``."""
    if isinstance(state, RestoreImage):  # laid out and parsed when it was taken
        base = state.parsed.caches[0].only_stream()
        if base is None or base.cell_count != n:
            raise CorruptEntry(f"laid-out state does not hold the snapshot's {n} tokens")
        return state.buf, state.window_start
    if isinstance(state, StoredPieces):
        return _assemble(model, state, n, out)
    return _pad(model, state, check_state(state, n), n, out)


def _assemble(model: Model, stored: StoredPieces, n: int, out: ZeroedBuffer
              ) -> Tuple[np.ndarray, int]:
    """Pieces read from disk assembled straight into the never-evicted layout (one copy)."""
    shape, pieces = stored.shape, stored.pieces
    last = len(shape.caches) - 1
    swa = [p for p in pieces if p.cache == last] if model.n_swa > 0 and last > 0 else []
    window_start = min((p.pos0 for p in swa), default=0)
    pad_to: Optional[dict] = None
    if (n > 0 and window_start > 0 and model.swa_full and len({p.stream for p in swa}) == 1
            and all(p.cells_len == seqstate.CELL_BYTES * p.count for p in swa)):
        pad_to = {last: 0}
    try:
        blob = seqpieces.assemble(shape, pieces, pad_to, out=out.take, written=out.written)
    except CorruptEntry:
        raise  # keeps the key of the damaged payload
    except ValueError as exc:
        raise CorruptEntry(f"stored pieces do not assemble: {exc}") from exc
    parsed = check_state(blob, n)
    if pad_to is not None:
        stream = parsed.caches[last].only_stream()
        if stream is None or not stream.is_contiguous or stream.pos_min != 0:
            raise CorruptEntry("stored SWA cells are not one contiguous run")
    return blob, window_start


def _pad(model: Model, blob: Any, parsed: seqstate.SeqState, n: int, out: ZeroedBuffer
         ) -> Tuple[Any, int]:
    """A compact blob padded to the never-evicted layout where this model is laid out."""
    if n == 0 or model.n_swa <= 0 or len(parsed.caches) < 2:
        return blob, 0
    swa = parsed.caches[-1].only_stream()
    if swa is None or swa.pos_min <= 0:
        return blob, 0
    if model.swa_full and swa.simple_cells and swa.is_contiguous:
        return seqstate.set_window_start(blob, parsed, len(parsed.caches) - 1, 0, out=out.take,
                                         written=out.written), swa.pos_min
    return blob, swa.pos_min
