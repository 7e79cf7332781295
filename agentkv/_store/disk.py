"""The disk tier: content-addressed token blocks, agent manifests and shared cuts on diskcache.

Layout of the diskcache under ``cache_dir`` (keys are strings, values raw bytes; blocks.py has
the payload formats)::

    blk/<xxh3-128 hex>     one cache's KV for one token block, named by its own digest
    kv/<xxh3-128 hex>      an agent's tail: partial block, tokens, logits, shape, block-list digest
    agent/<xxh3-128 hex>   an agent's manifest (JSON record): chain keys, block keys, tail key
    cut/<chain key hex>    a shared prefix (JSON record) stored with its SWA window
    model/<xxh3-128 hex>   a cached content hash of a GGUF file, keyed by path, size and mtime
    lock/store             the cross-process write lock (expires, so a killed holder frees it)

Saves are incremental: a block whose key is already stored is not written again, so a save
writes the blocks completed since the last one plus the tail. Equal blocks of different
agents (a shared system prompt) are stored once.

Crash safety: a save writes blocks, then the tail, then the record; diskcache commits a row
only after its file is written. A process killed in the middle leaves unreferenced blocks
(collected later), never a record pointing at missing or half-written data. Reads are
lock-free and check everything (digests, chain keys, the tail's digest of the block list).

Collection: payloads no record references are deleted. Records of other processes count:
before deleting, the collector re-reads every record on disk under the cross-process lock,
which every writer also holds from its first block to its record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional, Tuple

import numpy as np

from .._format.snapshot import Snapshot
from .keys import agent_key, file_identity, mismatch
from .reads import StoreReads
from .records import Record
from .writes import StoreWrites

__all__ = ["DiskStore", "NoDisk", "agent_key", "file_identity", "mismatch"]


class DiskStore(StoreWrites, StoreReads):
    """The disk tier (base.py: the database and its index; writes.py; reads.py)."""


class NoDisk:
    """The disk tier when the cache folder cannot be opened at all (a full disk, an I/O
    error): nothing is stored or found, so agents live in the context and RAM only."""

    nbytes = 0
    damaged_db = None

    def __init__(self, directory: Path, reason: str) -> None:
        self.directory = directory
        self.reason = reason

    def db_bytes(self) -> int:
        return 0

    def agents(self) -> List[Tuple[Record, int]]:
        return []

    def cuts(self) -> List[Record]:
        return []

    def has_agent(self, agent_id: str) -> bool:
        return False

    def manifest(self, agent_id: str) -> Optional[Record]:
        return None

    def missing(self, keys: Iterable[str]) -> List[str]:
        return list(keys)

    def chain_of(self, tokens: np.ndarray, fingerprint: bytes) -> List[str]:
        return []

    def read_ahead(self, agent_id: str) -> int:
        return 0

    def get(self, *args: Any, **kwargs: Any) -> Tuple[Optional[Snapshot], int]:
        return None, 0

    def find_prefix(self, *args: Any, **kwargs: Any
                    ) -> Tuple[Optional[Snapshot], int, Optional[str]]:
        return None, 0, None

    def plan_cut(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def put(self, *args: Any, **kwargs: Any) -> Tuple[Optional[Record], int]:
        raise OSError(f"the cache folder {self.directory} could not be opened ({self.reason})")

    put_cut = put

    def drop(self, agent_id: str) -> bool:
        return False

    def discard_damaged(self, payload: str) -> List[str]:
        return []

    def collect(self) -> int:
        return 0

    def sweep(self) -> int:
        return 0

    def garbage(self) -> Tuple[int, int]:
        return 0, 0

    def unheld_payloads(self) -> List[str]:
        return []

    def stray_files(self, fix: bool = False) -> List[str]:
        return []

    def drop_record(self, key: str) -> None:
        pass

    def recover(self, exc: BaseException) -> bool:
        return False

    def model_hash(self, path: str, compute: Callable[[str], str]) -> str:
        return compute(path)

    def close(self) -> None:
        pass
