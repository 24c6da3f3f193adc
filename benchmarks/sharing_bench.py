"""Block sharing on one GPU: parallel sampling (n=4) against independent requests, and beam search.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/sharing_bench.py --out data/benchmarks/sharing_h200.json

llama-3.1-8b with random weights (bf16). Parts, interleaved over --repeats runs (medians and spread):
- n4: 256 ShareGPT-like prompts (synthetic lengths), SamplingParams(n=4, temperature=0.8), every
  sequence generating --output-len tokens (ignore_eos), against
- independent: the same 1024 sequences as 1024 requests (each prompt four times, n=1).
  Both without prefix caching (so the independent run shares nothing) and with a token budget that
  admits every prompt in the first step, so all sequences are resident together at the end: the peak
  of used KV blocks is then the whole footprint. Targets: n4's peak within 2% of one prompt plus four
  outputs per request (counted in blocks: the shared full prompt blocks once, each sequence's tail with
  its own copy of the partial block); independent's against four prompts plus four outputs.
- beam: --beam-requests prompts, BeamSearchParams(beam_width=4, max_tokens=--beam-tokens,
  ignore_eos=True): peak used blocks, against the block-table entries at that step (what the beams
  would hold without sharing).
Writes JSON (command, device, versions, every run) to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine import LLM, BeamSearchParams, EngineConfig, SamplingParams
from workbench.bench import environment
from workbench.workloads import sharegpt_like
from workbench.bench import median_spread

N = 4


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# The peak is recorded after the last step before the sequences finish: each has then computed its prompt and
# all but its last two output tokens (the last one is sampled, never computed).
def shared_blocks_ideal(prompt_len: int, output_len: int, block_size: int, n: int) -> int:
    """One prompt and n outputs: n sequences forked after prompt_len - 1 tokens hold the full prompt blocks
    once and each its own tail (its copy of the partial prompt block included)."""
    full = (prompt_len - 1) // block_size
    return full + n * (-(-(prompt_len + output_len - 2) // block_size) - full)


def independent_ideal(prompt_len: int, output_len: int, block_size: int, n: int) -> int:
    """n prompts and n outputs."""
    return n * -(-(prompt_len + output_len - 2) // block_size)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(llm, prompts, params) -> dict:
    """One offline run; returns wall time, output tokens and the block counters' peaks."""
    engine = llm.engine
    engine.reset_stats()
    sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync()
    wall = time.perf_counter() - t0
    st = engine.stats()
    steps = st.steps
    peak = max(range(len(steps)), key=lambda i: steps[i].num_used_blocks)
    out_tokens = sum(len(o.token_ids) for r in outs for o in r.outputs)
    return {"wall_s": wall, "output_tokens": out_tokens, "output_tok_s": out_tokens / wall,
            "peak_used_blocks": steps[peak].num_used_blocks,
            "table_entries_at_peak": steps[peak].num_used_blocks + steps[peak].num_saved_blocks,
            "max_shared_blocks": max(s.num_shared_blocks for s in steps), "cow_copies": st.num_cow_copies,
            "preemptions": st.num_preemptions, "steps": st.num_steps}



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--beam-requests", type=int, default=64)
    ap.add_argument("--beam-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-prompt-len", type=int, default=1024)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU only for a smoke test
    bs = args.block_size

    cfg = EngineConfig(block_size=bs, max_num_batched_tokens=65536, max_num_seqs=N * args.requests,
                       max_model_len=2048, enable_prefix_caching=False)
    log(f"loading {args.model} (random weights)")
    llm = LLM.random(args.model, cfg, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, seed=0)
    vocab = llm.spec.vocab_size
    wl = sharegpt_like(num_requests=args.requests, mean_prompt_len=min(161.0, args.max_prompt_len / 4),
                       mean_output_len=min(338.0, args.max_prompt_len / 2),
                       max_len=args.max_prompt_len, vocab_size=vocab, seed=0)
    prompts = [list(r.prompt_token_ids) for r in wl.requests]
    assert sum(map(len, prompts)) <= cfg.max_num_batched_tokens, "the prompts must fit the first step"
    o = args.output_len
    n4 = SamplingParams(n=N, max_tokens=o, temperature=0.8, ignore_eos=True)
    one = SamplingParams(max_tokens=o, temperature=0.8, ignore_eos=True)
    ideal_n4 = sum(shared_blocks_ideal(len(p), o, bs, N) for p in prompts)
    ideal_ind = sum(independent_ideal(len(p), o, bs, N) for p in prompts)
    log(f"{len(prompts)} prompts, mean {np.mean([len(p) for p in prompts]):.0f} tokens; pool "
        f"{llm.engine.kv.num_blocks} blocks; ideal n4 {ideal_n4} blocks, independent {ideal_ind}")

    # Warm-up with the measured shapes (the full prefill steps, decodes of every batch size up to 1024), few tokens.
    llm.generate(prompts, SamplingParams(n=N, max_tokens=4, temperature=0.8, ignore_eos=True))
    llm.generate([p for p in prompts for _ in range(N)], SamplingParams(max_tokens=4, temperature=0.8,
                                                                        ignore_eos=True))
    runs = {"n4": [], "independent": []}
    for r in range(args.repeats):
        runs["n4"].append(run(llm, prompts, n4))
        log(f"n4 #{r}: {runs['n4'][-1]}")
        runs["independent"].append(run(llm, [p for p in prompts for _ in range(N)], one))
        log(f"independent #{r}: {runs['independent'][-1]}")

    beam_prompts = prompts[:args.beam_requests]
    bp = BeamSearchParams(beam_width=4, max_tokens=args.beam_tokens, ignore_eos=True)
    llm.beam_search(beam_prompts[:4], BeamSearchParams(beam_width=4, max_tokens=4, ignore_eos=True))
    beam_runs = [run(llm, beam_prompts, [bp] * len(beam_prompts)) for _ in range(args.repeats)]
    for b in beam_runs:
        log(f"beam: {b}")

    peak_n4 = runs["n4"][0]["peak_used_blocks"]
    peak_ind = runs["independent"][0]["peak_used_blocks"]
    beam = beam_runs[0]
    result = {
        "command": " ".join([sys.executable] + sys.argv),
        "environment": environment(device),
        "model": args.model, "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "workload": {"name": "sharegpt-like prompts (synthetic lengths)", "requests": len(prompts),
                     "mean_prompt_len": float(np.mean([len(p) for p in prompts])), "output_len": o, "n": N,
                     "temperature": 0.8},
        "runs": runs, "beam_runs": beam_runs,
        "n4": {"peak_used_blocks": peak_n4, "ideal_blocks": ideal_n4, "ratio_to_ideal": peak_n4 / ideal_n4,
               "target": "within 2% of one prompt + four outputs per request",
               "met": abs(peak_n4 / ideal_n4 - 1) <= 0.02,
               "output_tok_s": median_spread([x["output_tok_s"] for x in runs["n4"]]),
               "wall_s": median_spread([x["wall_s"] for x in runs["n4"]])},
        "independent": {"peak_used_blocks": peak_ind, "ideal_blocks": ideal_ind, "ratio_to_ideal": peak_ind / ideal_ind,
                        "output_tok_s": median_spread([x["output_tok_s"] for x in runs["independent"]]),
                        "wall_s": median_spread([x["wall_s"] for x in runs["independent"]])},
        "n4_saving": {"blocks": peak_ind - peak_n4, "fraction": 1 - peak_n4 / peak_ind,
                      "throughput_ratio": float(np.median([x["output_tok_s"] for x in runs["n4"]])
                                                / np.median([x["output_tok_s"] for x in runs["independent"]]))},
        "beam4": {"peak_used_blocks": beam["peak_used_blocks"],
                  "unshared_blocks_at_peak": beam["table_entries_at_peak"],
                  "saving_fraction": 1 - beam["peak_used_blocks"] / beam["table_entries_at_peak"],
                  "cow_copies": beam["cow_copies"], "requests": len(beam_prompts), "max_tokens": args.beam_tokens,
                  "output_tok_s": median_spread([x["output_tok_s"] for x in beam_runs])},
    }
    for key in ("n4", "independent", "n4_saving", "beam4"):
        log(f"{key}: {json.dumps({k: v for k, v in result[key].items()})}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
