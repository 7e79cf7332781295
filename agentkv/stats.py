"""What AgentMemory reports: the agents it holds, its counters, what the last turn did."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

__all__ = ["SOURCES", "AgentInfo", "MemoryStats", "TurnRecord"]

SOURCES = ("live", "ram", "prefetch", "disk", "shared", "prefix", "cold")


@dataclass(frozen=True)
class AgentInfo:
    """One agent the memory holds.

    Attributes:
        agent_id: the id given by the caller.
        n_tokens: tokens of context its KV covers.
        tier: where its newest KV is: "live" (the context), "ram" or "disk".
        nbytes: bytes its KV takes in that tier.
        last_used: wall-clock time of its last turn (or of its last save, from disk).
    """

    agent_id: str
    n_tokens: int
    tier: str
    nbytes: int
    last_used: float


@dataclass
class MemoryStats:
    """Counters since the AgentMemory was opened.

    Attributes:
        turns: turns run (calls and ``agent()`` blocks).
        hits: turns counted by where the agent's KV came from:
            "live", "ram", "prefetch" (read from disk into RAM in the background before
            the turn: ``mem.prefetch`` or ``prefetch=True``), "disk", "shared" (the shared
            tier: another worker's turn),
            "prefix" (a stored prefix, from disk or the shared tier), "cold".
        prompt_tokens_evaluated: prompt tokens the model evaluated.
        prompt_tokens_restored: prompt tokens served from restored KV instead.
        bytes_read: payload bytes read from disk.
        bytes_written: payload bytes written to disk.
        restore_seconds: time spent restoring (disk reads, checks, set_data).
        save_seconds: time spent saving (snapshots and disk writes, background included).
        rejected: stored entries refused (corrupt, truncated, foreign fingerprint).
        store_errors: operations the disk tier failed (a full disk, a damaged database, a
            lock held too long); each is logged, and the turn went on without it.
        ram_bytes: bytes of snapshots in the RAM tier now.
        disk_bytes: bytes of payloads on disk now.
        disk_db_bytes: bytes of the cache's SQLite files now (``disk_budget`` bounds them
            together with the payloads).
        agents: agents the memory holds now.
        draft_tokens: tokens drafted (self-draft decoding, ``draft="ngram"``).
        draft_accepted: drafted tokens the model agreed with (each saved a decode step).
        draft_rejected: drafted tokens it did not (their KV was dropped).
        shared_bytes_read: payload bytes read from the shared tier (``shared=``).
        shared_bytes_sent: payload bytes sent to it (blocks it lacked, tails).
        shared_refused: saves it refused because another worker had published a newer
            turn of the agent (the agent's next turn continues from that one).
        shared_missing: restores that found a payload gone from it (expired or evicted by
            the server); the agent was restored from what remained or prefilled.
        shared_errors: calls to it that failed or timed out (logged; the turn went on with
            the local tiers, and calls resume after a backoff of up to 30 s).
        shared_wait_seconds: time turns waited for another worker's turn of the same agent.
        prefetch_reads: agents' states read into RAM in the background (``hits["prefetch"]``
            counts the turns that used one).
        prefetch_bytes: payload bytes those reads took from disk (not in ``bytes_read``,
            which counts what turns read).
    """

    turns: int = 0
    hits: Dict[str, int] = field(default_factory=lambda: {s: 0 for s in SOURCES})
    prompt_tokens_evaluated: int = 0
    prompt_tokens_restored: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    restore_seconds: float = 0.0
    save_seconds: float = 0.0
    rejected: int = 0
    store_errors: int = 0
    ram_bytes: int = 0
    disk_bytes: int = 0
    disk_db_bytes: int = 0
    agents: int = 0
    draft_tokens: int = 0
    draft_accepted: int = 0
    shared_bytes_read: int = 0
    shared_bytes_sent: int = 0
    shared_refused: int = 0
    shared_missing: int = 0
    shared_errors: int = 0
    shared_wait_seconds: float = 0.0
    prefetch_reads: int = 0
    prefetch_bytes: int = 0

    @property
    def draft_rejected(self) -> int:
        return self.draft_tokens - self.draft_accepted


@dataclass
class TurnRecord:
    """What the last turn did, for benchmarks and demos.

    Attributes:
        agent_id: the agent.
        source: where its KV came from (see MemoryStats.hits).
        restore_seconds: time to bring its KV into the context.
        save_seconds: time the turn waited on saving the agent it displaced.
        prompt_tokens_evaluated: prompt tokens evaluated in this turn.
        prompt_tokens_restored: prompt tokens this turn did not evaluate thanks to a restore.
        draft_tokens: tokens drafted in this turn.
        draft_accepted: drafted tokens the model agreed with.
        draft_rejected: drafted tokens it did not.
    """

    agent_id: str
    source: str
    restore_seconds: float = 0.0
    save_seconds: float = 0.0
    prompt_tokens_evaluated: int = 0
    prompt_tokens_restored: int = 0
    draft_tokens: int = 0
    draft_accepted: int = 0
    _generates: int = 0

    @property
    def draft_rejected(self) -> int:
        return self.draft_tokens - self.draft_accepted
