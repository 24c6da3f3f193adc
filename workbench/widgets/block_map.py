"""BlockMapExplorer: the physical KV blocks of a small engine run, step by step."""
from __future__ import annotations

import ipywidgets as widgets
import pandas as pd

from .. import figures
from .common import _CSS, _esc, _table
from .plotly_widget import figure_widget


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
        # A sliding-window model: every KV cache group's tables own blocks (the null id marks slots whose block
        # left the window); the hover text names the block's group.
        groups = snap.get("kv_cache_groups")
        if groups:
            holders = {}
            for rid, tables in snap["group_block_tables"].items():
                for table in tables:
                    for b in table:
                        if b < len(snap["blocks"]):
                            holders.setdefault(b, []).append(rid)
        rows = []
        for b, (ref, cached) in enumerate(snap["blocks"]):
            who = holders.get(b, [])
            state = ("shared" if ref > 1 else "owned") if ref else ("cached" if cached else "free")
            note = " (a cached prefix)" if cached else ""
            g = snap["block_groups"][b] if groups else -1
            if g >= 0:
                note += f" in KV cache group {g} ({'full' if groups[g] is None else f'window {groups[g]}'})"
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
        self.figure = figure_widget(figures.block_map(recording.blocks(0), columns, self.colors))
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


