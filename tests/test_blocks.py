"""Token blocks: the split/assemble property, the block/tail/record codecs, and fuzzing every
reader of bytes from disk (each must raise CorruptEntry, never crash or read out of bounds)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from agentkv import CorruptEntry, FingerprintMismatch
from agentkv._format import seqstate
from agentkv._format import pieces as seqpieces
from agentkv._store.records import Record
from agentkv._store.payloads import (Tail, blocks_digest, chain_keys, decode_block, decode_tail,
                                    encode_tail, seal_block)
from blobgen import blobs, joined

FP = bytes(range(16))


def encode_block(piece, chain, fingerprint, rest=0):
    """One piece sealed as the store seals a whole block: its payload and content key."""
    block = seal_block(piece.cache, piece.stream, piece.pos0, piece.count, piece.cells_len,
                       [piece.data], chain, fingerprint, rest)
    return bytes(block), block.key
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(blob=blobs(), block_tokens=st.integers(1, 64))
def test_assemble_of_split_is_the_blob(blob, block_tokens):
    shape, pieces = joined(seqpieces.split_views(blob, block_tokens))
    assert bytes(seqpieces.assemble(shape, pieces)) == blob
    assert seqpieces.Shape.from_json(shape.to_json()) == shape
    for prev, p in zip(pieces, pieces[1:]):  # inside a stream, pieces start on block bounds
        if (prev.cache, prev.stream) == (p.cache, p.stream):
            assert p.pos0 % block_tokens == 0 and prev.pos0 + prev.count <= p.pos0


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(blob=blobs(), block_tokens=st.integers(1, 16))
def test_block_and_tail_codecs_round_trip(blob, block_tokens):
    shape, pieces = joined(seqpieces.split_views(blob, block_tokens))
    tokens = np.arange(64, dtype=np.int32)
    chain = chain_keys(FP, tokens, 4)
    back = []
    for i, p in enumerate(pieces):
        payload, key = encode_block(p, chain[i % len(chain)], FP)
        q = decode_block(payload, FP, key, chain[i % len(chain)], p.cache, p.pos0, p.count)
        assert bytes(q.data) == bytes(np.frombuffer(p.data, np.uint8)) and q.stream == p.stream
        back.append(q)
    payload, key = encode_tail(Tail(tokens, np.ones(7, np.float32), shape, back, blocks_digest([0], [['blk/x']])), FP)
    tail = decode_tail(payload, FP, key)
    assert bytes(seqpieces.assemble(tail.shape, tail.pieces)) == blob
    assert tail.digest == blocks_digest([0], [['blk/x']]) and np.array_equal(tail.tokens, tokens)
    with pytest.raises(FingerprintMismatch):
        decode_tail(payload, bytes(16))


def test_block_is_bound_to_its_prefix_and_place():
    piece = seqpieces.Piece(0, 0, 64, 32, 32 * 12, np.zeros(32 * 12 + 32 * 64, np.uint8))
    chain = chain_keys(FP, np.arange(128, dtype=np.int32), 32)
    payload, key = encode_block(piece, chain[2], FP)
    decode_block(payload, FP, key, chain[2], 0, 64, 32)
    for args in [(chain[1], 0, 64, 32), (chain[2], 1, 64, 32), (chain[2], 0, 96, 32)]:
        with pytest.raises(CorruptEntry):
            decode_block(payload, FP, key, *args)
    with pytest.raises(CorruptEntry):
        decode_block(payload, FP, "0" * 32, chain[2], 0, 64, 32)
    with pytest.raises(FingerprintMismatch):
        decode_block(payload, bytes(16), key, chain[2], 0, 64, 32)


def test_chain_keys_name_the_whole_prefix():
    a = np.arange(100, dtype=np.int32)
    b = a.copy()
    b[5] = 999  # differs in block 0: every later key differs too
    ka, kb = chain_keys(FP, a, 10), chain_keys(FP, b, 10)
    assert len(ka) == 10 and all(x != y for x, y in zip(ka, kb))
    c = a.copy()
    c[95] = 7  # differs in the last block only
    assert chain_keys(FP, c, 10)[:9] == ka[:9] and chain_keys(FP, c, 10)[9] != ka[9]
    assert chain_keys(bytes(16), a, 10)[0] != ka[0]  # the fingerprint starts the chain


def _mutate(data, raw: bytes) -> bytes:
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 6))):
        if not buf:
            break
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    return bytes(buf[: data.draw(st.integers(0, len(buf)))])


@FUZZ
@given(blob=blobs(), data=st.data())
def test_fuzz_parser_raises_only_corrupt_entry(blob, data):
    try:
        parsed = seqstate.parse(_mutate(data, blob))
    except CorruptEntry:
        return
    assert parsed.nbytes <= len(blob)


@FUZZ
@given(blob=blobs(max_cells=8), data=st.data())
def test_fuzz_tail_and_block_readers(blob, data):
    shape, pieces = joined(seqpieces.split_views(blob, 4))
    tail, tkey = encode_tail(Tail(np.arange(9, dtype=np.int32), None, shape, pieces,
                                  blocks_digest([0], [[]])), FP)
    bad = _mutate(data, tail)
    try:
        t = decode_tail(bad, FP)  # no key: only the digest guards it
        seqpieces.assemble(t.shape, t.pieces)
    except CorruptEntry:
        pass
    if not pieces:
        return
    chain = chain_keys(FP, np.arange(8, dtype=np.int32), 4)
    block, bkey = encode_block(pieces[0], chain[0], FP)
    try:
        decode_block(_mutate(data, block), FP, None, chain[0], pieces[0].cache,
                     pieces[0].pos0, pieces[0].count)
    except CorruptEntry:
        pass


@FUZZ
@given(data=st.data())
def test_fuzz_record_reader(data):
    h = [f"{i:032x}" for i in range(4)]  # digests as agentkv writes them: 32 hex digits
    good = Record("agent", "a", 300, 64, [h[0]] * 4, [0, 2],
                  [["blk/" + h[1]] * 4, ["blk/" + h[2]] * 2], FP.hex(), 1.0, tail="kv/" + h[3],
                  shape={"seq_id": 0, "caches": []})
    assert Record.from_bytes(good.to_bytes()) == good
    try:
        Record.from_bytes(_mutate(data, good.to_bytes()))
    except CorruptEntry:
        pass
