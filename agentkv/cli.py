"""``python -m agentkv``: look after a cache_dir without loading a model.

    python -m agentkv ls CACHE_DIR        agents and shared prefixes, tokens and bytes
    python -m agentkv verify CACHE_DIR    read and check every stored state (exit 1 if damaged)
    python -m agentkv gc CACHE_DIR        delete payloads no record holds and files no row names
                                         (killed writers' leftovers)

``verify`` checks what can be checked without the model: digests, chain keys, the assembled
state's structure and digest. Whether a state fits a given model is the fingerprint's job,
checked when an AgentMemory restores it.
"""

from __future__ import annotations

import argparse
import logging
import struct
import sys
from pathlib import Path
from typing import List, Optional

from . import pieces as seqpieces
from .errors import AgentKVError
from .snapshot import check_state
from .store import DiskStore


def _store(path: str, at_rest: int = 0) -> DiskStore:
    if not Path(path).is_dir():
        raise SystemExit(f"agentkv: {path} is not a directory")
    return DiskStore(Path(path), budget=1 << 62, at_rest=at_rest)


def _ls(args: argparse.Namespace) -> int:
    store = _store(args.cache_dir)
    try:
        print(f"{'kind':5s} {'tokens':>7s} {'bytes':>12s}  {'fingerprint':16s}  name")
        for r, nbytes in sorted(store.agents(), key=lambda x: x[0].name):
            print(f"agent {r.n_tokens:7d} {nbytes:12d}  {r.fingerprint[:16]}  {r.name}")
        for r in store.cuts():
            print(f"cut   {r.n_tokens:7d} {'':12s}  {r.fingerprint[:16]}  {r.name[:16]}")
        print(f"{store.nbytes} bytes held")
    finally:
        store.close()
    return 0


def _verify(args: argparse.Namespace) -> int:
    probe = _store(args.cache_dir)
    bad = 0
    try:
        records = [r for r, _ in probe.agents()]
        for r in sorted(records, key=lambda r: r.name):
            raw = probe._cache.get(r.tail)
            rest = struct.unpack_from("<H", raw, 6)[0] if raw and len(raw) >= 8 else 0
            store = probe if rest == 0 else _store(args.cache_dir, rest)
            try:
                snap, nread = store.get(r.name, bytes.fromhex(r.fingerprint))
                if snap is None:
                    status = "missing"
                else:  # assembled and parsed as llama.cpp will read it
                    check_state(seqpieces.assemble(snap.state.shape, snap.state.pieces), snap.n_tokens)
                    status = f"ok ({snap.n_tokens} tokens, {nread} bytes read)"
            except (AgentKVError, OSError) as exc:
                status = f"DAMAGED: {exc}"
                bad += 1
            finally:
                if store is not probe:
                    store.close()
            print(f"{r.name}: {status}")
    finally:
        probe.close()
    return 1 if bad else 0


def _gc(args: argparse.Namespace) -> int:
    store = _store(args.cache_dir)
    try:
        print(f"{store.collect()} unreferenced payloads deleted, "
              f"{store.sweep()} stray files removed")
    finally:
        store.close()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agentkv", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name, fn in (("ls", _ls), ("verify", _verify), ("gc", _gc)):
        p = sub.add_parser(name)
        p.add_argument("cache_dir")
        p.set_defaults(fn=fn)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
