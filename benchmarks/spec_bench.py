"""When speculative decoding pays: TPOT speed-up against batch size at chosen acceptance rates, on one GPU.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/spec_bench.py \
        --out data/benchmarks/spec_decode_h200.json [--model llama-3.1-8b] [--draft llama-3.2-1b] \
        [--batch-sizes 1,4,16,64,256] [--acceptance 0.6,0.8,0.95] [--k 4] [--prompt-len 128] \
        [--output-len 64] [--repeats 3]

Random weights (bf16), so no real draft agrees with the target: the speed-up is measured in SYNTHETIC
ACCEPTANCE mode (engine/spec_decode/synthetic.py): the draft model runs every step (its cost is real) but its
proposals are replaced by the target's own tokens from the baseline run of the same prompts, and position i
is accepted with the chosen probability while the earlier ones were. The target verifies k + 1 positions per
request as it would for a real draft, so each point is "what speculation would buy at this per-token
acceptance rate"; every synthetic row is labelled so in the JSON. The n-gram proposer (prompt lookup) runs on
the same prompts with its REAL acceptance on random weights (random prompts: expect almost none), as a check
of what a proposer that rarely hits costs.

Per batch size B: B requests of --prompt-len random tokens arrive at once and generate --output-len tokens
(ignore_eos, greedy). Arms, per repeat: the baseline first (no speculation, CUDA graphs for decode; its outputs
are the recording), then synthetic at each acceptance and n-gram in an order rotated every repeat. TPOT is
the median over the B requests of (finish - first token) / (tokens - 1); the table gives the median over
--repeats runs with its min-max spread, and speed-up = baseline TPOT / arm TPOT (> 1: speculation pays).
Decode steps without any draft replay the decode CUDA graphs; verification steps in which every request
verifies a full draft of k tokens replay verification graphs (the synthetic arms' steady state); the rest
(mixed with prefill, or shorter drafts near max_tokens, most n-gram steps) run eagerly. StepStats.cuda_graph
says which ran. The draft model's decode steps replay its own CUDA graphs, one host sync per proposal (see
engine/spec_decode/draft_model.py); in synthetic mode it is told it proposed the study's tokens, so it feeds one
or two tokens per step as a draft with that acceptance would. The target runs without prefix caching (repeated
prompts would otherwise skip the prefill of later arms).
Target: at B = 1, 80% acceptance, k = 4: speed-up >= 2; the crossover (speed-up < 1) appears at large B.
About 4 minutes on one H200 at the defaults.

--real: a trained model folder (--model, e.g. the shipped data/models/pystdlib-llama-6m) on real text (the
prompts are cut from its heldout.json), with REAL acceptance only: n-gram, and the draft model --draft (a
folder or preset with the same vocabulary) when given. E.g. on the CPU:
    PYTHONPATH=. python3 benchmarks/spec_bench.py --real --model data/models/pystdlib-llama-6m --draft none \
        --device cpu --batch-sizes 1,4,16 --output-len 48 --out data/benchmarks/spec_decode_cpu_shipped.json
and with the shipped draft (data/models/pystdlib-llama-1m-draft) as --draft: data/benchmarks/spec_decode_cpu_draft.json.
"""
import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.spec_decode import NgramProposer
from workbench.bench import median_spread


def environment(device: torch.device) -> dict:
    import transformers
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"command": " ".join(sys.argv), "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton_version, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}



def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict:
    """One arm on one batch: TPOT (median over requests, seconds), output tokens/s, and the spec counters."""
    llm.engine.reset_stats()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    stats = llm.engine.stats()
    spec = stats.spec_decode
    return {"tpot": statistics.median(o.metrics.tpot for o in outs),
            "output_throughput": sum(len(o.token_ids) for o in outs) / wall, "outputs": outs,
            "num_steps": stats.num_steps, "spec": spec.to_dict() if spec is not None else None,
            "graph_share": sum(s.cuda_graph for s in stats.steps) / max(1, len(stats.steps)),
            "step_ms": step_breakdown(stats.steps)}


def step_breakdown(steps) -> dict:
    """Where a steady-state step's time goes (medians, ms): verification steps (those with drafts) of a
    speculative arm, decode-only steps of the baseline. draft: the proposer (for a draft model: its forward
    passes and the one read-back); device: the target's forward on the device; the host phases of the step."""
    sel = [s for s in steps if s.num_draft_tokens > 0]
    kind = "verification"
    if not sel:
        sel, kind = [s for s in steps if s.num_decode_tokens and not s.num_prefill_tokens], "decode"
    if not sel:
        return {}
    out = {"steps": kind, "count": len(sel)}
    for name in ("duration", "draft_time", "device_time", "schedule_time", "prepare_time", "launch_time",
                 "sample_time", "output_time"):
        out[name] = 1e3 * statistics.median(getattr(s, name) for s in sel)
    return out


def label(arm: str, real: bool) -> str:
    if arm.startswith("synthetic@"):
        return "SYNTHETIC ACCEPTANCE (chosen, not earned; random weights)"
    weights = "trained weights, real text" if real else "random weights"
    return f"{arm}: real acceptance ({weights})"


def real_prompts(model_dir: str, prompt_len: int, llm: LLM) -> list[list[int]]:
    """Prompts of prompt_len tokens cut from the model folder's heldout.json files (one per window)."""
    files = json.loads((Path(model_dir) / "heldout.json").read_text())["files"]
    out = []
    for f in files:
        text = f["text"] if isinstance(f, dict) else f
        ids = llm.tokenizer.encode(text)
        out += [ids[i:i + prompt_len] for i in range(0, len(ids) - prompt_len, 4 * prompt_len)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--draft", default="llama-3.2-1b")
    ap.add_argument("--batch-sizes", default="1,4,16,64,256")
    ap.add_argument("--acceptance", default="0.6,0.8,0.95")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu (with --model tiny)")
    ap.add_argument("--real", action="store_true", help="trained model folder, real text, real acceptance only")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rates = [float(a) for a in args.acceptance.split(",")]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    max_len = args.prompt_len + args.output_len + args.k + 16
    draft = None if args.draft in ("", "none") else args.draft
    if args.real:
        method = "draft" if draft else "ngram"
    else:
        method = "synthetic"
    config = EngineConfig(max_num_seqs=max(batch_sizes), max_model_len=max_len, enable_prefix_caching=False,
                          speculative_method=method, speculative_model=draft,
                          num_speculative_tokens=args.k, device=str(device))
    t_load = time.perf_counter()
    if args.real:
        llm = LLM.from_pretrained(args.model, config, dtype=torch.float32 if device.type == "cpu" else None)
    else:
        llm = LLM.random(args.model, config, seed=0)
    ngram = NgramProposer()
    proposers = {"ngram": ngram}
    synthetic = None
    if method == "synthetic":
        synthetic = llm.engine.proposer  # costed by the draft model (config.speculative_model) when given
        proposers.update({f"synthetic@{a}": synthetic for a in rates})
    elif method == "draft":
        proposers["draft"] = llm.engine.proposer
    draft_engine = getattr(getattr(llm.engine.proposer, "cost_proposer", None) or llm.engine.proposer, "engine", None)
    print(f"loaded {args.model} + draft {draft} in {time.perf_counter() - t_load:.1f} s; KV blocks "
          f"{llm.engine.kv.num_blocks}, draft KV blocks {draft_engine.kv.num_blocks if draft_engine else None}",
          flush=True)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    arms = list(proposers)[1:] + ["ngram"]
    results = {b: {arm: [] for arm in ["baseline"] + arms} for b in batch_sizes}

    gen = torch.Generator().manual_seed(0)
    texts = real_prompts(args.model, args.prompt_len, llm) if args.real else None

    def make_prompts(b: int) -> list[list[int]]:
        if texts is None:
            return torch.randint(4, llm.vocab_size, (b, args.prompt_len), generator=gen).tolist()
        picks = torch.randint(0, len(texts), (b,), generator=gen).tolist()
        return [texts[i] for i in picks]

    warm = make_prompts(2)
    for proposer in [None] + list(dict.fromkeys(proposers.values())):  # warm-up: kernels compiled and autotuned
        llm.engine.set_proposer(proposer)
        llm.generate(warm, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))

    for rep in range(args.repeats):
        for b in batch_sizes:
            prompts = make_prompts(b)
            llm.engine.set_proposer(None)
            base = run(llm, prompts, params)
            results[b]["baseline"].append(base)
            if synthetic is not None:
                synthetic.recorded = {}
                synthetic.record(base["outputs"])
            order = arms[rep % len(arms):] + arms[:rep % len(arms)]
            for arm in order:
                if arm.startswith("synthetic@"):
                    synthetic.acceptance = float(arm.split("@")[1])
                llm.engine.set_proposer(proposers[arm])
                results[b][arm].append(run(llm, prompts, params))
            line = " ".join(f"{arm} {results[b][arm][-1]['tpot'] * 1e3:.2f}" for arm in ["baseline"] + arms)
            print(f"repeat {rep} B={b}: TPOT ms {line}", flush=True)
    rows = []
    print(f"\nTPOT speed-up (baseline / arm), median of {args.repeats} [min-max]; k={args.k}")
    print("(a: measured per-token acceptance, accepted / positions reached)")
    print("B     " + "  ".join(f"{arm:>24}" for arm in arms))
    for b in batch_sizes:
        base_tpot = [r["tpot"] for r in results[b]["baseline"]]
        cells = []
        for arm in arms:
            runs = results[b][arm]
            speedups = [bt / r["tpot"] for bt, r in zip(base_tpot, runs)]
            spec = [r["spec"] for r in runs]
            row = {"batch_size": b, "arm": arm, "k": args.k,
                   "label": label(arm, args.real),
                   "nominal_acceptance": float(arm.split("@")[1]) if arm.startswith("synthetic@") else None,
                   "tpot_s": median_spread([r["tpot"] for r in runs]), "baseline_tpot_s": median_spread(base_tpot),
                   "speedup": median_spread(speedups),
                   "output_throughput": median_spread([r["output_throughput"] for r in runs]),
                   "baseline_output_throughput": median_spread([r["output_throughput"] for r in results[b]["baseline"]]),
                   "acceptance_rate": statistics.median(s["acceptance_rate"] for s in spec),
                   "per_token_acceptance": statistics.median(s["per_token_acceptance"] for s in spec),
                   "acceptance_rate_per_position": spec[0]["acceptance_rate_per_position"],
                   "mean_accepted_length": statistics.median(s["mean_accepted_length"] for s in spec),
                   "draft_time_share": statistics.median(s["draft_time_share"] for s in spec),
                   "num_steps": [r["num_steps"] for r in runs],
                   "step_ms": [r["step_ms"] for r in runs], "baseline_step_ms": results[b]["baseline"][-1]["step_ms"]}
            rows.append(row)
            s = row["speedup"]
            cells.append(f"{s['median']:6.2f} [{s['min']:.2f}-{s['max']:.2f}] a {row['per_token_acceptance']:.2f}")
        print(f"{b:<5} " + "  ".join(f"{c:>24}" for c in cells))
    at1 = next((r for r in rows if r["batch_size"] == 1 and r["nominal_acceptance"] == 0.8), None)
    target = None if at1 is None else {"speedup_b1_acc80": at1["speedup"]["median"],
                                       "meets_2x": at1["speedup"]["median"] >= 2.0}
    crossover = {}
    for arm in arms:
        losing = [r["batch_size"] for r in rows if r["arm"] == arm and r["speedup"]["median"] < 1.0]
        crossover[arm] = min(losing) if losing else None
    print("\nsteady-state step, medians in ms (last repeat): duration = draft (proposer) + schedule + prepare + "
          "launch + sample + output; device: the target's forward")
    for b in batch_sizes:
        for arm in ["baseline"] + arms:
            m = results[b][arm][-1]["step_ms"]
            if m:
                print(f"B={b:<4} {arm:>15} {m['steps']:>12} x{m['count']:<4} duration {m['duration']:7.2f} draft "
                      f"{m['draft_time']:6.2f} device {m['device_time']:6.2f} host: schedule {m['schedule_time']:.2f} "
                      f"prepare {m['prepare_time']:.2f} launch {m['launch_time']:.2f} sample {m['sample_time']:.2f} "
                      f"output {m['output_time']:.2f}")
    print(f"\ntarget (B=1, 80%, k={args.k}, TPOT >= 2x): {target}; first batch size where speculation loses: "
          f"{crossover}")
    result = {"environment": environment(device), "model": args.model, "draft": args.draft,
              "dtype": str(llm.dtype), "config": config.to_dict(), "prompt_len": args.prompt_len,
              "output_len": args.output_len, "repeats": args.repeats, "cuda_graphs_baseline": bool(llm.engine.runner.graphs),
              "note": ("decode steps without drafts replay decode CUDA graphs; verification steps where every request "
                       "verifies a full draft replay verification graphs; other verification steps run eagerly"),
              "graph_steps_share": {f"{b}/{arm}": statistics.median(r["graph_share"] for r in results[b][arm])
                                    for b in batch_sizes for arm in ["baseline"] + arms},
              "rows": rows, "target": target, "crossover_batch_size": crossover}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
