"""What the engine asks the memory inside a turn: :class:`TurnHooks`.

The engine adapts llama-cpp-python and decides nothing; during a turn its ``generate`` calls
these hooks, which the memory's policy implements (agentkv/_memory/policy.py). Outside a turn
(a plain ``llm(...)`` on a wrapped ``Llama``) there are none.
"""

from __future__ import annotations

from typing import Optional, Protocol

import numpy as np

from .draft import NgramDraft

__all__ = ["TurnHooks"]


class TurnHooks(Protocol):
    """What ``generate`` asks during a turn (the memory's policy implements it)."""

    draft: Optional[NgramDraft]  # self-draft decoding of greedy calls (agentkv/_llama/draft.py)

    def cold_prompt(self, prompt: np.ndarray) -> None:
        """The context is empty and ``prompt`` (all but its last token) comes: the hook may
        restore a stored prefix of it."""

    def cut_for(self, prompt: np.ndarray, reuse: int) -> int:
        """A position to evaluate up to first and store as a shared prefix (0: none)."""

    def cut_evaluated(self, n_tokens: int) -> None:
        """The context holds the shared prefix planned by :meth:`cut_for`: store it."""

    def prompt_started(self, evaluated: int, reused: int) -> None:
        """``generate`` evaluates ``evaluated`` prompt tokens and reuses ``reused``."""

    def first_token(self) -> None:
        """``generate`` made its first token (or none)."""

    def drafted(self, drafted: int, kept: int) -> None:
        """A draft of ``drafted`` tokens was checked; ``kept`` of them stood."""
