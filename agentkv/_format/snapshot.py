"""One agent's KV at one moment.

A :class:`Snapshot` is what leaves the llama context when an agent is evicted: the tokens the
context had evaluated and the sequence-state blob of their KV. It is immutable by convention,
so the RAM tier, the background writer and a restore can share it without copies. On disk it
becomes token blocks and a tail (blocks.py, store.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np

from . import seqstate
from . import pieces as seqpieces
from ..errors import CorruptEntry
from .image import RestoreImage

__all__ = ["Snapshot", "StoredPieces", "check_state"]

Buffer = Union[bytes, bytearray, memoryview, np.ndarray]


@dataclass(frozen=True)
class StoredPieces:
    """A state as read from disk: its shape and its pieces in position order, checked and
    not yet assembled (the engine assembles it in the layout it restores)."""

    shape: seqpieces.Shape
    pieces: Tuple[seqpieces.Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


@dataclass(frozen=True)
class Snapshot:
    """Tokens evaluated by the context, and the llama.cpp sequence state of their KV.

    Attributes:
        tokens: int32 token ids, ``tokens[i]`` sits at position ``i``.
        state: the blob from ``llama_state_seq_get_data`` (any buffer), its :class:`StoredPieces`
            (read from disk), or a :class:`~agentkv._format.image.RestoreImage` (held in RAM, laid out
            for the restore; ``nbytes`` counts the RAM it owns).
        logits: float32 logits after the last token, when the context had them; a restore
            that carries them lets the next turn sample at once instead of replaying a token.
        exact: positions ``0 .. exact-1`` hold the KV a cold prefill of any prompt that starts
            with these tokens computes, bit for bit (see :meth:`Engine.cold_exact`): the part
            another agent may share without departing from its own cold run.
        version: ``(generation, save id)`` of the stored manifest it was read from
            (``Record.gen``/``sid``), ``(0, "")`` for a snapshot taken from the context.
    """

    tokens: np.ndarray
    state: Union[Buffer, StoredPieces, RestoreImage]
    logits: Optional[np.ndarray] = None
    exact: int = 0
    version: Tuple[int, str] = (0, "")

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def nbytes(self) -> int:
        extra = 0 if self.logits is None else int(self.logits.nbytes)
        state = self.state
        if isinstance(state, (StoredPieces, RestoreImage, np.ndarray)):
            size = int(state.nbytes)
        else:
            size = memoryview(state).nbytes
        return int(self.tokens.nbytes) + size + extra


def check_state(state: Buffer, n_tokens: int) -> seqstate.SeqState:
    """Parse ``state`` and check that its first (full-attention) cache holds positions
    ``0 .. n_tokens-1`` exactly once; raise :class:`CorruptEntry` otherwise."""
    parsed = seqstate.parse(state)
    if n_tokens == 0:
        if any(c.cell_count for c in parsed.caches):
            raise CorruptEntry("state holds cells but the snapshot has no tokens")
        return parsed
    base = parsed.caches[0].only_stream()
    if base is None or base.cell_count != n_tokens or not base.is_contiguous or base.pos_min != 0:
        raise CorruptEntry(f"state does not hold positions 0..{n_tokens - 1} of its {n_tokens} tokens")
    for cache in parsed.caches[1:]:
        stream = cache.only_stream()
        if stream is not None and stream.pos_max != n_tokens - 1:
            raise CorruptEntry("state's caches disagree on the last position")
    return parsed
