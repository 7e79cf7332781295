"""What a context was built with: every setting that changes the KV it computes or how it reads it.

A stored state may only be restored into a context that would have computed the same KV for the
same tokens. :func:`settings_of` collects those settings from what llama.cpp reports (the
context's batch sizes, the model's own metadata) and from what llama-cpp-python was given (RoPE
and YaRN parameters, metadata overrides, LoRA adapters and their files' content), and
:class:`AdapterLog` follows adapters and control vectors set on a context at run time through
``llama_cpp``'s functions. The engine hashes the result into the fingerprint.

Settings left out on purpose, and why:

- ``n_threads``: the stored bytes do not depend on it for prefill; decode rounding does (split-KV
  flash attention). A restored agent equals a never-evicted one that ran the same turns with the
  same thread counts (see the README's "What exact means").
- ``n_ctx``: the KV of a position does not depend on the context size (llama.cpp pads it to 256
  cells); a state longer than the context is refused at restore.

Left in on purpose: the machine that computes (:func:`compute`: the CPU architecture and
llama.cpp's build, as ``llama_print_system_info`` reports its backends and their features). The
KV bytes of a ggml type have one layout everywhere, but other kernels (AVX2 or AVX-512, NEON,
KleidiAI, a GPU) compute other values for them, and the stored logits too: a state written by
another build would not continue as a never-evicted agent does here, so it is refused.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import platform
import threading
from typing import Any, Callable, Dict, List, Optional

import llama_cpp
import llama_cpp.llama_cpp as _low
import xxhash

from .._format import layout as _layout

__all__ = ["settings_of", "compute", "attention_of", "AdapterLog", "ADAPTERS"]

log = logging.getLogger(__name__)

HashFile = Callable[[str], str]


_COMPUTE: Optional[str] = None


def compute() -> str:
    """What computes the KV here: the CPU architecture and llama.cpp's build (its backends and
    their features, as ``llama_print_system_info`` lists them), one line."""
    global _COMPUTE
    if _COMPUTE is None:
        info = llama_cpp.llama_print_system_info()
        text = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
        _COMPUTE = f"{platform.machine() or 'unknown'} | " + " ".join(text.split())
    return _COMPUTE


def _num(x: Any) -> Any:
    """A float setting as JSON can carry it exactly (repr of a float32 read back as float)."""
    v = float(x)
    return repr(v) if math.isfinite(v) else str(v)


def _meta(model: Any) -> Dict[str, str]:
    """The model's GGUF metadata as llama.cpp read it (key -> value string)."""
    out: Dict[str, str] = {}
    buf = ctypes.create_string_buffer(1 << 16)
    for i in range(int(llama_cpp.llama_model_meta_count(model))):
        n = llama_cpp.llama_model_meta_key_by_index(model, i, buf, len(buf))
        if n < 0:
            continue
        key = buf.value.decode("utf-8", "replace")
        n = llama_cpp.llama_model_meta_val_str_by_index(model, i, buf, len(buf))
        out[key] = buf.value.decode("utf-8", "replace") if n >= 0 else ""
    return out


def _effective(given: float, key: str, meta: Dict[str, str], overrides: Dict[str, Any]) -> Any:
    """A RoPE setting as the context uses it: ``given`` unless 0 ("from the model"), else the
    model's value (its metadata, or a kv_override of that key)."""
    if float(given) != 0.0:
        return _num(given)
    if key in overrides:
        return _num(overrides[key])
    try:
        return _num(meta[key]) if key in meta else "model"
    except ValueError:
        return meta[key]


def settings_of(llm: Any, hash_file: HashFile, adapters: Optional[List[Any]] = None
                ) -> Dict[str, Any]:
    """Everything about ``llm``'s context that a stored state must match, as JSON-able fields."""
    cp, ctx, model = llm.context_params, llm.ctx, llm.model
    meta = _meta(model)
    arch = meta.get("general.architecture", "")
    overrides = dict(getattr(llm, "kv_overrides", None) or {})
    fields: Dict[str, Any] = {
        "type_k": int(cp.type_k),
        "type_v": int(cp.type_v),
        "flash_attn": int(cp.flash_attn_type),
        "swa_full": bool(cp.swa_full),
        "n_seq_max": int(cp.n_seq_max),
        "kv_unified": bool(cp.kv_unified),
        "n_layer": int(llama_cpp.llama_model_n_layer(model)),
        "n_embd": int(llama_cpp.llama_model_n_embd(model)),
        "n_swa": int(llama_cpp.llama_model_n_swa(model)),
        # batch boundaries change the rounding of the KV a prefill computes
        "n_batch": int(llama_cpp.llama_n_batch(ctx)),
        "n_ubatch": int(llama_cpp.llama_n_ubatch(ctx)),
        "rope": {
            "freq_base": _effective(cp.rope_freq_base, f"{arch}.rope.freq_base", meta, overrides),
            "freq_scale": (_num(cp.rope_freq_scale) if float(cp.rope_freq_scale) != 0.0
                           else _num(llama_cpp.llama_model_rope_freq_scale_train(model))),
            "scaling_type": int(cp.rope_scaling_type),
            "yarn": [_num(cp.yarn_ext_factor), _num(cp.yarn_attn_factor), _num(cp.yarn_beta_fast),
                     _num(cp.yarn_beta_slow), int(cp.yarn_orig_ctx)],
        },
        "attention_type": int(cp.attention_type),
        "kv_overrides": sorted([k, _num(v) if isinstance(v, float) else v]
                               for k, v in overrides.items()),
        "meta": sorted(meta.items()),
    }
    if llama_cpp.llama_supports_gpu_offload():  # where layers run changes the arithmetic
        mp = llm.model_params
        fields["offload"] = [int(mp.n_gpu_layers), int(mp.split_mode), int(mp.main_gpu),
                             bool(cp.offload_kqv), bool(getattr(cp, "op_offload", False))]
    if adapters is None:  # nothing recorded for this context: what the Llama was built with
        lora = getattr(llm, "lora_path", None)
        adapters = [["lora", hash_file(lora), _num(llm.lora_scale)]] if lora else []
    fields["adapters"] = adapters
    return fields


class AdapterLog:
    """Adapters and control vectors set on each context through ``llama_cpp``'s functions.

    llama.cpp cannot be asked which LoRA adapters or control vector a context applies, so the
    functions that set them are wrapped (once, when agentkv is imported): each call records, per
    context, what it set. ``Llama(lora_path=...)`` goes through them too. Calls made through a
    reference taken before agentkv was imported are not seen; the README says so.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: Dict[int, str] = {}  # adapter pointer -> file
        self._state: Dict[int, Dict[str, Any]] = {}  # context pointer -> what is set
        self._version = 0
        self._installed = False

    @staticmethod
    def _addr(p: Any) -> int:
        if p is None:
            return 0
        v = getattr(p, "value", p)
        if isinstance(v, int):
            return v
        return ctypes.cast(p, ctypes.c_void_p).value or 0

    def install(self) -> None:
        if self._installed:
            return
        self._installed = True
        init, set_lora, set_cvec = (_low.llama_adapter_lora_init, _low.llama_set_adapters_lora,
                                    _low.llama_set_adapter_cvec)
        logbook = self

        def llama_adapter_lora_init(model: Any, path: bytes, *rest: Any) -> Any:
            adapter = init(model, path, *rest)
            if adapter:
                with logbook._lock:
                    logbook._paths[logbook._addr(adapter)] = os.fsdecode(path)
            return adapter

        def llama_set_adapters_lora(ctx: Any, adapters: Any, n: int, scales: Any, *rest: Any) -> int:
            rc = set_lora(ctx, adapters, n, scales, *rest)
            if rc == 0:
                entries = [[logbook._addr(adapters[i]), float(scales[i]) if scales else 1.0]
                           for i in range(int(n))] if adapters and n else []
                logbook._record(ctx, "lora", entries)
            return rc

        def llama_set_adapter_cvec(ctx: Any, data: Any, length: int, n_embd: int, il_start: int,
                                   il_end: int, *rest: Any) -> int:
            rc = set_cvec(ctx, data, length, n_embd, il_start, il_end, *rest)
            if rc == 0:
                if data:
                    raw = ctypes.string_at(ctypes.cast(data, ctypes.c_void_p), 4 * int(length))
                    entry: Any = [xxhash.xxh3_128_hexdigest(raw), int(n_embd), int(il_start),
                                  int(il_end)]
                else:
                    entry = None
                logbook._record(ctx, "cvec", entry)
            return rc

        for mod in (_low, llama_cpp):
            setattr(mod, "llama_adapter_lora_init", llama_adapter_lora_init)
            setattr(mod, "llama_set_adapters_lora", llama_set_adapters_lora)
            setattr(mod, "llama_set_adapter_cvec", llama_set_adapter_cvec)

    def _record(self, ctx: Any, kind: str, value: Any) -> None:
        with self._lock:
            self._state.setdefault(self._addr(ctx), {})[kind] = value
            self._version += 1

    @property
    def version(self) -> int:
        """Bumped by every recorded call: compare to notice a change."""
        return self._version

    def describe(self, ctx: Any, hash_file: HashFile) -> Optional[List[Any]]:
        """What is set on ``ctx`` (adapter files by content hash), or None if nothing was seen."""
        with self._lock:
            state = self._state.get(self._addr(ctx))
            if state is None:
                return None
            lora = [(self._paths.get(a), s) for a, s in state.get("lora", [])]
            cvec = state.get("cvec")
        out: List[Any] = []
        for path, scale in lora:
            # an adapter loaded before agentkv was imported: never matches another process
            name = hash_file(path) if path else f"unseen:{os.getpid()}:{id(self)}"
            out.append(["lora", name, _num(scale)])
        if cvec is not None:
            out.append(["cvec", *cvec])
        return out

    def forget(self, ctx: Any) -> None:
        with self._lock:
            self._state.pop(self._addr(ctx), None)


ADAPTERS = AdapterLog()
ADAPTERS.install()


# The architectures whose restores kv_equivalence.py --matrix proved at the minimal padding
# (_layout.load_from); other SWA models are restored in the never-evicted _layout. A model with
# attention sinks (gpt-oss) must stay out: ggml merges the sinks into the first KV chunk only.
PROVEN_ARCHITECTURES = ("gemma3",)
_GGML_F32, _GGML_F16 = 0, 1


def attention_of(llm: Any) -> str:
    """How this context's attention walks its KV cells (_layout.SPLIT, ORDERED or FIXED)."""
    cp = llm.context_params
    arch = str(llm.metadata.get("general.architecture", ""))
    if int(cp.flash_attn_type) != llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED \
            or arch not in PROVEN_ARCHITECTURES:
        return _layout.FIXED
    k, v = int(cp.type_k), int(cp.type_v)
    return _layout.SPLIT if k in (_GGML_F32, _GGML_F16) and k == v else _layout.ORDERED
