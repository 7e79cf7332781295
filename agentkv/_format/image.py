"""A RAM snapshot kept in the layout it is restored in, its padding costing no RAM.

An exact restore of an SWA model loads, in its SWA cache, masked zero cells in front of the
window (layout.load_from: from a few hundred cells up to the never-evicted layout, ~3.5x the
bytes of the snapshot at 4,000 tokens of Gemma 3 270M), and building it at restore time is a
copy inside the returning agent's time to first token. :func:`build_image` builds it once, when the
snapshot is taken, in a private anonymous mapping: the bytes that are data are copied in (the
same copy a compact snapshot makes), and the page-aligned insides of the zero runs are
populated read-only with the kernel's shared zero page (``MADV_POPULATE_READ``). Those pages
cost no RAM, do not count in RSS, and take no page fault when llama.cpp reads them; huge pages
are refused for the mapping (a huge page would make the padding resident).

What such a snapshot owns is :attr:`RestoreImage.nbytes`, the data pages: about the compact size.
Where the kernel lacks ``MADV_POPULATE_READ`` (before Linux 5.14, or not Linux) :func:`build_image`
returns None and the caller keeps the compact snapshot.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import mmap
from typing import List, Optional, Tuple

import numpy as np

from . import seqstate
from . import pieces as seqpieces

__all__ = ["MappedOut", "RestoreImage", "ZERO_PAGE", "ZeroPage", "build_image", "seal", "zero_runs"]

log = logging.getLogger(__name__)

_MADV_NOHUGEPAGE = getattr(mmap, "MADV_NOHUGEPAGE", 15)


class ZeroPage:
    """What the kernel offers for backing padding with its zero page: the ``madvise`` advice
    that populates a range read-only (``MADV_POPULATE_READ``, Linux >= 5.14) and whether it
    works here (None until the first attempt, then learnt once)."""

    def __init__(self) -> None:
        self.advice: int = getattr(mmap, "MADV_POPULATE_READ", 22)
        self.supported: Optional[bool] = None


ZERO_PAGE = ZeroPage()


class RestoreImage:
    """A sequence-state blob laid out as a never-evicted context holds it.

    ``buf`` is what ``llama_state_seq_set_data`` loads (the SWA cache ``cache`` holds cells
    from :attr:`load_from`, those below ``window_start`` masked zeros); ``parsed`` is its parse. Its compact form
    (``set_window_start(buf, parsed, cache, window_start)``) is what the store splits into blocks.
    """

    __slots__ = ("buf", "parsed", "cache", "window_start", "nbytes")

    @property
    def load_from(self) -> int:
        """The first position of its SWA cells (layout.load_from)."""
        st = self.parsed.caches[self.cache].only_stream()
        return st.pos_min if st is not None else 0

    def __init__(self, buf: np.ndarray, parsed: seqstate.SeqState, cache: int, window_start: int,
                 nbytes: int) -> None:
        self.buf = buf
        self.parsed = parsed
        self.cache = cache
        self.window_start = window_start
        self.nbytes = nbytes  # bytes of RAM it owns: its data pages, not the zero pages

    def split_views(self, block_tokens: int):
        """:func:`pieces.split_views` of the compact form, without making it (views of ``buf``)."""
        return seqpieces.split_views(self.buf, block_tokens, self.parsed,
                                    window_start={self.cache: self.window_start})


def _row_runs(spans: List[Tuple[int, seqstate.Span]], n_cells: int, z: int
              ) -> List[Tuple[int, int]]:
    """Byte ranges of the rows of the first ``z`` of ``n_cells`` cells, for each span (at its
    start offset) of one stream."""
    runs: List[Tuple[int, int]] = []
    for start, sp in spans:
        if sp.el_size == 0:
            runs.append((start, start + z * sp.row_size))
        else:  # transposed V: one run per embedding row
            row = n_cells * sp.el_size
            runs.extend((start + r * row, start + r * row + z * sp.el_size)
                        for r in range(sp.n_embd))
    return [(a, b) for a, b in runs if b > a]


def zero_runs(parsed: seqstate.SeqState, cache: int, window_start: int) -> List[Tuple[int, int]]:
    """Byte ranges of the rows of the SWA cells below ``window_start`` (the padding)."""
    st = parsed.caches[cache].only_stream()
    assert st is not None
    return _row_runs([(sp.start, sp) for sp in st.k + st.v], st.cell_count,
                     window_start - st.pos_min)


def _trimmed_runs(st: seqstate.StreamSection, load_from: int, window_start: int
                  ) -> List[Tuple[int, int]]:
    """:func:`zero_runs` of the blob ``set_window_start(.., load_from)`` would make of a stream
    (cells dropped from its front, or zero cells added there), from the stream's own offsets."""
    shift = load_from - st.pos_min  # cells dropped (negative: added)
    spans, shrink = [], seqstate.CELL_BYTES  # bytes per dropped cell before a span's start
    for sp in st.k + st.v:
        spans.append((sp.start - shift * shrink, sp))
        shrink += (sp.end - sp.start) // st.cell_count
    return _row_runs(spans, st.cell_count - shift, window_start - load_from)


def build_image(whole: np.ndarray, parsed: seqstate.SeqState, cache: int, window_start: int,
                seq_id: int, load_from: int = 0) -> Optional[RestoreImage]:
    """The layout a restore loads of a whole-context dump whose SWA cache ``cache`` holds one
    contiguous run of cells up to ``n-1`` from at most ``window_start`` (from 0 in a context
    that was prefilled; from the padding of its restore in one that was restored): the cells
    from ``load_from`` on (layout.load_from; zero cells are added in front where the dump
    starts above it), those below ``window_start`` zeroed, the header naming ``seq_id``.

    Returns None where the kernel cannot back the padding with the zero page.
    """
    if ZERO_PAGE.supported is False:
        return None
    st = parsed.caches[cache].only_stream()
    if st is None or not st.simple_cells or not st.is_contiguous \
            or not (0 <= load_from < window_start and st.pos_min <= window_start <= st.pos_max):
        raise ValueError("build_image needs one SWA run of simple cells holding the window")
    per_cell = seqstate.CELL_BYTES + sum((sp.end - sp.start) // st.cell_count
                                         for sp in st.k + st.v)
    size = int(whole.nbytes) - (load_from - st.pos_min) * per_cell
    page = mmap.PAGESIZE
    out = MappedOut()
    try:
        buf = out.take(size)  # its views keep the mapping alive; unmapped with the last one
    except OSError as exc:  # out of address space or commit charge: this snapshot stays compact
        log.debug("no mapping for a laid-out snapshot (%s); keeping it compact", exc)
        return None
    zero = _zero_back(out, _trimmed_runs(st, load_from, window_start))
    if zero is None:
        return None
    # writes every byte but the zero runs' rows (the padding stays on the zero page)
    seqstate.set_window_start(whole, parsed, cache, load_from, seq_id, out=lambda _: buf,
                              zero_below=window_start)
    kept = (seqstate.parse(buf) if load_from != st.pos_min
            else dataclasses.replace(parsed, seq_id=seq_id))
    return RestoreImage(buf, kept, cache, window_start,
                     -(-size // page) * page - zero)


class MappedOut:
    """Where an assembly writes a restore image: a private anonymous mapping of the size
    asked for, none of its pages touched, so that the padding the assembly leaves unwritten
    can stay on the kernel's zero page (:func:`seal`). The ``take`` / ``written`` pair of
    :class:`~agentkv._format.buffers.ZeroedBuffer`."""

    def __init__(self) -> None:
        self.mm: Optional[mmap.mmap] = None
        self.buf: Optional[np.ndarray] = None
        self.written: List[Tuple[int, int]] = []

    def take(self, nbytes: int) -> np.ndarray:
        self.mm = mmap.mmap(-1, max(1, nbytes), flags=mmap.MAP_PRIVATE)
        self.mm.madvise(_MADV_NOHUGEPAGE)
        self.buf = np.frombuffer(self.mm, dtype=np.uint8)[:nbytes]
        return self.buf


def _zero_back(out: MappedOut, runs: List[Tuple[int, int]]) -> Optional[int]:
    """Populate the page-aligned insides of ``runs`` (byte ranges of ``out``'s mapping, none
    written yet) read-only with the kernel's zero page; the bytes so backed, or None where
    the kernel cannot (learnt once for this kernel) or the call failed."""
    assert out.mm is not None
    page = mmap.PAGESIZE
    zero = 0
    try:
        for a, b in runs:
            a, b = -(-a // page) * page, b // page * page
            if b > a:
                out.mm.madvise(ZERO_PAGE.advice, a, b - a)
                zero += b - a
    except (OSError, AttributeError) as exc:
        if isinstance(exc, AttributeError) or exc.errno == errno.EINVAL:  # not this kernel's
            log.info("RAM snapshots stay compact: the zero page cannot back their padding (%s)",
                     exc)
            ZERO_PAGE.supported = False
        else:
            log.debug("could not back a snapshot's padding (%s); keeping it compact", exc)
        return None
    ZERO_PAGE.supported = True
    return zero


def seal(out: MappedOut, window_start: int) -> Optional[RestoreImage]:
    """A RestoreImage of the blob assembled into ``out`` whose last (SWA) cache holds masked
    cells below ``window_start``, their rows never written: those rows are put on the zero
    page (no RAM, and no page fault when llama.cpp reads them). None where there is no such
    padding or the kernel cannot back it (the caller keeps the blob as it is)."""
    if ZERO_PAGE.supported is False or out.buf is None:
        return None
    parsed = seqstate.parse(out.buf)
    cache = len(parsed.caches) - 1
    st = parsed.caches[cache].only_stream() if cache > 0 else None
    if st is None or st.pos_min >= window_start:
        return None
    zero = _zero_back(out, zero_runs(parsed, cache, window_start))
    if zero is None:
        return None
    page = mmap.PAGESIZE
    return RestoreImage(out.buf, parsed, cache, window_start,
                        -(-out.buf.nbytes // page) * page - zero)
