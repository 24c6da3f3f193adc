"""The report in headless Chromium: no console errors, every figure drawn.

Needs Debian's chromium (/usr/bin/chromium) and the playwright package; skipped without them.
CI: apt-get install -y chromium && pip install playwright (no `playwright install`: the system
chromium is used through executable_path).
"""
import os
import shutil

import pytest

from workbench.report import report_figures, write_report

CHROMIUM = os.environ.get("WORKBENCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no chromium at {CHROMIUM}")


def test_report_opens_without_errors_and_draws_every_figure(tmp_path, synthetic_hostile):
    sync_api = pytest.importorskip("playwright.sync_api")
    df, requests, timeseries, telemetry = synthetic_hostile
    path = write_report(df, str(tmp_path / "report.html"), timeseries, requests, telemetry,
                        environment={"gpu": "none"}, title="<script>alert(1)</script>")
    fig_ids = list(report_figures(df, timeseries, requests, telemetry))
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
        drawn = page.evaluate("() => Array.from(document.querySelectorAll('.plotly-graph-div'))"
                              ".filter(d => d._fullLayout && d.querySelector('.main-svg')).length")
        browser.close()
    assert drawn == len(fig_ids)
    assert errors == []
