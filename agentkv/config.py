"""Configuration of an AgentMemory: one frozen dataclass, sizes parsed once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .errors import ConfigError

__all__ = ["MemoryConfig", "SharedTier", "parse_size", "shared_config"]

SizeLike = Union[int, str]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: SizeLike, name: str = "size") -> int:
    """Bytes from an int or a string such as ``"512MiB"``, ``"1.5 GB"``, ``"0"``.

    >>> parse_size("1GiB")
    1073741824
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a byte count or a size string, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{name} must not be negative, got {value}")
        if value >= 1 << 63:
            raise ConfigError(f"{name}={value} is larger than any size agentkv can hold")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be an int or a string like '512MiB', not {type(value).__name__}")
    match = _SIZE_RE.match(value)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"{name}={value!r} is not a size; use bytes or a number with a unit "
            f"({', '.join(u for u in ('KiB', 'MiB', 'GiB', 'TiB', 'KB', 'MB', 'GB'))})"
        )
    number = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not number < 2.0 ** 63:  # also catches the inf that "1" * 400 parses to
        raise ConfigError(f"{name}={value[:40]!r}{'...' if len(value) > 40 else ''} is larger "
                          "than any size agentkv can hold")
    return int(number)


@dataclass(frozen=True)
class MemoryConfig:
    """Settings of one AgentMemory.

    Attributes:
        cache_dir: folder of the disk tier (created if missing).
        ram_budget: bytes of snapshots kept in RAM, the live agent excluded; 0 sends every
            returning agent through disk.
        disk_budget: bytes of KV payloads kept on disk; the least recently used agents go first.
        block_tokens: positions per stored block (the unit of sharing and incremental saves).
    """

    cache_dir: Path
    ram_budget: int
    disk_budget: int
    block_tokens: int = 256

    @classmethod
    def create(
        cls,
        cache_dir: Union[str, Path],
        ram_budget: SizeLike,
        disk_budget: SizeLike,
        block_tokens: int = 256,
    ) -> "MemoryConfig":
        if not isinstance(cache_dir, (str, Path)) or str(cache_dir) == "":
            raise ConfigError(f"cache_dir must be a path, not {cache_dir!r}")
        if "\0" in str(cache_dir):
            raise ConfigError(f"cache_dir must not contain a NUL character: {str(cache_dir)!r}")
        if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or \
                not 16 <= block_tokens <= 65536:
            raise ConfigError(f"block_tokens must be an int in 16..65536, not {block_tokens!r}")
        return cls(
            cache_dir=Path(cache_dir).expanduser(),
            ram_budget=parse_size(ram_budget, "ram_budget"),
            disk_budget=parse_size(disk_budget, "disk_budget"),
            block_tokens=block_tokens,
        )


@dataclass(frozen=True)
class SharedTier:
    """Where and how agents' KV is shared between processes and machines.

    ``AgentMemory(llm, shared="redis://host:6379/0")`` is ``shared=SharedTier("redis://...")``.

    Attributes:
        url: a ``redis://`` (or ``rediss://``, ``unix://``) URL, as redis-py reads it.
        namespace: prefix of every key; default ``agentkv:<hash of fingerprint and salt>``.
        salt: tenants with different salts never share a key (nor a block).
        timeout: seconds a connect or a read may take before the call fails (bounded wait).
        ttl: seconds before a manifest or payload expires (refreshed when published again),
            or None (default) to leave eviction to the server's ``maxmemory-policy``.
        lease: seconds a turn's lease lasts if its worker dies before publishing.
        wait: seconds a turn waits for another worker's turn of the same agent to publish.
    """

    url: str
    namespace: Optional[str] = None
    salt: Optional[str] = None
    timeout: float = 1.0
    ttl: Optional[int] = None
    lease: float = 60.0
    wait: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or "://" not in self.url:
            raise ConfigError(f"shared must be a redis:// URL or a SharedTier, not {self.url!r}")
        for name in ("namespace", "salt"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v or len(v) > 200):
                raise ConfigError(f"{name} must be a non-empty string of at most 200 characters")
        for name in ("timeout", "lease", "wait"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 86400 * 30:
                raise ConfigError(f"{name} must be a positive number of seconds, not {v!r}")
        if self.ttl is not None and (isinstance(self.ttl, bool) or not isinstance(self.ttl, int)
                                     or self.ttl <= 0):
            raise ConfigError(f"ttl must be None or a positive int of seconds, not {self.ttl!r}")


def shared_config(value: Any) -> Optional[SharedTier]:
    if value is None or isinstance(value, SharedTier):
        return value
    if isinstance(value, str):
        return SharedTier(value)
    raise ConfigError(f"shared must be None, a redis:// URL or a SharedTier, not {value!r}")
