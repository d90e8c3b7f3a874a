"""A `python -m server` subprocess on a free loopback port, for benchmarks and crash tests.

    with served("--no-prefix-reuse") as server:   # server.url, server.process; terminated on exit
        ...
    server = launch("--store-dir", d)              # the caller owns it (kill -9 it, wait for it)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

START_TIMEOUT_S = 300


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*flags: str, log_level: str = "warning", env: dict | None = None) -> ServerProcess:
    """Start the server with `flags` and wait until /health answers; raise if it exits or never answers."""
    port = free_port()
    environment = {**os.environ, "TPTT_LOG_LEVEL": log_level, **(env or {})}
    process = subprocess.Popen([sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), *flags],
                               env=environment)
    server = ServerProcess(f"http://127.0.0.1:{port}", process)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"the server did not start (exit code {process.poll()})")
        time.sleep(0.3)


@contextmanager
def served(*flags: str, **kwargs):
    server = launch(*flags, **kwargs)
    try:
        yield server
    finally:
        server.stop()
