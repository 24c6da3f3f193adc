"""The sampler on one GPU: the device sampler (engine.sampling.Sampler) against the host path it replaced.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/sampler_bench.py --out data/benchmarks/sampler_h200.json \
        [--rows 1,64,256,1024,2048] [--vocab 128256] [--repeats 3] [--old-max-rows 2048]

Per point: `rows` float32 logits rows over `vocab` tokens (randn x 4, on the GPU, made once), sampling with the
point's parameters; the time is from a synchronized start to the token ids on the host (what the runner waits for).
Parameter sets: "topk50_topp0.9_t0.8" (the issue's, every row; the top-k path), the same with a seed per row
("seeded": one device fill of the exponentials per row), "topp0.9_t0.8" (top-p alone: its nucleus looked for among
the 1024 largest values first, sorted only when not there), "topk2000_topp0.9_t0.8" (the sort path: a top-k above
1024), both new sampler only unless --old-sort, and "every16th_..." (issue 13's load test: 1 row in 16 samples so,
the others are greedy).
"old" is the host sampler before this change (copied below): it copies the sampled rows to the host 32 at a time
and filters each row there, so it runs only up to --old-max-rows rows. Runs are interleaved
(every point and sampler once per repeat, after one warm-up each); the JSON gives each median with its min-max
spread, the speed-up old / new, and the new sampler's peak device temporaries (torch.cuda.max_memory_allocated over
the call, beyond the logits) against engine.memory.sampler_temporary_bytes.

Expected: about 3-4 minutes on one H200 (the old path costs about 5 ms a sampled row: 4 x (2 x 3393 + 213) rows).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.memory import sampler_temporary_bytes  # noqa: E402
from engine.sampling import SAMPLE_CHUNK_ROWS, Sampler, SamplingParams  # noqa: E402

PARAMS = {
    "topk50_topp0.9_t0.8": dict(temperature=0.8, top_k=50, top_p=0.9),
    "topk50_topp0.9_t0.8_seeded": dict(temperature=0.8, top_k=50, top_p=0.9, seed=0),
    "topp0.9_t0.8": dict(temperature=0.8, top_p=0.9),
    "topk2000_topp0.9_t0.8": dict(temperature=0.8, top_k=2000, top_p=0.9),
    # issue 13's load test: 1 row in 16 samples with the issue's parameters, the others are greedy
    "every16th_topk50_topp0.9_t0.8": dict(temperature=0.8, top_k=50, top_p=0.9, every=16),
}

SORTING_SETS = ("topp0.9_t0.8", "topk2000_topp0.9_t0.8")  # the old path sorts every row of these: --old-sort


# ----- the host sampler this change replaced (engine/sampling.py before it), for comparison only ------------------
def _old_filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k != -1 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        remove = torch.zeros_like(remove_sorted).scatter(0, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


class OldHostSampler:
    """Greedy argmax on the device; rows with top-k/top-p or a seed copied to the host 32 at a time and drawn
    one by one with torch.multinomial (unseeded unfiltered rows drew on the device)."""

    def __init__(self, seed: int = 0, chunk_rows: int = 32):
        self.seed, self.chunk_rows = seed, chunk_rows
        self.generator = torch.Generator().manual_seed(seed)
        self.device_generator = None

    def __call__(self, logits, params, generators):
        greedy = logits.argmax(dim=-1).tolist()
        out = list(greedy)
        rest = [i for i, p in enumerate(params) if not p.greedy]
        if logits.device.type == "cuda":
            batch = [i for i in rest if generators[i] is None and params[i].top_k == -1 and params[i].top_p == 1.0]
            if batch and self.device_generator is None:
                self.device_generator = torch.Generator(device=logits.device).manual_seed(self.seed)
            for start in range(0, len(batch), self.chunk_rows):
                chunk = batch[start:start + self.chunk_rows]
                temps = torch.tensor([params[i].temperature for i in chunk], device=logits.device)
                probs = torch.softmax(logits[chunk].float() / temps[:, None], dim=-1)
                for i, t in zip(chunk, torch.multinomial(probs, 1, generator=self.device_generator)[:, 0].tolist()):
                    out[i] = t
            done = set(batch)
            rest = [i for i in rest if i not in done]
        for start in range(0, len(rest), self.chunk_rows):
            chunk = rest[start:start + self.chunk_rows]
            block = logits.index_select(0, torch.as_tensor(chunk, device=logits.device)).cpu().float()
            for i, row_logits in zip(chunk, block):
                p, gen = params[i], generators[i]
                row = _old_filter_top_k_top_p(row_logits / p.temperature, p.top_k, p.top_p)
                out[i] = int(torch.multinomial(row.softmax(-1), 1, generator=gen if gen is not None else self.generator)
                             .item())
        return out


# ----- measurement ----------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    import transformers
    import triton
    return {"command": " ".join(sys.argv),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "sample_chunk_rows": SAMPLE_CHUNK_ROWS}


def point_inputs(name: str, rows: int):
    kw = dict(PARAMS[name])
    every = kw.pop("every", 1)
    params = [SamplingParams(**{**kw, "seed": kw["seed"] + i} if "seed" in kw else kw) if i % every == 0 else
              SamplingParams(temperature=0.0) for i in range(rows)]
    return params, lambda: [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(sampler, logits, params, generators) -> float:
    sync(logits.device)
    t0 = time.perf_counter()
    tokens = sampler(logits, params, generators)
    elapsed = time.perf_counter() - t0  # tokens are host ints: the device work is done
    assert len(tokens) == len(params)
    return elapsed


def peak_temporaries(sampler, logits, params, generators) -> int | None:
    if logits.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sampler(logits, params, generators)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--rows", default="1,64,256,1024,2048")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--old-max-rows", type=int, default=2048, help="largest row count the old host path runs at")
    ap.add_argument("--old-sort", action="store_true", help="also time the old path on the top-p-only set")
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke test of the script)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("needs CUDA (or --device cpu for a smoke test)")
    torch.manual_seed(0)
    rows_list = [int(r) for r in args.rows.split(",")]
    logits_all = torch.randn(max(rows_list), args.vocab, device=device) * 4
    new = Sampler(0)
    old = OldHostSampler(0)
    points = []
    for name in PARAMS:
        for rows in rows_list:
            for impl in ("new", "old"):
                if impl == "old" and (rows > args.old_max_rows or (name in SORTING_SETS and not args.old_sort)):
                    continue
                points.append((name, rows, impl))
    samplers = {"new": new, "old": old}
    times: dict[tuple, list[float]] = {p: [] for p in points}
    for p in points:  # warm-up (kernels, generators, allocator)
        name, rows, impl = p
        params, gens = point_inputs(name, rows)
        timed(samplers[impl], logits_all[:rows], params, gens())
    for rep in range(args.repeats):
        order = points if rep % 2 == 0 else points[::-1]
        for p in order:
            name, rows, impl = p
            params, gens = point_inputs(name, rows)
            times[p].append(timed(samplers[impl], logits_all[:rows], params, gens()))
        print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
    results = []
    for name in PARAMS:
        for rows in rows_list:
            params, gens = point_inputs(name, rows)
            row = {"params": name, "rows": rows, "vocab": args.vocab,
                   "peak_temporary_bytes": peak_temporaries(new, logits_all[:rows], params, gens()),
                   "sampler_temporary_bytes_bound": sampler_temporary_bytes(rows, args.vocab, new.chunk_rows,
                                                                            new.sort_rows)}
            for impl in ("new", "old"):
                t = times.get((name, rows, impl))
                if t:
                    row[f"{impl}_ms_median"] = statistics.median(t) * 1e3
                    row[f"{impl}_ms_min"], row[f"{impl}_ms_max"] = min(t) * 1e3, max(t) * 1e3
                    row[f"{impl}_ms_runs"] = [x * 1e3 for x in t]
            if "old_ms_median" in row:
                row["speedup"] = row["old_ms_median"] / row["new_ms_median"]
            results.append(row)
            old_s = (f"old {row['old_ms_median']:9.2f} ms ({row['old_ms_min']:.2f}-{row['old_ms_max']:.2f})  "
                     f"x{row['speedup']:.0f}" if "old_ms_median" in row else "")
            print(f"{name:28s} rows {rows:5d}: new {row['new_ms_median']:8.3f} ms ({row['new_ms_min']:.3f}-"
                  f"{row['new_ms_max']:.3f})  {old_s}  temporaries {(row['peak_temporary_bytes'] or 0) / 2**20:.0f} "
                  f"MiB (bound {row['sampler_temporary_bytes_bound'] / 2**20:.0f})", flush=True)
    out = {"environment": environment(device), "repeats": args.repeats, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
