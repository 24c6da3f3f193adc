"""An OpenAI-compatible HTTP server for the engine: ``python -m engine serve --model PRESET|DIR``.

app.py (FastAPI routes), protocol.py (request models, error bodies), async_engine.py (the engine
loop on its own thread), detokenize.py (streamed text, stop strings), metrics.py (Prometheus, vLLM's
names), cli.py (the command line). Needs the "serve" extra: fastapi, uvicorn, prometheus_client.
"""
from .cli import main

__all__ = ["main"]
