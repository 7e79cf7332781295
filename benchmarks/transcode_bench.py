"""Transcode throughput: MB/s of float16 in, one thread, native kernels vs numpy twins.

Command::

    .venv/bin/python benchmarks/transcode_bench.py [--mb 8] [--repeats 5] [--json out.json]

Input: KV-like float16 rows (256 values, Gemma 3 270M's head size) totalling ``--mb`` MB.
For each format it times encode (f16 -> blocks) and decode (blocks -> f16). One warm-up,
then ``--repeats`` timed runs; the table shows medians. MB/s counts the float16 bytes (input
of encode, output of decode).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

from agentkv._quant import kernels as quant


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=8.0, help="MB of float16 input")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if quant.NATIVE is None:
        raise SystemExit("native kernels not built; nothing to compare")

    n = int(args.mb * 1e6 / 2) // 256 * 256
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal(n) * rng.gamma(1.0, 1.0, n)).astype(np.float16)
    backends = {"native": quant.NATIVE, "numpy": quant.TWIN}
    results = []

    for fmt in quant.FORMATS:
        q = quant.encode(rows, fmt)
        out_q = np.empty_like(q)
        out_f = np.empty(n, dtype=np.float16)
        for op in ("encode", "decode"):
            row = {"kernel": f"{fmt} {op}"}
            for name, k in backends.items():
                if op == "encode":
                    s = median_seconds(lambda: quant.encode(rows, fmt, out=out_q, kernels=k),
                                       args.repeats)
                else:
                    s = median_seconds(lambda: quant.decode(q, fmt, out=out_f, kernels=k),
                                       args.repeats)
                row[f"{name}_mb_s"] = rows.nbytes / s / 1e6
            results.append(row)

    for r in results:
        r["speedup"] = r["native_mb_s"] / r["numpy_mb_s"]
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    print(f"machine: {machine}, native ISA: {quant.NATIVE.isa}, one thread, "
          f"{rows.nbytes / 1e6:.1f} MB of f16, median of {args.repeats}")
    print(f"{'kernel':<22}{'native MB/s':>14}{'numpy MB/s':>14}{'speedup':>10}")
    for r in results:
        print(f"{r['kernel']:<22}{r['native_mb_s']:>14,.0f}{r['numpy_mb_s']:>14,.0f}"
              f"{r['speedup']:>9.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "isa": quant.NATIVE.isa, "mb": rows.nbytes / 1e6,
                       "repeats": args.repeats, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
