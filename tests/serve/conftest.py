"""A live server on a free local port for the serve tests: the shipped model on the CPU, float32."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

MODEL_DIR = Path(__file__).resolve().parents[2] / "data" / "models" / "pystdlib-llama-6m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving ``app`` on a thread; ``url`` is its base URL, ``server`` the OpenAIServer."""

    def __init__(self, app):
        import uvicorn

        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     access_log=False))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uvicorn.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    @property
    def server(self):
        return self.app.state.server

    def engine_call(self, fn, timeout: float = 30):
        """fn(LLMEngine) run on the engine thread (between steps), its result returned here."""
        import asyncio

        loop = self.server.engine._loop
        return asyncio.run_coroutine_threadsafe(self.server.engine.run_on_engine(fn), loop).result(timeout)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)


def make_llm(**config):
    from engine import LLM, EngineConfig

    cfg = EngineConfig(**{"device": "cpu", "max_model_len": 512, "max_num_batched_tokens": 512, "block_size": 16,
                          **config})
    return LLM.from_pretrained(MODEL_DIR, cfg)


@pytest.fixture(scope="module")
def live():
    from engine.serve.app import build_app

    srv = LiveServer(build_app(make_llm(), "pystdlib"))
    yield srv
    srv.stop()
