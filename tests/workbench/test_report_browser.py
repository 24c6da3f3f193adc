"""The report in headless Chromium: no console errors, every figure drawn.

Needs Debian's chromium (/usr/bin/chromium) and the playwright package; skipped without them.
CI: apt-get install -y chromium && pip install playwright (no `playwright install`: the system
chromium is used through executable_path).
"""
import os
import shutil

import pytest

from workbench import schema
from workbench import figures
from workbench.report import report_figures, write_report

CHROMIUM = os.environ.get("WORKBENCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no chromium at {CHROMIUM}")


def test_report_opens_without_errors_and_draws_every_figure(tmp_path, synthetic_hostile):
    sync_api = pytest.importorskip("playwright.sync_api")
    df, requests, timeseries, telemetry = synthetic_hostile
    path = write_report(df, str(tmp_path / "report.html"), timeseries, requests, telemetry,
                        environment={"gpu": "none"}, title="<script>alert(1)</script>")
    figs = report_figures(df, timeseries, requests, telemetry)
    fig_ids = [k for k, f in figs.items() if not figures.is_empty(f)]  # an empty one is a sentence, not a plot
    empty_ids = [k for k in figs if k not in fig_ids]
    assert empty_ids == ["kv-groups-over-time"]  # the synthetic model has one KV cache group
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
        page.on("request", lambda r: r.url.startswith("http") and errors.append(f"network: {r.url}"))
        page.goto(f"file://{path}")
        page.wait_for_load_state("load")
        for fig_id in fig_ids:
            page.wait_for_selector(f"#fig-{fig_id} .main-svg", timeout=10_000)
        for fig_id in empty_ids:
            assert page.locator(f"p.empty#empty-{fig_id}").count() == 1
        drawn = page.evaluate("() => Array.from(document.querySelectorAll('.plotly-graph-div'))"
                              ".filter(d => d._fullLayout && d.querySelector('.main-svg')).length")
        browser.close()
    assert drawn == len(fig_ids)
    assert errors == []


def test_report_axes_have_units_no_empty_figure_and_a_screenshot(tmp_path, synthetic):
    """Every drawn figure has data; every axis title names a unit or a count (categorical axes say what the
    categories are); the report is screenshotted into the test's tmp folder (a CI artifact)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    df, requests, timeseries, telemetry = synthetic
    df = df.assign(prefix_cache_hit_rate=0.0)  # a figure with no data: replaced by a sentence
    path = write_report(df, str(tmp_path / "report.html"), timeseries, requests, telemetry)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"file://{path}")
        page.wait_for_load_state("load")
        page.wait_for_selector(".plotly-graph-div .main-svg")
        figs = page.evaluate("""() => Array.from(document.querySelectorAll('.plotly-graph-div')).map(d => ({
            id: d.id, traces: d.data.length,
            points: (d.calcdata || []).reduce((n, cd) => n + cd.filter(p => p.y !== undefined && !isNaN(p.y)).length, 0),
            axes: Object.keys(d._fullLayout).filter(k => /^[xy]axis\\d*$/.test(k) && d._fullLayout[k].visible)
                  .map(k => ({type: d._fullLayout[k].type, title: (d._fullLayout[k].title || {}).text || ''}))}))""")
        empty_notes = page.locator("p.empty").count()
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        wide = page.evaluate("() => document.documentElement.scrollWidth <= document.documentElement.clientWidth")
        browser.close()
    print(f"screenshot: {shot}")
    assert figs and all(f["traces"] > 0 and f["points"] > 0 for f in figs), [(f["id"], f["traces"], f["points"]) for f in figs]
    assert empty_notes >= 1 and "fig-prefix-hit-rate" not in {f["id"] for f in figs}
    for f in figs:
        for axis in f["axes"]:
            t = axis["title"]
            if axis["type"] == "category":
                assert t, f"{f['id']}: a categorical axis without a title"
            else:
                units = {c.unit for c in schema.COLUMNS if c.unit}  # a small panel's axis: the unit alone
                assert "(" in t or "count" in t or t in units, f"{f['id']}: {t!r}"
    assert shot.stat().st_size > 10_000 and wide
