"""Prometheus metrics of the server under vLLM's names, fed from the engine's own counters.

The counters are advanced from each step's StepStats (prompt tokens = prefill tokens of the step,
generation tokens = sampled tokens, prefix-cache queries / hits, preemptions), exactly the sums
EngineStats reports, so after a run ``vllm:prompt_tokens_total`` equals ``EngineStats.num_prompt_tokens``
and so on, as long as nobody calls ``reset_stats()`` on the engine while it serves.
Latency histograms are observed from each finished request's RequestMetrics (engine timestamps,
arrival = when the HTTP request came in). Each server has its own CollectorRegistry.
"""
from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# No "<name>_created" series beside every counter and histogram (vLLM turns them off too).
prometheus_client.disable_created_metrics()

# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards built for vLLM read these unchanged.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0]
TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]


class ServerMetrics:
    """The server's Prometheus registry. on_step / on_finished / set_queue_state are called from the
    engine thread only; render() from anywhere (prometheus_client's metrics are thread-safe)."""

    def __init__(self, model_name: str, config=None, num_gpu_blocks: int | None = None):
        self.registry = reg = CollectorRegistry()
        lab = ["model_name"]
        self._labels = {"model_name": model_name}

        def gauge(name, doc):
            return Gauge(name, doc, lab, registry=reg).labels(**self._labels)

        def counter(name, doc):
            return Counter(name, doc, lab, registry=reg).labels(**self._labels)

        def hist(name, doc, buckets):
            return Histogram(name, doc, lab, buckets=buckets, registry=reg).labels(**self._labels)

        self.num_requests_running = gauge("vllm:num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage_perc = gauge("vllm:kv_cache_usage_perc", "KV-cache usage: used blocks / total (0..1).")
        self.prefix_cache_queries = counter("vllm:prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache.")
        self.num_preemptions = counter("vllm:num_preemptions", "Requests preempted (KV freed, recomputed later).")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefill tokens computed (recomputation included).")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens sampled.")
        self.num_steps = counter("pwb:engine_steps", "Engine steps run (paged-workbench).")
        self.request_success = Counter("vllm:request_success", "Requests finished, by finish reason.",
                                       lab + ["finished_reason"], registry=reg)
        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token (s).", TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Gaps between consecutive output tokens (s).",
                        ITL_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "End-to-end request latency (s).", E2E_BUCKETS)
        self.queue_time = hist("vllm:request_queue_time_seconds", "Arrival to first scheduled (s).", E2E_BUCKETS)
        self.request_prompt_tokens = hist("vllm:request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.request_generation_tokens = hist("vllm:request_generation_tokens", "Output tokens per request.",
                                              TOKEN_BUCKETS)
        if config is not None:
            info = {"block_size": str(config.block_size), "num_gpu_blocks": str(num_gpu_blocks),
                    "enable_prefix_caching": str(config.enable_prefix_caching),
                    "max_num_batched_tokens": str(config.max_num_batched_tokens),
                    "max_num_seqs": str(config.max_num_seqs), "max_model_len": str(config.max_model_len)}
            Gauge("vllm:cache_config_info", "Engine configuration (labels).", list(info),
                  registry=reg).labels(**info).set(1)

    def on_step(self, step) -> None:
        """Advance the counters and gauges by one StepStats."""
        if step is None:
            return
        self.num_steps.inc()
        self.prompt_tokens.inc(step.num_prefill_tokens)
        self.generation_tokens.inc(step.num_sampled_tokens)
        self.prefix_cache_queries.inc(step.prefix_cache_queries)
        self.prefix_cache_hits.inc(step.prefix_cache_hits)
        self.num_preemptions.inc(step.num_preemptions)
        self.set_queue_state(step.num_running, step.num_waiting, step.kv_usage)

    def set_queue_state(self, running: int, waiting: int, kv_usage: float) -> None:
        self.num_requests_running.set(running)
        self.num_requests_waiting.set(waiting)
        self.kv_cache_usage_perc.set(kv_usage)

    def on_finished(self, output) -> None:
        """Observe one finished (not aborted) request's latencies and token counts."""
        m = output.metrics
        self.request_success.labels(finished_reason=output.finish_reason, **self._labels).inc()
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        for gap in m.itl:
            self.itl.observe(gap)
        if m.e2e is not None:
            self.e2e.observe(m.e2e)
        if m.first_scheduled_time is not None:
            self.queue_time.observe(m.first_scheduled_time - m.arrival_time)
        self.request_prompt_tokens.observe(m.num_prompt_tokens)
        outputs = getattr(output, "outputs", None) or []  # n > 1: every completion's tokens
        self.request_generation_tokens.observe(sum(len(c.token_ids) for c in outputs) if len(outputs) > 1
                                               else m.num_output_tokens)

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
