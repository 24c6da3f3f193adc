"""Reading a server's Prometheus ``/metrics`` page (vLLM's metric names) during a load test.

`parse_metrics` turns one page into the workbench's column names (gauges as read, counters as totals),
`scrape_metrics` polls the page into a list of rows, `counter_increase` turns the rows into the
EngineStats-like counters of the run (the increase of each counter from the first to the last scrape).
Parsing is prometheus_client's.
"""
from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pandas as pd

# Series scraped from /metrics: our column -> Prometheus names, first found wins (older vLLM names last).
GAUGES = {"num_running": ["vllm:num_requests_running"], "num_waiting": ["vllm:num_requests_waiting"],
          "kv_usage": ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]}
COUNTERS = {"prefix_cache_queries": ["vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"],
            "prefix_cache_hits": ["vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"],
            "num_preemptions": ["vllm:num_preemptions"], "prompt_tokens": ["vllm:prompt_tokens"],
            "generation_tokens": ["vllm:generation_tokens"], "num_steps": ["pwb:engine_steps"]}


def parse_metrics(text: str) -> dict:
    """Our scraped columns from a Prometheus text page (values summed over label sets; absent: missing)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = defaultdict(float)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in (fam.name, fam.name + "_total"):
                totals[fam.name] += s.value
        if fam.name == "vllm:cache_config_info" and fam.samples:
            labels = fam.samples[0].labels
            for key in ("num_gpu_blocks", "block_size"):
                if str(labels.get(key, "")).isdigit():
                    totals["config:" + key] = int(labels[key])
    out = {}
    for col, names in {**GAUGES, **COUNTERS}.items():
        for name in names:
            if name in totals:
                out[col] = totals[name]
                break
    out.update({k: v for k, v in totals.items() if k.startswith("config:")})
    return out


async def scrape_once(client, url: str, rows: list) -> None:
    """One scrape appended to ``rows`` as {"time": perf_counter, columns...}; a failed one is skipped."""
    try:
        r = await client.get(url, timeout=10)
        if r.status_code == 200:
            rows.append({"time": time.perf_counter(), **parse_metrics(r.text)})
    except Exception:  # noqa: BLE001 - a missed scrape is a gap in the series, not a failed run
        pass


async def scrape_metrics(client, url: str, interval: float, rows: list, stop: asyncio.Event) -> None:
    """Scrape every ``interval`` seconds until ``stop`` is set. The caller scrapes once before the run and
    once after it (`scrape_once`), so the counters' increase covers exactly the run."""
    while True:
        try:
            await asyncio.wait_for(stop.wait(), interval)
            return
        except asyncio.TimeoutError:
            pass
        await scrape_once(client, url, rows)


def counter_increase(ts: pd.DataFrame) -> dict:
    """EngineStats-like counters of the run: the increase of each scraped counter, and the pool's size."""
    out = {}
    for col in COUNTERS:
        if col in ts and ts[col].notna().sum() >= 1:
            v = ts[col].dropna()
            out[col] = int(round(v.iloc[-1] - v.iloc[0]))
    for key in ("num_gpu_blocks", "block_size"):
        if f"config:{key}" in ts and ts[f"config:{key}"].notna().any():
            out[key] = int(ts[f"config:{key}"].dropna().iloc[0])
    return out
