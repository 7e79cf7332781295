"""A real redis-server for the tests: started on 127.0.0.1 on a free port, in a temporary
folder, with no persistence; stopped, killed, paused and restarted (empty) on demand."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """``redis-server`` as a child process; ``url`` and a ``client`` (redis-py) to inspect it."""

    def __init__(self, folder: Path, binary: str) -> None:
        self.folder = folder
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: Optional[subprocess.Popen] = None
        self.start()
        import redis
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)

    def start(self) -> None:
        """Start (or restart, empty) on the same port; wait until it answers PING (<= 10 s)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def kill(self) -> None:
        """SIGKILL: everything it held is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung server)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart_empty(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with_sigcont = self.proc.pid
            try:
                os.kill(with_sigcont, signal.SIGCONT)
            except OSError:
                pass
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_redis(folder: Path) -> RedisServer:
    """A running server, or a skip whose reason names what is missing."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed: scripts/setup.sh installs Debian's "
                    "redis-server package (apt-get install redis-server)")
    try:
        import redis  # noqa: F401 - the tests inspect the server with it
    except ImportError:
        pytest.skip("the redis client is not installed: pip install 'agentkv[redis]'")
    try:
        return RedisServer(folder, binary)
    except (OSError, RuntimeError) as exc:
        pytest.skip(f"redis-server could not be started on 127.0.0.1: {exc}")
