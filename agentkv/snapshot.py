"""One agent's KV at one moment, and its checksummed on-disk encoding.

A :class:`Snapshot` is what leaves the llama context when an agent is evicted: the tokens the
context had evaluated and the sequence-state blob of their KV. It is immutable by convention,
so the RAM tier, the background writer and a restore can share it without copies.

On disk a snapshot is one payload (little-endian)::

    magic b"AKVS" | u16 version | u16 flags | 16 B fingerprint | u32 n_tokens | u64 state_len
    | u32 n_logits | n_tokens x i32 token ids | state_len B sequence state
    | n_logits x f32 logits of the last token (0: none) | 16 B xxh3-128 of all that precedes

The digest is also the payload's content address (its key in the store), so a read checks that
the bytes are the ones that were written under that key. :func:`decode` checks, in order:
length, magic and version, the digest, the fingerprint, then the state's own structure and its
agreement with the token list. Nothing read from disk is ever unpickled.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import xxhash

from . import state as seqstate
from .errors import CorruptEntry, FingerprintMismatch

__all__ = ["Snapshot", "encode", "decode", "content_key", "check_state"]

Buffer = Union[bytes, bytearray, memoryview, np.ndarray]

_MAGIC = b"AKVS"
_VERSION = 2
_HEADER = struct.Struct("<4sHH16sIQI")
_DIGEST = 16


@dataclass(frozen=True)
class Snapshot:
    """Tokens evaluated by the context, and the llama.cpp sequence state of their KV.

    Attributes:
        tokens: int32 token ids, ``tokens[i]`` sits at position ``i``.
        state: the blob from ``llama_state_seq_get_data`` (any buffer).
        logits: float32 logits after the last token, when the context had them; a restore
            that carries them lets the next turn sample at once instead of replaying a token.
    """

    tokens: np.ndarray
    state: Buffer
    logits: Optional[np.ndarray] = None

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def nbytes(self) -> int:
        extra = 0 if self.logits is None else int(self.logits.nbytes)
        return int(self.tokens.nbytes) + memoryview(self.state).nbytes + extra


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


def encode(snapshot: Snapshot, fingerprint: bytes) -> bytes:
    """The checksummed payload of ``snapshot`` (see the module docstring)."""
    if len(fingerprint) != 16:
        raise ValueError("fingerprint must be 16 bytes")
    tokens = np.ascontiguousarray(snapshot.tokens, dtype="<i4")
    state = memoryview(snapshot.state).cast("B")
    logits = (np.zeros(0, "<f4") if snapshot.logits is None
              else np.ascontiguousarray(snapshot.logits, dtype="<f4"))
    header = _HEADER.pack(_MAGIC, _VERSION, 0, fingerprint, tokens.shape[0], state.nbytes,
                          logits.shape[0])
    h = xxhash.xxh3_128()
    for part in (header, tokens, state, logits):
        h.update(part)
    return b"".join((header, tokens.tobytes(), state, logits.tobytes(), h.digest()))


def content_key(payload: Buffer) -> str:
    """The store key of an encoded payload: the hex of its trailing digest."""
    view = memoryview(payload).cast("B")
    return bytes(view[-_DIGEST:]).hex()


def decode(payload: Buffer, fingerprint: bytes, key: Optional[str] = None) -> Snapshot:
    """Check ``payload`` and return its snapshot.

    Raises:
        CorruptEntry: truncated, wrong magic or version, digest mismatch (or not equal to
            ``key``), or a state that does not parse or disagrees with its tokens.
        FingerprintMismatch: a sound payload written under another fingerprint.
    """
    view = memoryview(payload).cast("B")
    if view.nbytes < _HEADER.size + _DIGEST:
        raise CorruptEntry(f"payload truncated: {view.nbytes} bytes")
    magic, version, _flags, fp, n_tokens, state_len, n_logits = _HEADER.unpack_from(view, 0)
    if magic != _MAGIC:
        raise CorruptEntry("payload is not an agentkv snapshot (bad magic)")
    if version != _VERSION:
        raise CorruptEntry(f"snapshot format version {version} is not supported (expected {_VERSION})")
    expected = _HEADER.size + 4 * n_tokens + state_len + 4 * n_logits + _DIGEST
    if view.nbytes != expected:
        raise CorruptEntry(f"payload is {view.nbytes} bytes, its header promises {expected}")
    digest = xxhash.xxh3_128(view[:-_DIGEST]).digest()
    if digest != bytes(view[-_DIGEST:]):
        raise CorruptEntry("payload checksum mismatch")
    if key is not None and digest.hex() != key:
        raise CorruptEntry("payload does not match the key it is stored under")
    if fp != fingerprint:
        raise FingerprintMismatch(
            f"snapshot was made under fingerprint {fp.hex()}, this context is {fingerprint.hex()}")
    off = _HEADER.size
    tokens = np.frombuffer(view, dtype="<i4", count=n_tokens, offset=off).astype(np.int32)
    off += 4 * n_tokens
    state = view[off: off + state_len]
    check_state(state, n_tokens)
    logits = None
    if n_logits:
        logits = np.frombuffer(view, dtype="<f4", count=n_logits, offset=off + state_len)
    return Snapshot(tokens=tokens, state=state, logits=logits)
