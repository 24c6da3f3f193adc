"""HTML pieces shared by the report and the widgets: escaping, tables, the style sheets (no arithmetic).

Every user-supplied string goes through `esc`; tables format values with the results schema.
"""
from __future__ import annotations

import html
import json

from . import schema

WIDGET_CSS = """<style>
.wb-table { border-collapse: collapse; font-size: 12px; margin: 4px 0 10px 0; }
.wb-table td, .wb-table th { border: 1px solid #ddd; padding: 2px 6px; text-align: left; }
.wb-table th { background: #f4f4f4; font-weight: 600; }
.wb-chip { display: inline-block; min-width: 18px; padding: 0 3px; margin: 1px; border-radius: 3px;
           font: 11px monospace; text-align: center; color: #222; }
.wb-h { font-weight: 600; margin: 6px 0 2px 0; }
.wb-muted { color: #777; } .wb-error { color: #b00; white-space: pre-wrap; }
.wb-sweep-panel .jupyter-button:disabled, .wb-sweep-panel button:disabled { opacity: .35; filter: grayscale(1);
           cursor: not-allowed; }
</style>"""

REPORT_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 12px; } td, th { border: 1px solid #ddd; padding: 3px 6px; }
th { background: #f4f4f4; text-align: left; } .scroll { overflow-x: auto; max-width: 100%; }
.figure { margin: 1em 0 2em 0; } .caption { color: #444; font-size: 13px; max-width: 60em; margin: .2em 0 0 0; }
.empty { color: #666; font-style: italic; } .failed { color: #a00; } pre { white-space: pre-wrap; margin: 0; }
code.block { display: block; background: #f6f6f6; padding: .5em; white-space: pre-wrap; }
.verdict { font-size: 12px; color: #444; }
"""


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def table(rows: list[dict], columns: dict, css_class: str = "wb-table") -> str:
    """An HTML table; columns: {key: (header, format)}: a str.format pattern, None (text), "html" (as is)
    or "schema" (the results schema's format of that column)."""
    head = "".join(f"<th>{esc(h)}</th>" for h, _ in columns.values())
    body = []
    for r in rows:
        cells = []
        for key, (_, fmt) in columns.items():
            v = r.get(key)
            if v is None or (isinstance(v, float) and v != v):
                cells.append("<td class='wb-muted'>-</td>")
            elif fmt == "html":
                cells.append(f"<td>{v}</td>")
            elif fmt == "schema":
                cells.append(f"<td>{esc(schema.fmt(key, v))}</td>")
            else:
                cells.append(f"<td>{esc(fmt.format(v) if fmt else v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='{css_class}'><tr>{head}</tr>{''.join(body)}</table>"


def results_table(df, names: list[str]) -> str:
    """The columns ``names`` of a results frame, headed by their schema titles (missing columns left out)."""
    names = [n for n in names if n in df]
    return table(df.to_dict("records"), {n: (schema.title(n), "schema") for n in names}, css_class="results")


def kv_table(d: dict) -> str:
    rows = []
    for k, v in d.items():
        cell = f"<pre>{esc(json.dumps(v, indent=1, default=str))}</pre>" if isinstance(v, (dict, list)) else esc(v)
        rows.append(f"<tr><th>{esc(k)}</th><td>{cell}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"
