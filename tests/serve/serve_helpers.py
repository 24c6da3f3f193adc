"""Helpers shared by the server tests."""
from __future__ import annotations

import time


def assert_engine_empty(live, timeout: float = 10.0) -> None:
    """Wait (up to timeout seconds) until the live server's engine holds no request and no KV block, then assert it."""
    deadline = time.monotonic() + timeout
    while True:
        state = live.engine_call(lambda e: (len(e.requests), e.has_unfinished_requests(), e.kv.num_used_blocks))
        if state == (0, False, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert state == (0, False, 0), "requests left in the engine, or KV blocks still in use"
