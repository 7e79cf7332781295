"""Exceptions raised by agentkv.

The tree, drawn once::

    AgentKVError                       root of everything agentkv raises
    ├── ConfigError(ValueError)        a bad budget string, a bad option value
    ├── InvalidAgentId(ValueError)     an empty or non-string agent id
    ├── UnknownAgent(KeyError)         an agent id the memory does not hold
    ├── NotALlama(TypeError)           AgentMemory was handed something that is not a Llama
    ├── MemoryClosed(RuntimeError)     a call on an AgentMemory after close()
    ├── TurnInProgress(RuntimeError)   a nested turn in the thread that holds the context
    ├── CorruptEntry(ValueError)       a stored entry failed its checksum or its parse
    ├── FingerprintMismatch(ValueError) a stored entry was made by another model or context
    ├── RestoreFailed(RuntimeError)    llama.cpp refused a state that passed every check
    ├── NotACache(ValueError)          a folder that is not an agentkv cache (ls/verify/gc refuse it)
    ├── StoreBusy(TimeoutError)        the cache's cross-process write lock was not freed in time
    └── UnsupportedLlamaCpp(RuntimeError) the installed llama.cpp writes a state format agentkv
                                       does not know

Errors on the restore path (CorruptEntry, FingerprintMismatch, RestoreFailed), and anything the
store raises (a full disk, a damaged database, StoreBusy), never reach a caller of a turn:
AgentMemory logs them, counts them in its stats and prefills. They are public so that
the store's own tools (``verify``) can report them.
"""

from __future__ import annotations

__all__ = [
    "AgentKVError",
    "ConfigError",
    "InvalidAgentId",
    "UnknownAgent",
    "NotALlama",
    "MemoryClosed",
    "TurnInProgress",
    "CorruptEntry",
    "FingerprintMismatch",
    "RestoreFailed",
    "NotACache",
    "StoreBusy",
    "UnsupportedLlamaCpp",
]


class AgentKVError(Exception):
    """Root of every exception agentkv raises."""


class ConfigError(AgentKVError, ValueError):
    """A configuration value is malformed or out of range."""


class InvalidAgentId(AgentKVError, ValueError):
    """An agent id is not a non-empty string."""


class UnknownAgent(AgentKVError, KeyError):
    """The memory holds no agent with this id."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "unknown agent"


class NotALlama(AgentKVError, TypeError):
    """AgentMemory wraps ``llama_cpp.Llama`` instances only."""


class MemoryClosed(AgentKVError, RuntimeError):
    """The AgentMemory was closed."""


class TurnInProgress(AgentKVError, RuntimeError):
    """This thread already holds the context for a turn (an open stream or agent() block)."""


class CorruptEntry(AgentKVError, ValueError):
    """A stored entry is truncated, fails its checksum, or does not parse.

    ``payload``: the store key of the damaged payload, where it is known (the store then
    drops that payload and every record that names it, so that the next save rewrites it).
    """

    payload: "str | None" = None
    record: "str | None" = None  # the key of the record being read, where it is known
    future = False  # written by a newer agentkv: not damage


class FingerprintMismatch(AgentKVError, ValueError):
    """A stored entry belongs to another model or context configuration."""


class RestoreFailed(AgentKVError, RuntimeError):
    """llama.cpp refused to load a sequence state."""


class NotACache(AgentKVError, ValueError):
    """A folder holds other files and no agentkv cache: agentkv will not write or delete there."""


class StoreBusy(AgentKVError, TimeoutError):
    """The cache's cross-process write lock was held by a live process for too long."""


class UnsupportedLlamaCpp(AgentKVError, RuntimeError):
    """The installed llama.cpp writes a sequence-state layout agentkv was not written for."""
