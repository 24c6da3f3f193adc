"""HTML and figure helpers shared by the panels (no arithmetic)."""
from __future__ import annotations

import html

import plotly.graph_objects as go


_CSS = """<style>
.wb-table { border-collapse: collapse; font-size: 12px; margin: 4px 0 10px 0; }
.wb-table td, .wb-table th { border: 1px solid #ddd; padding: 2px 6px; text-align: left; }
.wb-table th { background: #f4f4f4; font-weight: 600; }
.wb-chip { display: inline-block; min-width: 18px; padding: 0 3px; margin: 1px; border-radius: 3px;
           font: 11px monospace; text-align: center; color: #222; }
.wb-h { font-weight: 600; margin: 6px 0 2px 0; }
.wb-muted { color: #777; } .wb-error { color: #b00; white-space: pre-wrap; }
</style>"""


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _show(fw: go.FigureWidget, fig: go.Figure) -> None:
    """Replace what a FigureWidget shows with ``fig`` (traces and layout)."""
    with fw.batch_update():
        fw.data = []
        fw.add_traces(list(fig.data))
        fw.layout = fig.layout


def _table(rows: list[dict], columns: dict) -> str:
    """An HTML table; columns: {key: (header, format)}: a str.format pattern, None (text) or "html" (as is)."""
    head = "".join(f"<th>{_esc(h)}</th>" for h, _ in columns.values())
    body = []
    for r in rows:
        cells = []
        for key, (_, fmt) in columns.items():
            v = r.get(key)
            if v is None or (isinstance(v, float) and v != v):
                cells.append("<td class='wb-muted'>-</td>")
            elif fmt == "html":
                cells.append(f"<td>{v}</td>")
            else:
                cells.append(f"<td>{_esc(fmt.format(v) if fmt else v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='wb-table'><tr>{head}</tr>{''.join(body)}</table>"


