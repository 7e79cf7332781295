"""The reused buffers of a memory's hot paths, and their one owner, :class:`Buffers`.

A fresh 20 MB numpy buffer costs ~5,000 page faults the first time it is written (~2 us each
on a VM, inside a returning agent's time to first token); these keep their pages mapped from
one turn to the next and grow on demand (never shrink). One turn runs at a time, so one set
serves a memory: the engine dumps states into ``dump`` and lays restores out in ``image``,
the disk tier reads payloads into ``reads``.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

__all__ = ["Buffers", "GrowBuffer", "ReadArena", "ZeroedBuffer"]


class GrowBuffer:
    """``take(n)``: the first ``n`` bytes of a buffer that grows (by ``slack``) when short."""

    def __init__(self, slack: int = 3) -> None:
        self.buf = np.empty(0, dtype=np.uint8)
        self._slack = slack  # grow to n + n >> slack

    @property
    def nbytes(self) -> int:
        return int(self.buf.nbytes)

    def _grow(self, nbytes: int) -> None:
        self.buf = np.empty(nbytes + (nbytes >> self._slack), dtype=np.uint8)

    def take(self, nbytes: int) -> np.ndarray:
        if self.buf.nbytes < nbytes:
            self._grow(nbytes)
        return self.buf[:nbytes]


class ZeroedBuffer(GrowBuffer):
    """A buffer that reads as zeros wherever the last user did not write: ``take`` returns
    zeros, the user notes what it writes in :attr:`written`, and :meth:`zero` clears those
    ranges again (after a restore, off the next one's path)."""

    def __init__(self) -> None:
        super().__init__(slack=2)
        self.written: List[Tuple[int, int]] = []

    def _grow(self, nbytes: int) -> None:
        self.buf = np.zeros(nbytes + (nbytes >> 2), dtype=np.uint8)
        self.written.clear()

    def take(self, nbytes: int) -> np.ndarray:
        if self.buf.nbytes < nbytes:
            self._grow(nbytes)
        self.zero()
        return self.buf[:nbytes]

    def zero(self) -> None:
        for a, b in self.written:
            self.buf[a:b] = 0
        self.written.clear()

    def reserve(self, nbytes: int) -> None:
        """Grow to ``nbytes`` now, touching every page (so the next ``take`` faults none)."""
        if self.buf.nbytes < nbytes:
            self._grow(nbytes)
            self.buf.fill(0)  # written, so its pages are this process's from now on

    def any(self) -> bool:
        """Does any byte read other than zero? (After :meth:`zero` none may.)"""
        return bool(self.buf.any())


class ReadArena(GrowBuffer):
    """Many reads of one restore, each a view of one buffer: views stay valid until
    :meth:`reset`; a read that does not fit goes to a buffer of its own, and the next reset
    grows the arena to what the last round needed."""

    def __init__(self) -> None:
        super().__init__(slack=4)
        self._used = 0
        self._wanted = 0

    def reset(self) -> None:
        if self._wanted > self.buf.nbytes:
            self._grow(self._wanted)
        self._used = self._wanted = 0

    def take(self, nbytes: int) -> np.ndarray:
        self._wanted += nbytes
        if self._used + nbytes > self.buf.nbytes:
            return np.empty(nbytes, dtype=np.uint8)
        view = self.buf[self._used:self._used + nbytes]
        self._used += nbytes
        return view


class Buffers:
    """The three reused buffers of one memory (see the module's docstring)."""

    def __init__(self) -> None:
        self.dump = GrowBuffer()
        self.image = ZeroedBuffer()
        self.reads = ReadArena()

    def after_turn(self) -> None:
        """Ready the image buffer for the next restore, outside its time to first token: zero
        what the last restore wrote, and grow it to the live context's laid-out size (a
        whole-context dump is that large, and sized ``dump``)."""
        self.image.zero()
        self.image.reserve(self.dump.nbytes)
