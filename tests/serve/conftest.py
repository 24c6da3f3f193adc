"""A live server on a free local port for the serve tests: the shipped model on the CPU, float32."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

MODEL_DIR = Path(__file__).resolve().parents[2] / "data" / "models" / "pystdlib-llama-6m"


def make_llm(**config):
    from engine import LLM, EngineConfig

    cfg = EngineConfig(**{"device": "cpu", "max_model_len": 512, "max_num_batched_tokens": 512, "block_size": 16,
                          **config})
    return LLM.from_pretrained(MODEL_DIR, cfg)


@pytest.fixture(scope="session")
def llm_factory():
    """make_llm(**EngineConfig fields): a fresh LLM of the shipped model on the CPU."""
    return make_llm


@pytest.fixture(scope="module")
def live():
    from engine.serve.background import BackgroundServer

    with BackgroundServer(make_llm(), "pystdlib") as srv:
        yield srv
