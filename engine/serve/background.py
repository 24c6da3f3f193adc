"""BackgroundServer: the OpenAI server on a thread of this process (a notebook kernel, a test, a benchmark).

``python -m engine serve`` is the way to run a server; this is for when the caller wants the server
and its LLM in the same process, e.g. to read EngineStats after a load test.
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """uvicorn serving ``build_app(llm, model_name)`` on a daemon thread until stop().

    ``url`` is the base URL (``url + "/v1"`` for the openai client); ``server`` the OpenAIServer.
    The LLM's engine belongs to the server's engine thread while it runs: read it through
    ``engine_call(fn)``, which runs fn(LLMEngine) between two steps.
    """

    def __init__(self, llm, model_name: str = "model", host: str = "127.0.0.1", port: int | None = None,
                 start_timeout: float = 60.0):
        import uvicorn

        from .app import build_app

        self.app = build_app(llm, model_name)
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self._uvicorn = uvicorn.Server(uvicorn.Config(self.app, host=host, port=self.port, log_level="warning",
                                                      access_log=False))
        self._thread = threading.Thread(target=self._uvicorn.run, name="uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + start_timeout
        while not self._uvicorn.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)

    @property
    def server(self):
        return self.app.state.server

    def engine_call(self, fn, timeout: float = 60.0):
        """fn(LLMEngine) run on the engine thread between two steps; returns its result."""
        eng = self.server.engine
        return asyncio.run_coroutine_threadsafe(eng.run_on_engine(fn), eng._loop).result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
