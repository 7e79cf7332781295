"""The one place that touches llama-cpp-python internals: an adapter, it decides nothing.

:class:`Engine` snapshots and restores sequence 0 of a ``Llama`` context, keeps ``Llama``'s own
bookkeeping (``input_ids``, ``n_tokens``, ``_requires_eval``) in step with the KV so that
``Llama.generate`` prefix-matches a restored history and evaluates only the new suffix, and
guards ``generate`` against the one thing a restore cannot give back: SWA layers' KV older than
the stored window (see :meth:`Engine._guarded_generate`). Inside a turn, ``generate`` asks the
turn's :class:`TurnHooks` (the memory's policy, agentkv/_memory/policy.py) what to do: restore
a stored prefix, where to store a shared one; outside a turn (a plain ``llm(...)``) it only
guards. Which bytes a snapshot keeps and a restore loads is agentkv/_format/layout.py's.

Written and tested against llama-cpp-python 0.3.36 (llama.cpp of 2026-10); ``FORMAT_ID`` names
that pairing and goes into every fingerprint.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import xxhash

try:
    import llama_cpp
    from llama_cpp import Llama
except ImportError as exc:  # pragma: no cover - llama-cpp-python is a hard dependency
    raise ImportError("agentkv needs llama-cpp-python (pip install llama-cpp-python)") from exc

from .._format import layout
from .._format.buffers import Buffers
from .._format.snapshot import Snapshot, check_state
from ..errors import CorruptEntry, NotALlama, RestoreFailed, UnsupportedLlamaCpp
from . import greedy
from .draft import drafted_generate, greedy_refusal
from .hooks import TurnHooks
from .settings import ADAPTERS, attention_of, compute, settings_of

__all__ = ["Engine", "FORMAT_ID", "SUPPORTED_LLAMA_CPP", "TurnHooks", "hash_file"]

log = logging.getLogger(__name__)

SUPPORTED_LLAMA_CPP = ("0.3.36",)
FORMAT_ID = "llama.cpp-seq-state/ggsq3/kv-cache-2026-10"
_SEQ = 0  # Llama drives one sequence
SWA_MARGIN = 64  # positions kept beyond the SWA window: rollbacks this deep stay exact
_HASH_CHUNK = 8 << 20


def hash_file(path: str) -> str:
    """xxh3-128 hex digest of a file's content, read in 8 MiB chunks."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _ptr(buf: Any) -> Any:
    """A ``uint8*`` to the first byte of any contiguous buffer, without a copy."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    return arr.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), arr


class Engine:
    """Snapshot and restore of one ``Llama``'s sequence, plus its bookkeeping.

    ``block_tokens``: snapshots keep the SWA window from a multiple of it (the store's
    block); ``buffers``: the reused buffers of dumps and restores.
    """

    def __init__(self, llm: Llama, block_tokens: int = 1, buffers: Optional[Buffers] = None
                 ) -> None:
        if not isinstance(llm, Llama):
            raise NotALlama(f"AgentMemory wraps a llama_cpp.Llama, not {type(llm).__name__}")
        if getattr(llm, "_ctx", None) is None or llm.ctx is None:
            raise NotALlama("this Llama has no context (was it closed?)")
        if llama_cpp.__version__ not in SUPPORTED_LLAMA_CPP:
            log.warning("llama-cpp-python %s is not a version agentkv was tested with (%s)",
                        llama_cpp.__version__, ", ".join(SUPPORTED_LLAMA_CPP))
        self.llm = llm
        self.model = layout.Model(int(llama_cpp.llama_model_n_swa(llm.model)),
                                  bool(llm.context_params.swa_full), _SEQ, int(llm.n_ctx()),
                                  attention_of(llm))
        self.n_swa = self.model.n_swa
        self.block_tokens = max(1, int(block_tokens))
        self.buffers = buffers or Buffers()
        self.hooks: Optional[TurnHooks] = None  # the running turn's (see :meth:`turn`)
        self._window_start = 0  # first position whose SWA-layer KV is real (_rollback_is_exact)
        self._exact = 0  # positions whose KV a cold prefill reproduces (see cold_exact)
        self._installed = False
        self._has_outputs = False  # the context has decoded at least once: it has a logits row

    def n_threads(self) -> int:
        """The threads this context decodes one token with (``llama_set_n_threads`` may change
        it between turns): the restore layout depends on it."""
        return int(llama_cpp.llama_n_threads(self.llm.ctx))

    def check_format(self) -> None:
        """Decide from a real state whether this llama.cpp writes the format agentkv parses:
        evaluate one token, parse the sequence state (and its layers' types and row sizes
        against the model), then empty the context. Raises UnsupportedLlamaCpp naming the
        versions agentkv was tested with and what did not match."""
        llm = self.llm
        self.clear()
        try:
            Llama.eval(llm, [int(llm.token_bos()) if llm.token_bos() >= 0 else 0])
            parsed = check_state(self.state_bytes(_SEQ), 1)
            n_layer = int(llama_cpp.llama_model_n_layer(llm.model))
            for c in parsed.caches:
                stream = c.only_stream()
                if stream is not None and not 0 < len(stream.k) <= n_layer:
                    raise CorruptEntry(f"a cache section holds {len(stream.k)} layers; the "
                                       f"model has {n_layer}")
        except CorruptEntry as exc:
            raise UnsupportedLlamaCpp(
                f"llama-cpp-python {llama_cpp.__version__} writes a sequence state agentkv "
                f"cannot read ({exc}); agentkv was tested with llama-cpp-python "
                f"{', '.join(SUPPORTED_LLAMA_CPP)}") from exc
        finally:
            self.clear()

    # -- identity -------------------------------------------------------------------------

    def fingerprint(self, model_hash: str, hash_file: Callable[[str], str], at_rest: int = 0
                    ) -> bytes:
        """16 bytes naming everything a stored state must match to be restored here: the
        format, the model's content, every setting of the context that changes the KV it
        computes or how it reads it, and the machine and build that compute it
        (agentkv/_llama/settings.py), as llama.cpp reports them."""
        fields: Dict[str, Any] = {
            "format": FORMAT_ID,
            "llama_cpp": llama_cpp.__version__,
            "model": model_hash,
            "settings": settings_of(self.llm, hash_file, self.adapters(hash_file)),
            "compute": compute(),
        }
        if at_rest:
            fields["at_rest"] = at_rest
        return xxhash.xxh3_128(json.dumps(fields, sort_keys=True).encode()).digest()

    def adapters(self, hash_file: Callable[[str], str]) -> Optional[List[Any]]:
        """LoRA adapters and control vector set on the context at run time (None: none seen)."""
        return ADAPTERS.describe(self.llm.ctx, hash_file)

    @property
    def adapters_version(self) -> int:
        """Changes whenever adapters are set on any context: a cheap test before :meth:`adapters`."""
        return ADAPTERS.version

    @property
    def model_path(self) -> str:
        return os.fspath(self.llm.model_path)

    # -- bookkeeping ----------------------------------------------------------------------

    @property
    def n_tokens(self) -> int:
        return int(self.llm.n_tokens)

    def tokens(self) -> np.ndarray:
        return self.llm.input_ids[: self.llm.n_tokens].astype(np.int32, copy=True)

    def state_size(self) -> int:
        return int(llama_cpp.llama_state_seq_get_size(self.llm.ctx, _SEQ))

    def last_logits(self) -> np.ndarray:
        """A copy of the logits of the last evaluated token."""
        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).copy()

    def clear(self) -> None:
        """Empty the context: no tokens, no KV."""
        self.llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm.ctx), False)
        self._window_start = 0
        self._exact = 0

    # -- snapshot / restore ---------------------------------------------------------------

    def state_bytes(self, seq_id: int = _SEQ, reuse: bool = False) -> np.ndarray:
        """The state blob of ``seq_id`` (-1: the whole context, SWA-masked cells included).

        ``reuse`` writes into the memory's dump buffer (its pages stay mapped), for dumps that
        are only read once and then trimmed into a snapshot of their own.
        """
        size = int(llama_cpp.llama_state_seq_get_size(self.llm.ctx, seq_id))
        buf = self.buffers.dump.take(size) if reuse else np.empty(size, dtype=np.uint8)
        written = llama_cpp.llama_state_seq_get_data(
            self.llm.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, seq_id)
        if written != size:
            raise RestoreFailed(f"llama_state_seq_get_data wrote {written} of {size} bytes")
        return buf

    def snapshot(self, margin: int = SWA_MARGIN, image: bool = False) -> Snapshot:
        """The live tokens and the sequence state of their KV.

        For an SWA model the SWA layers keep at least ``margin`` positions more than the window
        the next token needs (from a multiple of ``block_tokens``), so that a prompt which
        rewrites the last few tokens of the history (a chat template re-rendering the previous
        answer) still continues exactly after a restore. ``image``: keep the state in the
        layout a restore loads (for snapshots held in RAM; agentkv/_format/layout.py).
        """
        llm = self.llm
        n = int(llm.n_tokens)
        # Cells past n_tokens are stale (Llama removes them lazily at its next eval).
        llm._ctx.kv_cache_seq_rm(-1, n, -1)
        tokens = llm.input_ids[:n].astype(np.int32, copy=True)
        logits = None
        if n > 0 and not llm._requires_eval:  # the context's logits are this history's
            logits = self.last_logits()
            self._has_outputs = True
        # (a window start past the last position is stale: the context was evaluated since)
        start = layout.keep_from(self.model, n, margin, self.block_tokens,
                                 self._window_start if self._window_start < n else 0)
        if start > 0:
            try:
                kept = layout.compact(self.model, self.state_bytes(-1, reuse=True), n, start,
                                      image, self.n_threads())
                if kept is not None:
                    return Snapshot(tokens, kept, logits, self.cold_exact)
            except CorruptEntry as exc:  # an unfamiliar layout: fall back to the plain state
                log.debug("whole-context state not trimmable (%s); saving the sequence state", exc)
        return Snapshot(tokens, self.state_bytes(_SEQ), logits, self.cold_exact)

    def restore(self, snap: Snapshot) -> None:
        """Make ``snap`` the live sequence; raise CorruptEntry/RestoreFailed (context cleared)."""
        n = snap.n_tokens
        if n > self.llm.n_ctx():
            raise RestoreFailed(f"snapshot holds {n} tokens, the context only {self.llm.n_ctx()}")
        blob, window_start = layout.restore_bytes(self.model, snap.state, n, self.buffers.image,
                                                  self.n_threads())
        self.clear()
        if n == 0:
            return
        ptr, view = _ptr(blob)  # view keeps the buffer alive during the call
        read = llama_cpp.llama_state_seq_set_data(self.llm.ctx, ptr, view.nbytes, _SEQ)
        if read == 0:
            self.clear()
            raise RestoreFailed("llama.cpp refused the sequence state (shape or type mismatch)")
        self.llm.input_ids[:n] = snap.tokens
        self.llm.n_tokens = n
        self.llm._requires_eval = not self._put_logits(snap.logits)
        self._window_start = window_start
        self._exact = min(snap.exact, n)

    def _put_logits(self, logits: Optional[np.ndarray]) -> bool:
        """Write carried logits into the context's last output row, so that generate samples
        them at once (exactly what a never-evicted context would sample from). Without them
        (or without an output row yet) generate replays the last token instead."""
        n_vocab = self.llm.n_vocab()
        if logits is None or not self._has_outputs or logits.shape[0] != n_vocab:
            return False
        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        if not ptr:
            return False
        np.ctypeslib.as_array(ptr, shape=(n_vocab,))[:] = logits
        return True

    # -- the generate guard ---------------------------------------------------------------

    def install(self) -> None:
        """Route the Llama's ``generate`` through the guard, and its ``eval`` through the
        batch bookkeeping of :attr:`cold_exact`, and its ``sample`` through greedy.py's argmax
        (instance attributes)."""
        if not self._installed:
            self.llm.generate = self._guarded_generate  # type: ignore[method-assign,assignment]
            self.llm.eval = self._tracked_eval  # type: ignore[method-assign]
            self.llm.sample = functools.partial(greedy.sample, self.llm)  # type: ignore
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            self.llm.__dict__.pop("generate", None)
            self.llm.__dict__.pop("eval", None)
            self.llm.__dict__.pop("sample", None)
            self._installed = False

    @property
    def cold_exact(self) -> int:
        """How many leading positions of the live KV a cold prefill reproduces bit for bit.

        llama.cpp rounds a token's KV differently depending on the batch it was evaluated in,
        and ``Llama.eval`` cuts a prompt into batches of ``n_batch`` from its first token. So
        the KV of positions evaluated from 0 in whole ``n_batch`` batches (an agent's first
        prefill, or a prefill that continues such a run from a multiple of ``n_batch``) is what
        a cold run of any prompt that starts with those tokens computes; KV evaluated later
        (a second turn's prompt, generated tokens) depends on the turns that made it.
        """
        return min(self._exact, int(self.llm.n_tokens))

    def _tracked_eval(self, tokens: Sequence[int]) -> None:
        llm = self.llm
        p = int(llm.n_tokens)
        nb = int(llm.n_batch)
        exact = min(self._exact, p)
        if p == exact and p % nb == 0:
            exact = p + (len(tokens) // nb) * nb
        self._exact = exact
        Llama.eval(llm, tokens)

    def _rollback_is_exact(self, reuse: int) -> bool:
        """Can the token at position ``reuse`` be evaluated on the KV now in the context?

        It attends, in SWA layers, to positions ``reuse - n_swa + 1 .. reuse - 1``; those must
        hold real KV, not cells the writer dropped (padding) or llama.cpp pruned.
        """
        if self.n_swa <= 0 or reuse == 0:
            return True
        mem = llama_cpp.llama_get_memory(self.llm.ctx)
        present_from = max(self._window_start, int(llama_cpp.llama_memory_seq_pos_min(mem, _SEQ)))
        return max(0, reuse - self.n_swa + 1) >= present_from

    def _reuse_point(self, tokens: List[int]) -> int:
        """Where ``Llama.generate`` (llama-cpp-python 0.3.36) would resume the prompt on the
        live context, the same rule in numpy; the context is cleared (0) when that point lies
        further back than the restored SWA window reaches."""
        llm = self.llm
        n = int(llm.n_tokens)
        if n == 0:
            return 0
        m = min(n, len(tokens))
        same = llm.input_ids[:m] == np.asarray(tokens[:m], dtype=np.intc)
        common = int(m if same.all() else np.argmin(same))
        consumed = common == len(tokens)
        if n == len(tokens) and consumed and not llm._requires_eval:
            return n
        reuse = common - 1 if consumed else common
        if reuse < n and not self._rollback_is_exact(reuse):
            log.info("prompt diverges at token %d, before the restored SWA window (from %d): "
                     "prefilling the whole prompt", reuse, self._window_start)
            self.clear()
            return 0
        return reuse

    def _evaluate_cut(self, hooks: TurnHooks, tokens: List[int], reuse: int) -> int:
        """Evaluate up to the cut the hooks plan as its own segment and let them store the
        shared prefix there; generate then prefix-matches it. Returns the new reuse point."""
        cut = hooks.cut_for(np.asarray(tokens[:-1], dtype=np.int32), reuse)
        if not reuse < cut < len(tokens):
            return reuse
        llm = self.llm
        llm.n_tokens = reuse
        llm._ctx.kv_cache_seq_rm(-1, reuse, -1)
        llm.eval(tokens[reuse:cut])
        hooks.cut_evaluated(cut)
        return cut

    def _resume_at(self, tokens: List[int], reuse: int) -> List[int]:
        """Do generate's own prefix reuse from ``reuse`` (its loop compares token by token in
        Python, ~1 ms at 4,000 tokens of TTFT); the tokens generate must still evaluate."""
        llm = self.llm
        if reuse == len(tokens) and not llm._requires_eval:
            return []  # the whole prompt is cached with its logits: sample at once
        if reuse > 0 and llm._ctx.kv_cache_seq_rm(-1, reuse, -1):
            llm.n_tokens = reuse
            llm._requires_eval = True
            return tokens[reuse:]
        llm.reset()
        self._window_start = 0  # the whole prompt is evaluated again: its KV is all real
        return tokens

    def _guarded_generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Iterator[int]:
        """``Llama.generate``, after checking that its prefix reuse will be exact; inside a
        turn, the turn's hooks may restore a stored prefix first and store a shared one."""
        llm = self.llm
        hooks = self.hooks
        tokens = list(tokens)
        reset = kwargs.get("reset", args[6] if len(args) > 6 else True)
        if hooks is not None and reset and len(tokens) > 1 and int(llm.n_tokens) == 0:
            hooks.cold_prompt(np.asarray(tokens[:-1], dtype=np.int32))
        reuse = self._reuse_point(tokens) if reset else 0
        if hooks is not None:
            hooks.prompt_started(len(tokens) - reuse, reuse)
            if reset and len(tokens) > 1:
                reuse = self._evaluate_cut(hooks, tokens, reuse)
        if reset and len(args) <= 6 and int(llm.n_tokens) > 0:
            kwargs["reset"] = False
            tokens = self._resume_at(tokens, reuse)
        draft = None if hooks is None else hooks.draft
        refusal = greedy_refusal(args, kwargs) if draft is not None else "off"
        if draft is not None and refusal is None:
            out = drafted_generate(llm, tokens, draft, bool(kwargs.get("reset", True)),
                                   hooks.drafted if hooks is not None else None)
        else:
            if draft is not None:
                log.debug("decoding without drafts: %s", refusal)
            out = Llama.generate(llm, tokens, *args, **kwargs)
        return out if hooks is None else _first_token(out, hooks)


def _first_token(tokens_out: Iterator[int], hooks: TurnHooks) -> Iterator[int]:
    """``tokens_out``, telling ``hooks`` once the first token is made."""
    try:
        first = next(tokens_out)
    except StopIteration:
        return
    finally:
        hooks.first_token()
    yield first
    yield from tokens_out
