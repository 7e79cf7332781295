"""Records on disk: an agent's manifest or a shared cut, as JSON (payloads.py has the blocks
and tails they name). Every field is validated when a record is read; nothing unpickles."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..errors import CorruptEntry

__all__ = ["Record", "refuse_constant"]

_RECORD_VERSION = 3


@dataclass
class Record:
    """A stored state: an agent's manifest (``tail`` set) or a shared cut (``tail`` None).

    ``blocks[c]`` are cache ``c``'s block keys for block indices ``first[c] ..``; the base
    cache's start at 0 and cover every whole block, an SWA cache's only its stored window.
    ``chain`` holds the chain key of every whole block (hex).
    """

    kind: str  # "agent" or "cut"
    name: str  # the agent id, or the hex chain key of the cut's last block
    n_tokens: int
    block_tokens: int
    chain: List[str]
    first: List[int]
    blocks: List[List[str]]
    fingerprint: str
    saved_at: float
    tail: Optional[str] = None
    shape: Optional[Dict[str, Any]] = None  # the shape to assemble with
    # positions 0..exact-1 hold the KV a cold prefill of any prompt starting with these tokens
    # computes, bit for bit (evaluated from 0 in whole n_batch batches; see Engine.cold_exact)
    exact: int = 0
    # which save of the agent this is: its generation (one more than the state it continued)
    # and a random id of the save (two workers that continued one generation differ in it);
    # the shared tier accepts a manifest only over an older generation (shared.py)
    gen: int = 0
    sid: str = ""
    # the machine and llama.cpp build that computed it (settings.compute), for a clear refusal
    compute: str = ""
    last_used: float = field(default=0.0, compare=False)

    def keys(self) -> List[str]:
        """Every payload key this record holds on to."""
        out = [k for ks in self.blocks for k in ks]
        if self.tail is not None:
            out.append(self.tail)
        return out

    def covers(self, cache: int) -> Tuple[int, int]:
        """Block indices ``[lo, hi)`` whose blocks of ``cache`` this record stores."""
        lo = self.first[cache]
        return lo, lo + len(self.blocks[cache])

    def to_bytes(self) -> bytes:
        d = {"v": _RECORD_VERSION, "kind": self.kind, "name": self.name, "n_tokens": self.n_tokens,
             "block_tokens": self.block_tokens, "chain": self.chain, "first": self.first,
             "blocks": self.blocks, "fp": self.fingerprint, "saved_at": self.saved_at,
             "tail": self.tail, "shape": self.shape, "exact": self.exact}
        if self.gen or self.sid:
            d["gen"], d["sid"] = self.gen, self.sid
        if self.compute:
            d["compute"] = self.compute
        return json.dumps(d, separators=(",", ":"), allow_nan=False).encode("utf-8", "surrogatepass")

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Record":
        """Parse a record strictly: bounded size, finite numbers, every field of its type and in
        range; anything else (deep nesting included) is CorruptEntry, never OverflowError,
        RecursionError or a hang."""
        if not isinstance(raw, (bytes, bytearray)) or len(raw) > _RECORD_MAX:
            raise CorruptEntry("record is not bytes or is larger than any record agentkv writes")
        try:
            text = bytes(raw).decode("utf-8", "surrogatepass")
            d = json.loads(text, parse_constant=refuse_constant)  # too deep: RecursionError
            if isinstance(d, dict) and type(d.get("v")) is int and d["v"] > _RECORD_VERSION:
                err = CorruptEntry(f"record version {d['v']} is newer than this agentkv's")
                err.future = True  # another agentkv's: never dropped as damage
                raise err
            if not isinstance(d, dict) or d.get("v") != _RECORD_VERSION:
                raise CorruptEntry(f"record version {d.get('v') if isinstance(d, dict) else d!r} "
                                   "is not supported")
            r = cls(kind=_str(d["kind"]), name=_str(d["name"]), n_tokens=_int(d["n_tokens"]),
                    block_tokens=_int(d["block_tokens"]), chain=_strs(d["chain"]),
                    first=[_int(x) for x in _list(d["first"])],
                    blocks=[_strs(b) for b in _list(d["blocks"])],
                    fingerprint=_str(d["fp"]), saved_at=_float(d["saved_at"]),
                    tail=None if d.get("tail") is None else _str(d["tail"]),
                    shape=d.get("shape"), exact=_int(d.get("exact", 0)),
                    gen=_int(d.get("gen", 0)), sid=_str(d.get("sid", "")),
                    compute=_str(d.get("compute", "")))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            if isinstance(exc, CorruptEntry):
                raise
            raise CorruptEntry(f"record does not parse: {exc}") from exc
        ok = (r.kind in ("agent", "cut") and r.block_tokens > 0 and _hex32(r.fingerprint)
              and all(_hex32(c) for c in r.chain)
              and len(r.first) == len(r.blocks) and all(k.startswith("blk/") and _hex32(k[4:])
                                                         for ks in r.blocks for k in ks)
              and len(r.chain) * r.block_tokens <= r.n_tokens and r.exact <= r.n_tokens
              and all(f + len(b) <= len(r.chain) for f, b in zip(r.first, r.blocks))
              and (r.tail is None or (r.tail.startswith("kv/") and _hex32(r.tail[3:])))
              and (r.shape is None or isinstance(r.shape, dict)) and len(r.sid) <= 64
              and len(r.compute) <= 4096
              and (r.kind == "agent") == (r.tail is not None))
        if not ok:
            raise CorruptEntry("record fields are inconsistent")
        r.last_used = r.saved_at
        return r


_RECORD_MAX = 64 << 20  # a 1M-token agent's record is ~10 MB
_HEX = frozenset("0123456789abcdef")


def _hex32(s: str) -> bool:
    """A 128-bit digest as agentkv writes it: 32 lowercase hex digits."""
    return len(s) == 32 and _HEX.issuperset(s)


def refuse_constant(name: str) -> Any:
    raise CorruptEntry(f"record holds {name}, which agentkv never writes")


def _int(x: Any) -> int:
    if type(x) is not int or not 0 <= x < (1 << 40):
        raise CorruptEntry(f"record field {x!r} is not a count")
    return x


def _float(x: Any) -> float:
    if type(x) not in (int, float) or not math.isfinite(x) or x < 0:
        raise CorruptEntry(f"record field {x!r} is not a time")
    return float(x)


def _str(x: Any) -> str:
    if type(x) is not str:
        raise CorruptEntry(f"record field {x!r} is not a string")
    return x


def _list(x: Any) -> list:
    if type(x) is not list:
        raise CorruptEntry(f"record field {type(x).__name__} is not a list")
    return x


def _strs(x: Any) -> List[str]:
    return [_str(v) for v in _list(x)]
