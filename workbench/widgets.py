"""ipywidgets panels: SweepPanel (pick a grid, run it, watch the figures fill, export the report),
BlockMapExplorer (the physical KV blocks of a small engine run, step by step) and AllocatorComparison
(one trace through the paged allocator and the contiguous ones of the vLLM paper).

Panels compose `workbench.figures` and show numbers made elsewhere (`workbench.metrics` through `Sweep`,
`workbench.baselines`, `workbench.planner`, the engine's StepStats and `LLMEngine.block_map()`); they
compute none themselves. Each panel is an ipywidgets box: put it last in a cell, or `display()` it.
"""
from __future__ import annotations

import html
import threading

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go

from . import baselines, figures, metrics
from .workloads import WORKLOADS

_CSS = """<style>
.wb-table { border-collapse: collapse; font-size: 12px; margin: 4px 0 10px 0; }
.wb-table td, .wb-table th { border: 1px solid #ddd; padding: 2px 6px; text-align: left; }
.wb-table th { background: #f4f4f4; font-weight: 600; }
.wb-chip { display: inline-block; min-width: 18px; padding: 0 3px; margin: 1px; border-radius: 3px;
           font: 11px monospace; text-align: center; color: #222; }
.wb-h { font-weight: 600; margin: 6px 0 2px 0; }
.wb-muted { color: #777; } .wb-error { color: #b00; white-space: pre-wrap; }
</style>"""


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _show(fw: go.FigureWidget, fig: go.Figure) -> None:
    """Replace what a FigureWidget shows with ``fig`` (traces and layout)."""
    with fw.batch_update():
        fw.data = []
        fw.add_traces(list(fig.data))
        fw.layout = fig.layout


def _table(rows: list[dict], columns: dict) -> str:
    """An HTML table; columns: {key: (header, format)}: a str.format pattern, None (text) or "html" (as is)."""
    head = "".join(f"<th>{_esc(h)}</th>" for h, _ in columns.values())
    body = []
    for r in rows:
        cells = []
        for key, (_, fmt) in columns.items():
            v = r.get(key)
            if v is None or (isinstance(v, float) and v != v):
                cells.append("<td class='wb-muted'>-</td>")
            elif fmt == "html":
                cells.append(f"<td>{v}</td>")
            else:
                cells.append(f"<td>{_esc(fmt.format(v) if fmt else v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='wb-table'><tr>{head}</tr>{''.join(body)}</table>"


# ===== BlockMapExplorer ==========================================================================

class BlockMapRecording:
    """A small engine run recorded step by step (see `record_block_map`).

    snapshots[i]: `LLMEngine.block_map()` after step i (i = 0: before the first step); counters[i]: the
    StepStats of step i as a dict (None for i = 0); events[i]: request ids that arrived, were admitted,
    preempted or finished in step i. request_ids: every request, in arrival order.
    """

    def __init__(self, snapshots: list[dict], counters: list, events: list[dict], request_ids: list[str]):
        self.snapshots, self.counters, self.events, self.request_ids = snapshots, counters, events, request_ids

    def __len__(self) -> int:
        return len(self.snapshots)

    def blocks(self, i: int) -> pd.DataFrame:
        """One row per physical block after step i: block_id, state (owned | shared | cached | free), owner,
        owners (text), ref_count, cached: the frame `figures.block_map` draws."""
        snap = self.snapshots[i]
        holders: dict[int, list[str]] = {}
        for rid, table in snap["block_tables"].items():
            for b in table:
                holders.setdefault(b, []).append(rid)
        rows = []
        for b, (ref, cached) in enumerate(snap["blocks"]):
            who = holders.get(b, [])
            state = ("shared" if ref > 1 else "owned") if ref else ("cached" if cached else "free")
            note = " (a cached prefix)" if cached else ""
            owners = (f"held by {', '.join(who)}" if who else "no owner") + note
            rows.append({"block_id": b, "state": state, "owner": who[0] if len(who) == 1 else "",
                         "owners": owners, "ref_count": ref, "cached": cached})
        return pd.DataFrame(rows, columns=["block_id", "state", "owner", "owners", "ref_count", "cached"])


def _events(before: dict, snap: dict, finished: list[str], arrived: list[str]) -> dict:
    was_running = set(before["running"])
    return {"arrived": arrived, "admitted": [r for r in snap["running"] if r not in was_running],
            "preempted": [r for r in snap["waiting"] if r in was_running], "finished": finished}


def record_block_map(llm, requests, max_steps: int = 500) -> BlockMapRecording:
    """Run ``requests`` through ``llm.engine`` and keep the block map after every step.

    requests: (request_id, prompt, max_tokens[, arrival_step]) tuples; prompt is text (a model with a
    tokenizer) or token ids; arrival_step k adds the request after k steps (0: before the first).
    Sampling is greedy with ignore_eos. The engine must be idle; it is idle again afterwards.
    """
    from engine import SamplingParams

    engine = llm.engine
    if engine.has_unfinished_requests():
        raise ValueError("the engine has unfinished requests: finish or abort them before recording")
    pending = sorted(((r[3] if len(r) > 3 else 0), i, r) for i, r in enumerate(requests))
    ids = [r[0] for _, _, r in pending]

    def arrive(step: int) -> list[str]:
        added = []
        while pending and (pending[0][0] <= step or not engine.has_unfinished_requests()):
            _, _, (rid, prompt, max_tokens, *_) = pending.pop(0)
            engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
            added.append(rid)
        return added

    arrived = arrive(0)
    snapshots, counters = [engine.block_map()], [None]
    events = [{"arrived": arrived, "admitted": [], "preempted": [], "finished": []}]
    for step in range(1, max_steps + 1):
        if not engine.has_unfinished_requests():
            break
        finished = [o.request_id for o in engine.step()]
        arrived = arrive(step)
        snap = engine.block_map()
        events.append(_events(snapshots[-1], snap, finished, arrived))
        snapshots.append(snap)
        counters.append(vars(engine.stats().steps[-1]).copy())
    else:
        for rid in list(engine.requests):
            engine.abort_request(rid)
    return BlockMapRecording(snapshots, counters, events, ids)


COUNTERS = {  # StepStats field: (label, format), shown two per row
    "num_running": ("running requests", "{}"), "num_waiting": ("waiting requests", "{}"),
    "num_prefill_tokens": ("prefill tokens", "{}"), "num_decode_tokens": ("decode tokens", "{}"),
    "num_used_blocks": ("used blocks", "{}"), "num_free_blocks": ("free blocks", "{}"),
    "kv_usage": ("KV usage", "{:.0%}"), "num_cached_blocks": ("free, cached prefix", "{}"),
    "internal_fragmentation": ("internal fragmentation", "{:.1%}"), "num_preemptions": ("preemptions", "{}"),
    "prefix_cache_hits": ("prefix-cache hits (tokens)", "{}"), "prefix_cache_queries": ("looked up (tokens)", "{}"),
}


class BlockMapExplorer(widgets.VBox):
    """The physical KV blocks of a recorded run: a grid coloured by owning request (shared prefix blocks
    dark, free blocks that keep a cached prefix outlined green), a step slider with a play button, and
    beside the grid the step's counters and the block table of every running request.

    Build it from a recording (`record_block_map`) or with `BlockMapExplorer.record(llm, requests)`.
    ``slider.value`` is the step shown; `show(i)` moves there.
    """

    def __init__(self, recording: BlockMapRecording, columns: int = 16, interval_ms: int = 700):
        super().__init__()
        self.recording, self.columns = recording, columns
        self.colors = figures.block_colors(recording.request_ids)
        last = len(recording) - 1
        self.figure = go.FigureWidget(figures.block_map(recording.blocks(0), columns, self.colors))
        self.figure._config = {"displayModeBar": False}  # FigureWidget's config; zooming a fixed grid helps nobody
        self.play = widgets.Play(min=0, max=last, interval=interval_ms, description="play")
        self.slider = widgets.IntSlider(min=0, max=last, description="step", continuous_update=True,
                                        layout=widgets.Layout(width="420px"))
        widgets.jslink((self.play, "value"), (self.slider, "value"))
        self.events = widgets.HTML(layout=widgets.Layout(margin="0 0 0 12px"))
        self.counters = widgets.HTML(layout=widgets.Layout(margin="0 0 0 10px"))
        self.tables = widgets.HTML(layout=widgets.Layout(min_width="330px", margin="0 0 0 16px"))
        self.slider.observe(lambda change: self.show(change["new"]), "value")
        self.children = [widgets.HTML(_CSS), widgets.HBox([self.play, self.slider, self.events]),
                         widgets.HBox([widgets.VBox([self.figure, self.counters]), self.tables])]
        self.add_class("wb-block-map-explorer")
        self.step = -1
        self.show(0)

    @classmethod
    def record(cls, llm, requests, columns: int = 16, max_steps: int = 500, **kwargs) -> "BlockMapExplorer":
        """Record ``requests`` on ``llm`` (see `record_block_map`) and explore the recording."""
        return cls(record_block_map(llm, requests, max_steps), columns, **kwargs)

    def show(self, i: int) -> None:
        """Show the pool after step i (0: before the first step)."""
        rec = self.recording
        fig = figures.block_map(rec.blocks(i), self.columns, self.colors,
                                title="KV blocks before the first step" if i == 0 else f"KV blocks after step {i}")
        with self.figure.batch_update():
            for old, new in zip(self.figure.data, fig.data):
                old.update(x=new.x, y=new.y, text=new.text, customdata=new.customdata)
            self.figure.layout.title = fig.layout.title
        self.events.value = self._events_html(rec.events[i])
        self.counters.value = _CSS + self._counters_html(rec.counters[i])
        self.tables.value = _CSS + self._tables_html(rec.snapshots[i])
        if self.slider.value != i:
            self.slider.value = i
        self.step = i

    def _events_html(self, ev: dict) -> str:
        parts = [f"<b>{name}</b> {_esc(', '.join(ev[key]))}" for key, name in
                 (("arrived", "arrived:"), ("admitted", "admitted:"), ("preempted", "preempted:"),
                  ("finished", "finished:")) if ev[key]]
        return " &nbsp;·&nbsp; ".join(parts) or "<span class='wb-muted'>decode: every running request +1 token</span>"

    def _counters_html(self, counters: dict | None) -> str:
        if counters is None:
            return "<div class='wb-h'>Counters of the step</div><div class='wb-muted'>no step has run yet</div>"
        cells = [f"<td>{_esc(label)}</td><td><b>{_esc(fmt.format(counters[key]))}</b></td>"
                 for key, (label, fmt) in COUNTERS.items()]
        rows = "".join("<tr>" + "".join(cells[j:j + 2]) + "</tr>" for j in range(0, len(cells), 2))
        return f"<div class='wb-h'>Counters of the step</div><table class='wb-table'>{rows}</table>"

    def _tables_html(self, snap: dict) -> str:
        blocks = snap["blocks"]

        def chip(b, colour):
            ref = blocks[b][0]
            style = "background:#3C3C3C;color:white" if ref > 1 else f"background:{colour}"
            return f"<span class='wb-chip' style='{style}' title='ref_count {ref}'>{b}</span>"

        rows = []
        for rid, computed in snap["running"].items():
            colour = self.colors.get(rid, "#ccc")
            rows.append({"rid": f"<span class='wb-chip' style='background:{colour}'>{_esc(rid)}</span>",
                         "tokens": computed,
                         "table": "".join(chip(b, colour) for b in snap["block_tables"].get(rid, []))})
        out = f"<div class='wb-h'>Block tables (block size {snap['block_size']})</div>"
        out += _table(rows, {"rid": ("request", "html"), "tokens": ("tokens in KV", "{}"),
                             "table": ("block table: logical block -> physical block", "html")}) if rows else \
            "<div class='wb-muted'>no request running</div>"
        if snap["waiting"]:
            out += f"<div><b>waiting:</b> {_esc(', '.join(snap['waiting']))}</div>"
        return out


# ===== AllocatorComparison =======================================================================

class AllocatorComparison(widgets.VBox):
    """One trace through the paged allocator and through contiguous ones that reserve max_model_len,
    the next power of two, or the exact final length (the vLLM paper's Orca Max / Pow2 / Oracle), in the
    same KV pool: where the memory goes, how many requests run at once, and the numbers.

    ``result`` is the `workbench.baselines.compare_allocators` result shown; changing the block size, the
    pool size or the averaging window replays the trace.
    """

    def __init__(self, trace, capacity_tokens: int, max_model_len: int, block_size: int = 16,
                 max_num_seqs: int = 256, steps: str = "loaded"):
        super().__init__()
        self.trace, self.max_model_len, self.max_num_seqs = trace, max_model_len, max_num_seqs
        style = {"description_width": "initial"}
        self.block_size = widgets.Dropdown(options=[8, 16, 32, 64, 128], value=block_size, style=style,
                                           description="paged block size", layout=widgets.Layout(width="190px"))
        self.capacity = widgets.BoundedIntText(value=capacity_tokens, min=max_model_len, max=10**8, step=1024,
                                               description="KV pool (token slots)", style=style,
                                               layout=widgets.Layout(width="270px"))
        self.steps = widgets.ToggleButtons(options=[("while requests wait", "loaded"), ("whole run", "all")],
                                           value=steps, style={"button_width": "150px"},
                                           tooltips=["steps in which the pool held a request back",
                                                     "every step, including the drain at the end"])
        self.waste = go.FigureWidget()
        self.batch = go.FigureWidget()
        self.table = widgets.HTML()
        self.caption = widgets.HTML()
        for w in (self.block_size, self.capacity, self.steps):
            w.observe(lambda _: self.update(), "value")
        self.children = [widgets.HTML(_CSS), self.caption,
                         widgets.HBox([self.block_size, self.capacity, widgets.Label("average over"), self.steps],
                                      layout=widgets.Layout(flex_flow="row wrap", align_items="center")),
                         widgets.HBox([self.waste, self.batch]), self.table]
        self.add_class("wb-allocator-comparison")
        self.update()

    def update(self) -> None:
        """Replay the trace with the current settings and redraw."""
        self.result = baselines.compare_allocators(self.trace, self.capacity.value, self.max_model_len,
                                                   self.block_size.value, self.max_num_seqs, steps=self.steps.value)
        summary, timeline = self.result
        window = "while requests wait" if self.steps.value == "loaded" else "over the whole run"
        waste = figures.memory_waste(summary, f"Where the KV memory goes ({window})")
        waste.update_layout(width=500, height=430, margin=dict(l=60, r=10, t=60, b=80))
        batch = figures.allocator_batch_size(timeline)
        batch.update_layout(width=470, height=430, margin=dict(l=60, r=10, t=60, b=80),
                            legend=dict(orientation="h", x=0, y=-0.22, yanchor="top"))
        _show(self.waste, waste)
        _show(self.batch, batch)
        info = getattr(self.trace, "summary", lambda: None)()
        trace = (f"{info['num_requests']} requests ({_esc(info['name'])}), prompts {info['prompt_len_mean']:.0f} and "
                 f"outputs {info['output_len_mean']:.0f} tokens on average" if info else f"{len(summary)} allocators")
        self.caption.value = (f"<div class='wb-h'>Trace: {trace}; one pool of {self.capacity.value:,} token slots, "
                              f"max_model_len {self.max_model_len}</div>")
        self.table.value = _CSS + _table(summary.to_dict("records"), {
            "label": ("allocator", None), "tokens_share": ("token states", "{:.1%}"),
            "reservation_share": ("reservation", "{:.1%}"),
            "internal_fragmentation_share": ("internal frag.", "{:.1%}"),
            "external_fragmentation_share": ("external frag.", "{:.1%}"), "free_share": ("free", "{:.1%}"),
            "batch_size_mean": ("requests at once (mean)", "{:.1f}"), "batch_size_max": ("(max)", "{}"),
            "num_steps": ("steps to finish the trace", "{:,}"), "num_preemptions": ("preemptions", "{}")})


# ===== SweepPanel ================================================================================

DIMENSIONS = {  # EngineConfig field: example values
    "block_size": "8, 16, 32", "max_num_batched_tokens": "256, 2048", "max_num_seqs": "4, 64",
    "enable_prefix_caching": "True, False", "quantization": "None, int8", "kv_cache_dtype": "auto, fp8",
    "gpu_memory_utilization": "0.8, 0.9",
}


def parse_values(text: str) -> list:
    """"8, 16" -> [8, 16]; "True, off" -> [True, False]; "None, int8" -> [None, "int8"]; "" -> []."""
    words = {"none": None, "true": True, "on": True, "false": False, "off": False}
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item.lower() in words:
            out.append(words[item.lower()])
            continue
        for cast in (int, float):
            try:
                out.append(cast(item))
                break
            except ValueError:
                pass
        else:
            out.append(item.strip("'\""))
    return out


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
    After a run: ``sweep`` (the `Sweep`), ``results`` (its DataFrame).
    """

    def __init__(self, model: str = "tiny", workload: str | None = None, grid: dict | None = None,
                 base_config=None, num_requests: int = 16, workloads: dict | None = None, gpu: str | None = None,
                 slo: dict | None = None, llm=None, report_path: str = "sweep_report.html",
                 background: bool = True, sweep_args: dict | None = None):
        super().__init__()
        from engine import EngineConfig
        from engine.model import PRESETS

        self.base_config = base_config or EngineConfig()
        self.workload_args = dict(workloads or {name: {} for name in WORKLOADS})
        self.slo, self.llm, self._llm_model = slo, llm, model if llm is not None else None
        self.background, self.sweep_args = background, dict(sweep_args or {})
        self.sweep, self.results, self.plans = None, pd.DataFrame(), None
        self._thread, self._stop, self._running, self._running_label = None, False, False, None
        style, wide = {"description_width": "175px"}, widgets.Layout(width="420px")
        self.model = widgets.Combobox(value=model, options=[model] + sorted(PRESETS), description="model",
                                      ensure_option=False, style=style, layout=wide)
        self.workload = widgets.Dropdown(options=list(self.workload_args), description="workload", style=style,
                                         value=workload or next(iter(self.workload_args)), layout=wide)
        self.num_requests = widgets.BoundedIntText(value=num_requests, min=1, max=100_000, description="requests",
                                                   style=style, layout=wide)
        self.gpu = widgets.Dropdown(options=self._gpu_options(), value=gpu or self._default_gpu(),
                                    description="plan for GPU", style=style, layout=wide)
        self.dims = {}
        for name, example in DIMENSIONS.items():
            values = (grid or {}).get(name, [])
            self.dims[name] = widgets.Text(value=", ".join("None" if v is None else str(v) for v in values),
                                           placeholder=f"e.g. {example}  (empty: {getattr(self.base_config, name)})",
                                           description=name, continuous_update=False, style=style, layout=wide)
        self.run_button = widgets.Button(description="Run", icon="play", button_style="success")
        self.stop_button = widgets.Button(description="Stop", icon="stop", button_style="danger", disabled=True)
        self.export_button = widgets.Button(description="Export HTML", icon="download", disabled=True)
        self.report_path = widgets.Text(value=report_path, description="report", layout=widgets.Layout(width="320px"))
        self.progress = widgets.IntProgress(min=0, max=1, value=0, layout=widgets.Layout(width="440px"))
        self.status = widgets.HTML()
        self.points_table = widgets.HTML()
        self.figures = {name: go.FigureWidget() for name in ("throughput_latency", "throughput", "ttft", "kv")}
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
                                widgets.HBox([self.export_button, self.report_path]), self.points_table],
                               layout=widgets.Layout(margin="0 0 0 20px"))
        figs = widgets.GridBox(list(self.figures.values()),
                               layout=widgets.Layout(grid_template_columns="repeat(2, 510px)"))
        self.children = [widgets.HTML(_CSS), widgets.HBox([form, actions]), figs]
        self.add_class("wb-sweep-panel")
        self.preview()

    # --- setup ---------------------------------------------------------------------------------------

    def _gpu_options(self) -> list[str]:
        import torch

        try:
            from .planner import GPUS
        except ImportError:  # no planner: the verdict column is left out (see _plan)
            GPUS = {}
        return ["cpu", *(["current"] if torch.cuda.is_available() else []), *GPUS]

    def _default_gpu(self) -> str:
        import torch

        cpu = str(self.base_config.device or "").startswith("cpu") or not torch.cuda.is_available()
        return "cpu" if cpu else "current"

    def grid(self) -> dict:
        """The grid the form describes: {EngineConfig field: [values]} for the fields given values."""
        return {name: parse_values(w.value) for name, w in self.dims.items() if parse_values(w.value)}

    def _model(self):
        name = self.model.value.strip()
        if self.llm is not None and name == self._llm_model:
            return self.llm, name
        return name, name

    def build_sweep(self):
        """A `Sweep` of the form's settings (no run); raises ValueError for a bad setting."""
        from .sweep import Sweep

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
        self.run_button.disabled = False
        self.progress.max, self.progress.value = len(self.sweep.points), 0
        self.status.value = f"{len(self.sweep.points)} points, not run yet"
        self._render_points()

    def _plan(self, sweep) -> dict | None:
        """{point_id: (verdict, reason)} from the memory planner, or None when there is no planner."""
        try:
            from .planner import plan_table
        except ImportError:
            return None
        model = sweep.llm.spec if sweep.llm is not None else self.model.value.strip()
        try:
            table = plan_table(model, self.gpu.value, [p["config"] for p in sweep.points])
        except Exception as e:  # noqa: BLE001 - no plan is not a reason to refuse to run
            return {p["point_id"]: ("no plan", str(e)) for p in sweep.points}
        return {p["point_id"]: (r["verdict"], r["reason"]) for p, r in zip(sweep.points, table.to_dict("records"))}

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
        self.stop_button.disabled = True
        self.status.value = "stopping after the running point..."

    def run(self) -> pd.DataFrame:
        """Run the sweep in this thread; returns the results (also kept in ``results``)."""
        if self._running:
            raise RuntimeError("a sweep is running already: Stop it or wait for it")
        self._prepare()
        if self.sweep is None:
            return self.results
        self._stop, self._running = False, True
        self.run_button.disabled, self.stop_button.disabled, self.export_button.disabled = True, False, True
        self.progress.value, self.progress.bar_style = 0, ""
        self._running_label = self.sweep.points[0]["label"] if self.sweep.points else None
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
            self.run_button.disabled, self.stop_button.disabled = False, True
            self.export_button.disabled = len(self.results) == 0
            self._render_points()
            self._render_figures()
        return self.results

    def _ok_count(self) -> int:
        return int((self.sweep.results["status"] == "ok").sum()) if len(self.sweep.results) else 0

    def _on_point(self, row: dict) -> None:
        self.results = self.sweep.results
        done = set(self.results["point_id"])
        nxt = next((p["label"] for p in self.sweep.points if p["point_id"] not in done), None)
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

    def _render_points(self) -> None:
        if self.sweep is None:
            return
        by_id = {r["point_id"]: r for r in self.results.to_dict("records")} if len(self.results) else {}
        running = self._running_label
        rows = []
        for p in self.sweep.points:
            r = by_id.get(p["point_id"], {})
            status = r.get("status") or ("running" if p["label"] == running else "pending")
            if r.get("error"):
                status = f"<span title='{_esc(r['error'])}' class='wb-error'>{_esc(status)}</span>"
            row = {"label": p["label"], "status": status, **{k: r.get(k) for k in
                                                             ("output_throughput", "ttft_p99_ms", "tpot_p50_ms",
                                                              "kv_usage_peak", "num_preemptions")}}
            if self.plans is not None:
                verdict, reason = self.plans[p["point_id"]]
                colour = "#2a7" if verdict == "fits" else "#b00"
                row["plan"] = f"<span style='color:{colour}' title='{_esc(reason)}'>{_esc(verdict)}</span>"
            rows.append(row)
        columns = {"label": ("point", None)}
        if self.plans is not None:
            columns["plan"] = ("planner", "html")
        columns.update({"status": ("status", "html"), "output_throughput": ("output tok/s", "{:.1f}"),
                        "ttft_p99_ms": ("TTFT p99 ms", "{:.0f}"), "tpot_p50_ms": ("TPOT p50 ms", "{:.1f}"),
                        "kv_usage_peak": ("KV peak", "{:.0%}"), "num_preemptions": ("preempt.", "{:.0f}")})
        self.points_table.value = _CSS + _table(rows, columns)

    def _render_figures(self) -> None:
        df = self.results
        best = metrics.best_settings(df, {"throughput": ("output_throughput", "max")})
        pid, label = (best["point_id"].iloc[0], best["label"].iloc[0]) if len(best) else (None, "no point yet")
        figs = {"throughput_latency": figures.throughput_latency(df), "throughput": figures.throughput_by_setting(df),
                "ttft": figures.latency_percentiles(df, "ttft"),
                "kv": figures.kv_usage_over_time(self.sweep.timeseries.get(pid), f"KV usage and batch size: {label}")}
        for name, fig in figs.items():
            fig.update_layout(width=500, height=360, margin=dict(l=60, r=20, t=50, b=50), title_font_size=14)
            _show(self.figures[name], fig)
