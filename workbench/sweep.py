"""The grid runner: one workload (or a few), many engine settings, one results row per setting.

`Sweep` (with `workbench.trace_replay` driving the engine through a workload's arrivals) loads the weights once,
reconfigures the engine for every grid point, warms it up, replays the workload under telemetry, and
appends one row per point (config, metrics from `workbench.metrics`, status) to a results file, so
an interrupted sweep resumes where it stopped.
"""
from __future__ import annotations

import gc
import hashlib
import itertools
import json
import logging
import math
import os
import time
import traceback
from typing import Callable

import pandas as pd

from . import metrics
from .trace_replay import replay, warm_up
from .telemetry import NullTelemetry, environment, make_telemetry
from .workloads import Workload, make_workload

log = logging.getLogger(__name__)


def _is_oom(e: BaseException) -> bool:
    try:
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


def _release_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _config_fields() -> list[str]:
    from engine import EngineConfig

    return list(EngineConfig().to_dict())


def _model_vocab_size(model) -> int | None:
    """The model's vocabulary size, before loading weights where possible."""
    if not isinstance(model, str):
        for path in ("vocab_size", "spec.vocab_size", "hf_config.vocab_size", "model_config.vocab_size"):
            obj = model
            for part in path.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, int):
                return obj
        return None
    from engine import LLM

    return LLM.model_spec(model).vocab_size


SHORT_NAMES = {"block_size": "bs", "max_num_batched_tokens": "tokens", "max_num_seqs": "seqs",
               "enable_prefix_caching": "prefix", "quantization": "quant", "kv_cache_dtype": "kv",
               "gpu_memory_utilization": "mem", "max_model_len": "len", "num_gpu_blocks": "blocks",
               "attention_backend": "attn", "tensor_parallel_size": "tp", "enforce_eager": "eager"}


def point_label(settings: dict) -> str:
    """A short name for the grid values of a point, e.g. "bs=16 prefix=on tokens=2048" ("base" for none)."""
    def fmt(v):
        return {True: "on", False: "off", None: "none"}.get(v, v) if isinstance(v, (bool, type(None))) else v

    return " ".join(f"{SHORT_NAMES.get(k, k)}={fmt(v)}" for k, v in settings.items()) or "base"


def _stable_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Sweep:
    """Run ``workload`` once per point of ``grid`` (the product of its value lists) on one model.

    model: a preset name (random weights), an HF checkpoint folder, or an `LLM` (then give
    ``model_name`` so reruns recognise finished points). workload: a `Workload`, a built-in name or a
    .jsonl path (built with the model's vocab size, ``num_requests`` and ``workload_args``), or a list
    of those (an outer grid dimension). grid: {EngineConfig field: [values]}; base_config: the other fields.
    slo: {"ttft": s, "tpot": s, "e2e": s} for goodput. out: ".jsonl" or ".parquet" results file,
    appended after every point; per-point steps/requests/telemetry go beside it in ``<out stem>.points/``.

    After `run()`: ``results`` (DataFrame, one row per point, grid order), ``timeseries[point_id]``
    (per-step counters with t in seconds since the run started, merged with GPU telemetry),
    ``requests[point_id]`` (per-request latencies), ``telemetry[point_id]`` (raw NVML samples),
    ``environment`` (versions, GPU).
    Points sharing a quantization run next to each other, so weights are re-quantized once per value.
    A point's key (point_id) hashes its config, workload and model, not the SLO: rows resumed from
    ``out`` keep the goodput of the SLO they were measured with (see their slo_*_s columns).
    """

    def __init__(self, model, workload, grid: dict | None = None, base_config=None, slo: dict | None = None,
                 out: str | None = None, warmup: bool = True, progress: bool = True, num_requests: int | None = None,
                 sampling: dict | None = None, telemetry: bool | None = None, telemetry_interval: float = 0.1,
                 seed: int = 0, dtype=None, model_name: str | None = None, max_duration: float | None = None,
                 retry_failed: bool = False, on_point: Callable[[dict], None] | None = None,
                 workload_args: dict | None = None):
        from engine import EngineConfig

        self.model, self.base_config = model, base_config if base_config is not None else EngineConfig()
        self.slo, self.out, self.warmup, self.progress = dict(slo or {}), out, warmup, progress
        self.sampling, self.seed, self.dtype, self.max_duration = sampling, seed, dtype, max_duration
        self.retry_failed, self.on_point, self.workload_args = retry_failed, on_point, dict(workload_args or {})
        metrics.slo_met(pd.DataFrame(columns=list(metrics.SLO_KEYS)), self.slo)  # validates the keys
        if out is not None and not out.endswith((".jsonl", ".parquet")):
            raise ValueError(f"out={out!r}: the results file must end in .jsonl or .parquet")
        self.model_name = model_name or (model if isinstance(model, str) else type(model).__name__)
        if not isinstance(model, str):
            self.model_id = f"llm:{self.model_name}"
        elif os.path.isdir(model):
            self.model_id = os.path.abspath(model)
        else:
            self.model_id = f"preset:{model}:seed={seed}:dtype={dtype}"
        self.vocab_size = _model_vocab_size(model)
        workloads = workload if isinstance(workload, list) else [workload]
        self.workloads = [self._workload(w, num_requests) for w in workloads]
        self.grid = {k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in (grid or {}).items()}
        allowed = _config_fields()
        unknown = [k for k in self.grid if k not in allowed]
        if unknown:
            raise ValueError(f"grid keys {unknown} are not EngineConfig fields: use some of {allowed}")
        self.points = self._points()
        self.llm = model if not isinstance(model, str) else None
        self._telemetry = make_telemetry(telemetry_interval, enabled=telemetry) if telemetry is not False and \
            str(self.base_config.device or "").split(":")[0] != "cpu" else NullTelemetry()
        self.environment = {**environment(self._telemetry), "model": self.model_name,
                            "workloads": [w.summary() for w in self.workloads]}
        self.results = pd.DataFrame()
        self.timeseries, self.requests, self.telemetry = {}, {}, {}
        self._file_records: dict[str, dict] = self._load_out()

    # --- setup -------------------------------------------------------------------------------------

    def _workload(self, w, num_requests) -> Workload:
        if isinstance(w, str):
            params = {"seed": self.seed, **self.workload_args}
            if self.vocab_size and "vocab_size" not in params:
                params["vocab_size"] = self.vocab_size
            if num_requests is not None:
                params["num_requests"] = num_requests
            w = make_workload(w, **params)
        elif num_requests is not None:
            w = w.head(num_requests)
        if self.vocab_size and w.max_token_id >= self.vocab_size:
            raise ValueError(f"workload {w.name!r} has token id {w.max_token_id}, outside the model's "
                             f"vocabulary of {self.vocab_size}: build it with vocab_size={self.vocab_size}")
        return w

    def _points(self) -> list[dict]:
        keys = list(self.grid)
        combos = [dict(zip(keys, values)) for values in itertools.product(*self.grid.values())] or [{}]
        multi = len(self.workloads) > 1
        points = []
        for w in self.workloads:
            for combo in combos:
                cfg = self.base_config.replace(**combo)  # raises ConfigError now, not mid-sweep
                label = point_label(combo)
                if multi:
                    label = f"{w.name}: {label}"
                pid = _stable_hash({"config": cfg.to_dict(), "workload": w.fingerprint(), "model": self.model_id,
                                    "sampling": self.sampling})
                points.append({"point_id": pid, "label": label, "config": cfg, "workload": w})
        # Equal quantizations adjacent (weights re-quantized once per value), grid order otherwise.
        order = {q: i for i, q in enumerate(dict.fromkeys(p["config"].quantization for p in points))}
        return sorted(points, key=lambda p: order[p["config"].quantization])

    @property
    def sidecar_dir(self) -> str | None:
        return None if self.out is None else os.path.splitext(self.out)[0] + ".points"

    # --- results file ----------------------------------------------------------------------------------

    def _load_out(self) -> dict:
        if self.out is None or not os.path.exists(self.out):
            return {}
        if self.out.endswith(".parquet"):
            recs = pd.read_parquet(self.out).to_dict("records")
        else:
            with open(self.out) as f:
                recs = [json.loads(line) for line in f if line.strip()]
        return {r["point_id"]: r for r in recs}

    def _save(self, row: dict) -> None:
        self._file_records[row["point_id"]] = row
        if self.out is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        if self.out.endswith(".jsonl"):
            clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            with open(self.out, "a") as f:
                f.write(json.dumps(clean, default=str) + "\n")
        else:  # Parquet cannot append: rewrite, atomically, so a kill never leaves half a file
            tmp = self.out + ".tmp"
            pd.DataFrame(list(self._file_records.values())).to_parquet(tmp, index=False)
            os.replace(tmp, self.out)

    def _save_frames(self, pid: str, frames: dict) -> None:
        if self.sidecar_dir is None:
            return
        try:
            os.makedirs(self.sidecar_dir, exist_ok=True)
            for kind, df in frames.items():
                if df is not None and len(df):
                    df.to_parquet(os.path.join(self.sidecar_dir, f"{pid}.{kind}.parquet"), index=False)
        except ImportError:
            log.warning("pyarrow is missing: per-point time series are not saved beside %s", self.out)

    def _load_frames(self, pid: str) -> None:
        for kind, store in (("steps", self.timeseries), ("requests", self.requests), ("telemetry", self.telemetry)):
            path = os.path.join(self.sidecar_dir or "", f"{pid}.{kind}.parquet")
            if self.sidecar_dir and os.path.exists(path):
                df = pd.read_parquet(path)
                if kind == "requests" and "itl" in df:
                    df["itl"] = df["itl"].map(list)
                store[pid] = df

    # --- running --------------------------------------------------------------------------------------

    def _is_done(self, pid: str) -> bool:
        rec = self._file_records.get(pid)
        return rec is not None and (rec.get("status") == "ok" or not self.retry_failed)

    def _llm_for(self, cfg):
        """The LLM configured for ``cfg``: weights loaded on first use, reconfigured afterwards."""
        if self.llm is None:
            from engine import LLM

            if os.path.isdir(self.model):
                self.llm = LLM.from_pretrained(self.model, cfg)
            else:
                kwargs = {} if self.dtype is None else {"dtype": self.dtype}
                self.llm = LLM.random(self.model, cfg, seed=self.seed, **kwargs)
        else:
            self.llm.reconfigure(cfg)
        return self.llm

    def _base_row(self, point: dict) -> dict:
        w = point["workload"]
        row = {"point_id": point["point_id"], "label": point["label"], "model": self.model_name,
               "workload": w.name, "workload_id": w.fingerprint(), "num_requests": len(w), "arrival": w.arrival,
               "request_rate": w.request_rate, "concurrency": w.concurrency}
        row.update(point["config"].to_dict())
        row.update({f"slo_{k}_s": self.slo.get(k) for k in metrics.SLO_KEYS})
        return row

    def _run_point(self, point: dict) -> dict:
        cfg, w, pid = point["config"], point["workload"], point["point_id"]
        row = self._base_row(point)
        t0 = time.perf_counter()
        try:
            if cfg.max_model_len is not None and w.max_seq_len > cfg.max_model_len:
                raise ValueError(f"workload {w.name!r} has a request of {w.max_seq_len} tokens (prompt + output), "
                                 f"over max_model_len={cfg.max_model_len}: raise max_model_len or shorten the workload")
            llm = self._llm_for(cfg)
            if w.max_seq_len > llm.config.max_model_len:  # max_model_len=None: the model's context
                raise ValueError(f"workload {w.name!r} has a request of {w.max_seq_len} tokens (prompt + output), "
                                 f"over the model's context of {llm.config.max_model_len} tokens: shorten the workload")
            if self.warmup:
                warm_up(llm.engine, llm.config)
            llm.engine.reset_stats()
            self._telemetry.start()
            try:
                run = replay(llm.engine, w, self.sampling, self.max_duration)
            finally:
                samples = self._telemetry.stop()
            stats = llm.engine.stats()
            requests, steps = metrics.request_frame(run.outputs), metrics.steps_frame(stats)
            row.update(metrics.point_metrics(requests, steps, stats, metrics.telemetry_summary(samples),
                                             run.duration, self.slo))
            row.update(status="ok", error=None)
            samples = samples.assign(t=samples["time"] - run.start)
            self.timeseries[pid], self.requests[pid], self.telemetry[pid] = \
                _timeseries(steps, samples, run.start), requests, samples
            self._save_frames(pid, {"steps": self.timeseries[pid], "requests": requests, "telemetry": samples})
        except Exception as e:  # noqa: BLE001 - a failing point is a result, not the end of the sweep
            row.update(status="oom" if _is_oom(e) else "error", error=f"{type(e).__name__}: {e}")
            log.debug("traceback of point %s:\n%s", pid, traceback.format_exc())
            _release_memory()
        row["point_duration_s"] = time.perf_counter() - t0
        row["timestamp"] = pd.Timestamp.now(tz="UTC").isoformat()
        return row

    def run(self) -> pd.DataFrame:
        """Run every point not already in the results file; returns (and keeps in ``results``) the table."""
        from tqdm.auto import tqdm

        todo = [p for p in self.points if not self._is_done(p["point_id"])]
        for p in self.points:
            if self._is_done(p["point_id"]):
                self._load_frames(p["point_id"])
        self._collect()
        bar = tqdm(total=len(self.points), initial=len(self.points) - len(todo), desc="sweep", unit="point",
                   disable=not self.progress)
        try:
            for point in todo:
                bar.set_postfix_str(point["label"], refresh=True)
                row = self._run_point(point)
                if row["status"] != "ok":
                    msg = f"point {row['point_id']} ({row['label']}) failed [{row['status']}]: {row['error']}"
                    if self.progress:
                        bar.write(msg)
                    else:
                        log.warning(msg)
                self._save(row)
                self._collect()
                bar.update(1)
                if self.on_point is not None:
                    self.on_point(row)
        finally:
            bar.close()
        return self.results

    def _collect(self) -> None:
        rows = [self._file_records[p["point_id"]] for p in self.points if p["point_id"] in self._file_records]
        self.results = pd.DataFrame(rows)
        if len(self.results) and "ttft_p99_ms" in self.results:
            ok = self.results["status"] == "ok"
            front = metrics.pareto_front(self.results, "ttft_p99_ms", "output_throughput")
            self.results["on_pareto_front"] = ok & front

    def write_report(self, path: str, title: str = "paged-workbench sweep report", drilldown: str | None = None) -> str:
        """The HTML report of this sweep (see `workbench.report.write_report`)."""
        from .report import write_report

        return write_report(self.results, path, self.timeseries, self.requests, self.telemetry, self.environment,
                            title, drilldown)

    def close(self) -> None:
        """Release the telemetry handle (the model stays in ``llm``)."""
        self._telemetry.close()


def _timeseries(steps: pd.DataFrame, samples: pd.DataFrame, start: float) -> pd.DataFrame:
    """Per-step counters with t (s since the run started) and the nearest earlier GPU sample."""
    if len(steps) == 0:
        return steps
    steps = steps.copy()
    steps["t"] = steps["time"].astype(float) - start if "time" in steps else range(len(steps))
    if len(samples):
        tel = samples[["t", "gpu_util_pct", "power_w", "mem_used_bytes"]].sort_values("t")
        steps = pd.merge_asof(steps.sort_values("t"), tel, on="t", direction="backward")
    return steps
