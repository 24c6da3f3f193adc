"""The Ray executor against the sequential one: the same 8-point sweep, on one GPU and on Ray across all of them.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/ray_sweep_bench.py --out $OUT/ray_sweep_h200x2.json

The sweep is what a user runs: `workbench.Sweep` over llama-3.1-8b (random bf16 weights), the ShareGPT-like
workload (lengths clipped to --max-len 512, so that no point is mostly the tail of a few long requests),
grid block_size {16, 32} x max_num_batched_tokens {2048, 4096, 8192, 16384} at max_num_seqs 256, one run
per point. Each sweep runs in a fresh process (no GPU memory or CUDA context left over from the other):
the sequential one with CUDA_VISIBLE_DEVICES set to one GPU, the Ray one (Sweep(executor="ray"), Ray
started by the sweep) with every GPU, one actor per GPU. Wall time: from Sweep() to the return of run(),
ray.init, each actor's imports and weight loads included (the process start and torch import are outside
both).

Before the timed sweeps two short calibration sweeps (sequential, not timed; one per block size, of n and
3n requests) fill the on-disk Triton cache that both timed sweeps then read (so neither pays the kernels'
compilation while the other does not), and their run times give the request count for which a point's
measured run takes about --target-point-s seconds, lowered so that both timed sweeps fit --budget-s (or
give --num-requests).

A pair longer than one machine session can be split: `--executors sequential` runs and saves the sequential
sweeps alone; a later `--executors ray --resume-from THAT.json` takes its request count and runs, adds the Ray
sweeps and compares them with the saved sequential ones (both commands are recorded), after short untimed
sweeps that fill this session's Triton cache. Only pairs measured on the same kind of host are comparable; the
JSON keeps each run's environment.

Targets (issue 22): Ray wall time <= 0.6x the sequential one; each point's output throughput on Ray within
5% of its sequential value. --pairs N runs N (sequential, Ray) pairs, interleaved (seq, ray, ray, seq, ...),
as many as fit in --budget-s, and reports medians with their range; one pair is a single measurement of
each wall time, which the JSON says. JSON (command, device, versions, every row) goes to --out, rewritten
after each sweep.

CPU smoke run (a local Ray from the environment; a minute or two, mostly Ray's start on a small machine):
    PYTHONPATH=. python3 benchmarks/ray_sweep_bench.py --preset tiny --device cpu --out /tmp/ray_smoke.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from workbench.bench import median_spread

ROOT = Path(__file__).resolve().parents[1]
GPU_GRID = {"block_size": [16, 32], "max_num_batched_tokens": [2048, 4096, 8192, 16384]}
CPU_GRID = {"block_size": [8, 16], "max_num_batched_tokens": [64, 128]}
KEEP = ["point_id", "label", "status", "error", "output_throughput", "duration_s", "point_duration_s",
        "total_output_tokens", "num_preemptions", "kv_blocks", "tpot_p50_ms", "run_host", "device_name",
        "kernel_compiles", "kernel_compile_s", "kernels_built"]


# ----- one sweep, in its own process ---------------------------------------------------------------

def run_child(spec: dict) -> dict:
    """Run one sweep as a user would and return its wall time and rows (called in a fresh process).
    spec["parts"]: run one sweep per part ({"grid", "num_requests"}) instead, one after another."""
    import torch

    if "parts" in spec:
        runs = [run_child({**{k: v for k, v in spec.items() if k != "parts"}, **part,
                           "out": spec["out"].replace(".jsonl", f".part{i}.jsonl")})
                for i, part in enumerate(spec["parts"])]
        rows = [{**row, "num_requests": part["num_requests"]} for run, part in zip(runs, spec["parts"])
                for row in run["rows"]]
        return {**runs[-1], "rows": rows, "wall_s": sum(r["wall_s"] for r in runs)}

    from engine import EngineConfig
    from workbench import Sweep

    finished: list[tuple[float, float]] = []  # (s since Sweep() when the point's row arrived, its duration)
    t0 = time.perf_counter()
    sweep = Sweep(model=spec["model"], workload=spec["workload"], num_requests=spec["num_requests"],
                  grid=spec["grid"], base_config=EngineConfig(**spec["base"]), out=spec["out"], repeats=1,
                  progress=False, executor=spec["executor"], num_workers=spec.get("num_workers"),
                  workload_args=spec.get("workload_args"),
                  dtype=getattr(torch, spec["dtype"]) if spec.get("dtype") else None,
                  on_point=lambda row: finished.append((time.perf_counter() - t0, row.get("point_duration_s"))))
    df = sweep.run()
    wall = time.perf_counter() - t0
    env = dict(sweep.environment)
    sweep.close()
    rows = df[[c for c in KEEP if c in df]].to_dict("records")
    durations = [r["point_duration_s"] for r in rows if r.get("point_duration_s") == r.get("point_duration_s")]
    starts = [t - d for t, d in finished if d is not None]
    return {"executor": spec["executor"], "wall_s": wall, "finished_at_s": [t for t, _ in finished], "rows": rows,
            # Sweep() to the start of its first point: Ray's start, the workers' imports (weights load in the point)
            "startup_s": min(starts) if starts else None,
            "sum_point_duration_s": sum(durations), "hosts": sorted({str(r.get("run_host")) for r in rows}),
            "environment": env, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0}


def launch(spec: dict, env_overrides: dict, timeout_s: float) -> dict:
    """Run `spec` in a child process; its result, or {"error": ...} when it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, **env_overrides, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        for stale in Path(spec["out"]).parent.glob(Path(spec["out"]).stem + ".*"):  # no resume of an old run
            if stale.is_file():
                stale.unlink()
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", str(spec_path), str(out_path)], env=env,
                                  timeout=timeout_s, capture_output=True, text=True)
        except subprocess.TimeoutExpired as e:
            return {"executor": spec["executor"], "error": f"timed out after {timeout_s:.0f} s",
                    "stderr_tail": str(e.stderr or "")[-3000:]}
        if proc.returncode != 0 or not out_path.exists():
            return {"executor": spec["executor"], "error": f"exit code {proc.returncode}",
                    "stderr_tail": proc.stderr[-3000:]}
        result = json.loads(out_path.read_text())
        result["process_s"] = time.perf_counter() - t0
        return result


# ----- the comparison ------------------------------------------------------------------------------


def summarise(runs: list[dict], max_wall_ratio: float, max_throughput_dev: float) -> dict:
    """Wall-time ratio (Ray / sequential) per pair and its median; per point the median output throughput of
    each executor and their ratio; the targets met or not."""
    ok = [r for r in runs if "error" not in r]
    seq = [r for r in ok if r["executor"] == "sequential"]
    par = [r for r in ok if r["executor"] == "ray"]
    pairs = min(len(seq), len(par))
    if not pairs:
        return {"complete_pairs": 0}
    ratios = [par[i]["wall_s"] / seq[i]["wall_s"] for i in range(pairs)]
    per_point = {}
    for label in [row["label"] for row in seq[0]["rows"]]:
        tput = {}
        for name, group in (("sequential", seq[:pairs]), ("ray", par[:pairs])):
            vals = [row["output_throughput"] for r in group for row in r["rows"]
                    if row["label"] == label and row["status"] == "ok"]
            tput[name] = statistics.median(vals) if vals else None
        ratio = tput["ray"] / tput["sequential"] if tput["ray"] and tput["sequential"] else None
        # Triton builds inside the measured runs (each stalls the GPU): the usual reason for a point that differs
        builds = {name: sum(row.get("kernel_compiles") or 0 for r in group[:pairs] for row in r["rows"]
                            if row["label"] == label) for name, group in (("sequential", seq), ("ray", par))}
        per_point[label] = {"output_throughput_sequential": tput["sequential"], "output_throughput_ray": tput["ray"],
                            "ray_over_sequential": ratio, "kernel_compiles": builds}
    devs = [abs(p["ray_over_sequential"] - 1) for p in per_point.values() if p["ray_over_sequential"] is not None]
    wall = {name: median_spread([r["wall_s"] for r in group[:pairs]]) for name, group in
            (("sequential", seq), ("ray", par))}
    return {
        "complete_pairs": pairs,
        "wall_s": wall,
        "wall_ratio_ray_over_sequential": median_spread(ratios),
        "wall_ratio_per_pair": ratios,
        "first_point_finished_s": {"sequential": seq[0]["finished_at_s"][:1], "ray": par[0]["finished_at_s"][:2]},
        "startup_s": {"sequential": [r.get("startup_s") for r in seq[:pairs]],
                      "ray": [r.get("startup_s") for r in par[:pairs]]},
        "per_point": per_point,
        "max_throughput_deviation": max(devs) if devs else None,
        "points_failed": sum(row["status"] != "ok" for r in ok for row in r["rows"]),
        "target_wall_ratio_met": statistics.median(ratios) <= max_wall_ratio,
        "target_throughput_within_met": bool(devs) and len(devs) == len(per_point) and max(devs) <= max_throughput_dev,
        "noise_note": ("one (sequential, Ray) pair: each wall time is a single measurement, its run-to-run noise "
                       "not measured here" if pairs == 1 else
                       f"{pairs} interleaved pairs (seq, ray, ray, seq, ...): medians with min-max"),
    }


def calibrate(args, base_spec: dict, env_seq: dict, log, elapsed) -> tuple[int, dict]:
    """Requests per point so that one point's measured run takes about args.target_point_s, from two short
    sequential sweeps (one per block size of the grid, so they also fill the Triton cache), of n and 3n
    requests at the grid's smallest token budget: run time = a + b x requests (the tail of the longest
    requests is the a)."""
    n1 = args.calibration_requests
    tokens = [min(base_spec["grid"]["max_num_batched_tokens"])]
    parts = [{"grid": {"block_size": [bs], "max_num_batched_tokens": tokens}, "num_requests": n}
             for bs, n in zip(base_spec["grid"]["block_size"], (n1, 3 * n1))]
    spec = {**base_spec, "executor": "sequential", "parts": parts,
            "out": str(Path(base_spec["out"]).with_name(Path(base_spec["out"]).stem + ".calibration.jsonl"))}
    result = launch(spec, env_seq, min(args.child_timeout_s, args.budget_s / 3))
    if "error" in result:
        log(f"calibration failed: {result['error']}\n{result.get('stderr_tail', '')}")
        return n1, result
    ok = [(row["num_requests"], row["duration_s"]) for row in result["rows"] if row["status"] == "ok"]
    if not ok:
        return n1, result
    log("calibration runs: " + ", ".join(f"{n} requests {d:.1f} s" for n, d in ok))
    # The timed sweeps must fit what is left of the budget: the sequential one, whose points each add ~2.5 s
    # (reconfigure, CUDA graphs, warm-up) to their measured run, plus ~20 s of process starts, and the Ray one
    # at about 0.65 x that when it runs here too.
    left = args.budget_s - elapsed()
    share = 1.65 if "ray" in args.executors else 1.0
    target = min(args.target_point_s, ((left - 20) / share - 5) / 8 - 2.5)
    result["target_point_s"] = target
    (na, da), (nb, db) = ok[0], ok[-1]
    slope = (db - da) / (nb - na) if nb != na else 0.0
    n = round(na + (target - da) / slope) if slope > 0 else round(nb * target / db)
    return max(args.min_requests, min(args.max_requests, n)), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama-3.1-8b", help="model preset (random weights)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when present")
    ap.add_argument("--workload", default="sharegpt-like")
    ap.add_argument("--num-requests", type=int, default=None, help="requests per point (default: calibrated)")
    ap.add_argument("--target-point-s", type=float, default=11.0, help="measured run time per point to aim at")
    ap.add_argument("--calibration-requests", type=int, default=128, help="n: calibration runs n and 3n")
    ap.add_argument("--calibrate", action="store_true", help="calibrate on the CPU too (default: 8 requests)")
    ap.add_argument("--min-requests", type=int, default=64)
    ap.add_argument("--max-requests", type=int, default=1000)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-len", type=int, default=512,
                    help="longest prompt and output of the ShareGPT-like workload (bounds the tail of a point)")
    ap.add_argument("--num-workers", type=int, default=None, help="Ray actors (default: one per GPU; 2 on the CPU)")
    ap.add_argument("--pairs", type=int, default=1, help="(sequential, Ray) pairs to run, interleaved")
    ap.add_argument("--executors", default="sequential,ray",
                    help="which sweeps of each pair run here: sequential,ray (default), sequential, or ray")
    ap.add_argument("--resume-from", default=None,
                    help="a JSON of an earlier run of this bench: its request count and runs are kept, and the "
                         "sweeps run here are added to them (a pair split over two sessions)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="seconds for the whole run: the request count is sized and pairs started to end by then, "
                         "and no sweep runs past it (set it below an outer timeout)")
    ap.add_argument("--child-timeout-s", type=float, default=300.0)
    ap.add_argument("--out", default="data/benchmarks/ray_sweep.json")
    ap.add_argument("--child", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.executors = [e.strip() for e in args.executors.split(",") if e.strip()]
    if not args.executors or set(args.executors) - {"sequential", "ray"}:
        ap.error(f"--executors must name sequential and/or ray, got {','.join(args.executors)!r}")
    if args.child:
        result = run_child(json.loads(Path(args.child[0]).read_text()))
        Path(args.child[1]).write_text(json.dumps(result, default=str))
        return

    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)

    on_cpu = args.device == "cpu" or (args.device is None and not _has_cuda())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid = CPU_GRID if on_cpu else GPU_GRID
    base = {"max_num_seqs": args.max_num_seqs if not on_cpu else 8, "max_model_len": args.max_model_len}
    if on_cpu:
        base.update(device="cpu", max_model_len=min(args.max_model_len, 256))
    workload = args.workload
    base_spec = {"model": args.preset, "workload": workload, "grid": grid, "base": base, "dtype": None,
                 "workload_args": {"max_len": args.max_len} if workload == "sharegpt-like" else None,
                 "num_workers": args.num_workers or (2 if on_cpu else None),
                 "out": str(out.with_name(out.stem + ".sweep.jsonl"))}
    if on_cpu and args.workload == "sharegpt-like":
        base_spec.update(workload="fixed", workload_args={"prompt_len": 16, "output_len": 8})  # a smoke run
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    env_seq = {} if on_cpu else {"CUDA_VISIBLE_DEVICES": visible[0] if visible else "0"}
    result = {"command": "python3 " + " ".join(sys.argv), "preset": args.preset, "grid": grid, "base_config": base,
              "workload": base_spec["workload"], "targets": {"wall_ratio_max": 0.6, "throughput_deviation_max": 0.05},
              "versions": _versions(), "runs": []}

    def save() -> None:
        out.write_text(json.dumps(result, indent=2, default=str))

    if args.resume_from:
        earlier = json.loads(Path(args.resume_from).read_text())
        if earlier.get("grid") != grid or earlier.get("base_config") != base:
            sys.exit(f"--resume-from {args.resume_from}: its grid/base config {earlier.get('grid')} "
                     f"{earlier.get('base_config')} differ from this run's {grid} {base}")
        result.update(runs=earlier["runs"], calibration=earlier.get("calibration"), resumed_from=args.resume_from,
                      commands=earlier.get("commands", [earlier["command"]]) + [result["command"]])
        args.num_requests = args.num_requests or earlier["num_requests"]
        log(f"resuming {args.resume_from}: {len(earlier['runs'])} earlier sweeps, {args.num_requests} requests")
    if args.num_requests is None and (not on_cpu or args.calibrate):
        log(f"calibrating on {args.calibration_requests} and {3 * args.calibration_requests} requests "
            "(sequential; fills the Triton cache)")
        n, cal = calibrate(args, base_spec, env_seq, log, lambda: time.perf_counter() - start)
        result["calibration"] = cal
        log(f"{n} requests per point")
    else:
        n = args.num_requests or 8
        if args.resume_from and not on_cpu:  # this session's Triton cache is cold: fill it before the timed sweeps
            log("filling the Triton cache (short sequential sweeps, not timed)")
            result["cache_fill"] = calibrate(argparse.Namespace(**{**vars(args), "calibration_requests": 32}),
                                             base_spec, env_seq, log, lambda: time.perf_counter() - start)[1]
    base_spec["num_requests"] = n
    result["num_requests"] = n
    save()

    pair_s = None
    for pair in range(args.pairs):
        elapsed = time.perf_counter() - start
        if pair and pair_s is not None and elapsed + pair_s > args.budget_s:
            log(f"stopping after {pair} pair(s): another would end at about {elapsed + pair_s:.0f} s > "
                f"--budget-s {args.budget_s:.0f}")
            break
        t_pair = time.perf_counter()
        order = ["sequential", "ray"] if pair % 2 == 0 else ["ray", "sequential"]
        for executor in [e for e in order if e in args.executors]:
            spec = {**base_spec, "executor": executor,
                    "out": str(out.with_name(f"{out.stem}.{executor}{pair}.jsonl"))}
            left = args.budget_s - (time.perf_counter() - start)
            if left < 20:
                log(f"pair {pair}: no time left for the {executor} sweep (--budget-s {args.budget_s:.0f})")
                break
            log(f"pair {pair}: {executor} sweep of {len(grid['block_size']) * len(grid['max_num_batched_tokens'])} "
                f"points x {n} requests")
            run = launch(spec, env_seq if executor == "sequential" else {}, min(args.child_timeout_s, left))
            run["pair"] = pair
            result["runs"].append(run)
            if "error" in run:
                log(f"  FAILED: {run['error']}\n{run.get('stderr_tail', '')}")
            else:
                failed = [r for r in run["rows"] if r["status"] != "ok"]
                startup = run["startup_s"] if run.get("startup_s") is not None else float("nan")
                log(f"  wall {run['wall_s']:.1f} s (first point started at {startup:.1f} s; process "
                    f"{run['process_s']:.1f} s), hosts {run['hosts']}, "
                    f"{len(failed)} failed points" + "".join(f"\n    {r['label']}: {r['error']}" for r in failed))
            if "error" not in run and executor == "ray" and "device" not in result:
                result["device"] = {"name": run["environment"].get("cuda_device", "cpu"),
                                    "gpus": run["gpus_visible"], "environment": run["environment"]}
            result["summary"] = summarise(result["runs"], 0.6, 0.05)
            save()
        pair_s = time.perf_counter() - t_pair

    s = result.get("summary", {})
    if s.get("complete_pairs"):
        w = s["wall_ratio_ray_over_sequential"]
        print(f"wall time: sequential {s['wall_s']['sequential']['median']:.1f} s, "
              f"ray {s['wall_s']['ray']['median']:.1f} s"
              f" -> ratio {w['median']:.3f} (min {w['min']:.3f}, max {w['max']:.3f}; target <= 0.6: "
              f"{'met' if s['target_wall_ratio_met'] else 'MISSED'})")
        print(f"{'point':36s}{'seq out tok/s':>15s}{'ray out tok/s':>15s}{'ray/seq':>9s}  kernel builds seq/ray")
        for label, p in s["per_point"].items():
            r = p["ray_over_sequential"]
            print(f"{label:36s}{p['output_throughput_sequential'] or float('nan'):15.1f}"
                  f"{p['output_throughput_ray'] or float('nan'):15.1f}{r if r else float('nan'):9.3f}"
                  f"  {p['kernel_compiles']['sequential']}/{p['kernel_compiles']['ray']}")
        dev = s["max_throughput_deviation"]
        print(f"max throughput deviation {dev if dev is not None else float('nan'):.3f} (target <= 0.05: "
              f"{'met' if s['target_throughput_within_met'] else 'MISSED'}); {s['noise_note']}")
        if args.resume_from:
            print(f"the sequential sweeps come from {args.resume_from}, an earlier session: not a baseline measured "
                  "in this run (same kind of host only if both JSONs' environments say so)")
    else:
        print("no complete (sequential, Ray) pair: see the runs' errors in the JSON")
    print(f"results: {out}")


def _has_cuda() -> bool:
    # Without creating a CUDA context in this process (the children use the GPUs).
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def _versions() -> dict:
    import platform

    v = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers", "ray"):
        try:
            v[name] = __import__(name).__version__
        except ImportError:
            v[name] = None
    return v


if __name__ == "__main__":
    main()
