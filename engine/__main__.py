"""`python -m engine`: a short demo run that prints throughput and the KV-cache counters.

On the CPU it uses the small model shipped in data/models/ (random-weight "tiny" preset if that is
missing); pass --model PRESET|DIR to choose another and --device cuda on a GPU.
``python -m engine serve --help``: the OpenAI-compatible HTTP server (engine/serve/).
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from . import LLM, EngineConfig, SamplingParams

SHIPPED_MODELS = Path(__file__).resolve().parents[1] / "data" / "models"

PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n", "class Stack:\n    def __init__(self):\n",
           "    for i in range(len(items)):\n", "def parse_args(argv=None):\n    parser = argparse.",
           "with open(path) as f:\n", "try:\n    import json\nexcept ImportError:\n", "@property\ndef name(self):\n"]


def default_model() -> str:
    shipped = sorted(p for p in SHIPPED_MODELS.glob("*") if (p / "config.json").exists())
    return str(shipped[0]) if shipped else "tiny"


def load(model: str, cfg: EngineConfig) -> LLM:
    return LLM.from_pretrained(model, cfg) if Path(model).is_dir() else LLM.random(model, cfg)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="preset name or HF checkpoint folder (default: the shipped model)")
    ap.add_argument("--num-requests", type=int, default=32, help="requests in the demo (default 32)")
    ap.add_argument("--max-tokens", type=int, default=48, help="output tokens per request (default 48)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    args = ap.parse_args(argv)

    model = args.model or default_model()
    cfg = EngineConfig(block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens,
                       max_model_len=1024, device=args.device)
    t0 = time.perf_counter()
    llm = load(model, cfg)
    print(f"model {model}: {llm.spec.num_params() / 1e6:.1f}M parameters on {llm.device}, "
          f"loaded in {time.perf_counter() - t0:.1f} s")
    rng = random.Random(0)
    if llm.tokenizer is not None:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.num_requests)]
    else:
        system = [rng.randrange(3, llm.spec.vocab_size) for _ in range(64)]
        prompts = [system + [rng.randrange(3, llm.spec.vocab_size) for _ in range(rng.randint(4, 64))]
                   for _ in range(args.num_requests)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    st = llm.engine.stats()
    n_out = sum(len(o.token_ids) for o in outs)
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    ttft = statistics.median(o.metrics.ttft for o in outs)
    tpot = statistics.median(o.metrics.tpot for o in outs if o.metrics.tpot is not None)
    print(f"\n{len(outs)} requests, {n_in} prompt + {n_out} output tokens in {wall:.2f} s "
          f"({st.num_steps} steps, backend {st.attention_backend})")
    print(f"throughput   {len(outs) / wall:8.2f} req/s  {n_out / wall:9.1f} output tok/s  "
          f"{(n_in + n_out) / wall:9.1f} total tok/s")
    print(f"latency      TTFT p50 {ttft * 1e3:8.1f} ms   TPOT p50 {tpot * 1e3:7.2f} ms")
    print(f"KV cache     {st.num_gpu_blocks} blocks x {st.block_size} tokens = {st.kv_capacity_tokens} tokens, "
          f"{st.kv_bytes_per_token} bytes/token")
    print(f"             peak usage {max(s.kv_usage for s in st.steps):.1%}, mean internal fragmentation "
          f"{statistics.mean(s.internal_fragmentation for s in st.steps):.1%}")
    print(f"prefix cache {st.prefix_cache_hits} / {st.prefix_cache_queries} prompt tokens hit "
          f"({st.prefix_cache_hit_rate:.1%}), {st.num_cached_blocks} cached free blocks")
    print(f"preemptions  {st.num_preemptions}")
    if outs[0].text is not None:
        print(f"\nsample: {prompts[0]!r} ->\n{outs[0].text}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["serve"]:  # python -m engine serve ...: the OpenAI-compatible server
        from .serve import main as serve_main

        serve_main(sys.argv[2:])
    else:
        main()
