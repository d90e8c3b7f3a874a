"""Helpers shared by the reliability tests."""

import time


def wait_until_idle(app, timeout_s: float = 60.0) -> None:
    """Wait until the engine has no running or waiting request and every per-request record is gone."""
    ctx = app.state.ctx
    deadline = time.monotonic() + timeout_s
    while True:
        engine = ctx.engine
        idle = (not engine.engine.requests and not engine.listeners and not engine.inbox
                and engine.stats["num_running"] == 0 and engine.stats["num_waiting"] == 0)
        if idle:
            return
        assert time.monotonic() < deadline, f"still busy: {engine.stats}, {len(engine.engine.requests)} requests"
        time.sleep(0.1)
