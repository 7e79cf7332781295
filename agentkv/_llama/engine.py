"""The one place that touches llama-cpp-python internals.

:class:`Engine` snapshots and restores sequence 0 of a ``Llama`` context, keeps ``Llama``'s own
bookkeeping (``input_ids``, ``n_tokens``, ``_requires_eval``) in step with the KV so that
``Llama.generate`` prefix-matches a restored history and evaluates only the new suffix, and
guards ``generate`` against the one thing a restore cannot give back: SWA layers' KV older than
the stored window (see :meth:`Engine._guarded_generate`).

Written and tested against llama-cpp-python 0.3.36 (llama.cpp of 2026-10); ``FORMAT_ID`` names
that pairing and goes into every fingerprint.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import xxhash

try:
    import llama_cpp
    from llama_cpp import Llama
except ImportError as exc:  # pragma: no cover - llama-cpp-python is a hard dependency
    raise ImportError("agentkv needs llama-cpp-python (pip install llama-cpp-python)") from exc

from .._format import seqstate
from .._format import pieces as seqpieces
from .draft import NgramDraft, drafted_generate, greedy_refusal
from ..errors import CorruptEntry, NotALlama, RestoreFailed, UnsupportedLlamaCpp
from .._format.image import RestoreImage, build_image
from .settings import ADAPTERS, compute, settings_of
from .._format.snapshot import StoredPieces, Snapshot, check_state

__all__ = ["Engine", "FORMAT_ID", "SUPPORTED_LLAMA_CPP", "hash_file"]

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
    """Snapshot and restore of one ``Llama``'s sequence, plus its bookkeeping."""

    def __init__(self, llm: Llama) -> None:
        if not isinstance(llm, Llama):
            raise NotALlama(f"AgentMemory wraps a llama_cpp.Llama, not {type(llm).__name__}")
        if getattr(llm, "_ctx", None) is None or llm.ctx is None:
            raise NotALlama("this Llama has no context (was it closed?)")
        if llama_cpp.__version__ not in SUPPORTED_LLAMA_CPP:
            log.warning("llama-cpp-python %s is not a version agentkv was tested with (%s)",
                        llama_cpp.__version__, ", ".join(SUPPORTED_LLAMA_CPP))
        self.llm = llm
        self.n_swa = int(llama_cpp.llama_model_n_swa(llm.model))
        self.swa_full = bool(llm.context_params.swa_full)
        self._window_start = 0  # first position whose SWA-layer KV is real (see _rollback_is_exact)
        self._exact = 0  # positions whose KV a cold prefill reproduces (see cold_exact)
        self._installed = False
        self._scratch = np.empty(0, dtype=np.uint8)
        # Restores lay the state out in this buffer, whose pages stay mapped (a fresh one
        # costs a page fault per 4 KiB written). Its padding must read as zeros: after a
        # restore, zero_restore_buffer() zeroes the ranges the assembly wrote.
        self._asm = np.empty(0, dtype=np.uint8)
        self._asm_dirty: list = []
        self._has_outputs = False  # the context has decoded at least once: it has a logits row
        self.on_prompt: Optional[Callable[[int, int], None]] = None  # (evaluated, reused)
        self.block_tokens = 1  # snapshots keep the SWA window from a multiple of this
        # Shared prefixes (set by AgentMemory): on_cold_prompt(prompt[:-1]) may restore a
        # stored prefix into an empty context; plan_cut(prompt[:-1], reuse) names a position
        # to evaluate up to first, where on_cut(position) stores the shared prefix.
        self.on_cold_prompt: Optional[Callable[[np.ndarray], None]] = None
        self.plan_cut: Optional[Callable[[np.ndarray, int], int]] = None
        self.on_cut: Optional[Callable[[int], None]] = None
        self.on_first_token: Optional[Callable[[], None]] = None  # generate made its first token
        # Self-draft decoding of greedy calls (agentkv/draft.py); on_draft(drafted, kept)
        # after every check of a draft.
        self.draft: Optional[NgramDraft] = None
        self.on_draft: Optional[Callable[[int, int], None]] = None

    def check_format(self) -> None:
        """Decide from a real state whether this llama.cpp writes the format agentkv parses:
        evaluate one token, parse the sequence state (and its layers' types and row sizes
        against the model), then empty the context. Raises UnsupportedLlamaCpp naming the
        versions agentkv was tested with and what did not match."""
        llm = self.llm
        self.clear()
        try:
            Llama.eval(llm, [int(llm.token_bos()) if llm.token_bos() >= 0 else 0])
            blob = self._state(_SEQ)
            parsed = check_state(blob, 1)
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
        (agentkv/settings.py), as llama.cpp reports them."""
        fields = {
            "format": FORMAT_ID,
            "llama_cpp": llama_cpp.__version__,
            "model": model_hash,
            "settings": settings_of(self.llm, hash_file, self.adapters(hash_file)),
            "compute": compute(),
        }
        if at_rest:
            fields["at_rest"] = at_rest
        return xxhash.xxh3_128(json.dumps(fields, sort_keys=True).encode()).digest()

    def adapters(self, hash_file: Callable[[str], str]) -> Optional[list]:
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

    def _state(self, seq_id: int, scratch: bool = False) -> np.ndarray:
        """The state blob of ``seq_id`` (-1: the whole context, SWA-masked cells included).

        ``scratch`` writes into a buffer the engine reuses (its pages stay mapped), for
        dumps that are only read once and then trimmed into a snapshot of their own.
        """
        size = int(llama_cpp.llama_state_seq_get_size(self.llm.ctx, seq_id))
        if scratch:
            if self._scratch.nbytes < size:
                self._scratch = np.empty(size + (size >> 3), dtype=np.uint8)
            buf = self._scratch[:size]
        else:
            buf = np.empty(size, dtype=np.uint8)
        written = llama_cpp.llama_state_seq_get_data(
            self.llm.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, seq_id)
        if written != size:
            raise RestoreFailed(f"llama_state_seq_get_data wrote {written} of {size} bytes")
        return buf

    def snapshot(self, margin: int = SWA_MARGIN, laid: bool = False) -> Snapshot:
        """The live tokens and the sequence state of their KV.

        For an SWA model the SWA layers keep at least ``margin`` positions more than the window
        the next token needs (from a multiple of ``block_tokens``), so that a prompt which
        rewrites the last few tokens of the history (a chat template re-rendering the previous
        answer) still continues exactly after a restore.

        ``laid``: keep the state in the layout a restore loads (a :class:`~agentkv._format.image.RestoreImage`,
        its padding backed by the zero page), for snapshots held in RAM; compact where that
        layout is not the one :meth:`restore` would build, or the kernel cannot back it.
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
        B = max(1, self.block_tokens)
        # (a window_start past the last position is stale: the context was evaluated again since)
        window_start = self._window_start if self._window_start < n else 0
        keep_from = max(0, window_start, (max(0, n - self.n_swa + 1 - margin) // B) * B)
        if self.n_swa > 0 and keep_from > 0:
            whole = self._state(-1, scratch=True)  # every cell, SWA-masked ones included
            try:
                parsed = seqstate.parse(whole)
                swa = parsed.caches[-1].only_stream()
                base = parsed.caches[0].only_stream()
                if (len(parsed.caches) == 2 and swa is not None and base is not None
                        and swa.simple_cells and base.simple_cells and swa.is_contiguous
                        and swa.pos_min <= keep_from and swa.pos_max == n - 1):
                    if laid and self.swa_full and swa.pos_min == 0:
                        kept = build_image(whole, parsed, 1, keep_from, _SEQ)
                        if kept is not None:
                            return Snapshot(tokens, kept, logits, self.cold_exact)
                    return Snapshot(tokens, seqstate.set_window_start(whole, parsed, 1, keep_from, _SEQ),
                                    logits, self.cold_exact)
            except CorruptEntry as exc:  # an unfamiliar layout: fall back to the plain state
                log.debug("whole-context state not trimmable (%s); saving the sequence state", exc)
        return Snapshot(tokens, self._state(_SEQ), logits, self.cold_exact)

    def restore(self, snap: Snapshot) -> None:
        """Make ``snap`` the live sequence; raise CorruptEntry/RestoreFailed (context cleared)."""
        n = snap.n_tokens
        if n > self.llm.n_ctx():
            raise RestoreFailed(f"snapshot holds {n} tokens, the context only {self.llm.n_ctx()}")
        if isinstance(snap.state, RestoreImage):  # laid out and parsed when it was taken
            blob, window_start = snap.state.buf, snap.state.window_start
            base = snap.state.parsed.caches[0].only_stream()
            if base is None or base.cell_count != n:
                raise CorruptEntry(f"laid-out state does not hold the snapshot's {n} tokens")
        elif isinstance(snap.state, StoredPieces):
            blob, window_start = self._assemble_image(snap.state, n)
        else:
            parsed = check_state(snap.state, n)
            blob, window_start = self._pad_image(snap.state, parsed, n)
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

    def _assemble_image(self, parts: StoredPieces, n: int):
        """Assemble pieces read from disk straight into the layout :meth:`_pad_image`
        gives a blob (one copy instead of two); return it (checked) and its SWA window_start."""
        shape, pieces = parts.shape, parts.pieces
        last = len(shape.caches) - 1
        swa = [p for p in pieces if p.cache == last] if self.n_swa > 0 and last > 0 else []
        window_start = min((p.pos0 for p in swa), default=0)
        pad_to = None
        if (n > 0 and window_start > 0 and self.swa_full and len({p.stream for p in swa}) == 1
                and all(p.cells_len == seqstate.CELL_BYTES * p.count for p in swa)):
            pad_to = {last: 0}
        try:
            blob = seqpieces.assemble(shape, pieces, pad_to, out=self._assembly_buffer,
                                     written=self._asm_dirty)
        except CorruptEntry:
            raise  # keeps the key of the damaged payload
        except ValueError as exc:
            raise CorruptEntry(f"stored pieces do not assemble: {exc}") from exc
        parsed = check_state(blob, n)
        if pad_to is not None:
            stream = parsed.caches[last].only_stream()
            if stream is None or not stream.is_contiguous or stream.pos_min != 0:
                raise CorruptEntry("stored SWA cells are not one contiguous run")
        return blob, window_start

    def _assembly_buffer(self, nbytes: int) -> np.ndarray:
        """``nbytes`` of the engine's assembly buffer, all zeros (grown when too small)."""
        if self._asm.nbytes < nbytes:
            self._grow_assembly(nbytes)
        self._zero_dirty()
        return self._asm[:nbytes]

    def _grow_assembly(self, nbytes: int) -> None:
        self._asm = np.zeros(nbytes + (nbytes >> 2), dtype=np.uint8)
        self._asm_dirty.clear()

    def _zero_dirty(self) -> None:
        for a, b in self._asm_dirty:
            self._asm[a:b] = 0
        self._asm_dirty.clear()

    def zero_restore_buffer(self) -> None:
        """Zero what the last assembly wrote, so the buffer's padding reads as zeros next time,
        and grow the buffer to the live context's laid-out size (plus a quarter), touching its
        pages now (AgentMemory calls this after a turn, off the next restore's path: a fresh
        buffer's first touch costs ~2 us per 4 KiB page on a VM, ~180 ms at 4,000 tokens).
        The live context's layout is as large as its whole-context dump, which sized the
        snapshot scratch buffer."""
        self._zero_dirty()
        if self._asm.nbytes < self._scratch.nbytes:
            self._grow_assembly(self._scratch.nbytes)
            self._asm.fill(0)  # written, so its pages are this process's from now on

    def _pad_image(self, blob: Any, parsed: seqstate.SeqState, n: int):
        """The blob to load and the SWA window_start it leaves (see state.py on padding); a padded
        blob is built in the assembly buffer."""
        if n == 0 or self.n_swa <= 0 or len(parsed.caches) < 2:
            return blob, 0
        swa = parsed.caches[-1].only_stream()
        if swa is None or swa.pos_min <= 0:
            return blob, 0
        if self.swa_full and swa.simple_cells and swa.is_contiguous:
            return seqstate.set_window_start(blob, parsed, len(parsed.caches) - 1, 0,
                                      out=self._assembly_buffer, written=self._asm_dirty), swa.pos_min
        return blob, swa.pos_min

    # -- the generate guard ---------------------------------------------------------------

    def install(self) -> None:
        """Route the Llama's ``generate`` through the guard, and its ``eval`` through the
        batch bookkeeping of :attr:`cold_exact` (instance attributes)."""
        if not self._installed:
            self.llm.generate = self._guarded_generate  # type: ignore[method-assign]
            self.llm.eval = self._tracked_eval  # type: ignore[method-assign]
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            self.llm.__dict__.pop("generate", None)
            self.llm.__dict__.pop("eval", None)
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

    def _guarded_generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Iterator[int]:
        """``Llama.generate``, after checking that its prefix reuse will be exact.

        Mirrors the prefix match of ``Llama.generate`` (llama-cpp-python 0.3.36): when the reuse
        point lies further back than the stored SWA window reaches, the context is cleared so
        that generate prefills the whole prompt instead of attending to missing KV.
        """
        llm = self.llm
        tokens = list(tokens)
        reset = kwargs.get("reset", args[6] if len(args) > 6 else True)
        if reset and len(tokens) > 1 and int(llm.n_tokens) == 0 and self.on_cold_prompt is not None:
            self.on_cold_prompt(np.asarray(tokens[:-1], dtype=np.int32))
        n = int(llm.n_tokens)
        reuse = 0
        if reset and n > 0:
            m = min(n, len(tokens))
            same = llm.input_ids[:m] == np.asarray(tokens[:m], dtype=np.intc)
            common = int(m if same.all() else np.argmin(same))
            consumed = common == len(tokens)
            if n == len(tokens) and consumed and not llm._requires_eval:
                reuse = n
            else:
                reuse = common - 1 if consumed else common
                if reuse < n and not self._rollback_is_exact(reuse):
                    log.info("prompt diverges at token %d, before the restored SWA window "
                             "(from %d): prefilling the whole prompt", reuse, self._window_start)
                    self.clear()
                    reuse = 0
        if self.on_prompt is not None:
            self.on_prompt(len(tokens) - reuse, reuse)
        if reset and self.plan_cut is not None and len(tokens) > 1:
            cut = self.plan_cut(np.asarray(tokens[:-1], dtype=np.int32), reuse)
            if reuse < cut < len(tokens):
                # Evaluate up to the cut as its own segment and store the shared prefix there;
                # generate then prefix-matches it and evaluates the rest.
                llm.n_tokens = reuse
                llm._ctx.kv_cache_seq_rm(-1, reuse, -1)
                llm.eval(tokens[reuse:cut])
                if self.on_cut is not None:
                    self.on_cut(cut)
                reuse = cut
        if reset and len(args) <= 6 and int(llm.n_tokens) > 0:
            # Do generate's prefix reuse here, from the match above (the same rule, in numpy):
            # its own loop compares token by token in Python, ~1 ms at 4,000 tokens of TTFT.
            kwargs["reset"] = False
            if reuse == len(tokens) and not llm._requires_eval:
                tokens = []  # the whole prompt is cached with its logits: sample at once
            elif reuse > 0 and llm._ctx.kv_cache_seq_rm(-1, reuse, -1):
                llm.n_tokens = reuse
                llm._requires_eval = True
                tokens = tokens[reuse:]
            else:
                llm.reset()
                self._window_start = 0  # the whole prompt is evaluated again: its KV is all real
        draft = self.draft
        refusal = greedy_refusal(args, kwargs) if draft is not None else "off"
        if draft is not None and refusal is None:
            tokens_out = drafted_generate(llm, tokens, draft, bool(kwargs.get("reset", True)),
                                          self.on_draft)
        else:
            if draft is not None:
                log.debug("decoding without drafts: %s", refusal)
            tokens_out = Llama.generate(llm, tokens, *args, **kwargs)
        return tokens_out if self.on_first_token is None else self._first_token(tokens_out)

    def _first_token(self, tokens_out: Iterator[int]) -> Iterator[int]:
        """``tokens_out``, calling ``on_first_token`` once the first token is made."""
        try:
            first = next(tokens_out)
        except StopIteration:
            return
        finally:
            if self.on_first_token is not None:
                self.on_first_token()
        yield first
        yield from tokens_out
