"""A real redis-server on a free loopback port (Debian's package, installed when missing), for the shared
session store's tests. `stop()` and `start()` again on the same port model an outage; nothing persists to disk.
"""

import socket
import subprocess
import time

import pytest
import redis

from tests.debian import find_or_install


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, binary: str):
        self.binary, self.port, self.process = binary, free_port(), None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                assert time.monotonic() < deadline and self.process.poll() is None, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


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
