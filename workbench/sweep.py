"""The grid runner: one workload (or a few), many engine settings, one results row per setting.

`Sweep` composes the parts: `workbench.grid` (typed points, every value checked before anything runs),
`workbench.store` (the results file: locked, appended per run, resumable), `workbench.point_run.run_point`
(one measured run, the same the bench makes) and `workbench.metrics.summarise` (repeats -> median with
min-max). It loads the weights once and reconfigures the engine for every point.
"""
from __future__ import annotations

import functools

import logging
import os
from typing import Callable

import pandas as pd

from . import metrics, schema
from .grid import Point, build_points, point_label  # noqa: F401 - point_label is public here too
from .executors import make_executor
from .point_run import PointWorker, model_vocab_size
from .schema import C
from .store import ResultsStore
from .trace_replay import request_params
from .telemetry import NullTelemetry, environment, make_telemetry
from .workloads import resolve_workload

log = logging.getLogger(__name__)


class Sweep:
    """Run ``workload`` ``repeats`` times per point of ``grid`` (the product of its value lists) on one model.

    model: a preset name (random weights), an HF checkpoint folder, or an `LLM` (then give
    ``model_name`` so reruns recognise finished points). workload: a `Workload`, a built-in name or a
    .jsonl path (built with the model's vocab size, ``num_requests`` and ``workload_args``), or a list
    of those (an outer grid dimension). grid: {EngineConfig field: [values]} (duplicates dropped; every
    value checked here), and the workload's sampling: ``n`` (completions per request) and ``beam_width``
    (None, or beam search); base_config: the other fields. slo: {"ttft": s, "tpot": s, "e2e": s} for goodput.
    repeats: runs per point, interleaved: round r runs every point once, odd rounds in reverse order (points
    sharing a quantization stay adjacent, so weights are re-quantized once per value and round), so
    drift over time does not favour one setting. out: ".jsonl" or ".parquet" results file, one row per
    run, appended as each finishes (locked while the sweep runs; checked writable before the first run);
    per-point steps/requests/telemetry go beside it in ``<out stem>.points/``.

    After `run()`: ``results`` (DataFrame, one row per point in grid order: the schema's median columns
    summarised over repeats with ``_min`` / ``_max``), ``runs`` (one row per run), ``timeseries[point_id]``
    (per-step counters of the point's last run, t in seconds since the run started, merged with GPU
    telemetry), ``requests[point_id]``, ``telemetry[point_id]`` (raw NVML samples), ``environment``,
    ``skipped`` (points already complete in ``out``, not rerun).
    A point's key (point_id) hashes its config, workload and model, not the SLO: rows resumed from
    ``out`` keep the goodput of the SLO they were measured with (see their slo_*_s columns). A point
    whose run fails is not repeated.
    executor: "sequential" (this process, one model) or "ray" (`workbench.executors.RayExecutor`: one actor
    per group of tensor_parallel_size GPUs, each keeping its model loaded; ``ray_address`` joins a cluster,
    None starts Ray here; ``num_workers`` caps the actors). Results stream into the same store, in the
    same rows; a point whose actor dies is recorded as failed and the actor replaced. Points of different
    tensor_parallel_size run in groups, one after another (tp=1 on one-GPU actors, then tp=2 on two-GPU
    actors, ...), in the order the sizes first appear in the schedule; repeats interleave within a group.
    """

    def __init__(self, model, workload, grid: dict | None = None, base_config=None, slo: dict | None = None,
                 out: str | None = None, warmup: bool = True, progress: bool = True, num_requests: int | None = None,
                 sampling: dict | None = None, telemetry: bool | None = None, telemetry_interval: float = 0.1,
                 seed: int = 0, dtype=None, model_name: str | None = None, max_duration: float | None = None,
                 retry_failed: bool = False, on_point: Callable[[dict], None] | None = None,
                 workload_args: dict | None = None, repeats: int = 3, executor="sequential",
                 ray_address: str | None = None, num_workers: int | None = None):
        from engine import EngineConfig

        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            raise ValueError(f"repeats={repeats!r}: must be an integer >= 1")
        if num_requests is not None and (not isinstance(num_requests, int) or num_requests < 1):
            raise ValueError(f"num_requests={num_requests!r}: must be an integer >= 1")
        self.model, self.base_config = model, base_config if base_config is not None else EngineConfig()
        self.slo, self.warmup, self.progress, self.repeats = dict(slo or {}), warmup, progress, repeats
        self.sampling, self.seed, self.dtype, self.max_duration = sampling, seed, dtype, max_duration
        self.retry_failed, self.on_point, self.workload_args = retry_failed, on_point, dict(workload_args or {})
        metrics.slo_met(pd.DataFrame(columns=list(metrics.SLO_KEYS)), self.slo)  # validates the keys
        self.store = ResultsStore(out)
        self.model_name = model_name or (model if isinstance(model, str) else type(model).__name__)
        if not isinstance(model, str):
            self.model_id = f"llm:{self.model_name}"
        elif os.path.isdir(model):
            self.model_id = os.path.abspath(model)
        else:
            self.model_id = f"preset:{model}:seed={seed}:dtype={dtype}"
        self.vocab_size = model_vocab_size(model)
        workloads = workload if isinstance(workload, list) else [workload]
        self.workloads = [resolve_workload(w, num_requests, self.vocab_size, seed, self.workload_args) for w in workloads]
        self.points: list[Point] = build_points(grid, self.base_config, self.workloads,
                                                {C.model: self.model_id, "sampling": self.sampling},
                                                check_sampling=lambda s: request_params(s, 1))
        self.executor = make_executor(executor, ray_address, num_workers)
        if self.executor.name != "sequential" and not isinstance(model, str):
            raise ValueError(f"executor={executor!r} loads the model in each worker: give model as a preset "
                             f"name or a checkpoint folder, not a loaded {type(model).__name__}")
        self._worker = PointWorker(model, seed, dtype, self.slo, warmup, sampling, max_duration,
                                   llm=model if not isinstance(model, str) else None)
        self._telemetry_args = (telemetry_interval, telemetry)
        self._check_for_model()
        self._telemetry = make_telemetry(telemetry_interval, enabled=telemetry) if telemetry is not False and \
            str(self.base_config.device or "").split(":")[0] != "cpu" else NullTelemetry()
        self._worker.telemetry = self._telemetry
        self.environment = {**environment(self._telemetry), C.model: self.model_name,
                            "workloads": [w.summary() for w in self.workloads], C.repeats: repeats}
        self.results, self.runs = pd.DataFrame(), pd.DataFrame()
        self.timeseries, self.requests, self.telemetry = {}, {}, {}
        self.skipped = 0
        self.announce: Callable[[str], None] = log.info  # where run() says what it resumes (the CLI prints)

    def _check_for_model(self) -> None:
        """Refuse, before anything runs, configs the engine refuses for this model whatever the memory
        (max_model_len past its positions, quantization its shapes do not allow): every one in one error."""
        from engine import LLM

        spec = getattr(self.llm, "spec", None) if self.llm is not None else LLM.model_spec(self.model)
        if spec is None:
            return
        problems = []
        for cfg in dict.fromkeys(p.config for p in self.points):
            try:
                LLM.check_config(spec, cfg)
            except ValueError as e:
                problems.append(str(e))
        if problems:
            raise ValueError(f"invalid for model {self.model_name}: " + "; ".join(dict.fromkeys(problems)))

    @property
    def out(self) -> str | None:
        return self.store.path

    @property
    def sidecar_dir(self) -> str | None:
        return self.store.sidecar_dir

    # --- which runs are left -------------------------------------------------------------------------

    def _recorded(self, p: Point, r: int) -> dict | None:
        rec = self.store.done(p.point_id, r)
        if rec is not None and rec.get(C.status) != "ok" and self.retry_failed:
            return None
        return rec

    def _point_done(self, p: Point) -> bool:
        """All repeats recorded, or a recorded failure (a failing point is not repeated)."""
        recs = [self._recorded(p, r) for r in range(self.repeats)]
        return all(recs) or any(rec is not None and rec.get(C.status) != "ok" for rec in recs)

    def _schedule(self) -> list[tuple[Point, int]]:
        """The runs still to do, round by round: even rounds in grid order, odd rounds reversed, so every
        setting sits early and late alike (drift over time favours none) and points sharing a quantization
        stay adjacent; with an odd number of rounds the last run is the last point, as without repeats."""
        todo = []
        for r in range(self.repeats):
            rnd = [p for p in self.points if self._recorded(p, r) is None]
            todo += [(p, r) for p in (rnd if r % 2 == 0 else rnd[::-1])]
        return todo

    # --- running --------------------------------------------------------------------------------------

    def _base_row(self, p: Point, repeat: int) -> dict:
        w = p.workload
        row = {C.point_id: p.point_id, C.label: p.label, C.repeat: repeat, C.model: self.model_name,
               C.workload: w.name, C.workload_id: w.fingerprint(), C.num_requests: len(w), C.arrival: w.arrival,
               C.request_rate: w.request_rate, C.concurrency: w.concurrency}
        row.update(p.config.to_dict())
        sampling = {**(self.sampling or {}), **p.sampling}
        row.update({C.n: sampling.get(C.n, 1), C.beam_width: sampling.get(C.beam_width)})
        row.update({C.slo_ttft_s: self.slo.get("ttft"), C.slo_tpot_s: self.slo.get("tpot"),
                    C.slo_e2e_s: self.slo.get("e2e")})
        return row

    @property
    def llm(self):
        """The loaded model of a sequential sweep (None before its first point, and with executor="ray")."""
        return self._worker.llm

    def _worker_factory(self):
        """What each worker builds its point runner with: this process's own, or, for a Ray actor, a picklable
        factory of a fresh PointWorker (never a bound method: that would ship the whole Sweep, whose NVML
        telemetry holds ctypes handles Ray cannot pickle)."""
        if self.executor.name == "sequential":
            return lambda: self._worker
        interval, enabled = self._telemetry_args
        return functools.partial(PointWorker, self.model, self.seed, self.dtype, self.slo, self.warmup, self.sampling,
                                 self.max_duration, telemetry_interval=interval, telemetry_enabled=enabled)

    def run(self) -> pd.DataFrame:
        """Run every run not already in the results file; returns (and keeps in ``results``) the table.

        The results file is locked and checked writable before the first run; a KeyboardInterrupt
        propagates after the finished runs are saved (``saved_points()`` counts them).
        """
        from tqdm.auto import tqdm

        self.store.open()
        try:
            self.skipped = sum(self._point_done(p) for p in self.points)
            for p in self.points:
                if self.store.done(p.point_id, 0) is not None:
                    frames = self.store.load_frames(p.point_id)
                    for kind, target in (("steps", self.timeseries), ("requests", self.requests),
                                         ("telemetry", self.telemetry)):
                        if kind in frames:
                            target[p.point_id] = frames[kind]
            if self.skipped:
                self.announce(f"resuming: skipped {self.skipped} of {len(self.points)} points already in {self.out}")
            self._collect()
            todo = self._schedule()
            total = len(self.points) * self.repeats
            bar = tqdm(total=total, initial=total - len(todo), desc="sweep", unit="run", disable=not self.progress)

            def finish(item, result):
                (p, r), (out, frames) = item, result
                row = {**self._base_row(p, r), **out}
                if frames:
                    self.timeseries[p.point_id], self.requests[p.point_id], self.telemetry[p.point_id] = \
                        frames["steps"], frames["requests"], frames["telemetry"]
                    self.store.save_frames(p.point_id, frames)
                if row[C.status] != "ok":
                    log.debug("traceback of point %s:\n%s", p.point_id, row.get("traceback"))
                    msg = f"point {p.point_id} ({p.label}) failed [{row[C.status]}]: {row[C.error]}"
                    bar.write(msg) if self.progress else log.warning(msg)
                row.pop("traceback", None)
                self.store.append(row)
                self._collect()
                bar.update(1)
                if self.on_point is not None:
                    self.on_point(row)

            def fail(item, reason):  # the worker died mid-point (Ray): the point failed, the sweep goes on
                finish(item, ({C.status: schema.ERROR, C.error: reason,
                               C.timestamp: pd.Timestamp.now(tz="UTC").isoformat()}, {}))

            def skip(item):  # failed in an earlier round: not repeated
                if self._point_done(item[0]):
                    bar.update(1)
                    return True
                bar.set_postfix_str(item[0].label, refresh=True)
                return False

            try:
                self.executor.map(todo, self._worker_factory(), finish, fail,
                                  tensor_parallel_size=lambda item: item[0].config.tensor_parallel_size, skip=skip)
            finally:
                bar.close()
                if getattr(self.executor, "timings", None):  # Ray: ray.init's and each actor's start, in s
                    self.environment["executor_timings"] = self.executor.timings
        finally:
            self.store.close()
        return self.results

    def saved_points(self) -> int:
        """Points whose every repeat (or a failure) is in the results."""
        return sum(self._point_done(p) for p in self.points)

    def _collect(self) -> None:
        self.runs = self.store.runs()
        ids = [p.point_id for p in self.points]
        if len(self.runs):
            self.runs = self.runs[self.runs[C.point_id].isin(ids)]
        summary = metrics.summarise(self.runs)
        if len(summary):
            summary = summary.set_index(C.point_id, drop=False).loc[[i for i in ids if i in set(summary[C.point_id])]]
            summary = summary.reset_index(drop=True)
            if C.ttft_p99_ms in summary:
                ok = summary[C.status] == "ok"
                summary[C.on_pareto_front] = ok & metrics.pareto_front(summary, C.ttft_p99_ms, C.output_throughput)
        self.results = summary

    def write_report(self, path: str, title: str = "paged-workbench sweep report", drilldown: str | None = None) -> str:
        """The HTML report of this sweep (see `workbench.report.write_report`)."""
        from .recommend import plan_verdict, recommendations
        from .report import write_report

        verdict = None
        best = next((r for r in recommendations(self.results) if r["column"] == C.output_throughput), None)
        if best is not None:
            row = self.results[self.results[C.point_id] == best[C.point_id]].iloc[0].to_dict()
            model = self.llm.spec if self.llm is not None and isinstance(self.model, str) is False else self.model
            verdict = plan_verdict(model, self._planner_gpu(), row)
        return write_report(self.results, path, self.timeseries, self.requests, self.telemetry, self.environment,
                            title, drilldown, planner_verdict=verdict)

    def _planner_gpu(self) -> str:
        import torch

        on_cpu = str(self.base_config.device or "").startswith("cpu") or not torch.cuda.is_available()
        return "cpu" if on_cpu else "current"

    def close(self) -> None:
        """Release the telemetry handle (the model stays in ``llm``)."""
        self._telemetry.close()
