"""Re-make the README's screenshots (docs/img/*.png) when the report or the widgets change.

    python scripts/make_screenshots.py [--out-dir docs/img]

1. Runs the demo (`workbench.demo.run_demo`) and opens its report.html in headless
   Chromium: report_recommendation.png (the recommendation section), report_<figure>.png (two figures).
2. Writes a two-cell notebook (a SweepPanel that has run a small grid, and the BlockMapExplorer of
   notebook 01), runs it in JupyterLab with the browser test's code (tests/notebooks/test_browser.py:
   start the server, start the kernel, Run All), and screenshots the two widgets, live:
   sweep_panel.png, block_map_explorer.png.
3. Every PNG is quantised to 256 colours and, if still too big, scaled down until it is under
   --max-kb (300 KB by default).

Exits non-zero, naming the screenshot, when one cannot be made (no Chromium, a selector that never
appears, a blank image, a file that stays too big). Needs the dev extra (playwright, jupyterlab, pillow)
and Debian's chromium (no `playwright install`).
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The report's figures shown in the README, by the report's figure id, first choice first.
REPORT_FIGURES = [("throughput", "throughput-by-setting"), ("prefix-hit-rate", "fragmentation")]
RECOMMENDATION_HEADINGS = ("Recommendation", "Best setting")  # the report's section, new and old name
EXPLORER_STEP = 27  # as in the browser test: a step where the pool is full and r3 is preempted

NOTEBOOK_CELLS = [
    """\
import os
import torch
torch.set_num_threads(1)
from engine import LLM, EngineConfig
from workbench.widgets import BlockMapExplorer, SweepPanel

MODEL = {model!r}
base = EngineConfig(device="cpu", max_model_len=256, num_gpu_blocks=256)  # as notebook 02: a small pool
panel = SweepPanel(MODEL, "shared-prefix", grid={{"block_size": [8, 32], "enable_prefix_caching": [True, False]}},
                   base_config=base, num_requests=16, gpu="cpu", background=False,
                   workloads={{"shared-prefix": dict(num_prefixes=2, prefix_len=96, suffix_len=16, output_len=16)}})
panel.run()
panel""",
    """\
cfg = EngineConfig(block_size=8, num_gpu_blocks=20, max_model_len=128, max_num_batched_tokens=256, device="cpu")
llm = LLM.from_pretrained(MODEL, cfg)
encode = llm.tokenizer.encode
header = "import os\\nimport sys\\nimport json\\nfrom pathlib import Path\\n\\n\\n"
REQUESTS = [("r0", encode(header + "def load(path):\\n"), 40, 0), ("r1", encode(header + "class Config:\\n"), 40, 0),
            ("r2", encode("for i in range(10):\\n"), 30, 2), ("r3", encode("def fib(n):\\n    "), 60, 4),
            ("r4", encode(header + "def main():\\n"), 20, 50)]
explorer = BlockMapExplorer.record(llm, REQUESTS, columns=10)
explorer""",
]


class ScreenshotError(RuntimeError):
    """A screenshot could not be made; the message names it."""


def _browser_test_helpers():
    """tests/notebooks/test_browser.py as a module: its JupyterLab start-up and Run-All code is reused."""
    path = ROOT / "tests" / "notebooks" / "test_browser.py"
    spec = importlib.util.spec_from_file_location("workbench_test_browser", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shrink(png: bytes, path: Path, max_kb: int) -> int:
    """Write ``png`` to ``path`` as a 256-colour optimised PNG, scaled down by steps of 0.8 until it is
    under ``max_kb`` KB (never below 400 px wide); returns the size in bytes."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    while True:
        buf = io.BytesIO()
        img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            buf, format="PNG", optimize=True)
        if buf.tell() <= max_kb * 1024:
            path.write_bytes(buf.getvalue())
            return buf.tell()
        if img.width * 0.8 < 400:
            raise ScreenshotError(f"{path.name}: {buf.tell() // 1024} KB at {img.width} px wide, over {max_kb} KB")
        img = img.resize((int(img.width * 0.8), int(img.height * 0.8)), Image.Resampling.LANCZOS)


def not_blank(png: bytes) -> bool:
    """More than a handful of colours and no single colour over 97% of the image."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB").resize((200, 200))
    colours = img.getcolors(maxcolors=200 * 200) or []
    return len(colours) > 30 and max(c for c, _ in colours) < 0.97 * 200 * 200


def _save(shots: dict, name: str, png: bytes) -> None:
    if not not_blank(png):
        raise ScreenshotError(f"{name}: the screenshot is blank")
    shots[name] = png


def report_shots(page, report: Path, shots: dict) -> None:
    """The recommendation section and two figures of the report."""
    page.set_viewport_size({"width": 1200, "height": 900})
    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    page.wait_for_selector(".plotly-graph-div .main-svg", timeout=30_000)
    # The section: its heading down to the next heading (the report has no wrapper element around it).
    box = page.evaluate("""(names) => {
        const hs = [...document.querySelectorAll('h2')];
        const i = hs.findIndex(h => names.some(n => h.textContent.startsWith(n)));
        if (i < 0) return null;
        const top = hs[i].getBoundingClientRect().top + window.scrollY - 8;
        let bottom = top + 400, right = 0;
        for (let el = hs[i]; el && (el === hs[i] || el.tagName !== 'H2'); el = el.nextElementSibling) {
            const r = el.getBoundingClientRect();
            bottom = r.bottom + window.scrollY + 8; right = Math.max(right, r.right + 8);
        }
        const left = Math.max(0, hs[i].getBoundingClientRect().left - 8);
        return {x: left, y: top, width: Math.min(right, document.body.scrollWidth) - left, height: bottom - top};
    }""", list(RECOMMENDATION_HEADINGS))
    if not box:
        raise ScreenshotError(f"report_recommendation.png: no section headed {' or '.join(RECOMMENDATION_HEADINGS)}")
    _save(shots, "report_recommendation.png", page.screenshot(clip=box, full_page=True))
    for choices in REPORT_FIGURES:
        fig_id = next((f for f in choices if page.locator(f"#fig-{f} .main-svg").count()), None)
        if fig_id is None:
            raise ScreenshotError(f"report figure: none of {choices} drawn in {report}")
        # The report's wrapper of the figure (with its caption, where the report writes one), else plotly's.
        wrapper = page.locator(f"div.figure:has(#fig-{fig_id})")
        el = wrapper.first if wrapper.count() else page.locator(f"#fig-{fig_id}").locator("xpath=..")
        el.scroll_into_view_if_needed()
        _save(shots, f"report_{fig_id.replace('-', '_')}.png", el.screenshot())


def widget_shots(sync_api, browser, tmp: Path, model: str, shots: dict) -> None:
    """The SweepPanel and the BlockMapExplorer, live in JupyterLab."""
    import nbformat

    helpers = _browser_test_helpers()
    work = tmp / "lab"
    work.mkdir()
    nb = nbformat.v4.new_notebook()
    if not Path(model).is_dir():
        raise ScreenshotError(f"the widgets need the shipped model with its tokenizer; got {model!r}")
    # The model as the notebooks name it (../data/models/...), not by this machine's absolute path.
    (tmp / "data" / "models").mkdir(parents=True)
    (tmp / "data" / "models" / Path(model).name).symlink_to(Path(model).resolve(), target_is_directory=True)
    model = f"../data/models/{Path(model).name}"
    nb.cells = [nbformat.v4.new_code_cell(src.format(model=model)) for src in NOTEBOOK_CELLS]
    nbformat.write(nb, work / "screenshots.ipynb")
    for name, value in helpers.LAB_SETTINGS.items():
        path = tmp / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    port, token = helpers._free_port(), "workbench-screenshots"
    lab = helpers._start_lab(tmp, work, port, token)
    try:
        helpers._start_kernel(port, token, "screenshots.ipynb")
        # Tall and wide enough that each widget is whole on screen inside JupyterLab's scrolling notebook
        # (an element screenshot is cropped to the viewport) with the file browser open beside it.
        page = browser.new_page(viewport={"width": 1700, "height": 2400})
        helpers._open_and_run_all(page, port, token, "screenshots.ipynb")
        errors = page.locator("[data-mime-type='application/vnd.jupyter.error']")
        if errors.count():
            raise ScreenshotError(f"the screenshot notebook failed: {errors.first.inner_text()[:1000]}")
        page.wait_for_selector(".wb-sweep-panel .js-plotly-plot .main-svg", timeout=60_000)
        page.wait_for_selector(".wb-block-map-explorer .js-plotly-plot .main-svg", timeout=60_000)
        page.locator(".wb-block-map-explorer .slider-container .noUi-handle").first.click()
        for _ in range(EXPLORER_STEP):
            page.keyboard.press("ArrowRight")
        page.wait_for_selector(f".wb-block-map-explorer .gtitle:text-is('KV blocks after step {EXPLORER_STEP}')",
                               timeout=30_000)
        time.sleep(1)  # let plotly finish its transition
        for name, selector in (("sweep_panel.png", ".wb-sweep-panel"), ("block_map_explorer.png",
                                                                        ".wb-block-map-explorer")):
            el = page.locator(selector).first
            el.scroll_into_view_if_needed()
            _save(shots, name, el.screenshot())
        page.close()
    except sync_api.Error as e:
        raise ScreenshotError(f"JupyterLab widgets: {e}") from e
    finally:
        lab.terminate()
        lab.wait(timeout=30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default=str(ROOT / "docs" / "img"), help="where the PNGs go (default: docs/img)")
    ap.add_argument("--max-kb", type=int, default=300, help="largest PNG, in KB (default: %(default)s)")
    ap.add_argument("--num-requests", type=int, default=32, help="requests of the demo sweep (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per point of the demo sweep (default: %(default)s)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        from playwright import sync_api
    except ImportError:
        print("error: playwright is missing: pip install -e \".[dev]\"", file=sys.stderr)
        return 1
    from workbench import demo

    chromium = os.environ.get("WORKBENCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium):
        print(f"error: no chromium at {chromium}: apt-get install -y chromium (or set WORKBENCH_CHROMIUM)",
              file=sys.stderr)
        return 1
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shots: dict[str, bytes] = {}
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="wb-screenshots-") as tmp:
            tmp = Path(tmp)
            res = demo.run_demo(str(tmp / "report"), num_requests=args.num_requests, repeats=args.repeats,
                                progress=False)
            if not res.ok:
                raise ScreenshotError(f"the demo sweep failed: {res.results[['label', 'status', 'error']]}")
            with sync_api.sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium,
                                            args=["--headless", "--no-sandbox", "--disable-gpu"])
                try:
                    report_shots(browser.new_page(device_scale_factor=1), Path(res.report_path), shots)
                    widget_shots(sync_api, browser, tmp, demo.demo_model(), shots)
                finally:
                    browser.close()
        for name, png in shots.items():
            size = shrink(png, out / name, args.max_kb)
            print(f"{out / name}: {size // 1024} KB")
    except (ScreenshotError, sync_api.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(shots)} screenshots in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
