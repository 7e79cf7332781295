"""Token blocks on disk: chain keys, block and tail payloads (records.py: the records).

An agent's KV is stored as immutable blocks plus a small tail:

- a **block** is one cache's cells for ``block_tokens`` positions ``j*B .. (j+1)*B-1``
  (a :class:`~agentkv._format.pieces.Piece`), named by the xxh3-128 digest of its payload, so equal
  bytes are stored once whoever wrote them;
- its **chain key** ``key(j) = xxh3_128(key(j-1) | tokens of block j)``, with
  ``key(-1) = fingerprint``, names the token prefix it belongs to: two blocks have the same
  chain key exactly when the whole prefix up to them is equal. Every block payload carries
  its chain key, so a block can never be assembled under another prefix;
- the **tail** holds what is not a whole block (the last partial block, pieces of streams
  that are not block-shaped), the token ids, the carried logits, the state's shape and the
  digest of the block keys it was saved with (:func:`blocks_digest`): blocks are checked by
  their own keys, so this binds the manifest's list to the tail without hashing the KV twice;
- a **record** (JSON) lists a stored state's chain keys and block keys per cache: an agent's
  manifest (with its tail), or a *cut*: the prefix ``0..n-1`` shared by several agents,
  stored with the SWA window that makes it restorable for a new agent.

Payloads (little-endian), each followed by 16 bytes of xxh3-128 of everything before::

    block:  b"AKVB" u16 version u16 at-rest format | 16 B fingerprint | 16 B chain key | u8 cache | u8 stream
            | u16 0 | u32 pos0 | u32 count | u32 cells_len | u64 data_len | data
    tail:   b"AKVT" u16 version u16 at-rest format | 16 B fingerprint | 16 B blocks digest | u32 n_tokens
            | u32 n_logits | u32 shape_len | u32 n_pieces | tokens i32 | logits f32 | shape JSON
            | n_pieces x (u8 cache u8 stream u16 0 u32 pos0 u32 count u32 cells_len u64 len)
            | piece data ...

The at-rest format (0: exact, else agentkv._store.atrest's code of a quantized row format) is in every
payload's header and must be the one the reader expects. Nothing here unpickles; every length
is checked before use (CorruptEntry otherwise).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import xxhash

from ..errors import CorruptEntry, FingerprintMismatch
from .._format.pieces import FilePiece, Piece, Shape
from .records import refuse_constant

__all__ = ["chain_keys", "BlockPayload", "seal_block", "decode_block",
           "open_block", "Tail", "encode_tail", "decode_tail", "blocks_digest"]

_DIGEST = 16
_BLOCK = struct.Struct("<4sHH16s16sBBHIIIQ")
_TAIL = struct.Struct("<4sHH16s16sIIII")
_PIECE = struct.Struct("<BBHIIIQ")
_VERSION = 3


def chain_keys(fingerprint: bytes, tokens: Any, block_tokens: int, n_blocks: Optional[int] = None
               ) -> List[bytes]:
    """Chain keys of the whole blocks of ``tokens`` (or of the first ``n_blocks``)."""
    toks = np.ascontiguousarray(tokens, dtype="<i4")
    full = toks.shape[0] // block_tokens
    n = full if n_blocks is None else min(n_blocks, full)
    keys: List[bytes] = []
    prev = fingerprint
    for j in range(n):
        h = xxhash.xxh3_128(prev)
        h.update(toks[j * block_tokens:(j + 1) * block_tokens].tobytes())
        prev = h.digest()
        keys.append(prev)
    return keys


def blocks_digest(first: Sequence[int], blocks: Sequence[Sequence[str]]) -> bytes:
    """xxh3-128 of a state's block keys, per cache with the index of its first block."""
    h = xxhash.xxh3_128()
    for f, keys in zip(first, blocks):
        h.update(json.dumps([f, list(keys)], separators=(",", ":")).encode())
    return h.digest()


def _seal(parts: Sequence[Any]) -> Tuple[bytes, str]:
    h = xxhash.xxh3_128()
    for p in parts:
        h.update(p)
    digest = h.digest()
    return b"".join([*parts, digest]), digest.hex()  # join takes any buffer: one copy


def _check_magic(view: Any, magic: bytes, what: str, rest: int) -> None:
    if bytes(view[:4]) != magic:
        raise CorruptEntry(f"not an agentkv {what} (bad magic)")
    version, flags = struct.unpack_from("<HH", view, 4)
    if version != _VERSION:
        raise CorruptEntry(f"{what} format version {version} is not supported")
    if flags != rest:
        raise CorruptEntry(f"{what} is stored in at-rest format {flags}, expected {rest}")


def _open(payload: Any, magic: bytes, what: str, key: Optional[str], rest: int) -> memoryview:
    view = memoryview(payload).cast("B")
    if view.nbytes < 8 + _DIGEST:
        raise CorruptEntry(f"{what} truncated: {view.nbytes} bytes")
    _check_magic(view, magic, what, rest)
    digest = xxhash.xxh3_128(view[:-_DIGEST]).digest()
    if digest != bytes(view[-_DIGEST:]):
        raise CorruptEntry(f"{what} checksum mismatch")
    if key is not None and digest.hex() != key:
        raise CorruptEntry(f"{what} does not match the key it is stored under")
    return view


# -- blocks ---------------------------------------------------------------------------------

class BlockPayload:
    """A block's payload, named by its digest before its bytes are joined: a save hashes
    the blocks it already holds without copying them, and joins only the ones it writes."""

    __slots__ = ("key", "nbytes", "_parts", "_digest")

    def __init__(self, parts: Sequence[Any]) -> None:
        h = xxhash.xxh3_128()
        for p in parts:
            h.update(p)
        self._digest = h.digest()
        self._parts = parts
        self.key = self._digest.hex()
        self.nbytes = sum(memoryview(p).nbytes for p in parts) + _DIGEST

    def __bytes__(self) -> bytes:
        return b"".join(self.parts())  # join takes any buffer: one copy

    def parts(self) -> List[Any]:
        """The payload's buffers in order (its bytes, unjoined)."""
        return [*self._parts, self._digest]


def seal_block(cache: int, stream: int, pos0: int, count: int, cells_len: int,
               parts: Sequence[Any], chain: bytes, fingerprint: bytes, rest: int = 0) -> BlockPayload:
    """The payload of the block whose data is ``parts`` (contiguous buffers, joined in order)."""
    views = [np.ascontiguousarray(np.frombuffer(p, np.uint8)).data.cast("B") for p in parts]
    header = _BLOCK.pack(b"AKVB", _VERSION, rest, fingerprint, chain, cache, stream, 0,
                         pos0, count, cells_len, sum(v.nbytes for v in views))
    return BlockPayload([header, *views])


def decode_block(payload: Any, fingerprint: bytes, key: Optional[str], chain: bytes, cache: int,
                 pos0: int, count: int, rest: int = 0) -> Piece:
    """Check a block against everything its reader expects; return its piece."""
    view = _open(payload, b"AKVB", "block", key, rest)
    s, cells_len, data_len = _block_fields(view, view.nbytes, fingerprint, key, chain, cache,
                                           pos0, count)
    return Piece(cache, s, pos0, count, cells_len, view[_BLOCK.size:_BLOCK.size + data_len])


def _block_fields(view: Any, size: int, fingerprint: bytes, key: Optional[str], chain: bytes,
                  cache: int, pos0: int, count: int) -> Tuple[int, int, int]:
    """Check a block header against its reader's expectations: (stream, cells_len, data_len)."""
    if size < _BLOCK.size + _DIGEST:
        raise CorruptEntry("block truncated")
    (_, _, _, fp, ch, c, s, _, p0, n, cells_len, data_len) = _BLOCK.unpack_from(view, 0)
    if fp != fingerprint:
        raise FingerprintMismatch("block was written under another fingerprint")
    if _BLOCK.size + data_len + _DIGEST != size or cells_len > data_len:
        raise CorruptEntry("block length fields disagree with its size")
    if ch != chain or c != cache or p0 != pos0 or n != count:
        raise CorruptEntry(f"block {key} is not block {pos0 // max(count, 1)} of this prefix")
    return s, cells_len, data_len


def open_block(f: Any, fingerprint: bytes, key: str, chain: bytes, cache: int, pos0: int,
               count: int, rest: int = 0) -> FilePiece:
    """A stored block, still in its open file ``f``, as a :class:`~agentkv._format.pieces.FilePiece`:
    its header is checked now, its digest once assembly has read its bytes into place."""
    fd = f.fileno()
    if hasattr(os, "posix_fadvise"):  # a restore opens all its blocks first: from a cold disk
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)  # they are then read in parallel
    size = os.fstat(fd).st_size
    header = os.pread(fd, _BLOCK.size, 0)
    if len(header) < 8:
        raise CorruptEntry(f"block truncated: {len(header)} bytes")
    _check_magic(header, b"AKVB", "block", rest)
    s, cells_len, data_len = _block_fields(header, size, fingerprint, key, chain, cache, pos0, count)

    def verify(views: List[memoryview]) -> None:
        h = xxhash.xxh3_128(header)
        for v in views:
            h.update(v)
        digest = h.digest()
        if digest != os.pread(fd, _DIGEST, _BLOCK.size + data_len):
            raise CorruptEntry("block checksum mismatch")
        if digest.hex() != key:
            raise CorruptEntry("block does not match the key it is stored under")

    verify.payload = "blk/" + key  # type: ignore[attr-defined]
    return FilePiece(cache, s, pos0, count, cells_len, (f, _BLOCK.size, data_len, verify))


# -- tails ----------------------------------------------------------------------------------

@dataclass
class Tail:
    """The part of a stored state that is not whole blocks, plus what identifies the state."""

    tokens: np.ndarray
    logits: Optional[np.ndarray]
    shape: Shape
    pieces: List[Piece]
    digest: bytes  # blocks_digest of the block keys saved with this tail


def encode_tail(tail: Tail, fingerprint: bytes, rest: int = 0) -> Tuple[bytes, str]:
    tokens = np.ascontiguousarray(tail.tokens, dtype="<i4")
    logits = (np.zeros(0, "<f4") if tail.logits is None
              else np.ascontiguousarray(tail.logits, dtype="<f4"))
    shape = json.dumps(tail.shape.to_json(), separators=(",", ":")).encode()
    datas = [np.ascontiguousarray(np.frombuffer(p.data, np.uint8)).data.cast("B")
             for p in tail.pieces]
    table = b"".join(_PIECE.pack(p.cache, p.stream, 0, p.pos0, p.count, p.cells_len, d.nbytes)
                     for p, d in zip(tail.pieces, datas))
    header = _TAIL.pack(b"AKVT", _VERSION, rest, fingerprint, tail.digest, tokens.shape[0],
                        logits.shape[0], len(shape), len(tail.pieces))
    return _seal([header, tokens.tobytes(), logits.tobytes(), shape, table, *datas])


def decode_tail(payload: Any, fingerprint: bytes, key: Optional[str] = None, rest: int = 0) -> Tail:
    view = _open(payload, b"AKVT", "tail", key, rest)
    end = view.nbytes - _DIGEST
    if end < _TAIL.size:
        raise CorruptEntry("tail truncated")
    _, _, _, fp, digest, n_tokens, n_logits, shape_len, n_pieces = _TAIL.unpack_from(view, 0)
    if fp != fingerprint:
        raise FingerprintMismatch(
            f"state was saved under fingerprint {fp.hex()}, this context is {fingerprint.hex()}")
    off = _TAIL.size
    fixed = 4 * n_tokens + 4 * n_logits + shape_len + _PIECE.size * n_pieces
    if off + fixed > end:
        raise CorruptEntry("tail length fields exceed its size")
    tokens = np.frombuffer(view, "<i4", n_tokens, off).astype(np.int32)
    off += 4 * n_tokens
    logits = np.frombuffer(view, "<f4", n_logits, off) if n_logits else None
    off += 4 * n_logits
    try:
        text = bytes(view[off:off + shape_len])
        shape = Shape.from_json(json.loads(text, parse_constant=refuse_constant))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CorruptEntry(f"tail shape does not parse: {exc}") from exc
    off += shape_len
    table = [_PIECE.unpack_from(view, off + i * _PIECE.size) for i in range(n_pieces)]
    off += _PIECE.size * n_pieces
    pieces = []
    for c, s, _, p0, n, cells_len, length in table:
        if off + length > end or cells_len > length:
            raise CorruptEntry("tail piece exceeds the tail")
        pieces.append(Piece(c, s, p0, n, cells_len, view[off:off + length]))
        off += length
    if off != end:
        raise CorruptEntry("tail has trailing bytes")
    return Tail(tokens, logits, shape, pieces, digest)


# -- records --------------------------------------------------------------------------------
