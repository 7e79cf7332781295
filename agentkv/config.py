"""Configuration of an AgentMemory: one frozen dataclass, sizes parsed once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from .errors import ConfigError

__all__ = ["MemoryConfig", "parse_size"]

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
