"""``python -m agentkv serve``: an OpenAI-compatible HTTP server whose agents keep their KV.

One front process (Starlette on uvicorn) and ``--workers`` worker processes, each with its own
``Llama`` and ``AgentMemory`` on one shared cache_dir. Needs the ``server`` extra
(``pip install 'agentkv[server]'``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Dict

__all__ = ["EXTRA_HINT", "add_arguments", "worker_config"]

EXTRA_HINT = "agentkv serve needs the server extra: pip install 'agentkv[server]'"

_KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # ggml type ids (llama.h GGML_TYPE_*)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path of the GGUF model")
    p.add_argument("--cache-dir", required=True, help="the agents' KV cache folder (shared by all workers)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes, each with its own Llama (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads in all, split evenly between workers (default: every core)")
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--n-batch", type=int, default=512)
    p.add_argument("--flash-attn", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--chat-format", default=None,
                   help="llama-cpp-python chat format (default: the GGUF's template; Gemma: gemma)")
    p.add_argument("--type-k", choices=sorted(_KV_TYPES), default=None, help="live K cache type")
    p.add_argument("--type-v", choices=sorted(_KV_TYPES), default=None, help="live V cache type")
    p.add_argument("--ram-budget", default="1GiB", help="per worker")
    p.add_argument("--disk-budget", default="20GiB")
    p.add_argument("--at-rest", default=None, choices=["q8_0", "q4_0", "q4_1", "iq4_nl"])
    p.add_argument("--draft", default=None, choices=["ngram"],
                   help="self-draft decoding of greedy requests (a request's \"draft\" overrides it)")
    p.add_argument("--shared", default=None, metavar="URL",
                   help="a shared tier (redis://host:port/db, agentkv[redis]) for servers on "
                        "several machines: an agent's turn restores from it what another "
                        "server's worker saved")
    p.add_argument("--model-name", default=None, help="the model id clients see (default: the file name)")
    p.add_argument("--log-level", default="WARNING")


def worker_config(args: argparse.Namespace) -> Dict[str, Any]:
    threads = args.threads or os.cpu_count() or 1
    return {
        "model": str(Path(args.model).expanduser()), "cache_dir": str(Path(args.cache_dir).expanduser()),
        "threads": max(1, threads // args.workers), "n_ctx": args.n_ctx, "n_batch": args.n_batch,
        "flash_attn": args.flash_attn, "chat_format": args.chat_format,
        "type_k": _KV_TYPES.get(args.type_k) if args.type_k else None,
        "type_v": _KV_TYPES.get(args.type_v) if args.type_v else None,
        "ram_budget": args.ram_budget, "disk_budget": args.disk_budget, "at_rest": args.at_rest,
        "draft": args.draft, "shared": args.shared, "log_level": args.log_level.upper(),
    }
