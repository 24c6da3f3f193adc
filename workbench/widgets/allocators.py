"""AllocatorComparison: one trace through the paged allocator and the vLLM paper's contiguous ones."""
from __future__ import annotations

import ipywidgets as widgets

from .. import baselines, figures, group_figures
from .common import _CSS, _esc, _show, _table
from .plotly_widget import figure_widget


class AllocatorComparison(widgets.VBox):
    """One trace through the paged allocator and through contiguous ones that reserve max_model_len,
    the next power of two, or the exact final length (the vLLM paper's Orca Max / Pow2 / Oracle), in the
    same KV pool: where the memory goes, how many requests run at once, and the numbers.

    ``result`` is the `workbench.baselines.compare_allocators` result shown; changing the block size, the
    pool size or the averaging window replays the trace. group_windows: a sliding-window model's KV cache groups
    (EngineStats.kv_cache_groups): the paged allocator keeps per-group tables, and a third figure shows its blocks
    in use per group (``groups``; None without group_windows).
    """

    def __init__(self, trace, capacity_tokens: int, max_model_len: int, block_size: int = 16,
                 max_num_seqs: int = 256, steps: str = "loaded", group_windows=None):
        super().__init__()
        self.trace, self.max_model_len, self.max_num_seqs = trace, max_model_len, max_num_seqs
        self.group_windows = tuple(group_windows) if group_windows else None
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
        self.waste = figure_widget()
        self.batch = figure_widget()
        self.groups = figure_widget() if self.group_windows else None
        self.table = widgets.HTML()
        self.caption = widgets.HTML()
        for w in (self.block_size, self.capacity, self.steps):
            w.observe(lambda _: self.update(), "value")
        self.children = [widgets.HTML(_CSS), self.caption,
                         widgets.HBox([self.block_size, self.capacity, widgets.Label("average over"), self.steps],
                                      layout=widgets.Layout(flex_flow="row wrap", align_items="center")),
                         widgets.HBox([self.waste, self.batch]), *([self.groups] if self.groups else []), self.table]
        self.add_class("wb-allocator-comparison")
        self.update()

    def update(self) -> None:
        """Replay the trace with the current settings and redraw."""
        self.result = baselines.compare_allocators(self.trace, self.capacity.value, self.max_model_len,
                                                   self.block_size.value, self.max_num_seqs, steps=self.steps.value,
                                                   group_windows=self.group_windows)
        summary, timeline = self.result
        window = "while requests wait" if self.steps.value == "loaded" else "over the whole run"
        waste = figures.memory_waste(summary, f"Where the KV memory goes ({window})")
        waste.update_layout(width=500, height=430, margin=dict(l=60, r=10, t=60, b=80))
        batch = figures.allocator_batch_size(timeline)
        batch.update_layout(width=470, height=430, margin=dict(l=60, r=10, t=60, b=80),
                            legend=dict(orientation="h", x=0, y=-0.22, yanchor="top"))
        _show(self.waste, waste)
        _show(self.batch, batch)
        if self.groups is not None:
            paged = timeline[timeline["allocator"] == "paged"]
            groups = group_figures.group_blocks_over_time(
                paged, self.group_windows, None, "Paged allocator: KV blocks in use per cache group")
            groups.update_layout(width=970, height=380, margin=dict(l=60, r=10, t=60, b=50))
            _show(self.groups, groups)
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


