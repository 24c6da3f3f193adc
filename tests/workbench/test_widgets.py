"""Widget state changes, driven from Python as a notebook front end would (button clicks, slider moves)."""
import pytest

pytest.importorskip("ipywidgets")

from engine import LLM, EngineConfig  # noqa: E402
from workbench import figures  # noqa: E402
from workbench.baselines import compare_allocators  # noqa: E402
from workbench.widgets import (AllocatorComparison, BlockMapExplorer, SweepPanel, parse_values,  # noqa: E402
                               record_block_map)
from workbench.workloads import sharegpt_like  # noqa: E402

CPU = EngineConfig(device="cpu", max_model_len=128, num_gpu_blocks=64)
SMALL = {"shared-prefix": dict(num_prefixes=2, prefix_len=16, suffix_len=4, output_len=4),
         "fixed": dict(prompt_len=8, output_len=4)}


def panel(**kwargs):
    args = dict(model="tiny", workload="shared-prefix", grid={"block_size": [8, 16]}, base_config=CPU,
                num_requests=4, workloads=SMALL, background=False, sweep_args={"warmup": False})
    return SweepPanel(**{**args, **kwargs})


def test_parse_values():
    assert parse_values("8, 16,32") == [8, 16, 32]
    assert parse_values("True, off, None, int8, 0.9, 'fp8'") == [True, False, None, "int8", 0.9, "fp8"]
    assert parse_values(" , ") == []


def test_sweep_panel_shows_the_plan_before_running():
    p = panel()
    assert p.grid() == {"block_size": [8, 16]} and not p.run_button.disabled
    assert p.progress.max == 2 and p.progress.value == 0
    table = p.points_table.value
    assert "bs=8" in table and "bs=16" in table and table.count(">pending<") == 2
    assert p.plans is not None and table.count(">fits<") == 2  # the memory planner's verdict per point
    p.dims["max_num_seqs"].value = "1, 2"
    assert p.progress.max == 4 and "seqs=2" in p.points_table.value


def test_run_button_on_a_2_point_grid_fills_results_figures_and_export(tmp_path):
    p = panel()
    seen = []
    run_point = p._on_point
    p._on_point = lambda row: (seen.append(len(p.figures["throughput"].data[0].x)
                                           if p.figures["throughput"].data else 0), run_point(row))
    p.run_button.click()
    assert len(p.results) == 2 and (p.results["status"] == "ok").all()
    assert list(p.results["block_size"]) == [8, 16]
    assert p.progress.value == 2 and p.progress.bar_style == "success" and "2 of 2 points ok" in p.status.value
    assert seen == [0, 1]  # the figures were redrawn after the first point, before the second finished
    bars = p.figures["throughput"].data[0]
    assert list(bars.x) == ["bs=8", "bs=16"] and list(bars.y) == pytest.approx(list(p.results["output_throughput"]))
    assert p.points_table.value.count(">ok<") == 2 and not p.export_button.disabled
    assert p.llm is not None and p.sweep.llm is p.llm  # weights kept for the next run
    p.report_path.value = str(tmp_path / "report.html")
    p.export_button.click()
    assert (tmp_path / "report.html").stat().st_size > 100_000 and "report.html" in p.status.value
    assert (p.results["repeats"] == 1).all()  # the panel's quick mode
    for column in ("hit rate", "frag.", "out tok/s"):
        assert f"<th>{column}</th>" in p.points_table.value
    p.dims["block_size"].value = "32"  # a new grid: the old figures no longer describe it
    assert all(len(fw.data) == 0 for fw in p.figures.values())
    p.run_button.click()  # a second run reuses the loaded model
    assert list(p.results["block_size"]) == [32] and p.sweep.llm is p.llm


def test_stop_ends_the_sweep_after_the_running_point():
    p = panel()
    run_point = p._on_point
    p._on_point = lambda row: (p.stop_button.click(), run_point(row))
    p.run_button.click()
    assert len(p.results) == 1 and "stopped after 1 of 2 points" in p.status.value
    assert not p.run_button.disabled and p.stop_button.disabled
    assert p.stop_button.button_style == ""  # grey when disabled, not a red button that looks pressable


def test_stop_is_red_only_while_a_sweep_runs():
    p = panel()
    assert p.stop_button.disabled and p.stop_button.button_style == ""
    styles = []
    run_point = p._on_point
    p._on_point = lambda row: (styles.append((p.stop_button.disabled, p.stop_button.button_style)), run_point(row))
    p.run_button.click()
    assert styles[0] == (False, "danger") and p.stop_button.button_style == ""


def test_a_bad_value_disables_run_and_says_why():
    p = panel()
    p.dims["block_size"].value = "8, 7"
    assert p.run_button.disabled and "block_size=7 is not allowed" in p.status.value
    p.dims["block_size"].value = "8"
    assert not p.run_button.disabled


def test_the_panel_sweeps_n_and_beam_width():
    p = panel()
    p.dims["n"].value = "1, 4"
    assert p.grid() == {"block_size": [8, 16], "n": [1, 4]} and p.progress.max == 4
    assert "n=4" in p.points_table.value and not p.run_button.disabled
    p.dims["beam_width"].value = "None, 2"
    assert p.run_button.disabled and "n=4 with beam_width=2" in p.status.value  # a point is one or the other
    p.dims["n"].value = ""
    p.dims["block_size"].value = "8"
    p.run_button.click()
    assert list(p.results["beam_width"].fillna(0)) == [0, 2] and (p.results["status"] == "ok").all()
    assert (p.results["num_unshared_blocks_peak"] >= p.results["num_used_blocks_peak"]).all()


def test_the_plan_says_what_sharing_means_for_n_and_beam_points():
    from workbench.widgets.sweep_panel import sharing_note

    p = panel(grid={"max_num_seqs": [8], "n": [1, 4]})
    plans = [p.plans[q.point_id] for q in p.sweep.points]
    assert [pl[2] for pl in plans][0] is None  # n=1: one sequence per request, nothing to say
    tag, why = plans[1][2]
    assert tag == "4 seqs/request, \u22642 requests"  # 8 sequences at once / 4 per request, by hand
    assert "max_num_seqs=8 counts sequences" in why and "prompt's KV blocks" in why
    table = p.points_table.value
    assert ">fits<" in table and ">fits; 4 seqs/request, \u22642 requests<" in table
    assert "at most 2 such requests run at once" in table  # the tooltip
    p.dims["n"].value = ""
    p.dims["beam_width"].value = "3"
    assert "3 seqs/request, \u22642 requests" in p.points_table.value and "beams" in p.points_table.value
    # n above max_num_seqs: refused as the grid refuses it (the panel, and the note for a single point)
    p.dims["beam_width"].value = ""
    p.dims["n"].value = "16"
    assert p.run_button.disabled and "n=16 is more than max_num_seqs=8" in p.status.value
    verdict, why = sharing_note({"n": 16}, CPU.replace(max_num_seqs=8))
    assert verdict == "not allowed" and "n=16 is more than max_num_seqs=8" in why
    assert sharing_note({"beam_width": 2}, CPU.replace(max_num_seqs=None))[0] == "2 seqs/request"


@pytest.fixture(scope="module")
def recording():
    """Three requests on the tiny model in 12 blocks of 4: two share an 8-token prefix, and the pool runs out."""
    llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=48, block_size=4, num_gpu_blocks=12))
    shared = list(range(10, 18))
    return record_block_map(llm, [("a", shared + [1, 2], 12), ("b", shared + [3], 12),
                                  ("c", list(range(40, 46)), 20, 2), ("d", shared + [4], 4, 30)])


def test_recording_sees_sharing_preemption_and_cached_blocks(recording):
    events = recording.events
    assert events[0]["arrived"] == ["a", "b"] and events[1]["admitted"] == ["a", "b"]
    frame = recording.blocks(1)
    shared = frame[frame["state"] == "shared"]
    assert list(shared["block_id"]) == [0, 1] and (shared["ref_count"] == 2).all()
    assert shared["owners"].str.contains("a, b").all()
    assert any(e["preempted"] for e in events)  # 12 blocks cannot hold a, b and c to the end
    finished = next(i for i, e in enumerate(events) if e["finished"])
    assert (recording.blocks(finished)["state"] == "cached").any()
    d = next(i for i, e in enumerate(events) if "d" in e["admitted"])
    assert recording.counters[d]["prefix_cache_hits"] == 8  # d takes the cached prefix back
    assert recording.counters[0] is None and all(c is not None for c in recording.counters[1:])


def test_block_map_explorer_slider_moves_to_the_step(recording):
    ex = BlockMapExplorer(recording, columns=6)
    assert ex.step == 0 and ex.slider.max == len(recording) - 1 and ex.play.max == ex.slider.max
    assert ex.figure.layout.title.text == "KV blocks before the first step"
    for step in (3, 1, len(recording) - 1):
        ex.slider.value = step
        assert ex.step == step and ex.figure.layout.title.text == f"KV blocks after step {step}"
        expected = figures.block_map(recording.blocks(step), 6, ex.colors)
        assert [tuple(t.x) for t in ex.figure.data] == [tuple(t.x) for t in expected.data]
        assert [tuple(t.text) for t in ex.figure.data] == [tuple(t.text) for t in expected.data]
        snap = recording.snapshots[step]
        for rid, table in snap["block_tables"].items():
            assert f">{rid}</span>" in ex.tables.value
            assert all(f">{b}</span>" in ex.tables.value for b in table)
        assert f"<b>{recording.counters[step]['num_used_blocks']}</b>" in ex.counters.value
    ex.show(2)
    assert ex.slider.value == 2 and ex.step == 2
    # One trace per request and per block state, in the same order at every step.
    assert [t.name for t in ex.figure.data][:4] == ["a", "b", "c", "d"]


def test_allocator_comparison_shows_the_baselines_and_replays_on_change():
    trace = sharegpt_like(num_requests=30, vocab_size=64, seed=1, mean_prompt_len=60, mean_output_len=100, max_len=256)
    ac = AllocatorComparison(trace, capacity_tokens=2048, max_model_len=512, block_size=16)
    expected = compare_allocators(trace, 2048, 512, 16).summary
    assert ac.result.summary.equals(expected)
    assert [t.name for t in ac.waste.data] == ["token states", "reservation", "internal fragmentation",
                                               "external fragmentation", "free"]
    assert list(ac.waste.data[0].y) == pytest.approx(list(expected["tokens_share"]))
    assert all(label in ac.table.value for label in expected["label"])
    assert len(ac.batch.data) == 4
    ac.block_size.value = 64
    assert ac.result.summary.equals(compare_allocators(trace, 2048, 512, 64).summary)
    ac.steps.value = "all"
    assert (ac.result.summary["steps"] == "all").all() and "whole run" in ac.waste.layout.title.text


def test_allocator_comparison_of_a_sliding_window_model_shows_the_paged_blocks_per_group():
    trace = sharegpt_like(num_requests=12, vocab_size=64, seed=1, mean_prompt_len=60, mean_output_len=100, max_len=256)
    ac = AllocatorComparison(trace, capacity_tokens=2048, max_model_len=512, block_size=16, group_windows=(None, 16))
    assert AllocatorComparison(trace, 2048, 512, 16).groups is None  # one group: no third figure
    timeline = compare_allocators(trace, 2048, 512, 16, group_windows=(None, 16)).timeline
    paged = timeline[timeline["allocator"] == "paged"]
    assert [t.name for t in ac.groups.data] == ["group 0 (full attention)", "group 1 (window 16)"]
    assert list(ac.groups.data[0].y) == paged["group0_blocks"].tolist()
    assert list(ac.groups.data[1].y) == paged["group1_blocks"].tolist()
    assert max(ac.groups.data[1].y) < max(ac.groups.data[0].y)  # the window's blocks only
    ac.block_size.value = 32
    paged = compare_allocators(trace, 2048, 512, 32, group_windows=(None, 16)).timeline.query("allocator == 'paged'")
    assert list(ac.groups.data[0].y) == paged["group0_blocks"].tolist()


def test_recording_of_a_sliding_window_model_names_every_blocks_group():
    """Tiny Gemma 3 (window 8: 3 sliding layers, 1 global), blocks of 4: every block in use has its owner and its
    KV cache group in the hover text, and the sliding groups hold fewer blocks than the full one."""
    import transformers
    cfg = transformers.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                        num_key_value_heads=1, head_dim=16, vocab_size=128, sliding_window=8,
                                        layer_types=["sliding_attention"] * 3 + ["full_attention"])
    llm = LLM.random(cfg, EngineConfig(device="cpu", max_model_len=64, block_size=4, num_gpu_blocks=64))
    rec = record_block_map(llm, [("a", list(range(10, 40)), 6)])
    snap, frame = rec.snapshots[2], rec.blocks(2)
    used = frame[frame["state"] == "owned"]
    assert len(used) == sum(rec.counters[2]["group_used_blocks"]) and (used["owner"] == "a").all()
    assert used["owners"].str.contains("KV cache group 0 \\(full\\)").sum() == rec.counters[2]["group_used_blocks"][0]
    assert used["owners"].str.contains("window 8").sum() == sum(rec.counters[2]["group_used_blocks"][1:])
    assert rec.counters[2]["group_used_blocks"][0] == 8 and rec.counters[2]["group_used_blocks"][1] == 3
    assert snap["kv_cache_groups"] == [None, 8, 8, 8]


def test_a_quantization_grid_adds_the_speedup_curve_to_the_panel():
    p = panel(workload="fixed", grid={"quantization": [None, "int8"], "max_num_seqs": [1, 2]})

    def shown():  # (identity: FigureWidgets compare equal by content)
        return any(w is p.figures["quantization"] for w in p.figure_grid.children)

    assert not shown()
    p.run_button.click()
    assert (p.results["status"] == "ok").all() and shown()
    lines = {t.name: list(t.y) for t in p.figures["quantization"].data}
    ok = p.results.set_index(["quantization", "max_num_seqs"])["output_throughput"]
    base = p.results[p.results.quantization.isna()].set_index("max_num_seqs")["output_throughput"]
    assert lines["quant=int8"] == pytest.approx([ok[("int8", s)] / base[s] for s in (1, 2)])
    p.dims["quantization"].value = "int8"  # a grid without the mode comparison: back to the four figures
    assert not shown()
