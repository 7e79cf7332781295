"""Keys of the disk tier's rows, and what a refused record's fingerprint tells."""

from __future__ import annotations

import os
from typing import Dict, Optional

import xxhash

from ..errors import CorruptEntry
from .records import Record

__all__ = ["Overlay", "agent_key", "file_identity", "mismatch", "overlaid", "record_key"]

_SAMPLE = 64 << 10

Overlay = Dict[str, Optional[bytes]]  # payloads read from the shared tier (None: not there)


def agent_key(agent_id: str) -> str:
    return "agent/" + xxhash.xxh3_128_hexdigest(agent_id.encode("utf-8", "surrogatepass"))


def record_key(r: Record) -> str:
    return agent_key(r.name) if r.kind == "agent" else "cut/" + r.name


def file_identity(path: str) -> str:
    """A string that changes when the file at ``path`` is replaced or rewritten: path, device,
    inode, size, modification and change times, and the xxh3 of 18 samples of its bytes."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        h = xxhash.xxh3_128()
        size = st.st_size
        for i in range(18):
            off = 0 if i == 0 else size - _SAMPLE if i == 17 else (size * i) // 17
            h.update(os.pread(f.fileno(), _SAMPLE, max(0, off)))
    return (f"{os.path.abspath(path)}\0{st.st_dev}\0{st.st_ino}\0{size}\0{st.st_mtime_ns}"
            f"\0{st.st_ctime_ns}\0{h.hexdigest()}")


def mismatch(agent_id: str, r: Record, here: str) -> str:
    """Why agent ``agent_id``'s record ``r`` (another fingerprint) cannot be restored on a
    machine whose compute description is ``here``."""
    if r.compute and here and r.compute != here:
        return (f"agent {agent_id!r} was saved by another machine or llama.cpp build, whose "
                f"kernels compute other KV and logits than this one's ({r.compute.split(' |')[0]}:"
                f" {r.compute}; here {here.split(' |')[0]}: {here})")
    return f"agent {agent_id!r} was saved by another model or context configuration"


def overlaid(overlay: Overlay, key: str) -> bytes:
    value = overlay[key]
    if value is None:
        raise CorruptEntry(f"payload {key} is missing from the shared tier")
    return value
