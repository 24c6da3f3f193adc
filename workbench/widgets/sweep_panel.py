"""SweepPanel: pick a grid, run it, watch the figures fill, export the report."""
from __future__ import annotations

import threading

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go

from engine.config import parse_value

from .. import figures, recommend, schema
from ..schema import C
from ..workloads import WORKLOADS
from .common import _CSS, _esc, _show, _table
from .plotly_widget import figure_widget


DIMENSIONS = {  # EngineConfig field: example values
    C.block_size: "8, 16, 32", C.max_num_batched_tokens: "256, 2048", C.max_num_seqs: "4, 64",
    C.enable_prefix_caching: "True, False", C.quantization: "None, int8", C.kv_cache_dtype: "auto, fp8",
    C.gpu_memory_utilization: "0.8, 0.9",
    # the workload's sampling (workbench.grid.SAMPLING_KEYS), not EngineConfig fields
    C.n: "1, 2, 4", C.beam_width: "None, 2, 4",
}
SAMPLING_DEFAULTS = {C.n: 1, C.beam_width: None}  # what an empty sampling field runs with
# Short table headers of the panel's columns (the schema's labels are too long for a 1280 px notebook).
HEADERS = {C.output_throughput: "out tok/s", C.ttft_p99_ms: "TTFT p99 ms", C.tpot_p50_ms: "TPOT p50 ms",
           C.kv_usage_peak: "KV peak", C.prefix_cache_hit_rate: "hit rate", C.internal_fragmentation_mean: "frag.",
           C.num_preemptions: "preempt."}
FIGURE_WIDTH = 490  # two per row in JupyterLab's cell at 1280 px (one per row when narrower)
PANEL_FIGURES = ("throughput_latency", "throughput", "ttft", "kv")  # always shown; a speed-up curve when it applies


def parse_values(text: str) -> list:
    """"8, 16" -> [8, 16]; "True, off" -> [True, False]; "None, int8" -> [None, "int8"]; "" -> []."""
    values = [parse_value(t) for t in text.split(",") if t.strip()]
    return [v.strip("'\"") if isinstance(v, str) else v for v in values]


def sharing_note(sampling: dict, config) -> tuple[str, str] | None:
    """What block sharing means for a point whose requests run several sequences (``n`` > 1, or a beam
    search of ``beam_width`` > 1): (a short tag for the planner column, the explanation for its tooltip);
    None for one sequence per request. max_num_seqs counts sequences, not requests, so such a point runs at
    most max_num_seqs // size requests at once. A sampling the grid refuses (`workbench.grid.sampling_problems`,
    e.g. n above max_num_seqs) gives ("not allowed", its problems), as the grid's validation words them."""
    from ..grid import sampling_problems

    problems = sampling_problems(sampling, config)
    if problems:
        return "not allowed", "; ".join(problems)
    n, beam = sampling.get(C.n, 1), sampling.get(C.beam_width)
    size = n if beam is None else beam
    if size == 1:
        return None
    if beam is None:
        what = (f"n={n}: each request holds up to {n} sequences, which share its prompt's KV blocks (the last, "
                "partly filled block is copied on the first write)")
    else:
        what = (f"beam_width={beam}: each request holds up to {beam} beams, which share the blocks of their common "
                "history (copied on write where they diverge, freed when a beam dies)")
    seqs = config.max_num_seqs
    if seqs is None:
        return f"{size} seqs/request", f"{what}; max_num_seqs (the engine's pick) counts sequences, not requests"
    return (f"{size} seqs/request, \u2264{seqs // size} requests",
            f"{what}; max_num_seqs={seqs} counts sequences, so at most {seqs // size} such requests run at once")


class _Stopped(Exception):
    pass


class SweepPanel(widgets.VBox):
    """Pick a model, a workload and the values to sweep per setting; see the planner's verdict for each
    point before it runs; Run (Stop ends the sweep after the running point); the figures and the table
    fill in as points finish; Export HTML writes the report.

    model: preset name or checkpoint folder; llm: an already loaded `LLM` for that model (reused, and kept
    in ``llm`` after a run). workloads: {workload name: its arguments} offered in the picker (default:
    every built-in, default arguments). grid: initial values per EngineConfig field. base_config: the
    other settings. gpu: what the planner plans for ("cpu" on the CPU). background: Run starts a thread, so
    the notebook stays usable and Stop works; `run()` runs in the calling thread (scripts, tests).
    repeats: runs per point (1, the quick mode, by default: no noise estimate; 3 to trust a winner).
    The panel fits a 1280-pixel-wide JupyterLab notebook; changing the form clears the figures of the
    last run (they no longer describe the grid shown).
    After a run: ``sweep`` (the `Sweep`), ``results`` (its DataFrame).
    """

    def __init__(self, model: str = "tiny", workload: str | None = None, grid: dict | None = None,
                 base_config=None, num_requests: int = 16, workloads: dict | None = None, gpu: str | None = None,
                 slo: dict | None = None, llm=None, report_path: str = "sweep_report.html",
                 background: bool = True, sweep_args: dict | None = None, repeats: int = 1):
        super().__init__()
        from engine import LLM, EngineConfig

        self.base_config = base_config or EngineConfig()
        self.workload_args = dict(workloads or {name: {} for name in WORKLOADS})
        self.slo, self.llm, self._llm_model = slo, llm, model if llm is not None else None
        self.background, self.sweep_args = background, {**dict(repeats=repeats), **(sweep_args or {})}
        self.sweep, self.results, self.plans = None, pd.DataFrame(), None
        self._thread, self._stop, self._running, self._running_label = None, False, False, None
        style, wide = {"description_width": "165px"}, widgets.Layout(width="400px")
        self.model = widgets.Combobox(value=model, options=[model] + LLM.presets(), description=schema.column(C.model).label,
                                      ensure_option=False, style=style, layout=wide)
        self.workload = widgets.Dropdown(options=list(self.workload_args), description=schema.column(C.workload).label, style=style,
                                         value=workload or next(iter(self.workload_args)), layout=wide)
        self.num_requests = widgets.BoundedIntText(value=num_requests, min=1, max=100_000, description="requests",
                                                   style=style, layout=wide)
        self.gpu = widgets.Dropdown(options=self._gpu_options(), value=gpu or self._default_gpu(),
                                    description="plan for GPU", style=style, layout=wide)
        self.dims = {}
        for name, example in DIMENSIONS.items():
            values = (grid or {}).get(name, [])
            self.dims[name] = widgets.Text(value=", ".join("None" if v is None else str(v) for v in values),
                                           placeholder=f"e.g. {example}  (empty: "
                                                       f"{getattr(self.base_config, name, SAMPLING_DEFAULTS.get(name))})",
                                           description=name, continuous_update=False, style=style, layout=wide)
        self.run_button = widgets.Button(description="Run", icon="play", button_style="success")
        self.stop_button = widgets.Button(description="Stop", icon="stop", disabled=True,
                                          tooltip="stop after the running point")
        self.export_button = widgets.Button(description="Export HTML", icon="download", disabled=True)
        self.report_path = widgets.Text(value=report_path, description="report", layout=widgets.Layout(width="320px"))
        self.progress = widgets.IntProgress(min=0, max=1, value=0, layout=widgets.Layout(width="400px"))
        self.status = widgets.HTML()
        self.points_table = widgets.HTML()
        # A speed-up curve (figures.SPEEDUP_BASELINES: quantization, KV dtype) joins them once the results vary it.
        self.figures = {name: figure_widget() for name in (*PANEL_FIGURES, *figures.SPEEDUP_BASELINES)}
        self.run_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.export_button.on_click(lambda _: self.export())
        for w in (self.model, self.workload, self.num_requests, self.gpu, *self.dims.values()):
            w.observe(lambda _: self.preview(), "value")
        form = widgets.VBox([widgets.HTML("<div class='wb-h'>What to run</div>"), self.model, self.workload,
                             self.num_requests, self.gpu, widgets.HTML("<div class='wb-h'>Values to sweep "
                                                                       "(comma separated)</div>"),
                             *self.dims.values()])
        actions = widgets.VBox([widgets.HBox([self.run_button, self.stop_button]), self.progress, self.status,
                                widgets.HBox([self.export_button, self.report_path])],
                               layout=widgets.Layout(margin="0 0 0 20px"))
        self.figure_grid = widgets.GridBox([self.figures[n] for n in PANEL_FIGURES], layout=widgets.Layout(
            grid_template_columns=f"repeat(auto-fill, {FIGURE_WIDTH + 10}px)"))
        self.children = [widgets.HTML(_CSS), widgets.HBox([form, actions], layout=widgets.Layout(flex_flow="row wrap")),
                         self.points_table, self.figure_grid]
        self.layout.max_width = "100%"
        self.add_class("wb-sweep-panel")
        self.preview()

    # --- setup ---------------------------------------------------------------------------------------

    def _gpu_options(self) -> list[str]:
        import torch

        try:
            from ..planner import GPUS
        except ImportError:  # no planner: the verdict column is left out (see _plan)
            GPUS = {}
        return ["cpu", *(["current"] if torch.cuda.is_available() else []), *GPUS]

    def _default_gpu(self) -> str:
        import torch

        cpu = str(self.base_config.device or "").startswith("cpu") or not torch.cuda.is_available()
        return "cpu" if cpu else "current"

    def grid(self) -> dict:
        """The grid the form describes: {EngineConfig field (or n, beam_width): [values]} for the fields given
        values."""
        return {name: parse_values(w.value) for name, w in self.dims.items() if parse_values(w.value)}

    def _model(self):
        name = self.model.value.strip()
        if self.llm is not None and name == self._llm_model:
            return self.llm, name
        return name, name

    def build_sweep(self):
        """A `Sweep` of the form's settings (no run); raises ValueError for a bad setting."""
        from ..sweep import Sweep

        model, name = self._model()
        return Sweep(model, self.workload.value, self.grid(), self.base_config, slo=self.slo,
                     num_requests=self.num_requests.value, workload_args=self.workload_args[self.workload.value],
                     progress=False, model_name=name, on_point=self._on_point, **self.sweep_args)

    def preview(self) -> None:
        """Rebuild the points from the form and plan each one; shows the table, enables Run if it is valid."""
        if self._running:
            return
        self._prepare()

    def _prepare(self) -> None:
        try:
            self.sweep = self.build_sweep()
        except Exception as e:  # noqa: BLE001 - a bad form value is shown, not raised
            self.sweep = None
            self.status.value = f"<div class='wb-error'>{_esc(e)}</div>"
            self.run_button.disabled = True
            self.points_table.value = ""
            return
        self.plans = self._plan(self.sweep)
        self.results = pd.DataFrame()
        self._clear_figures()
        self.run_button.disabled = False
        self.progress.max, self.progress.value = len(self.sweep.points), 0
        self.status.value = f"{len(self.sweep.points)} points, not run yet"
        self._render_points()

    def _plan(self, sweep) -> dict | None:
        """{point_id: (verdict, reason, sharing)} from the memory planner (sharing: `sharing_note` of the point's
        sampling, or None), or None when there is no planner."""
        try:
            from ..planner import plan_table
        except ImportError:
            return None
        model = sweep.llm.spec if sweep.llm is not None else self.model.value.strip()
        notes = [sharing_note({**(sweep.sampling or {}), **p.sampling}, p.config) for p in sweep.points]
        try:
            table = plan_table(model, self.gpu.value, [p.config for p in sweep.points])
        except Exception as e:  # noqa: BLE001 - no plan is not a reason to refuse to run
            return {p.point_id: ("no plan", str(e), note) for p, note in zip(sweep.points, notes)}
        return {p.point_id: (r["verdict"], r["reason"], note)
                for p, r, note in zip(sweep.points, table.to_dict("records"), notes)}

    # --- running -------------------------------------------------------------------------------------

    def start(self) -> None:
        """What Run does: `run()` in a thread (background=True) or here."""
        if self.background:
            self._thread = threading.Thread(target=self.run, daemon=True)
            self._thread.start()
        else:
            self.run()

    def stop(self) -> None:
        """Stop after the point that is running (a point cannot be interrupted halfway)."""
        self._stop = True
        self._set_stop(enabled=False)
        self.status.value = "stopping after the running point..."

    def run(self) -> pd.DataFrame:
        """Run the sweep in this thread; returns the results (also kept in ``results``)."""
        if self._running:
            raise RuntimeError("a sweep is running already: Stop it or wait for it")
        self._prepare()
        if self.sweep is None:
            return self.results
        self._stop, self._running = False, True
        self.run_button.disabled, self.export_button.disabled = True, True
        self._set_stop(enabled=True)
        self.progress.value, self.progress.bar_style = 0, ""
        self._running_label = self.sweep.points[0].label if self.sweep.points else None
        self.status.value = f"running {_esc(self._running_label)}... (the first point loads the weights)"
        self._render_points()
        try:
            self.sweep.run()
            self.status.value = f"done: {self._ok_count()} of {len(self.sweep.points)} points ok"
            self.progress.bar_style = "success"
        except _Stopped:
            self.status.value = f"stopped after {len(self.sweep.results)} of {len(self.sweep.points)} points"
            self.progress.bar_style = "warning"
        except Exception as e:  # noqa: BLE001 - shown in the panel; the thread must not die silently
            self.status.value = f"<div class='wb-error'>the sweep failed: {_esc(type(e).__name__)}: {_esc(e)}</div>"
            self.progress.bar_style = "danger"
        finally:
            self._running, self._running_label = False, None
            if self.sweep.llm is not None:
                self.llm, self._llm_model = self.sweep.llm, self.model.value.strip()
            self.results = self.sweep.results
            self.run_button.disabled = False
            self._set_stop(enabled=False)
            self.export_button.disabled = len(self.results) == 0
            self._render_points()
            self._render_figures()
        return self.results

    def _ok_count(self) -> int:
        return int((self.sweep.results[C.status] == "ok").sum()) if len(self.sweep.results) else 0

    def _on_point(self, row: dict) -> None:
        self.results = self.sweep.results
        done = set(self.results[C.point_id])
        nxt = next((p.label for p in self.sweep.points if p.point_id not in done), None)
        self._running_label = None if self._stop else nxt
        self.progress.value = len(done)
        if nxt is not None and not self._stop:
            self.status.value = f"{len(done)} of {len(self.sweep.points)} points done; running {_esc(nxt)}..."
        self._render_points()
        self._render_figures()
        if self._stop:
            raise _Stopped()

    def export(self, path: str | None = None) -> str:
        """Write the HTML report of the last run (what Export HTML does); returns its path."""
        path = path or self.report_path.value
        self.sweep.write_report(path)
        self.status.value = f"report written to <code>{_esc(path)}</code>"
        return path

    # --- display -------------------------------------------------------------------------------------

    def _set_stop(self, enabled: bool) -> None:
        """Stop is red only while it can be pressed; disabled it is grey (and dimmed by the panel's CSS)."""
        self.stop_button.disabled = not enabled
        self.stop_button.button_style = "danger" if enabled else ""

    def _clear_figures(self) -> None:
        for fw in self.figures.values():
            _show(fw, go.Figure(layout=dict(width=FIGURE_WIDTH, height=340)))
        self.figure_grid.children = [self.figures[n] for n in PANEL_FIGURES]

    def _render_points(self) -> None:
        if self.sweep is None:
            return
        by_id = {r[C.point_id]: r for r in self.results.to_dict("records")} if len(self.results) else {}
        running = self._running_label
        rows = []
        for p in self.sweep.points:
            r = by_id.get(p.point_id, {})
            status = r.get(C.status) or ("running" if p.label == running else "pending")
            if r.get(C.error):
                status = f"<span title='{_esc(r[C.error])}' class='wb-error'>{_esc(status)}</span>"
            row = {C.label: p.label, C.status: status, **{k: r.get(k) for k in schema.PANEL_COLUMNS}}
            if self.plans is not None:
                verdict, reason, sharing = self.plans[p.point_id]
                ok = verdict == "fits" and (sharing is None or sharing[0] != "not allowed")
                if sharing is not None:  # e.g. "fits; 4 seqs/request, <=16 requests", the why in the tooltip
                    verdict, reason = f"{verdict}; {sharing[0]}", f"{reason} | {sharing[1]}"
                colour = "#2a7" if ok else "#b00"
                row["plan"] = f"<span style='color:{colour}' title='{_esc(reason)}'>{_esc(verdict)}</span>"
            rows.append(row)
        columns = {C.label: ("point", None)}
        if self.plans is not None:
            columns["plan"] = ("planner", "html")
        columns[C.status] = (schema.column(C.status).label, "html")
        columns.update({k: (HEADERS.get(k, schema.title(k)), "schema") for k in schema.PANEL_COLUMNS})
        self.points_table.value = (_CSS + "<div style='overflow-x:auto;max-width:100%'>" + _table(rows, columns)
                                   + "</div>")

    def _render_figures(self) -> None:
        df = self.results
        best = next((r for r in recommend.recommendations(df) if r["column"] == C.output_throughput), None)
        pid, label = (best[C.point_id], best[C.label]) if best else (None, "no point yet")
        figs = {"throughput_latency": figures.throughput_latency(df), "throughput": figures.throughput_by_setting(df),
                "ttft": figures.latency_percentiles(df, "ttft"),
                "kv": figures.kv_usage_over_time(self.sweep.timeseries.get(pid), f"KV usage and batch size: {label}")}
        figs.update(figures.speedup_curves(df))
        shown = [self.figures[name] for name in figs]
        if [id(w) for w in self.figure_grid.children] != [id(w) for w in shown]:  # (== compares the figures)
            self.figure_grid.children = shown
        for name, fig in figs.items():
            fig.update_layout(width=FIGURE_WIDTH, height=340, margin=dict(l=60, r=10, t=50, b=40), title_font_size=13,
                              legend=dict(orientation="h", x=0, y=-0.3, yanchor="top", font_size=10))
            _show(self.figures[name], fig)
