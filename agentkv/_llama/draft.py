"""Self-draft decoding: the agent's own history proposes its next tokens, one batch checks them.

Prompt lookup (n-gram) drafting, no second model: the last few tokens are looked up in
everything the context holds (a returning agent's restored history included), and the tokens
that followed their latest earlier occurrence are the draft. One ``llama_decode`` evaluates
the pending token and the draft together, with logits at every position; the longest prefix
of the draft that greedy decoding would have produced is kept, plus the token the model
predicts after it, and the KV of the rest is dropped.

Only greedy sampling can be checked this way (``temperature=0``, or ``top_k=1``; no
penalties, grammar, logits processors or stopping criteria); any other setting decodes
normally. A token evaluated in a batch can round its KV and logits differently in the last
bits from the same token evaluated alone, so a drafted greedy output can differ from an
undrafted one at a near-tie: drafting is opt-in, and benchmarks/draft_bench.py measures how
often that happens.

Every decision (what to draft, how long, when to pause) depends only on the tokens and on
what the model accepted within the call, never on time: two runs of the same history draft
the same batches, so a restored agent equals the same agent never evicted, both drafting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Generator, List, Optional, Sequence, Union

import numpy as np

import llama_cpp

from ..errors import ConfigError

__all__ = ["NgramDraft", "draft_config", "greedy_refusal", "drafted_generate", "lookup_start"]


@dataclass(frozen=True)
class NgramDraft:
    """Settings of prompt-lookup drafting (``AgentMemory(draft="ngram")`` uses the defaults).

    Attributes:
        max_ngram: longest suffix of the history looked up (the longest match wins).
        min_ngram: shortest suffix looked up; 2 or 1 find look-alikes everywhere in free
            text, which rarely pay.
        max_len: most tokens drafted at once; the length adapts between ``min_len`` and this.
        min_len: fewest tokens drafted at once.
        start_len: draft length of a call's first draft.
        pays: a check pays when it keeps at least this share of what it drafted (on a 2-core
            CPU a batch of d + 1 tokens costs about 1.2 + 0.3 d one-token decodes of
            Gemma 3 270M, 1.2 + 0.45 d of Qwen2.5 0.5B: keeping half breaks even). Each
            check that does not pay doubles the pause before the next lookup (1, 2, 4 ...
            tokens, up to ``max_pause``), each that does halves it, so a turn that copies
            nothing decodes almost as if drafting were off.
        max_pause: longest run of tokens decoded without looking up a draft.
    """

    max_ngram: int = 4
    min_ngram: int = 3
    max_len: int = 16
    min_len: int = 3
    start_len: int = 4
    pays: float = 0.5
    max_pause: int = 64

    def __post_init__(self) -> None:
        for name in ("max_ngram", "min_ngram", "max_len", "min_len", "start_len", "max_pause"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"NgramDraft.{name} must be a positive int, not {value!r}")
        if self.min_ngram > self.max_ngram:
            raise ConfigError("NgramDraft.min_ngram must not exceed max_ngram")
        if not self.min_len <= self.start_len <= self.max_len:
            raise ConfigError("NgramDraft needs min_len <= start_len <= max_len")
        if self.max_len > 256:
            raise ConfigError(f"NgramDraft.max_len must be at most 256, not {self.max_len}")
        if isinstance(self.pays, bool) or not isinstance(self.pays, (int, float)) or \
                not 0.0 <= self.pays <= 1.0:
            raise ConfigError(f"NgramDraft.pays must be a share in 0..1, not {self.pays!r}")


DraftLike = Union[None, bool, str, NgramDraft]


def draft_config(value: DraftLike, name: str = "draft") -> Optional[NgramDraft]:
    """The drafting settings ``value`` names: None/False (off), "ngram" or an NgramDraft."""
    if value is None or value is False:
        return None
    if value == "ngram":
        return NgramDraft()
    if isinstance(value, NgramDraft):
        return value
    raise ConfigError(f"{name} must be None, False, 'ngram' or an NgramDraft, not {value!r}")


_PLAIN = {"repeat_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}


def greedy_refusal(args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[str]:
    """Why a ``Llama.generate(tokens, *args, **kwargs)`` call cannot be drafted (None: it can)."""
    if args:
        return "sampling settings passed by position"
    temp = kwargs.get("temp", 0.8)
    greedy = temp == 0.0 or (kwargs.get("top_k", 40) == 1 and temp > 0.0
                             and kwargs.get("mirostat_mode", 0) == 0)
    if not greedy:
        return "sampling is not greedy (temperature=0 or top_k=1 drafts)"
    for key, neutral in _PLAIN.items():
        if kwargs.get(key, neutral) != neutral:
            return f"{key} changes the logits"
    for key in ("logits_processor", "grammar", "stopping_criteria"):
        if kwargs.get(key) is not None:
            return f"a {key} is set"
    return None


def lookup_start(history: np.ndarray, n_max: int, n_min: int) -> int:
    """Where the tokens that followed the latest earlier occurrence of the longest suffix of
    ``history`` (``n_max`` down to ``n_min`` tokens) begin; -1 if no suffix occurs before."""
    L = int(history.shape[0])
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        tail = history[L - n:]
        starts = np.flatnonzero(history[: L - n] == tail[0])
        for i in range(1, n):
            if starts.size == 0:
                break
            starts = starts[history[starts + i] == tail[i]]
        if starts.size:
            return int(starts[-1]) + n
    return -1


class DraftPace:
    """What to draft next, and whether to look at all (see NgramDraft).

    ``source`` follows a copy: the history position the next drafted token would be read
    from when the last draft came from there and the model kept agreeing, so a long copy
    goes on from where it is, not from the latest look-alike n-gram (code repeats them).
    """

    def __init__(self, cfg: NgramDraft) -> None:
        self.cfg = cfg
        self.length = cfg.start_len
        self.pause = 0  # lookups still to skip
        self.misses = 0  # checks that did not pay, less those that did (the pause is 2**misses/2)
        self.source = -1  # history index aligned with the next position, or -1

    def propose(self, history: np.ndarray, room: int) -> np.ndarray:
        """The next draft for ``history`` (its last token is the one about to be evaluated)."""
        if self.pause > 0:
            self.pause -= 1
            return history[:0]
        cfg, L = self.cfg, int(history.shape[0])
        src = self.source
        if not (1 <= src < L and history[src - 1] == history[L - 1]):
            src = lookup_start(history, cfg.max_ngram, cfg.min_ngram)
        self.source = src
        if src < 0:
            return history[:0]
        length = min(self.length, room)
        if src + length <= L:
            return history[src: src + length]
        # the copy runs into the present: it repeats with period L - src (as LZ77 copies do)
        return np.resize(history[src:], length)

    def moved(self, history: np.ndarray, drafted: int, kept: int) -> None:
        """A decode step put ``kept + 1`` tokens after the ones drafted from (``drafted`` of
        them were drafted); ``history`` ends with the newest (the next to evaluate)."""
        if self.source >= 0:
            at = self.source + kept  # where the newest token sits in the source
            follows = at < history.shape[0] - 1 and history[at] == history[-1]
            self.source = at + 1 if follows else -1
        if drafted == 0:
            return
        cfg = self.cfg
        if kept == drafted:
            self.length = min(cfg.max_len, self.length * 2)
        else:
            self.length = max(cfg.min_len, min(cfg.max_len, kept + 1))
        if kept < max(1.0, cfg.pays * drafted):
            self.misses = min(self.misses + 1, cfg.max_pause.bit_length())
            self.pause = min(cfg.max_pause, 1 << (self.misses - 1))
        else:
            self.misses = max(0, self.misses - 1)


def _row(ctx: Any, i: int, n_vocab: int) -> np.ndarray:
    ptr = llama_cpp.llama_get_logits_ith(ctx, i)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,))


# One generator on purpose (~60 lines of code past its docstring): Llama's bookkeeping must
# be what its own generate leaves at every yield, and one loop keeps that invariant in one place.
def drafted_generate(llm: Any, tokens: Sequence[int], cfg: NgramDraft, reset: bool,
                     on_check: Optional[Callable[[int, int], None]] = None
                     ) -> Generator[int, Optional[Sequence[int]], None]:
    """``Llama.generate(tokens, temp=0, reset=reset)`` with prompt-lookup drafting.

    Keeps ``Llama``'s bookkeeping as its own generate does at every yielded token: the
    yielded token is not in ``n_tokens``, and the context's last logits row is the one it was
    chosen from, so a caller that stops there (max_tokens, a stop string, an end of turn)
    leaves the state an undrafted decode of the same tokens leaves (KV cells past
    ``n_tokens`` are stale, as after any rollback). Tokens sent into the generator are
    evaluated after the token just yielded, as ``Llama.generate`` does.
    ``on_check(drafted, kept)`` is called after every check of a draft.
    """
    if reset:
        llm.reset()
    tokens = list(tokens)
    if tokens:
        llm.eval(tokens)
    ctx, n_vocab, n_ctx = llm.ctx, llm.n_vocab(), llm.n_ctx()
    batch = llm._batch
    ids = llm.input_ids  # the Llama's own token array: the history drafts are looked up in
    longest = max(0, min(cfg.max_len, int(llm.n_batch) - 1))
    pace = DraftPace(cfg)
    cur = int(_row(ctx, -1, n_vocab).argmax())
    sent = yield cur
    while True:
        pos = int(llm.n_tokens)  # cur goes at pos
        if sent is not None:
            llm.eval([cur] + list(sent))
            cur = int(_row(ctx, -1, n_vocab).argmax())
            sent = yield cur
            continue
        draft: List[int] = []
        room = min(n_ctx - pos - 1, longest)
        if room > 0:
            ids[pos] = cur
            draft = [int(t) for t in pace.propose(ids[: pos + 1], room)]
        seq = [cur] + draft
        llm._ctx.kv_cache_seq_rm(-1, pos, -1)
        batch.set_batch(batch=seq, n_past=pos, logits_all=bool(draft))
        llm._ctx.decode(batch)  # raises as Llama.eval does when the context is full
        ids[pos: pos + len(seq)] = seq
        llm._requires_eval = False
        if not draft:
            llm.n_tokens = pos + 1
            cur = int(_row(ctx, -1, n_vocab).argmax())
            if pos + 1 < n_ctx:
                ids[pos + 1] = cur
                pace.moved(ids[: pos + 2], 0, 0)
            sent = yield cur
            continue
        preds = [int(_row(ctx, i, n_vocab).argmax()) for i in range(len(seq))]
        kept = 0
        while kept < len(draft) and draft[kept] == preds[kept]:
            kept += 1
        if pos + kept + 1 < n_ctx:
            ids[pos + kept + 1] = preds[kept]
            pace.moved(ids[: pos + kept + 2], len(draft), kept)
        if on_check is not None:
            on_check(len(draft), kept)
        if kept < len(draft):
            llm._ctx.kv_cache_seq_rm(-1, pos + kept + 1, -1)
        last = _row(ctx, -1, n_vocab)  # the batch's last output row: "the last logits"
        after_all = last.copy() if kept == len(draft) else None
        for i in range(kept):  # drafted tokens the model agrees with, already evaluated
            llm.n_tokens = pos + i + 1
            last[:] = _row(ctx, i, n_vocab)  # rows 0..kept-1 are not the last row
            sent = yield preds[i]
            if sent is not None:  # evaluated again, with what was sent, at the loop's top
                cur = preds[i]
                break
        else:
            llm.n_tokens = pos + kept + 1
            last[:] = after_all if after_all is not None else _row(ctx, kept, n_vocab)
            cur = preds[kept]
            sent = yield cur
