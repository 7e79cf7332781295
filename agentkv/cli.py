"""``python -m agentkv``: look after a cache_dir without loading a model.

    python -m agentkv ls CACHE_DIR        agents and shared prefixes, tokens and bytes
    python -m agentkv verify CACHE_DIR    read and check every record, cut and block it names
                                         (exit 1 if anything is damaged; --repair drops
                                         what is damaged, with every record naming it)
    python -m agentkv gc CACHE_DIR        delete payloads no record holds and files no row names
                                         (killed writers' leftovers)
    python -m agentkv ls|verify --shared redis://HOST:PORT/DB [--namespace NS]
                                         the same for the shared tier (every agentkv namespace
                                         on that server, or NS); verify reads every payload
    python -m agentkv serve MODEL.gguf --cache-dir DIR [--workers N ...]
                                         an OpenAI-compatible HTTP server (agentkv[server])

Every command refuses (exit 2), without creating or deleting anything, a folder that is not an
agentkv cache. ``verify`` checks what can be checked without the model: the database, every
record (agents and shared cuts), digests, chain keys, the assembled state's structure and
digest. Whether a state fits a given model is the fingerprint's job, checked when an
AgentMemory restores it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, Union

from ._store.records import Record
from ._store.files import DB_NAME, check_database, claim
from .errors import AgentKVError, CorruptEntry, NotACache
from ._store.disk import DiskStore

if TYPE_CHECKING:  # pragma: no cover - the redis client is an optional extra
    from ._store.shared import RedisTier


class _Refused(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _store(path: str, at_rest: int = 0) -> DiskStore:
    """The cache at ``path``, opened without creating, repairing or collecting anything."""
    directory = Path(path)
    try:
        claim(directory, create=False)
    except (NotACache, AgentKVError) as exc:
        raise _Refused(2, f"agentkv: {exc}") from exc
    problem = check_database(directory / DB_NAME)
    if problem is not None:
        raise _Refused(1, f"{DB_NAME}: DAMAGED: {problem}")
    try:
        return DiskStore(directory, budget=1 << 62, at_rest=at_rest, create=False, repair=False)
    except CorruptEntry as exc:
        raise _Refused(1, f"{DB_NAME}: DAMAGED: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - the database cannot even be opened
        raise _Refused(1, f"{DB_NAME}: cannot be opened: {type(exc).__name__}: {exc}") from exc


def _tier(args: argparse.Namespace) -> "RedisTier":
    """The shared tier named by --shared (and --namespace)."""
    from .config import SharedTier
    from ._store.shared import RedisTier
    try:
        return RedisTier(SharedTier(args.shared, namespace=args.namespace, timeout=10.0), b"")
    except AgentKVError as exc:
        raise _Refused(2, f"agentkv: {exc}") from exc


def _shared_records(tier: "RedisTier") -> List[Tuple[str, bytes, Union[Record, CorruptEntry]]]:
    try:
        rows = list(tier.scan())
    except Exception as exc:  # noqa: BLE001 - redis-py's errors: the server is not reachable
        raise _Refused(1, f"{tier.cfg.url}: cannot be read: {type(exc).__name__}: {exc}") from exc
    out: List[Tuple[str, bytes, Union[Record, CorruptEntry]]] = []
    for prefix, raw in rows:
        try:
            out.append((prefix, raw, Record.from_bytes(raw)))
        except CorruptEntry as exc:
            out.append((prefix, raw, exc))
    return sorted(out, key=lambda x: (x[0], isinstance(x[2], Record) and x[2].kind == "cut",
                                      x[2].name if isinstance(x[2], Record) else ""))


def _ls_shared(args: argparse.Namespace) -> int:
    tier = _tier(args)
    print(f"{'kind':5s} {'tokens':>7s} {'gen':>5s}  {'namespace':25s} name")
    for prefix, _, r in _shared_records(tier):
        if isinstance(r, CorruptEntry):
            print(f"?     {'':7s} {'':5s}  {prefix:25s} DAMAGED: {r}")
        elif r.kind == "agent":
            print(f"agent {r.n_tokens:7d} {r.gen:5d}  {prefix:25s} {r.name}")
        else:
            print(f"cut   {r.n_tokens:7d} {'':5s}  {prefix:25s} {r.name[:16]}")
    tier.close()
    return 0


def _verify_shared(args: argparse.Namespace) -> int:
    """Read every payload each record on the shared tier names and check it as the disk
    tier does (in a scratch cache folder: nothing is written to the server)."""
    import tempfile
    tier = _tier(args)
    bad = 0
    with tempfile.TemporaryDirectory(prefix="agentkv-verify-") as tmp:
        stores: Dict[int, DiskStore] = {}
        try:
            for prefix, raw, r in _shared_records(tier):
                if isinstance(r, CorruptEntry):
                    print(f"{prefix}: DAMAGED record: {r}")
                    bad += 1
                    continue
                try:
                    payloads = tier.read(prefix, r.keys())
                    first = next((v for v in payloads.values() if v is not None), b"")
                    rest = int.from_bytes(first[6:8], "little") if len(first) >= 8 else 0
                    if rest not in stores:
                        stores[rest] = DiskStore(Path(tmp) / str(rest), budget=1 << 62,
                                                 at_rest=rest)
                    nread = stores[rest].check_record(r, remote=(raw, payloads))
                    status = f"ok ({r.n_tokens} tokens, {nread} bytes read)"
                except Exception as exc:  # noqa: BLE001 - whatever damage raises is reported
                    status = f"DAMAGED: {exc}" if isinstance(exc, (AgentKVError, OSError)) else \
                        f"DAMAGED: {type(exc).__name__}: {exc}"
                    bad += 1
                print(f"{prefix}{_describe('', r)}: {status}")
        finally:
            for st in stores.values():
                st.close()
            tier.close()
    return 1 if bad else 0


def _ls(args: argparse.Namespace) -> int:
    if args.shared:
        return _ls_shared(args)
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


def _describe(key: str, r: Record) -> str:
    return r.name if r.kind == "agent" else f"cut {r.name[:16]} ({r.n_tokens} tokens)"


def _verify(args: argparse.Namespace) -> int:
    if args.shared:
        return _verify_shared(args)
    probe = _store(args.cache_dir)
    stores: Dict[int, DiskStore] = {0: probe}
    bad = 0
    try:
        rows = probe.record_rows()
        for key, r in sorted(rows, key=lambda kr: (isinstance(kr[1], Record) and kr[1].kind == "cut",
                                                    _name(kr))):
            if isinstance(r, CorruptEntry):
                print(f"{key}: DAMAGED: {r}" + (_repair(probe, key, r) if args.repair else ""))
                bad += 1
                continue
            first = r.tail if r.tail is not None else next((k for ks in r.blocks for k in ks), None)
            rest = probe.payload_rest(first) if first else 0
            if rest not in stores:
                stores[rest] = _store(args.cache_dir, rest)
            try:
                nread = stores[rest].check_record(r)
                status = f"ok ({r.n_tokens} tokens, {nread} bytes read)"
            except Exception as exc:  # noqa: BLE001 - whatever damage raises is reported
                status = f"DAMAGED: {exc}" if isinstance(exc, (AgentKVError, OSError)) else \
                    f"DAMAGED: {type(exc).__name__}: {exc}"
                bad += 1
                if args.repair:
                    status += _repair(probe, key, exc)
            print(f"{_describe(key, r)}: {status}")
    finally:
        for s in stores.values():
            s.close()
    return 1 if bad else 0


def _repair(store: DiskStore, key: str, exc: BaseException) -> str:
    """Drop what is damaged: the payload found damaged with every record naming it, else the
    record itself. What an AgentMemory does when a restore finds the same damage."""
    payload = getattr(exc, "payload", None)
    if payload is not None:
        dropped = store.discard_damaged(payload)
        if key not in dropped:
            store.drop_record(key)
        return f" -> dropped {payload} and {max(len(dropped), 1)} record(s)"
    store.drop_record(key)
    return " -> record dropped"


def _name(kr: Tuple[str, Union[Record, CorruptEntry]]) -> str:
    key, r = kr
    return r.name if isinstance(r, Record) else key


def _gc(args: argparse.Namespace) -> int:
    store = _store(args.cache_dir)
    try:
        print(f"{store.collect()} unreferenced payloads deleted, "
              f"{store.sweep()} stray files removed")
    finally:
        store.close()
    return 0


def _serve(args: argparse.Namespace) -> int:
    """``python -m agentkv serve``: start the workers, then serve until interrupted."""
    from ._server import EXTRA_HINT, worker_config
    try:
        import uvicorn

        from ._server.app import Server  # starlette
        from ._server.pool import Pool, WorkerDied
    except ImportError as exc:
        print(f"{EXTRA_HINT} ({exc})", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("agentkv serve: --workers must be at least 1", file=sys.stderr)
        return 2
    if not Path(args.model).expanduser().is_file():
        print(f"agentkv serve: no model file at {args.model}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    cfg = worker_config(args)
    print(f"agentkv serve: starting {args.workers} worker(s), {cfg['threads']} thread(s) each",
          file=sys.stderr, flush=True)
    try:
        pool = Pool(cfg, args.workers)
    except WorkerDied as exc:
        print(f"agentkv serve: {exc}", file=sys.stderr)
        return 1
    name = args.model_name or Path(args.model).name.removesuffix(".gguf")
    try:
        print(f"agentkv serve: {name} on http://{args.host}:{args.port}/v1", file=sys.stderr,
              flush=True)
        uvicorn.run(Server(pool, name).app(), host=args.host, port=args.port,
                    log_level=args.log_level.lower(), access_log=False)
    finally:
        pool.stop()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agentkv", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name, fn in (("ls", _ls), ("verify", _verify), ("gc", _gc)):
        p = sub.add_parser(name)
        if name == "gc":
            p.add_argument("cache_dir")
        else:
            p.add_argument("cache_dir", nargs="?")
            p.add_argument("--shared", metavar="URL",
                           help="the shared tier (redis://host:port/db) instead of a cache_dir")
            p.add_argument("--namespace", help="with --shared: only this namespace")
        if name == "verify":
            p.add_argument("--repair", action="store_true",
                           help="drop damaged payloads and the records naming them (cache_dir)")
        p.set_defaults(fn=fn)
    serve = sub.add_parser("serve", help="an OpenAI-compatible server whose agents keep their KV")
    from ._server import add_arguments
    add_arguments(serve)
    serve.set_defaults(fn=_serve)
    args = ap.parse_args(argv)
    if args.fn in (_ls, _verify) and (args.cache_dir is None) == (args.shared is None):
        ap.error(f"{args.command}: give a CACHE_DIR or --shared URL (one of them)")
    if args.fn is _serve:
        return _serve(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except _Refused as exc:
        print(str(exc), file=sys.stderr if exc.code == 2 else sys.stdout)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
