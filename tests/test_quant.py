"""At-rest transcoding: the native kernels, their numpy twins and ggml itself agree bit for bit."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
import textwrap

import llama_cpp
import numpy as np
import pytest

from agentkv._quant import kernels as quant
from agentkv._quant import reference as twin
from agentkv._quant.reference import f32_to_f16_bits

FORMATS = quant.FORMATS
# How this CPU converts an out-of-range float to an integer (ggml's reference inherits it).
CVT = "arm" if platform.machine().lower() in ("aarch64", "arm64") else "x86"


def _special() -> np.ndarray:
    rng = np.random.default_rng(7)
    x = rng.standard_normal(32 * 64).astype(np.float16)
    for i in range(64):  # one special value per block, at every position
        x[i * 32 + i % 32] = (np.inf, -np.inf, np.nan, -np.nan)[i % 4]
    x[5 * 32:6 * 32] = np.nan
    x[6 * 32:7 * 32] = np.inf
    x[7 * 32:8 * 32] = -np.inf
    x[8 * 32:9 * 32 - 1] = 1.0
    x[9 * 32 - 1] = np.nan  # NaN last in the block: q8_0's scale becomes NaN in ggml
    return x.view(np.uint16)


def _zeros() -> np.ndarray:
    z = np.zeros(32 * 6, dtype=np.float16)
    z[32:64] = -0.0
    z[64] = -0.0
    z[96:128] = np.float16(3.0)  # constant block: q4_1's d == 0
    z[128:160:2] = -0.0
    z[160:192] = np.float16(-2.0)
    return z.view(np.uint16)


def _cases() -> dict:
    rng = np.random.default_rng(0)
    return {
        "normal": rng.standard_normal(32 * 700).astype(np.float16).view(np.uint16),
        "all_bit_patterns": np.arange(65536, dtype=np.uint16)[rng.permutation(65536)],
        "zeros_and_constants": _zeros(),
        "inf_nan": _special(),
        "large": (rng.standard_normal(32 * 100) * 30000).clip(-65504, 65504)
        .astype(np.float16).view(np.uint16),
        "max_magnitude": np.tile(np.array([65504, -65504, 1, -1] * 8, dtype=np.float16), 4)
        .view(np.uint16),
        "subnormal": (rng.standard_normal(32 * 50) * 1e-6).astype(np.float16).view(np.uint16),
        "single_block": rng.standard_normal(32).astype(np.float16).view(np.uint16),
        "empty": np.zeros(0, dtype=np.uint16),
    }


CASES = _cases()


def _backends():
    out = [pytest.param((quant.TWIN, None), id="twin")]
    if quant.NATIVE is not None:
        out.append(pytest.param((quant.NATIVE, False), id="native-simd"))
        out.append(pytest.param((quant.NATIVE, True), id="native-scalar"))
    return out


@pytest.fixture
def kernels(request):
    k, scalar = request.param
    if scalar is not None:
        k.force_scalar(scalar)
    yield k
    if scalar is not None:
        k.force_scalar(False)


@pytest.fixture(scope="module")
def ggml():
    """libggml-base from the installed llama-cpp-python: ggml's own reference quantizers."""
    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    names = [n for n in os.listdir(libdir) if n.startswith("libggml-base")]
    if not names:
        pytest.skip("libggml-base not found in llama_cpp/lib")
    lib = ctypes.CDLL(os.path.join(libdir, sorted(names)[0]))
    for fmt in FORMATS:
        for name in (f"quantize_row_{fmt}_ref", f"dequantize_row_{fmt}"):
            getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            getattr(lib, name).restype = None
    return lib


def _f32(f16: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # aarch64's fcvtl flags a signalling NaN
        return f16.view(np.float16).astype(np.float32)


def ggml_encode(lib, fmt: str, f16: np.ndarray) -> np.ndarray:
    x = _f32(f16)
    out = np.zeros(quant.encoded_size(x.size, fmt), dtype=np.uint8)
    if x.size:
        getattr(lib, f"quantize_row_{fmt}_ref")(x.ctypes.data, out.ctypes.data, x.size)
    return out


def ggml_decode(lib, fmt: str, q: np.ndarray, n: int) -> np.ndarray:
    """ggml's float32 dequantization, rounded to float16 bits the way ggml rounds."""
    y = np.zeros(n, dtype=np.float32)
    if n:
        getattr(lib, f"dequantize_row_{fmt}")(q.ctypes.data, y.ctypes.data, n)
    return f32_to_f16_bits(y)


@pytest.mark.parametrize("kernels", _backends(), indirect=True)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantizers_are_ggml_bit_for_bit(ggml, kernels, fmt, case):
    f16 = CASES[case]
    q = quant.encode(f16, fmt, kernels=kernels)
    ref = ggml_encode(ggml, fmt, f16)
    if CVT != "x86":
        # ggml's reference converts an out-of-range float (a NaN block, a value far above a
        # block's scale) as this CPU does; the twin run with the same rule predicts every byte
        # of it, then what agentkv stores is x86's rule, the same bytes on every CPU
        like_ggml = np.zeros_like(ref)
        twin.encode(f16, fmt, like_ggml, cvt=CVT)
        bad = _differ(like_ggml, ref, f16, fmt)
        assert bad.size == 0, f"{bad.size} blocks differ from ggml ({CVT} rule), first {bad[:5]}"
        portable = np.zeros_like(ref)
        twin.encode(f16, fmt, portable)
        ref_bytes, ref = ref, portable
    else:
        ref_bytes = ref
    bad = _differ(q, ref, f16, fmt)
    assert bad.size == 0, f"{bad.size} blocks differ from ggml, first {bad[:5]}"
    back = quant.decode(ref_bytes, fmt, kernels=kernels).view(np.uint16)
    assert np.array_equal(back, ggml_decode(ggml, fmt, ref_bytes, f16.size))


def _differ(q: np.ndarray, ref: np.ndarray, f16: np.ndarray, fmt: str) -> np.ndarray:
    """The indices of the blocks of q that differ from ref."""
    differs = (q != ref).reshape(-1, quant.block_bytes(fmt))
    if fmt == "iq4_nl":  # ggml leaves scratch contents in the nibbles of a scale-0 block
        x = _f32(f16).reshape(-1, 32)
        differs[np.where(np.isnan(x), 0, np.abs(x)).max(axis=1, initial=0) < 1e-15, 2:] = False
    return np.flatnonzero(differs.any(axis=1))


def test_the_stored_bytes_do_not_depend_on_the_cpu():
    """A NaN block or a value far above its block's scale: x86's conversion is stored on every
    CPU (the twin's default, which the native kernels equal); the Arm rule gives other bytes."""
    x = np.full(32, 1e-3, np.float16)
    # q8_0's scan restarts after a NaN: the scale comes from the 1e-3 values, and 60000 lands
    # far outside int32 (x86: 0, aarch64: saturated, 0xFF)
    x[0], x[1] = np.float16(60000.0), np.float16(np.nan)
    stored, arm = np.zeros(34, np.uint8), np.zeros(34, np.uint8)
    twin.encode(x.view(np.uint16), "q8_0", stored)
    twin.encode(x.view(np.uint16), "q8_0", arm, cvt="arm")
    assert not np.array_equal(stored, arm)
    assert np.array_equal(quant.encode(x, "q8_0"), stored)
    with pytest.raises(ValueError, match="conversion"):
        twin.encode(x.view(np.uint16), "q8_0", arm, cvt="ppc")


@pytest.mark.skipif(quant.NATIVE is None, reason="native kernels not built")
@pytest.mark.parametrize("fmt", FORMATS)
def test_native_equals_twin_on_arbitrary_blocks(fmt):
    """Decoding arbitrary bytes (not only what an encoder writes) is bit-identical too."""
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, quant.block_bytes(fmt) * 4000, dtype=np.uint8)
    native = quant.decode(blocks, fmt, kernels=quant.NATIVE).view(np.uint16)
    twin = quant.decode(blocks, fmt, kernels=quant.TWIN).view(np.uint16)
    assert np.array_equal(native, twin)
    kv_like = (rng.standard_normal(256 * 300) * rng.gamma(1, 2, 256 * 300)).astype(np.float16)
    assert np.array_equal(quant.encode(kv_like, fmt, kernels=quant.NATIVE),
                          quant.encode(kv_like, fmt, kernels=quant.TWIN))


@pytest.mark.parametrize("fmt", FORMATS)
def test_error_bounds_and_sizes(fmt):
    x = np.random.default_rng(5).standard_normal(256 * 64).astype(np.float16)
    q = quant.encode(x, fmt)
    assert q.nbytes == quant.encoded_size(x.size, fmt) == x.size // 32 * quant.block_bytes(fmt)
    err = np.abs(quant.roundtrip(x, fmt).astype(np.float32) - x.astype(np.float32))
    scale = np.abs(x.astype(np.float32)).reshape(-1, 32).max(axis=1, keepdims=True)
    # half a step (q4_1: of 2 * amax / 15 at most; q4_0: a whole one on the side opposite the
    # block maximum, its grid is -8..7; iq4_nl: about half its widest gap, 24 of 127), plus
    # the float16 roundings of the scale and of the result
    step = {"q8_0": 0.5 / 127, "q4_0": 1 / 8, "q4_1": 1 / 15, "iq4_nl": 0.15}[fmt]
    assert np.all(err.reshape(-1, 32) <= scale * (step + 2.0 ** -9))


def test_buffers_in_and_out_without_copies():
    x = np.random.default_rng(1).standard_normal(64).astype(np.float16)
    q_from_bytes = quant.encode(x.tobytes(), "q8_0")
    q_from_view = quant.encode(memoryview(bytearray(x.tobytes())), "q8_0")
    assert np.array_equal(q_from_bytes, q_from_view)
    out = np.zeros(quant.encoded_size(64, "q8_0"), dtype=np.uint8)
    assert quant.encode(x, "q8_0", out=out) is not None and np.array_equal(out, q_from_bytes)
    back = bytearray(128)
    quant.decode(q_from_bytes, "q8_0", out=back)
    assert np.array_equal(np.frombuffer(back, np.float16), quant.decode(q_from_bytes, "q8_0"))


def test_clear_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.encode(np.zeros(33, np.float16), "q8_0")
    with pytest.raises(ValueError, match="unknown at-rest format"):
        quant.encode(np.zeros(32, np.float16), "q3_k")
    with pytest.raises(ValueError, match="whole number"):
        quant.decode(np.zeros(35, np.uint8), "q8_0")
    with pytest.raises(ValueError, match="bytes"):
        quant.encode(np.zeros(32, np.float16), "q4_0", out=np.zeros(17, np.uint8))
    with pytest.raises(ValueError, match="read-only"):
        quant.decode(np.zeros(18, np.uint8), "q4_0", out=bytes(64))


FORCED = textwrap.dedent("""
    import hashlib, numpy as np
    from agentkv._quant import kernels as quant
    x = np.random.default_rng(0).standard_normal(32 * 999).astype(np.float16)
    h = hashlib.sha256()
    for fmt in quant.FORMATS:
        q = quant.encode(x, fmt)
        h.update(q.tobytes()); h.update(quant.decode(q, fmt).tobytes())
    print(quant.BACKEND, h.hexdigest())
""")


def test_forced_twin_in_a_subprocess():
    """AGENTKV_PUREPYTHON=1 selects the twins, which give what the default backend gives."""
    runs = {}
    for forced in ("1", ""):
        env = dict(os.environ, AGENTKV_PUREPYTHON=forced)
        out = subprocess.run([sys.executable, "-c", FORCED], env=env, check=True,
                             capture_output=True, text=True, timeout=60).stdout.split()
        runs[forced] = out
    assert runs["1"][0] == "numpy"
    assert runs[""][0] == ("numpy" if quant.NATIVE is None else "native")
    assert runs["1"][1] == runs[""][1]


def test_the_native_kernels_were_built():
    """A build without them must fail the suite, not skip the native tests: only
    AGENTKV_PUREPYTHON=1 says that the numpy twins alone are wanted."""
    if os.environ.get("AGENTKV_PUREPYTHON", "") not in ("", "0"):
        assert quant.BACKEND == "numpy"
        return
    assert quant.NATIVE is not None, "agentkv's native kernels did not build or load"
    assert quant.BACKEND == "native"


def _neon_runner():
    """How to build and run tests/neon_check.c for aarch64 here: natively on aarch64, or with
    the aarch64 cross compiler and qemu-user on x86_64 (scripts/setup.sh installs both)."""
    import shutil
    if CVT == "arm":
        cc = shutil.which("cc") or shutil.which("gcc")
        return (cc, []) if cc else None
    cc = shutil.which("aarch64-linux-gnu-gcc")
    qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    return (cc, [qemu, "-cpu", "max,sme=off"]) if cc and qemu else None


@pytest.mark.skipif(_neon_runner() is None, reason="needs an aarch64 C compiler (and qemu-user "
                    "on x86_64: Debian's gcc-aarch64-linux-gnu and qemu-user-static, which "
                    "scripts/setup.sh installs)")
@pytest.mark.parametrize("neon", [True, False], ids=["neon", "built-without-neon"])
def test_aarch64_kernels_equal_the_scalar_reference(tmp_path, neon):
    """The NEON paths, bit for bit, on every float16 pattern (under qemu on x86_64); a build
    without them (-DAKV_NO_NEON) runs the scalar reference and says so."""
    cc, run = _neon_runner()
    here = os.path.dirname(os.path.abspath(__file__))
    exe = tmp_path / "neon_check"
    flags = [] if neon else ["-DAKV_NO_NEON"]
    subprocess.run([cc, "-O3", "-ffp-contract=off", "-static", *flags,
                    "-I", os.path.join(here, "..", "native"), os.path.join(here, "neon_check.c"),
                    "-lm", "-o", str(exe)], check=True, timeout=300)
    out = subprocess.run([*run, str(exe)], capture_output=True, text=True, timeout=300)
    if neon:
        assert out.returncode == 0 and "isa neon" in out.stdout, out.stdout + out.stderr
        assert "OK: 4 formats bit-identical" in out.stdout
    else:
        assert out.returncode == 2 and "isa scalar" in out.stdout, out.stdout + out.stderr
