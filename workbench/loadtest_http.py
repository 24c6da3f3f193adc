"""Load-testing any OpenAI-compatible endpoint (vLLM, SGLang, TGI, or ``python -m engine serve``).

`run_loadtest` replays a `Workload` over HTTP with the workload's arrival process (offline, Poisson at
a request rate, closed-loop concurrency, follow-up turns after their parent), each request a streaming
POST /v1/completions with the trace's token ids as the prompt and ``ignore_eos`` (vLLM's extension)
so it produces exactly max_tokens tokens. From each stream it measures, in the client's clock:

- TTFT: first chunk carrying output - arrival (the scheduled send time, so a late client counts);
- ITL: gaps between consecutive chunks carrying output (one chunk may carry several tokens, as in
  ``vllm bench serve``); TPOT = (last chunk - first chunk) / (output tokens - 1); E2E = end - arrival;
- output tokens from the final ``usage`` (``stream_options.include_usage``), else counted.

A workload's sampling ``n`` (``sampling={"n": 4}``) goes into every request body; the server then streams n
choices (``index`` 0..n-1, each chunk one choice's, each choice ending with its own finish_reason). They are
counted as the in-process path counts SamplingParams(n) (`workbench.metrics.request_frame`, the engine's
group metrics): output tokens are those of every choice (``usage.completion_tokens``, else each choice's
counted tokens, summed), as vLLM's benchmark counts them; TTFT is the first chunk of any choice; ITL and
TPOT are those of one choice, the longest (most tokens; ties: the lowest index), as in-process they are the
group's longest sequence's: ITL its chunk gaps, TPOT (last chunk of any choice - first chunk) / (its
tokens - 1). Its token count is its streamed ``token_ids`` when the server sends them, else, when every
choice finished for "length" (one prompt, one limit: equal lengths), the usage total / n, else its chunk
count (a lower bound). ``beam_width`` has no OpenAI field and is refused (ValueError).

While it runs it scrapes ``/metrics`` (`workbench.metrics_scrape`; vLLM's names) when the server has it, giving a
time series of KV usage, running / waiting requests and the counters' increase over the run (prefix
hits, preemptions), and samples NVML when the GPU is local. Its row is made by the same
`workbench.metrics.point_metrics` as an in-process run, so results files and the HTML report read the
same. A request that fails (HTTP error, error event, stream cut before ``[DONE]``, timeout) is kept
in ``failures`` with its reason and counted in ``num_failed``; it never disappears.
HTTP and SSE come from httpx and httpx-sse; Prometheus parsing from prometheus_client.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace
from urllib.parse import urlparse

import pandas as pd

from . import metrics
from .metrics_scrape import counter_increase, scrape_metrics, scrape_once
from .workloads import Workload
from .schema import ERROR, OK, C

@dataclass
class LoadTestResult:
    """One load test: ``row`` (a results row), per-request frame, scraped /metrics series, NVML samples,
    and the failed requests as {"request_id", "error"}."""

    row: dict
    requests: pd.DataFrame
    timeseries: pd.DataFrame
    telemetry: pd.DataFrame
    failures: list = field(default_factory=list)


API_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def _payload(model: str, r, sampling: dict, ignore_eos: bool, api: str = "completions",
             text: str | None = None) -> dict:
    """The request body: the prompt as token ids, or as ``text`` (completions), or one user message (chat)."""
    body = {C.model: model, "max_tokens": r.max_tokens, "stream": True, "stream_options": {"include_usage": True},
            "temperature": 0.0, **sampling}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text if text is not None else list(r.prompt_token_ids)
    if ignore_eos:
        body["ignore_eos"] = True
    return body


async def _send(client, url: str, body: dict, r, arrival: float, timeout: float):
    """One streaming request; returns (output-like record or None, error or None). With n > 1 choices see
    the module docstring for how they are counted."""
    from httpx_sse import aconnect_sse

    # Per choice index: the times of its chunks carrying output, its counted tokens (token_ids, else one per
    # chunk), whether they came as token_ids, and its finish_reason.
    times, counted, by_ids, finish = defaultdict(list), defaultdict(int), defaultdict(bool), {}
    state = {"usage": None, "done": False}

    async def read():
        async with aconnect_sse(client, "POST", url, json=body) as es:
            if es.response.status_code != 200:
                await es.response.aread()
                return f"HTTP {es.response.status_code}: {es.response.text[:300]}"
            async for sse in es.aiter_sse():
                if sse.data.strip() == "[DONE]":
                    state["done"] = True
                    return None
                now = time.perf_counter()
                obj = json.loads(sse.data)
                if C.error in obj:
                    return f"error event: {json.dumps(obj['error'])[:300]}"
                for c in obj.get("choices") or []:
                    i = int(c.get("index") or 0)
                    text = c.get("text") or (c.get("delta") or {}).get("content") or ""
                    ids = c.get("token_ids")
                    if text or ids:
                        times[i].append(now)
                        counted[i] += len(ids) if ids else 1
                        by_ids[i] = by_ids[i] or bool(ids)
                    if c.get("finish_reason"):
                        finish[i] = c["finish_reason"]
                state["usage"] = obj.get("usage") or state["usage"]
        return None

    try:
        err = await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        return None, f"timeout: no complete answer after {timeout} s"
    except Exception as e:  # noqa: BLE001 - the failure is the result
        return None, f"{type(e).__name__}: {e}"
    if err is not None:
        return None, err
    usage, end = state["usage"], time.perf_counter()
    if not state["done"]:
        return None, "the stream ended without data: [DONE]"
    n_out = int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") is not None \
        else sum(counted.values())
    cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    first = min((t[0] for t in times.values()), default=None)
    last = max((t[-1] for t in times.values()), default=None)
    num_choices = max(len(set(times) | set(finish)), int(body.get("n") or 1))
    if times:
        lead = min(times, key=lambda i: (-counted[i], i))  # the longest choice; ties: the lowest index
        lead_tokens = _choice_tokens(lead, counted, by_ids, finish, n_out, num_choices)
        itl = [b - a for a, b in zip(times[lead], times[lead][1:])]
    else:
        lead_tokens, itl = 0, []
    m = {"arrival_time": arrival, "first_scheduled_time": None, "first_token_time": first, "finished_time": end,
         "ttft": None if first is None else first - arrival, "e2e": end - arrival,
         "tpot": (last - first) / (lead_tokens - 1) if first is not None and lead_tokens > 1 else None,
         "itl": itl,
         "num_prompt_tokens": int((usage or {}).get("prompt_tokens") or r.prompt_len),  # the server's count
         "num_output_tokens": n_out, "num_cached_tokens": int(cached)}
    reasons = [finish.get(i) for i in range(num_choices)]
    return SimpleNamespace(request_id=r.request_id, prompt_token_ids=list(r.prompt_token_ids), token_ids=[],
                           finish_reason=reasons[0] if reasons else None, finish_reasons=reasons, metrics=m), None


def _choice_tokens(i: int, counted: dict, by_ids: dict, finish: dict, n_out: int, num_choices: int) -> int:
    """Output tokens of choice ``i`` (see the module docstring): exact from token_ids; the usage total split
    evenly when there is one choice or all finished for "length"; else its chunk count."""
    if by_ids[i]:
        return counted[i]
    if num_choices == 1 or (len(finish) == num_choices and all(f == "length" for f in finish.values())):
        return n_out // num_choices
    return counted[i]


async def _replay(endpoint: str, model: str, workload: Workload, sampling: dict, ignore_eos: bool,
                  scrape_interval: float | None, request_timeout: float, max_duration: float | None,
                  max_connections: int, api: str = "completions", texts: dict | None = None):
    import httpx

    base = endpoint.rstrip("/")
    url = base + API_PATHS[api]
    texts = texts or {}
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    outputs, failures, scraped = [], [], []
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(request_timeout, connect=30)) as client:
        stop = asyncio.Event()
        metrics_url = base + "/metrics"
        scraper = None
        if scrape_interval:
            await scrape_once(client, metrics_url, scraped)  # the counters' values before the first request
            scraper = asyncio.create_task(scrape_metrics(client, metrics_url, scrape_interval, scraped, stop))
        closed = workload.arrival == C.concurrency
        sem = asyncio.Semaphore(workload.concurrency) if closed else None
        children = defaultdict(list)
        for r in workload:
            if r.depends_on:
                children[r.depends_on].append(r)
        tasks: set = set()
        start = time.perf_counter()

        async def launch(r, due: float):
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            body = _payload(model, r, sampling, ignore_eos, api, texts.get(r.request_id))
            if sem is not None:
                async with sem:
                    out, err = await _send(client, url, body, r, time.perf_counter(), request_timeout)
            else:
                out, err = await _send(client, url, body, r, due, request_timeout)
            if err is not None:
                failures.append({"request_id": r.request_id, C.error: err})
            else:
                outputs.append(out)
            t_fin = out.metrics["finished_time"] if out is not None else time.perf_counter()
            for c in children.pop(r.request_id, []):
                _spawn(launch(c, t_fin + c.arrival_time))

        def _spawn(coro):
            t = asyncio.create_task(coro)
            tasks.add(t)
            t.add_done_callback(tasks.discard)

        for r in workload:
            if not r.depends_on:
                _spawn(launch(r, start if closed else start + r.arrival_time))
        timed_out = False
        deadline = None if max_duration is None else start + max_duration
        while tasks:  # children join the set as their parents finish
            left = None if deadline is None else deadline - time.perf_counter()
            if left is not None and left <= 0:
                timed_out = True
                for t in list(tasks):
                    t.cancel()
                await asyncio.gather(*list(tasks), return_exceptions=True)
                break
            await asyncio.wait(list(tasks), timeout=left)
        stop.set()
        if scraper is not None:
            await scraper
            await scrape_once(client, metrics_url, scraped)  # the counters' totals after the run
    done_ids = {o.request_id for o in outputs} | {f["request_id"] for f in failures}
    for r in workload:  # never dropped: what did not run (timeout, orphaned turns) is a failure too
        if r.request_id not in done_ids:
            failures.append({"request_id": r.request_id,
                             C.error: f"not finished: the run hit max_duration={max_duration} s" if timed_out
                             else "not sent: the request it depends on failed"})
    return outputs, failures, scraped, start


async def _warm_up(endpoint: str, model: str, num_requests: int, prompt_len: int, max_tokens: int,
                   ignore_eos: bool, timeout: float) -> None:
    """Unmeasured requests in waves of 1, 1 and the rest, each wave sent once the previous one streams its
    first token, so prefills also run beside 1 and 2 decodes (as `trace_replay.warm_up` does in-process:
    kernels and CUDA graphs see every shape class before the measured run). Raises if one fails."""
    import httpx
    from httpx_sse import aconnect_sse

    url = endpoint.rstrip("/") + "/v1/completions"

    async def one(client, k: int, streaming: asyncio.Event):
        body = {C.model: model, "prompt": [(7 * k + j) % 500 + 3 for j in range(prompt_len)],
                "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
        if ignore_eos:
            body["ignore_eos"] = True
        try:
            async with aconnect_sse(client, "POST", url, json=body) as es:
                if es.response.status_code != 200:
                    await es.response.aread()
                    raise RuntimeError(f"warm-up request failed: HTTP {es.response.status_code}: "
                                       f"{es.response.text[:300]}")
                async for sse in es.aiter_sse():
                    streaming.set()
                    if sse.data.strip() == "[DONE]":
                        break
        finally:
            streaming.set()

    n = max(1, num_requests)
    waves = [1, 1, n - 2] if n > 2 else [1] * n
    async with httpx.AsyncClient(timeout=timeout) as client:
        tasks, k = [], 0
        for size in waves:
            streaming = asyncio.Event()
            for _ in range(size):
                tasks.append(asyncio.create_task(one(client, k, streaming)))
                k += 1
            await asyncio.wait_for(streaming.wait(), timeout)
        await asyncio.gather(*tasks)


def _scraped_frame(scraped: list, start: float) -> pd.DataFrame:
    df = pd.DataFrame(scraped)
    if len(df):
        df["t"] = df["time"] - start
    return df


def _is_local(endpoint: str) -> bool:
    return (urlparse(endpoint).hostname or "") in ("localhost", "127.0.0.1", "::1", "0.0.0.0")


def check_sampling(sampling: dict | None) -> dict:
    """The request-body fields of ``sampling`` (beam_width=None dropped); raises ValueError for an ``n`` that is
    not an integer >= 1 and for a beam_width (the OpenAI API has no beam search)."""
    sampling = dict(sampling or {})
    beam_width = sampling.pop(C.beam_width, None)
    if beam_width is not None:
        raise ValueError(f"sampling beam_width={beam_width!r} cannot be load-tested over HTTP: the "
                         "OpenAI API has no beam search field; use n (parallel sampling) or the in-process sweep")
    n = sampling.get(C.n, 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"sampling n={n!r} is not allowed: n must be an integer >= 1 (completions per request)")
    return sampling


def run_loadtest(endpoint: str, model: str, workload: Workload, sampling: dict | None = None,
                 ignore_eos: bool = True, scrape_interval: float | None = 0.5, telemetry: bool | None = None,
                 telemetry_interval: float = 0.1, request_timeout: float = 600.0, max_duration: float | None = None,
                 max_connections: int = 1024, slo: dict | None = None, point_id: str = "endpoint",
                 label: str | None = None, warmup: bool = True, api: str = "completions",
                 tokenizer=None) -> LoadTestResult:
    """Replay ``workload`` against ``endpoint`` (base URL, e.g. http://127.0.0.1:8000) serving ``model``.

    sampling: extra fields of every request body (default greedy); ``n`` asks for n choices per request
    (counted as the module docstring says; the row's ``n``), ``beam_width`` is refused. telemetry: NVML sampling, None =
    when the endpoint is local and a GPU is there. scrape_interval: seconds between /metrics scrapes
    (None: no scraping). api: "completions" or "chat" (one user message). tokenizer (a transformers
    tokenizer or a folder): send each prompt as the text its token ids decode to (needed for chat, and for
    servers that take no token ids); the prompt length is then the server's count (usage). warmup: first send a few unmeasured requests (`_warm_up`). Returns a LoadTestResult whose ``row`` has the columns of an in-process row
    (`workbench.metrics.point_metrics`) plus endpoint, model, num_failed, first_failure, status, error.
    """
    from .telemetry import NullTelemetry, make_telemetry

    if api not in API_PATHS:
        raise ValueError(f"api={api!r} is not allowed: use one of {sorted(API_PATHS)}")
    sampling = check_sampling(sampling)
    n = sampling.get(C.n, 1)
    texts = None
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        texts = {r.request_id: tokenizer.decode(list(r.prompt_token_ids), skip_special_tokens=True) for r in workload}
    elif api == "chat":
        raise ValueError("api='chat' sends text: give tokenizer= (a tokenizer or its folder) to decode the prompts")
    if warmup:
        asyncio.run(_warm_up(endpoint, model, 4, 32, 4, ignore_eos, request_timeout))
    use_tel = telemetry if telemetry is not None else (None if _is_local(endpoint) else False)
    tel = NullTelemetry() if use_tel is False else make_telemetry(telemetry_interval, enabled=use_tel)
    try:
        tel.start()
        try:
            outputs, failures, scraped, start = asyncio.run(_replay(
                endpoint, model, workload, sampling, ignore_eos, scrape_interval, request_timeout,
                max_duration, max_connections, api, texts))
        finally:
            samples = tel.stop()
    finally:
        tel.close()
    requests = metrics.request_frame(outputs)
    ends = [o.metrics["finished_time"] for o in outputs]
    duration = (max(ends) - start) if ends else math.nan
    ts = _scraped_frame(scraped, start)
    stats = counter_increase(ts)
    row = {C.point_id: point_id, C.label: label or f"{model} @ {endpoint}", "backend": "endpoint",
           "endpoint": endpoint, "api": api, C.model: model, C.workload: workload.name, C.workload_id: workload.fingerprint(),
           C.num_requests: len(workload), C.arrival: workload.arrival, C.request_rate: workload.request_rate,
           C.concurrency: workload.concurrency, C.block_size: stats.get(C.block_size), C.n: n, C.beam_width: None}
    row.update(metrics.point_metrics(requests, ts, stats, metrics.telemetry_summary(samples), duration, slo))
    row.update(num_failed=len(failures), first_failure=failures[0][C.error] if failures else None,
               metrics_scraped=bool(len(ts)), generation_tokens_scraped=stats.get("generation_tokens"),
               prompt_tokens_scraped=stats.get("prompt_tokens"))
    ok = len(outputs) > 0
    row.update({C.status: OK if ok else ERROR,
                C.error: None if ok else f"every request failed; first: {failures[0][C.error] if failures else '?'}"})
    if len(samples):
        samples = samples.assign(t=samples["time"] - start)
    return LoadTestResult(row, requests, ts, samples, failures)
