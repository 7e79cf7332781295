"""agentkv: persistent KV memory for multi-agent llama.cpp inference on CPUs.

>>> from agentkv import AgentMemory                                          # doctest: +SKIP
>>> mem = AgentMemory(llm, cache_dir="~/.cache/agentkv", ram_budget="1GiB")  # doctest: +SKIP
>>> mem.create_chat_completion("coder", messages=[...], temperature=0)       # doctest: +SKIP
"""

from ._version import __version__
from .config import MemoryConfig, SharedTier, parse_size
from .errors import (AgentKVError, ConfigError, CorruptEntry, FingerprintMismatch, InvalidAgentId,
                     MemoryClosed, NotACache, NotALlama, RestoreFailed, StoreBusy, TurnInProgress,
                     UnknownAgent, UnsupportedLlamaCpp)
from ._llama.draft import NgramDraft
from ._memory.inspection import Inspection
from .memory import AgentMemory
from .stats import AgentInfo, MemoryStats, TurnRecord


__all__ = [
    "AgentMemory",
    "Inspection",
    "AgentInfo",
    "MemoryStats",
    "TurnRecord",
    "MemoryConfig",
    "NgramDraft",
    "SharedTier",
    "parse_size",
    "AgentKVError",
    "ConfigError",
    "CorruptEntry",
    "FingerprintMismatch",
    "InvalidAgentId",
    "MemoryClosed",
    "NotACache",
    "NotALlama",
    "RestoreFailed",
    "StoreBusy",
    "TurnInProgress",
    "UnknownAgent",
    "UnsupportedLlamaCpp",
    "__version__",
]
