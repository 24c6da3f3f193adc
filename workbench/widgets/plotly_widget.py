"""Plotly FigureWidgets that carry plotly's JavaScript once per kernel, compressed, not once per widget.

plotly's FigureWidget is an anywidget: its ``_esm`` trait holds the whole widget bundle (5 MB, plotly.js
included), and a notebook saved with its widget state stores that string once per figure widget (a
15 MB notebook with three panels). Here the first figure widget of the kernel carries the bundle
gzip-compressed (2 MB as base64), unpacks it in the browser (DecompressionStream), imports it and
publishes the module on ``globalThis``; every later one carries a few lines that wait for that module.
The widgets stay live (the same FigureWidget class and front-end code); a saved notebook holds the
bundle once.

Invariant: the first widget made in this process is a `_BundleFigureWidget`; all others are
`_SharedFigureWidget`. A front end that shows a shared widget gets the bundle from the first one
(restored from the same notebook's widget state, or created earlier in the same kernel).
"""
from __future__ import annotations

import base64
import gzip
import pathlib
import threading

import plotly.graph_objects as go

GLOBAL = "__workbenchPlotlyWidget"
WAIT_MS = 120_000


def _bundle_esm() -> str:
    """An ES module that unpacks plotly's widget bundle, imports it, and publishes it on globalThis."""
    import plotly

    raw = (pathlib.Path(plotly.__file__).parent / "package_data" / "widgetbundle.js").read_bytes()
    packed = base64.b64encode(gzip.compress(raw, 9, mtime=0)).decode()
    return f"""
const packed = "{packed}";
const bytes = Uint8Array.from(atob(packed), (c) => c.charCodeAt(0));
const code = await new Response(new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"))).text();
const url = URL.createObjectURL(new Blob([code], {{ type: "text/javascript" }}));
const mod = await import(url);
globalThis.{GLOBAL} = globalThis.{GLOBAL} || mod.default;
export default mod.default;
"""


SHARED_ESM = f"""
const bundle = await new Promise((resolve, reject) => {{
  const started = Date.now();
  (function poll() {{
    if (globalThis.{GLOBAL}) return resolve(globalThis.{GLOBAL});
    if (Date.now() - started > {WAIT_MS}) return reject(new Error(
      "plotly's widget code was not loaded: it comes with the kernel's first figure widget; re-run the notebook"));
    setTimeout(poll, 50);
  }})();
}});
export default bundle;
"""

try:
    BUNDLE_ESM = _bundle_esm()
except OSError:  # no bundle file: plain FigureWidgets (each with its own copy)
    BUNDLE_ESM = None


class _BundleFigureWidget(go.FigureWidget):
    _esm = BUNDLE_ESM if BUNDLE_ESM is not None else go.FigureWidget._esm


class _SharedFigureWidget(go.FigureWidget):
    _esm = SHARED_ESM if BUNDLE_ESM is not None else go.FigureWidget._esm


_lock = threading.Lock()
# The widget that carries the bundle, kept referenced for the life of the kernel: were it garbage-collected,
# its comm would close and a notebook saved afterwards would hold only widgets waiting for the bundle.
_bundle_widget: go.FigureWidget | None = None


def figure_widget(fig=None) -> go.FigureWidget:
    """A plotly FigureWidget of ``fig`` (None: empty); only the kernel's first one carries plotly's code."""
    global _bundle_widget
    with _lock:
        if _bundle_widget is None:
            _bundle_widget = _BundleFigureWidget(fig)
            return _bundle_widget
    return _SharedFigureWidget(fig)
