"""The numpy twins of the native transcode kernels (see ``native/quant.c``).

Every function here gives bit-identical output to its native counterpart; the tests check it.
The quantizers follow ggml's reference quantizers (``ggml-quants.c``:
``quantize_row_q8_0_ref``, ``quantize_row_q4_0_ref``, ``quantize_row_q4_1_ref``,
``quantize_row_iq4_nl_ref``) operation by operation, in float32, including what they do with signed zeros, infinities and NaN:

* every float -> integer conversion is C's truncating cast as x86 executes it: a NaN or an
  out-of-range value becomes INT32_MIN, and the cast to 8 bits keeps the low byte. That is the
  stored format on every CPU, so a block's bytes and content address never depend on where it
  was written; ggml's reference compiled for aarch64 converts as that CPU does (saturating,
  NaN -> 0) and so differs from it on such blocks (``cvt="arm"`` reproduces it);
* q8_0's ``amax = MAX(amax, fabsf(v))`` scan lets a NaN reset the running maximum (a NaN at
  the end of a block makes the scale NaN); q4_0's and q4_1's scans skip NaN;
* scales are stored with ggml's own float -> half conversion (round to nearest even; every
  NaN becomes ``sign | 0x7E00``).

Decoding computes ggml's ``dequantize_row_*`` in float32 (no fused multiply-add) and rounds the
result to float16 with the same conversion.
"""

from __future__ import annotations

import numpy as np

__all__ = ["encode", "decode", "f32_to_f16_bits"]

QK = 32
_F32 = np.float32
_INT_MIN = np.int32(-2147483648)
_FLT_MAX = np.finfo(np.float32).max


def f32_to_f16_bits(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_fp16: RNE, overflow to inf, NaN -> sign | 0x7E00 (uint16 bits)."""
    x = np.asarray(x, dtype=_F32)
    with np.errstate(over="ignore", invalid="ignore"):
        bits = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        sign = (x.view(np.uint32) >> 16).astype(np.uint16) & np.uint16(0x8000)
        bits = np.where(nan, sign | np.uint16(0x7E00), bits)
    return bits


def _f16_to_f32(bits: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # aarch64's fcvtl flags a signalling NaN
        return bits.view(np.float16).astype(_F32)


def _trunc_i32(x: np.ndarray, cvt: str = "x86") -> np.ndarray:
    """C's (int32_t)x as cvttss2si does it: NaN and out-of-range give INT32_MIN.

    ``cvt="arm"``: as aarch64's fcvtzs does it instead (saturating, NaN -> 0). agentkv stores
    x86's result on every CPU; the Arm rule only predicts what ggml's own reference quantizer,
    compiled for aarch64, writes (the tests compare it with ggml there).
    """
    ok = (x >= _F32(-2147483648.0)) & (x < _F32(2147483648.0))
    with np.errstate(invalid="ignore"):
        t = np.where(ok, x, 0).astype(np.int32)
    if cvt == "x86":
        return np.where(ok, t, _INT_MIN)
    if cvt != "arm":
        raise ValueError(f"unknown float -> int conversion {cvt!r}")
    sat = np.where(x > 0, np.int32(2147483647), _INT_MIN)
    return np.where(ok, t, np.where(np.isnan(x), np.int32(0), sat))


def _round_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: to nearest, ties away from zero (exact in float32)."""
    t = np.trunc(x)
    with np.errstate(invalid="ignore"):
        frac = x - t
        up = np.abs(frac) >= _F32(0.5)
    return np.where(up, t + np.copysign(_F32(1.0), x), t).astype(_F32)


def _blocks(f16: np.ndarray) -> np.ndarray:
    flat = np.asarray(f16).reshape(-1).view(np.uint16)
    if flat.size % QK:
        raise ValueError(f"{flat.size} values is not a multiple of {QK}")
    return flat.reshape(-1, QK)


def _inv(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f`` in float32."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.where(d != 0, _F32(1.0) / np.where(d != 0, d, _F32(1.0)), _F32(0.0)).astype(_F32)


def _q8_0(x: np.ndarray, cvt: str = "x86") -> np.ndarray:
    a = np.abs(x)
    nan = np.isnan(x)
    if nan.any():  # MAX(amax, v) with a NaN v yields v: only what follows the last NaN counts
        last = QK - 1 - np.argmax(nan[:, ::-1], axis=1)
        has = nan.any(axis=1)
        before = np.arange(QK)[None, :] <= last[:, None]
        a = np.where(has[:, None] & before, _F32(0.0), a)
        amax = a.max(axis=1)
        amax = np.where(has & (last == QK - 1), _F32(np.nan), amax)
    else:
        amax = a.max(axis=1)
    d = (amax.astype(_F32) / _F32(127.0)).astype(_F32)
    with np.errstate(invalid="ignore", over="ignore"):
        x0 = x * _inv(d)[:, None]
    q = _trunc_i32(_round_away(x0), cvt).astype(np.int8)
    out = np.empty((x.shape[0], 34), dtype=np.uint8)
    out[:, 0:2] = f32_to_f16_bits(d).reshape(-1, 1).view(np.uint8)
    out[:, 2:] = q.view(np.uint8)
    return out


def _nibbles(v: np.ndarray, cvt: str = "x86") -> np.ndarray:
    """MIN(15, (int8_t)v) stored as uint8, two per byte (j and j+16)."""
    xi = np.minimum(_trunc_i32(v, cvt).astype(np.int8).astype(np.int32), 15).astype(np.uint8)
    return xi[:, :16] | (xi[:, 16:] << np.uint8(4))


def _q4_0(x: np.ndarray, cvt: str = "x86") -> np.ndarray:
    a = np.where(np.isnan(x), _F32(-1.0), np.abs(x))
    idx = np.argmax(a, axis=1)  # first index of the largest |v|, NaN skipped (amax < v)
    amax = np.take_along_axis(a, idx[:, None], axis=1)[:, 0]
    vmax = np.where(amax > 0, np.take_along_axis(x, idx[:, None], axis=1)[:, 0], _F32(0.0))
    d = (vmax.astype(_F32) / _F32(-8.0)).astype(_F32)
    with np.errstate(invalid="ignore", over="ignore"):
        v = x * _inv(d)[:, None] + _F32(8.5)
    out = np.empty((x.shape[0], 18), dtype=np.uint8)
    out[:, 0:2] = f32_to_f16_bits(d).reshape(-1, 1).view(np.uint8)
    out[:, 2:] = _nibbles(v, cvt)
    return out


def _q4_1(x: np.ndarray, cvt: str = "x86") -> np.ndarray:
    nan = np.isnan(x)
    lo = np.where(nan, _F32(np.inf), x)
    hi = np.where(nan, _F32(-np.inf), x)
    vmin = np.take_along_axis(x, np.argmin(lo, axis=1)[:, None], axis=1)[:, 0]  # first minimum
    vmax = np.take_along_axis(x, np.argmax(hi, axis=1)[:, None], axis=1)[:, 0]
    vmin = np.where(vmin < _FLT_MAX, vmin, _FLT_MAX).astype(_F32)  # `v < min` from FLT_MAX
    vmax = np.where(vmax > -_FLT_MAX, vmax, -_FLT_MAX).astype(_F32)
    with np.errstate(invalid="ignore", over="ignore"):
        d = ((vmax - vmin) / _F32(15.0)).astype(_F32)
        v = (x - vmin[:, None]) * _inv(d)[:, None] + _F32(0.5)
    out = np.empty((x.shape[0], 20), dtype=np.uint8)
    out[:, 0:2] = f32_to_f16_bits(d).reshape(-1, 1).view(np.uint8)
    out[:, 2:4] = f32_to_f16_bits(vmin).reshape(-1, 1).view(np.uint8)
    out[:, 4:] = _nibbles(v, cvt)
    return out


IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                        dtype=np.int8)
_IQ4NL_F = IQ4NL_VALUES.astype(_F32)
_GROUP_MAX_EPS = _F32(1e-15)


def _best_index(al: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8 over IQ4NL_VALUES: nearest value, a tie goes up, NaN -> 15."""
    mu = np.clip(np.searchsorted(_IQ4NL_F, al, side="right"), 1, 15)  # NaN sorts last
    with np.errstate(invalid="ignore", over="ignore"):
        lower = (al - _IQ4NL_F[mu - 1]) < (_IQ4NL_F[mu] - al)
    idx = np.where(lower, mu - 1, mu)
    idx = np.where(al >= _IQ4NL_F[15], 15, idx)
    return np.where(al <= _IQ4NL_F[0], 0, idx)


def _seq_sum(t: np.ndarray) -> np.ndarray:
    """``s = 0; for v in row: s += v`` in float32, exactly (numpy's sum is pairwise)."""
    return np.cumsum(np.concatenate([np.zeros((t.shape[0], 1), _F32), t], axis=1),
                     axis=1, dtype=_F32)[:, -1]


def _iq4_nl(x: np.ndarray, cvt: str = "x86") -> np.ndarray:
    """ggml's quantize_row_iq4_nl_ref (quantize_row_iq4_nl_impl, no weights, ntry = -1).

    A block whose largest magnitude is below 1e-15 gets scale 0 and nibbles 8 (value +1, so
    it decodes to +0.0); ggml leaves whatever its scratch buffer held in those nibbles.
    """
    a = np.where(np.isnan(x), _F32(-1.0), np.abs(x))
    idx = np.argmax(a, axis=1)
    amax = np.take_along_axis(a, idx[:, None], axis=1)[:, 0]
    vmax = np.where(amax > 0, np.take_along_axis(x, idx[:, None], axis=1)[:, 0], _F32(0.0))
    small = ~(np.maximum(amax, _F32(0.0)) >= _GROUP_MAX_EPS)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore", under="ignore"):
        w = x * x
        d0 = (vmax / _F32(-127.0)).astype(_F32)
        idv = (_F32(1.0) / np.where(small, _F32(1.0), d0)).astype(_F32)
        L = _best_index(x * idv[:, None])
        q = _IQ4NL_F[L]
        wq = w * q
        sumqx = _seq_sum(wq * x)
        sumq2 = _seq_sum(wq * q)
        d = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, _F32(1.0)), _F32(0.0))
    d = np.where(small, _F32(0.0), d).astype(_F32)
    L = np.where(small[:, None], 8, L).astype(np.uint8)
    out = np.empty((x.shape[0], 18), dtype=np.uint8)
    out[:, 0:2] = f32_to_f16_bits(d).reshape(-1, 1).view(np.uint8)
    out[:, 2:] = L[:, :16] | (L[:, 16:] << np.uint8(4))
    return out


_ENCODERS = {"q8_0": _q8_0, "q4_0": _q4_0, "q4_1": _q4_1, "iq4_nl": _iq4_nl}
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "iq4_nl": 18}


def encode(f16: np.ndarray, fmt: str, out: np.ndarray, cvt: str = "x86") -> None:
    """Quantize float16 values (as uint16 bits, a multiple of 32) into ``out`` (uint8).

    ``cvt``: how an out-of-range float becomes an integer (see :func:`_trunc_i32`); the stored
    format is ``"x86"``'s on every CPU.
    """
    x = _f16_to_f32(_blocks(f16))
    out.reshape(-1)[:] = _ENCODERS[fmt](x, cvt).reshape(-1)


def decode(q: np.ndarray, fmt: str, out: np.ndarray) -> None:
    """Dequantize ``q`` (uint8 blocks) into ``out`` (float16 bits as uint16)."""
    b = np.asarray(q, dtype=np.uint8).reshape(-1, BLOCK_BYTES[fmt])
    d = _f16_to_f32(b[:, 0:2].copy().view(np.uint16))
    with np.errstate(invalid="ignore", over="ignore"):
        if fmt == "q8_0":
            y = b[:, 2:].view(np.int8).astype(_F32) * d
        else:
            qs = b[:, 4:] if fmt == "q4_1" else b[:, 2:]
            n = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=1).astype(np.int32)
            if fmt == "q4_0":
                y = (n - 8).astype(_F32) * d
            elif fmt == "iq4_nl":
                y = d * _IQ4NL_F[n]
            else:
                m = _f16_to_f32(b[:, 2:4].copy().view(np.uint16))
                y = (n.astype(_F32) * d) + m
    out.reshape(-1)[:] = f32_to_f16_bits(y.astype(_F32)).reshape(-1)
