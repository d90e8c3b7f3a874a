"""A real redis-server on a free loopback port (Debian's package, installed when missing), for the shared
session store's tests. `stop()` and `start()` again on the same port model an outage; nothing persists to disk.
"""

import pytest

from tests.debian import find_or_install
from tptt_runtime.bench.cluster import start_redis
from tptt_runtime.bench.serving import free_port


class RedisServer:
    def __init__(self, binary: str):
        self.binary, self.port, self.process = binary, free_port(), None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.process = start_redis(self.binary, self.port)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def started() -> RedisServer:
    binary = find_or_install("redis-server", "redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed and `apt-get install redis-server` failed here")
    return RedisServer(binary).start()


@pytest.fixture
def redis_server():
    server = started()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def module_redis_server():
    server = started()
    try:
        yield server
    finally:
        server.stop()
