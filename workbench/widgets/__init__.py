"""ipywidgets panels: SweepPanel (pick a grid, run it, watch the figures fill, export the report),
BlockMapExplorer (the physical KV blocks of a small engine run, step by step) and AllocatorComparison
(one trace through the paged allocator and the contiguous ones of the vLLM paper).

Panels compose `workbench.figures` and show numbers made elsewhere (`workbench.metrics` through `Sweep`,
`workbench.baselines`, `workbench.planner`, the engine's StepStats and `LLMEngine.block_map()`); they
compute none themselves. Each panel is an ipywidgets box: put it last in a cell, or `display()` it.
"""
from .allocators import AllocatorComparison
from .block_map import COUNTERS, BlockMapExplorer, BlockMapRecording, record_block_map
from .sweep_panel import DIMENSIONS, SweepPanel, parse_values

__all__ = ["SweepPanel", "BlockMapExplorer", "BlockMapRecording", "record_block_map", "AllocatorComparison",
           "COUNTERS", "DIMENSIONS", "parse_values"]
