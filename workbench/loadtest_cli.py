"""``python -m workbench loadtest``: load-test an OpenAI endpoint, or sweep servers started per point.

    python -m workbench loadtest --endpoint http://127.0.0.1:8000 --model NAME --workload sharegpt-like \\
        --request-rate 4 --num-requests 200 --out results.jsonl --html report.html
    python -m workbench loadtest --model llama-3.1-8b --request-rate 4 \\
        --server-cmd "{python} -m engine serve --model {model} --port {port} --block-size {block_size}" \\
        --grid block_size=16,32 --out sweep.jsonl --html sweep.html
"""
from __future__ import annotations
from .schema import C

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .__main__ import parse_assignment

    def grid_item(text):
        return parse_assignment(text, many=True)

    p.add_argument("--endpoint", metavar="URL", help="base URL of the server (e.g. http://127.0.0.1:8000); "
                   "with --server-cmd: http://HOST:PORT of the servers it starts")
    p.add_argument("--model", required=True, help="the model name the server serves (and {model} in --server-cmd)")
    p.add_argument("--served-model-name", help="the name to send in requests, when not --model")
    p.add_argument("--workload", default="sharegpt-like", metavar="NAME|FILE",
                   help="a built-in workload or a .jsonl trace (default: %(default)s)")
    p.add_argument("--num-requests", type=int, metavar="N", help="number of requests (default: the workload's)")
    p.add_argument("--workload-arg", type=parse_assignment, action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the built-in workload, e.g. output_len=64; repeatable")
    p.add_argument("--request-rate", type=float, metavar="REQ_PER_S", help="Poisson arrivals at this rate")
    p.add_argument("--concurrency", type=int, metavar="C", help="closed loop: C requests in flight")
    p.add_argument("--vocab-size", type=int, help="token ids of the workload are drawn below this (default: the "
                   "model's when --model is a preset or a folder, else 32000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload (default: 0)")
    p.add_argument("--api", choices=["completions", "chat"], default="completions",
                   help="/v1/completions (default) or /v1/chat/completions (one user message; needs --tokenizer)")
    p.add_argument("--tokenizer", metavar="DIR", help="send prompts as the text their token ids decode to with this "
                   "tokenizer (for chat, and servers that take no token ids)")
    p.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos (for servers without "
                   "vLLM's extension; outputs may then end early)")
    p.add_argument("--no-warmup", action="store_true", help="skip the few unmeasured requests sent first")
    p.add_argument("--scrape-interval", type=float, default=0.5, metavar="SECONDS",
                   help="seconds between /metrics scrapes, 0 for none (default: %(default)s)")
    p.add_argument("--telemetry", choices=["auto", "on", "off"], default="auto",
                   help="NVML sampling: auto (local endpoint with a GPU), on, off")
    p.add_argument("--max-duration", type=float, metavar="SECONDS", help="stop the run after this long")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="a request without a complete answer after this long fails (default: %(default)s)")
    p.add_argument("--slo-ttft", type=float, metavar="SECONDS", help="TTFT SLO for goodput, in seconds")
    p.add_argument("--slo-tpot", type=float, metavar="SECONDS", help="TPOT SLO for goodput, in seconds")
    p.add_argument("--server-cmd", metavar="TEMPLATE", help="start a server per grid point from this str.format "
                   "template ({model}, {host}, {port}, {python} and the grid's and --set's names)")
    p.add_argument("--grid", type=grid_item, action="append", default=[], metavar="NAME=V1,V2,...",
                   help="a value of --server-cmd to sweep; repeatable (the grid is the product); n=1,4 sweeps "
                   "the choices per request (sent in the request body)")
    p.add_argument("--set", type=parse_assignment, action="append", default=[], metavar="NAME=VALUE",
                   help="a value of --server-cmd held fixed; repeatable; n=4 asks for 4 choices per request "
                   "(also without --server-cmd)")
    p.add_argument("--host", default="127.0.0.1", help="host of the started servers (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port of the started servers (default: %(default)s)")
    p.add_argument("--startup-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="a server not healthy after this long is a failed point (default: %(default)s)")
    p.add_argument("--log-dir", help="where server logs go (default: beside --out)")
    p.add_argument("--out", metavar="PATH", help="results file (.jsonl)")
    p.add_argument("--html", metavar="PATH", help="write the HTML report here")
    p.add_argument("--title", default="paged-workbench endpoint load test", help="title of the HTML report")


def _workload(args):
    from .workloads import load_workload, make_workload

    vocab = args.vocab_size
    if vocab is None:
        try:
            from engine import LLM

            vocab = LLM.model_spec(args.model).vocab_size
        except Exception:  # noqa: BLE001 - a remote model name: any id below 32000 is in every common vocabulary
            vocab = 32000
    if args.workload.endswith(".jsonl"):
        w = load_workload(args.workload, vocab_size=vocab, seed=args.seed)
        w = w.head(args.num_requests) if args.num_requests else w
    else:
        kw = dict(args.workload_arg)
        if args.num_requests:
            kw[C.num_requests] = args.num_requests
        w = make_workload(args.workload, vocab_size=vocab, seed=args.seed, **kw)
    if args.request_rate is not None:
        w = w.with_arrival("poisson", request_rate=args.request_rate, seed=args.seed)
    elif args.concurrency is not None:
        w = w.with_arrival(C.concurrency, concurrency=args.concurrency)
    return w


def run(args) -> int:
    import pandas as pd

    workload = _workload(args)
    slo = {k: v for k, v in (("ttft", args.slo_ttft), ("tpot", args.slo_tpot)) if v is not None}
    lt = dict(ignore_eos=not args.no_ignore_eos, warmup=not args.no_warmup, api=args.api, tokenizer=args.tokenizer, scrape_interval=args.scrape_interval or None,
              telemetry={"auto": None, "on": True, "off": False}[args.telemetry], max_duration=args.max_duration,
              request_timeout=args.request_timeout, slo=slo)
    name = args.served_model_name or args.model
    if args.server_cmd:
        from .server_sweep import ServerSweep

        grid = {}
        for key, values in args.grid:
            grid.setdefault(key, []).extend(values)
        sweep = ServerSweep(args.server_cmd, args.model, workload, grid, dict(args.set), host=args.host,
                            port=args.port, startup_timeout=args.startup_timeout, out=args.out, log_dir=args.log_dir,
                            served_model_name=name, loadtest=lt)
        df = sweep.run()
        report = sweep.write_report(args.html, args.title) if args.html else None
    else:
        if not args.endpoint:
            print("give --endpoint URL, or --server-cmd to start servers", file=sys.stderr)
            return 2
        from .loadtest_http import run_loadtest

        from .grid import SAMPLING_KEYS

        sampling = {k: v for k, v in args.set if k in SAMPLING_KEYS}  # --set n=4: n choices per request
        res = run_loadtest(args.endpoint, name, workload, sampling=sampling, **lt)
        df = pd.DataFrame([res.row])
        for f in res.failures:
            print(f"FAILED request {f['request_id']}: {f['error']}", file=sys.stderr)
        if args.out:
            from .server_sweep import append_row

            append_row(args.out, res.row)
        report = None
        if args.html:
            from .report import write_report

            pid = res.row[C.point_id]
            report = write_report(df, args.html, {pid: res.timeseries}, {pid: res.requests}, {pid: res.telemetry},
                                  {"backend": "endpoint", "endpoint": args.endpoint, C.model: name,
                                   C.workload: workload.summary()}, args.title)
    cols = [c for c in (C.label, C.status, C.num_finished, "num_failed", C.output_throughput, C.ttft_p50_ms,
                        C.ttft_p99_ms, C.tpot_p50_ms, C.itl_p99_ms, C.prefix_cache_hit_rate, C.num_preemptions)
            if c in df]
    print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for _, r in df[df[C.status] != "ok"].iterrows():
        print(f"FAILED {r[C.label]}: {r[C.error]}", file=sys.stderr)
    if args.out:
        print(f"results: {args.out}")
    if report:
        print(f"report: {report}")
    return 0 if (df[C.status] == "ok").all() else 1
