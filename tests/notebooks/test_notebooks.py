"""Every notebook runs top to bottom in a fresh kernel (nbclient) without errors, on the CPU, in time.

The parameters are overridden papermill-style: a cell tagged ``injected-parameters`` goes right after the
cell tagged ``parameters``; it points MODEL at the shipped model by absolute path and OUT_DIR at the
test's tmp dir, which is also the kernel's working directory, so a run writes nothing into the repository.
"""
import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SHIPPED_MODEL = ROOT / "data" / "models" / "pystdlib-llama-6m"
SHIPPED_DRAFT = ROOT / "data" / "models" / "pystdlib-llama-1m-draft"
TIME_LIMIT_S = 180  # the bound per notebook on the CPU (they take well under a minute on 2 cores)


def parameters_cell(nb) -> int:
    return next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))


def inject_parameters(nb, **params):
    """Papermill's way: a cell after the ``parameters`` cell assigns the names it defines (others are ignored)."""
    i = parameters_cell(nb)
    source = nb.cells[i].source
    lines = [f"{k} = {v!r}" for k, v in params.items() if f"{k} = " in source]
    cell = nbformat.v4.new_code_cell("\n".join(lines))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(i + 1, cell)
    return nb


def execute(path: Path, workdir: Path, monkeypatch, **params):
    nb = inject_parameters(nbformat.read(path, as_version=4), MODEL=str(SHIPPED_MODEL), OUT_DIR=str(workdir),
                           **params)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    # One torch thread: the model is tiny, and OpenMP threads spin-waiting on a busy 2-core CI machine make
    # CPU inference many times slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = nbclient.NotebookClient(nb, timeout=TIME_LIMIT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    start = time.perf_counter()
    client.execute()
    return nb, time.perf_counter() - start


def outputs(nb, output_type=None):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if output_type is None or o.output_type == output_type]


def text(nb) -> str:
    return "\n".join(o.get("text", "") for o in outputs(nb, "stream"))


def widget_views(nb) -> int:
    return sum("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs(nb, "execute_result"))


MAX_NOTEBOOK_BYTES = 3_000_000  # executed, with its widget state
BUNDLE_MARKERS = ("Lodash (Custom Build)",  # a licence line of plotly's widget bundle, stored as is
                  "DecompressionStream")  # the bundle as workbench.widgets.plotly_widget stores it

def assert_small_with_plotly_js_once(nb):
    """The executed notebook (widget state included, as JupyterLab saves it) stays small: plotly's widget code
    is stored once, not once per figure widget."""
    text = nbformat.writes(nb)
    assert len(text.encode()) < MAX_NOTEBOOK_BYTES, f"{len(text.encode()) / 1e6:.1f} MB"
    assert sum(text.count(m) for m in BUNDLE_MARKERS) <= 1


def test_every_notebook_has_a_parameters_cell_first_and_no_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_paged_attention_internals.ipynb", "02_sweep.ipynb",
                                           "03_tuning_session.ipynb", "04_where_the_time_goes.ipynb",
                                           "05_speculative_decoding.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
        assert parameters_cell(nb) == first_code, path.name
        assert "MODEL = " in nb.cells[first_code].source and "DEVICE = " in nb.cells[first_code].source
        assert outputs(nb) == [], f"{path.name} is committed with outputs: clear them"


def test_01_paged_attention_internals(tmp_path, monkeypatch):
    nb, seconds = execute(NOTEBOOKS[0], tmp_path, monkeypatch)
    assert outputs(nb, "error") == [] and seconds < TIME_LIMIT_S
    log = text(nb)
    assert "block table [0" in log and "preempted r3" in log and "prefix-cache hits" in log
    assert "vLLM (paged)" in log and widget_views(nb) >= 2  # the BlockMapExplorer and the AllocatorComparison
    assert "parallel sampling, n=4" in log and "beam search, width 4" in log  # the comparison's sharing cases
    assert "widget-state" in str(nb.metadata.get("widgets", {}))  # the state a saved notebook keeps
    assert_small_with_plotly_js_once(nb)


def test_02_sweep(tmp_path, monkeypatch):
    nb, seconds = execute(NOTEBOOKS[1], tmp_path, monkeypatch)
    assert outputs(nb, "error") == [] and seconds < TIME_LIMIT_S
    assert (tmp_path / "panel_report.html").stat().st_size > 100_000  # plotly.js inlined
    assert (tmp_path / "sweep_report.html").stat().st_size > 100_000
    assert "n=4" in text(nb) and "sharing_saving" in text(nb)  # the sampling sweep's table
    assert "Output throughput over no quantization" in str(outputs(nb, "display_data") + outputs(nb, "execute_result"))
    assert widget_views(nb) >= 1
    assert_small_with_plotly_js_once(nb)


def test_03_tuning_session(tmp_path, monkeypatch):
    nb, seconds = execute(NOTEBOOKS[2], tmp_path, monkeypatch)
    assert outputs(nb, "error") == [] and seconds < TIME_LIMIT_S
    assert "Chosen: seqs=" in text(nb) and "planner: fits" in text(nb)
    assert_small_with_plotly_js_once(nb)


def test_04_where_the_time_goes(tmp_path, monkeypatch):
    nb, seconds = execute(NOTEBOOKS[3], tmp_path, monkeypatch)
    assert outputs(nb, "error") == [] and seconds < TIME_LIMIT_S
    log = text(nb)
    assert "where the time goes:" in log and "kernel class" in log
    assert "batch underfill:" in log and "host time not hidden:" in log
    import json
    trace = json.loads((tmp_path / "where_the_time_goes.trace.json").read_text())
    assert {e.get("cat") for e in trace["traceEvents"]} >= {"step", "phase", "request", "gemm"}


def test_05_speculative_decoding(tmp_path, monkeypatch):
    nb, seconds = execute(NOTEBOOKS[4], tmp_path, monkeypatch, DRAFT=str(SHIPPED_DRAFT), REPEATS=1)
    assert outputs(nb, "error") == [] and seconds < TIME_LIMIT_S
    log = text(nb)
    assert "greedy output identical with speculation: True" in log and "best arm: " in log
    assert (tmp_path / "speculative_decoding_cpu.png").stat().st_size > 10_000
