"""KV rows at rest: float16 <-> ggml's q8_0 / q4_0 / q4_1 / iq4_nl blocks.

Rows are transcoded in blocks of 32 values (ggml's QK), so a buffer's length must be a
multiple of 32. The block layouts are ggml's own, byte for byte:

======  =====  ===============================================  ==================
format  bytes  block                                            bytes per value
======  =====  ===============================================  ==================
q8_0    34     f16 d | 32 x int8 q            (x = q * d)       1.0625
q4_0    18     f16 d | 16 B nibbles           (x = (q - 8) * d) 0.5625
q4_1    20     f16 d | f16 m | 16 B nibbles   (x = q * d + m)   0.625
iq4_nl  18     f16 d | 16 B nibbles   (x = d * IQ4NL[q])        0.5625
======  =====  ===============================================  ==================

(nibbles: byte j holds value j in its low and value j+16 in its high half; IQ4NL is ggml's
non-linear grid -127 .. 113). Quantization is ggml's reference quantizer
(``quantize_row_*_ref``), dequantization ggml's ``dequantize_row_*`` rounded to float16; the
tests check both against libggml itself. One deliberate difference: an iq4_nl block whose
values are all below 1e-15 in magnitude gets nibbles 8 (ggml leaves scratch bytes there);
both decode to zeros.

Which 4-bit format: iq4_nl has q4_0's size and measures better on Gemma 3 KV (mean KL vs an
exact restore 2.1e-2 against q4_0's 3.5e-2, see ``benchmarks/kv_density.py --quality``); q4_1 costs 11%
more bytes and lands in between.

Two backends give bit-identical output: the native kernels (``native/quant.c``, built by
``pip install`` through CMake, loaded with ctypes, which releases the GIL during each call)
and their numpy twins. ``AGENTKV_PUREPYTHON=1`` forces the twins; so does a missing library
(with a logged warning). :data:`BACKEND` says which one is active.

>>> import numpy as np
>>> from agentkv import quant
>>> rows = np.random.default_rng(0).standard_normal(256).astype(np.float16)
>>> q = quant.encode(rows, "q8_0")                 # 8 blocks, 272 bytes
>>> back = quant.decode(q, "q8_0")                 # 256 float16 values
>>> float(np.abs(back.astype(np.float32) - rows).max()) < 0.02
True
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Union

import numpy as np

from . import reference as _twin

__all__ = [
    "FORMATS", "QK", "GGML_TYPE", "BACKEND", "ISA", "Kernels", "NATIVE", "TWIN",
    "block_bytes", "encoded_size", "encode", "decode", "roundtrip",
]

log = logging.getLogger(__name__)

Buffer = Union[bytes, bytearray, memoryview, np.ndarray]

QK = 32
FORMATS = ("q8_0", "q4_0", "q4_1", "iq4_nl")
# ggml_type ids of the layouts
GGML_TYPE: Dict[str, int] = {"q4_0": 2, "q4_1": 3, "q8_0": 8, "iq4_nl": 20}
_FMT_ID = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "iq4_nl": 3}
_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "iq4_nl": 18}
_LIB_GLOBS = ("_agentkv_quant*.so", "_agentkv_quant*.pyd", "_agentkv_quant*.dylib",
              "libagentkv_quant*.so", "libagentkv_quant*.dylib", "agentkv_quant*.dll")


@dataclass(frozen=True)
class Kernels:
    """One backend's kernels over validated, contiguous numpy arrays (no checks, no copies).

    Attributes:
        name: "native" or "numpy".
        isa: the code path: "avx2+f16c" or "scalar" (native), "numpy" (twins).
        encode: ``(src uint16[n], fmt, dst uint8[n/32*block]) -> None``.
        decode: ``(src uint8[...], fmt, dst uint16[n]) -> None``.
        force_scalar: ``(on) -> None`` makes the native kernels take their scalar reference
            path (on) or their SIMD path again (off); None for the twins, which have one path.
    """

    name: str
    isa: str
    encode: Callable[[np.ndarray, str, np.ndarray], None]
    decode: Callable[[np.ndarray, str, np.ndarray], None]
    force_scalar: Optional[Callable[[bool], None]] = None


TWIN = Kernels("numpy", "numpy", _twin.encode, _twin.decode)


def _find_library() -> Optional[str]:
    explicit = os.environ.get("AGENTKV_NATIVE_LIB")
    if explicit:
        return explicit
    here = os.path.dirname(os.path.abspath(__file__))
    for pattern in _LIB_GLOBS:
        found = sorted(glob.glob(os.path.join(here, pattern)))
        if found:
            return found[0]
    return None


def _load_native() -> Optional[Kernels]:
    path = _find_library()
    if path is None:
        log.warning("agentkv's native kernels were not built (no compiler or CMake at install "
                    "time?); using the numpy twins, which are slower")
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        log.warning("cannot load agentkv's native kernels from %s (%s); using the numpy twins",
                    path, exc)
        return None
    vp, sz, ci = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
    lib.akv_encode.argtypes = [ci, vp, sz, vp]
    lib.akv_decode.argtypes = [ci, vp, sz, vp]
    for fn in (lib.akv_encode, lib.akv_decode):
        fn.restype = ci
    lib.akv_isa.restype = ctypes.c_char_p
    lib.akv_force_scalar.argtypes = [ci]

    def check(rc: int, what: str) -> None:
        if rc != 0:
            raise ValueError(f"native {what} rejected its arguments (code {rc})")

    def encode(src: np.ndarray, fmt: str, dst: np.ndarray) -> None:
        check(lib.akv_encode(_FMT_ID[fmt], src.ctypes.data, src.size, dst.ctypes.data), "encode")

    def decode(src: np.ndarray, fmt: str, dst: np.ndarray) -> None:
        check(lib.akv_decode(_FMT_ID[fmt], src.ctypes.data, dst.size, dst.ctypes.data), "decode")

    def force_scalar(on: bool) -> None:
        lib.akv_force_scalar(int(on))

    return Kernels("native", lib.akv_isa().decode(), encode, decode, force_scalar)


NATIVE: Optional[Kernels] = _load_native()
_FORCED = os.environ.get("AGENTKV_PUREPYTHON", "") not in ("", "0")
_ACTIVE: Kernels = TWIN if _FORCED or NATIVE is None else NATIVE
BACKEND: str = _ACTIVE.name  # "native" or "numpy"
ISA: str = _ACTIVE.isa
if _FORCED:
    log.info("AGENTKV_PUREPYTHON is set: using the numpy twins")


# -- helpers -------------------------------------------------------------------------------

def _check_fmt(fmt: str) -> None:
    if fmt not in _FMT_ID:
        raise ValueError(f"unknown at-rest format {fmt!r}; choose one of {', '.join(FORMATS)}")


def block_bytes(fmt: str) -> int:
    """Bytes of one block of 32 values in ``fmt``."""
    _check_fmt(fmt)
    return _BLOCK_BYTES[fmt]


def encoded_size(n_values: int, fmt: str) -> int:
    """Bytes that ``n_values`` float16 values (a multiple of 32) take in ``fmt``."""
    if n_values % QK:
        raise ValueError(f"{n_values} values is not a multiple of {QK}")
    return n_values // QK * block_bytes(fmt)


def _as_u8(buf: Buffer, name: str) -> np.ndarray:
    arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be a contiguous buffer")
    return arr.reshape(-1).view(np.uint8)


def _as_u16(buf: Buffer, name: str) -> np.ndarray:
    u8 = _as_u8(buf, name)
    if u8.nbytes % 2:
        raise ValueError(f"{name} holds {u8.nbytes} bytes, not whole float16 values")
    return u8.view(np.uint16)


def _out(out: Optional[Buffer], nbytes: int, dtype: Any, name: str) -> np.ndarray:
    if out is None:
        return np.empty(nbytes // np.dtype(dtype).itemsize, dtype=dtype)
    arr = _as_u8(out, name)
    if not arr.flags.writeable:
        raise ValueError(f"{name} is read-only")
    if arr.nbytes != nbytes:
        raise ValueError(f"{name} holds {arr.nbytes} bytes, {nbytes} are needed")
    return arr.view(dtype)


# -- public API ----------------------------------------------------------------------------

def encode(f16: Buffer, fmt: str, out: Optional[Buffer] = None,
           kernels: Optional[Kernels] = None) -> np.ndarray:
    """Quantize float16 values (any contiguous buffer, length a multiple of 32) to ``fmt``.

    Returns a uint8 array of ``encoded_size(n, fmt)`` bytes (``out`` if given, written in
    place). ``kernels`` picks a backend explicitly (``quant.NATIVE`` / ``quant.TWIN``).
    """
    _check_fmt(fmt)
    src = _as_u16(f16, "f16")
    if src.size % QK:
        raise ValueError(f"{src.size} values is not a multiple of {QK}")
    dst = _out(out, encoded_size(src.size, fmt), np.uint8, "out")
    (kernels or _ACTIVE).encode(src, fmt, dst)
    return dst


def decode(q: Buffer, fmt: str, out: Optional[Buffer] = None,
           kernels: Optional[Kernels] = None) -> np.ndarray:
    """Dequantize whole ``fmt`` blocks to float16; returns a float16 array (``out`` if given)."""
    _check_fmt(fmt)
    src = _as_u8(q, "q")
    bb = _BLOCK_BYTES[fmt]
    if src.nbytes % bb:
        raise ValueError(f"{src.nbytes} bytes is not a whole number of {fmt} blocks ({bb} B)")
    n = src.nbytes // bb * QK
    dst = _out(out, 2 * n, np.uint16, "out")
    (kernels or _ACTIVE).decode(src, fmt, dst)
    return dst.view(np.float16)


def roundtrip(f16: Buffer, fmt: str, out: Optional[Buffer] = None,
              kernels: Optional[Kernels] = None) -> np.ndarray:
    """``decode(encode(f16, fmt), fmt)``: what a row looks like after a trip through rest."""
    return decode(encode(f16, fmt, kernels=kernels), fmt, out=out, kernels=kernels)
