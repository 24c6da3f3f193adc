"""Figure helpers shared by the panels (no arithmetic); HTML pieces come from `workbench.html_parts`."""
from __future__ import annotations

import plotly.graph_objects as go

from ..html_parts import WIDGET_CSS as _CSS  # noqa: F401 - re-exported for the panels
from ..html_parts import esc as _esc  # noqa: F401
from ..html_parts import table as _table  # noqa: F401


def _show(fw: go.FigureWidget, fig: go.Figure) -> None:
    """Replace what a FigureWidget shows with ``fig`` (traces and layout)."""
    with fw.batch_update():
        fw.data = []
        fw.add_traces(list(fig.data))
        fw.layout = fig.layout
