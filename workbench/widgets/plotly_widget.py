"""Plotly FigureWidgets that carry plotly's JavaScript once per kernel, compressed, not once per widget.

plotly's FigureWidget is an anywidget: its ``_esm`` trait holds the whole widget bundle (5 MB, plotly.js
included), and a notebook saved with its widget state stores that string once per figure widget (a
15 MB notebook with three panels). Here the first figure widget of the kernel carries the bundle
gzip-compressed (2 MB as base64), unpacks it in the browser (DecompressionStream), imports it and
publishes the module on ``globalThis``; every later one carries a few lines that wait for that module.
The widgets stay live (the same FigureWidget class and front-end code); a saved notebook holds the
bundle once. Neither kind waits for that module before it initializes (see LOADER): anywidget would drop
every message to a figure whose module took more than 2 s.

Invariant: the first widget made in this process is a `_BundleFigureWidget`; all others are
`_SharedFigureWidget`. A front end that shows a shared widget gets the bundle from the first one
(restored from the same notebook's widget state, or created earlier in the same kernel).
"""
from __future__ import annotations

import base64
import gzip
import json
import pathlib
import threading

import plotly.graph_objects as go

GLOBAL = "__workbenchPlotlyWidget"
WAIT_MS = 120_000


# The messages Python sends a figure (plotly's `_py2js_*` traits: set, then reset to null).
PY2JS = ["addTraces", "deleteTraces", "moveTraces", "restyle", "relayout", "update", "animate", "removeLayoutProps",
         "removeTraceProps"]

# The widget both kinds export, given CODE (a promise of plotly's widget factory). anywidget gives a model 2 s
# from its creation to load its module and initialize, and drops every later message to it when that runs out;
# plotly's code (5 MB to unpack and compile, or a wait for the widget that carries it) can take longer on a busy
# machine. So nothing waits for it: the module loads and initializes at once, messages that come before plotly's
# code wait in a queue and are replayed to plotly's model once it exists, and views render once that is done.
LOADER = """
export default () => {
  let plotly = null;  // plotly's widget ({initialize, render}), once its code is here
  let ready = null;
  return {
    initialize({ model, ...context }) {
      const queue = [];
      const early = %s.map((name) => ["change:_py2js_" + name, () => {
        const value = model.get("_py2js_" + name);
        if (value !== null) queue.push(["_py2js_" + name, value]);
      }]);
      early.forEach(([event, f]) => model.on(event, f));
      ready = CODE.then((factory) => {
        // one synchronous block: no message can come between plotly's initialize and the replay
        early.forEach(([event, f]) => model.off(event, f));
        const listeners = {};
        let replaying = null;  // [name, value]: what plotly's model reads of that trait during the replay
        const proxy = { ...model,
          get: (name) => (replaying !== null && replaying[0] === name ? replaying[1] : model.get(name)),
          on: (event, f) => { (listeners[event] = listeners[event] || []).push(f); model.on(event, f); } };
        plotly = factory();
        plotly.initialize({ model: proxy, ...context });
        for (const message of queue) {
          replaying = message;
          (listeners["change:" + message[0]] || []).forEach((f) => f());
        }
        replaying = null;
      });
    },
    async render(context) {
      await ready;
      return plotly.render(context);
    },
  };
};
""" % json.dumps(PY2JS)


def _bundle_esm() -> str:
    """An ES module that unpacks plotly's widget bundle, imports it, publishes it on globalThis, and wraps it."""
    import plotly

    raw = (pathlib.Path(plotly.__file__).parent / "package_data" / "widgetbundle.js").read_bytes()
    packed = base64.b64encode(gzip.compress(raw, 9, mtime=0)).decode()
    return f"""
const CODE = (async () => {{
  const packed = "{packed}";
  const bytes = Uint8Array.from(atob(packed), (c) => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  const url = URL.createObjectURL(new Blob([await new Response(stream).text()], {{ type: "text/javascript" }}));
  const mod = await import(url);
  globalThis.{GLOBAL} = globalThis.{GLOBAL} || mod.default;
  return mod.default;
}})();
""" + LOADER


SHARED_ESM = f"""
const CODE = new Promise((resolve, reject) => {{
  const started = Date.now();
  (function poll() {{
    if (globalThis.{GLOBAL}) return resolve(globalThis.{GLOBAL});
    if (Date.now() - started > {WAIT_MS}) return reject(new Error(
      "plotly's widget code was not loaded: it comes with the kernel's first figure widget; re-run the notebook"));
    setTimeout(poll, 50);
  }})();
}});
""" + LOADER

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
