"""Greedy sampling as one numpy ``argmax`` instead of llama.cpp's candidate array.

``Llama.generate`` samples every token through a sampler chain that llama-cpp-python builds
afresh for each call. For plain greedy settings (``temperature=0`` and no penalty, logits
processor or grammar) that chain's penalty stage returns at once and its greedy stage picks
the first of the highest logits. But first ``llama_sampler_sample`` copies all of the
vocabulary into a new array of (id, logit, p) entries: 3 MB for Gemma 3's 262,144 tokens,
paged in anew at each call's first token (0.7-3 ms of a returning agent's time to first
token on a 2-vCPU VM, against a 2.5-4 ms restore) and ~0.4 ms at each token after it.

:func:`plain_greedy` reads the same logits row and returns the same token: numpy's
``argmax`` is also the first of the highest. A row whose pick is NaN is left to llama.cpp
(which compares past a NaN rather than picking it), and so is every other setting.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np

import llama_cpp
from llama_cpp import Llama

__all__ = ["plain_greedy", "sample"]

_NEUTRAL = {"repeat_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}


def plain_greedy(llm: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[int]:
    """The token ``Llama.sample(*args, **kwargs)`` picks, if those are plain greedy
    settings (as ``generate`` passes them: by keyword, with ``idx``); None otherwise."""
    if args or kwargs.get("temp", 0.8) != 0.0 or kwargs.get("idx") is None:
        return None
    if any(kwargs.get(k, v) != v for k, v in _NEUTRAL.items()):
        return None
    if kwargs.get("logits_processor") is not None or kwargs.get("grammar") is not None:
        return None
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, int(kwargs["idx"]) - int(llm.n_tokens))
    if not ptr:
        return None
    row = np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))
    token = int(row.argmax())
    return None if np.isnan(row[token]) else token


def sample(llm: Any, *args: Any, **kwargs: Any) -> int:
    """``llm.sample(*args, **kwargs)`` (a wrapped Llama's): plain greedy settings as one argmax,
    anything else by llama.cpp's sampler chain."""
    token = plain_greedy(llm, args, kwargs)
    return Llama.sample(llm, *args, **kwargs) if token is None else token
