"""A live server: uvicorn on 127.0.0.1 (a free port) in a thread, around the shared default model."""

import contextlib
import socket
import threading
import time

import pytest
import uvicorn

from server.app import create_app
from server.settings import Settings

MODEL = "smollm2-135m-instruct-tptt"  # the default model's served name


def assert_error(response, status):
    """`response` is an OpenAI error object with HTTP `status`."""
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def chat_body(content="Say hi.", **extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(model, **settings):
    port = free_port()
    app = create_app(Settings(port=port, **settings), model)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def served(default_model):
    """(base URL, app) of one server shared by the tests that do not need special settings."""
    with live_server(default_model) as handle:
        yield handle


@pytest.fixture(scope="session")
def base_url(served):
    return served[0]


@pytest.fixture
def client(base_url):
    import openai

    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def start_server(default_model):
    """A context manager starting a private server with the given settings: `with start_server(**s) as (url, app)`."""
    return lambda **settings: live_server(default_model, **settings)
