"""The OpenAI server on a GPU (Triton kernels, CUDA graphs): concurrent streams give the offline greedy
tokens of the same engine, and every KV block comes back."""
import asyncio
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
httpx = pytest.importorskip("httpx")
httpx_sse = pytest.importorskip("httpx_sse")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

MODEL = Path(__file__).resolve().parents[2] / "data" / "models" / "pystdlib-llama-6m"


def test_server_on_cuda_streams_the_offline_greedy_tokens():
    from engine import LLM, EngineConfig, SamplingParams
    from engine.serve.background import BackgroundServer

    cfg = EngineConfig(max_model_len=512, num_gpu_blocks=256)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 4096, (8 + 7 * i,), generator=gen).tolist() for i in range(16)]
    ref = LLM.from_pretrained(MODEL, cfg, dtype=torch.float32)
    expected = [o.token_ids for o in ref.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0,
                                                                         ignore_eos=True))]
    del ref

    async def stream(client, url, p):
        body = {"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stream": True,
                "return_token_ids": True}
        ids = []
        async with httpx_sse.aconnect_sse(client, "POST", url, json=body) as es:
            async for sse in es.aiter_sse():
                if sse.data == "[DONE]":
                    return ids
                ids += json.loads(sse.data)["choices"][0]["token_ids"]
        raise AssertionError("the stream ended without [DONE]")

    async def run(url):
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*[stream(c, url, p) for p in prompts])

    with BackgroundServer(LLM.from_pretrained(MODEL, cfg, dtype=torch.float32), "m") as srv:
        got = asyncio.run(run(srv.url + "/v1/completions"))
        used = srv.engine_call(lambda e: (len(e.requests), e.kv.num_used_blocks))
    assert got == expected
    assert used == (0, 0)
