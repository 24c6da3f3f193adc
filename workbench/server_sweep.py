"""A sweep whose backend is a server: per grid point, start it from a command template, wait for
/health, load-test it (`workbench.loadtest_http`), stop it.

The template is a ``str.format`` string over the point's values plus ``{model}``, ``{host}``,
``{port}`` and ``{python}`` (this interpreter), e.g.
``"vllm serve {model} --port {port} --block-size {block_size}"`` or
``"{python} -m engine serve --model {model} --port {port} --block-size {block_size}
--enable-prefix-caching {enable_prefix_caching}"`` (booleans format as True / False, which
``engine serve`` accepts). Each server's stdout and stderr go to a log file that is kept; a point
whose server exits or is not healthy within ``startup_timeout`` seconds, or dies during the run, is a
row with status "error", the reason and the log's path, and the sweep goes on. A grid or fixed value named
``n`` (completions per request) is sent in every request body rather than (or as well as) formatted into the
template.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import pandas as pd

from .grid import SAMPLING_KEYS, point_label, stable_hash
from .workloads import Workload
from .schema import ERROR, OK, C


def append_row(path: str, row: dict) -> None:
    """Append one results row to a .jsonl file (NaN written as null)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    with open(path, "a") as f:
        f.write(json.dumps(clean, default=str) + "\n")


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> str | None:
    """Poll ``url``/health until it answers 200; returns None, or why the server is not up."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            return f"the server exited with code {code} before /health answered"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return None
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return f"the server was not healthy after {timeout} s"


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


class ServerSweep:
    """One load test per point of ``grid`` ({name: [values]}), each against a fresh server.

    server_cmd: the command template (see the module docstring); fixed: values held for every point.
    log_dir: where server logs go (default: beside ``out``, else ./server-logs). out: results .jsonl,
    appended after every point. loadtest: keyword arguments of `run_loadtest` (slo, max_duration...).
    After run(): ``results`` (one row per point), ``requests`` / ``timeseries`` / ``telemetry`` by point_id.
    """

    def __init__(self, server_cmd: str, model: str, workload: Workload, grid: dict | None = None,
                 fixed: dict | None = None, host: str = "127.0.0.1", port: int = 8000, startup_timeout: float = 600.0,
                 out: str | None = None, log_dir: str | None = None, served_model_name: str | None = None,
                 env: dict | None = None, loadtest: dict | None = None):
        self.server_cmd, self.model, self.workload = server_cmd, model, workload
        self.grid = {k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in (grid or {}).items()}
        self.fixed, self.host, self.port = dict(fixed or {}), host, port
        self.startup_timeout, self.out, self.env = startup_timeout, out, env
        self.served_model_name = served_model_name or model
        self.loadtest = dict(loadtest or {})
        if out is not None and not out.endswith(".jsonl"):
            raise ValueError(f"out={out!r}: the results file of a server sweep must end in .jsonl")
        default_logs = os.path.splitext(out)[0] + ".logs" if out else "server-logs"
        self.log_dir = log_dir or default_logs
        self.points = [dict(zip(self.grid, values)) for values in itertools.product(*self.grid.values())] or [{}]
        from .loadtest_http import check_sampling

        for p in self.points:  # a template that names an unknown value fails now, not after a server start
            self.command(p)
            check_sampling({**(self.loadtest.get("sampling") or {}), **self._sampling(p)})  # so does beam_width
        self.results = pd.DataFrame()
        self.requests, self.timeseries, self.telemetry = {}, {}, {}
        self.environment = {"backend": "server", "server_cmd": server_cmd, C.model: model,
                            C.workload: workload.summary()}

    def command(self, point: dict) -> str:
        values = {**self.fixed, **point, C.model: self.model, "host": self.host, "port": self.port,
                  "python": shlex.quote(sys.executable)}
        try:
            return self.server_cmd.format(**values)
        except KeyError as e:
            raise ValueError(f"server_cmd names {{{e.args[0]}}}, which is neither a grid nor a fixed value "
                             f"(known: {sorted(values)})") from None

    def _sampling(self, point: dict) -> dict:
        """n (grid.SAMPLING_KEYS) is the workload's sampling, not a server flag: it goes into the request bodies."""
        return {k: v for k, v in {**self.fixed, **point}.items() if k in SAMPLING_KEYS}

    def _run_point(self, point: dict) -> dict:
        from .loadtest_http import run_loadtest

        cmd = self.command(point)
        sampling = self._sampling(point)
        key = {"cmd": cmd, C.workload: self.workload.fingerprint()}
        pid = stable_hash({**key, "sampling": sampling} if sampling else key)
        label = point_label(point)
        os.makedirs(self.log_dir, exist_ok=True)
        log_path = os.path.join(self.log_dir, f"{pid}.log")
        row = {C.point_id: pid, C.label: label, **self.fixed, **point, "server_cmd": cmd, "server_log": log_path}
        t0 = time.perf_counter()
        url = f"http://{self.host}:{self.port}"
        with open(log_path, "w") as log:
            log.write(f"$ {cmd}\n")
            log.flush()
            proc = subprocess.Popen(shlex.split(cmd), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, **(self.env or {})})
            try:
                why = wait_healthy(url, proc, self.startup_timeout)
                row["startup_s"] = time.perf_counter() - t0
                if why is None:
                    lt = {**self.loadtest, "sampling": {**(self.loadtest.get("sampling") or {}), **sampling}}
                    res = run_loadtest(url, self.served_model_name, self.workload, point_id=pid, label=label, **lt)
                    died = proc.poll()
                    row.update({k: v for k, v in res.row.items() if k not in (C.point_id, C.label)})
                    row.update({k: v for k, v in point.items()})  # the grid's values win over scraped ones
                    self.requests[pid], self.timeseries[pid], self.telemetry[pid] = \
                        res.requests, res.timeseries, res.telemetry
                    if died is not None:
                        why = f"the server died during the run (exit code {died})"
                    elif res.row[C.status] != OK:
                        why = res.row[C.error]
            except Exception as e:  # noqa: BLE001 - a failed point is a row, not the end of the sweep
                why = f"{type(e).__name__}: {e}"
            finally:
                stop_server(proc)
        row.update({C.status: OK if why is None else ERROR,
                    C.error: None if why is None else f"{why} (server log: {log_path})"})
        row[C.point_duration_s] = time.perf_counter() - t0
        row[C.timestamp] = pd.Timestamp.now(tz="UTC").isoformat()
        return row

    def run(self) -> pd.DataFrame:
        """Run every point in grid order; returns (and keeps in ``results``) the table."""
        rows = []
        for point in self.points:
            row = self._run_point(point)
            rows.append(row)
            if self.out:
                append_row(self.out, row)
            self.results = pd.DataFrame(rows)
        return self.results

    def write_report(self, path: str, title: str = "paged-workbench server sweep") -> str:
        from .report import write_report

        return write_report(self.results, path, self.timeseries, self.requests, self.telemetry, self.environment,
                            title)
