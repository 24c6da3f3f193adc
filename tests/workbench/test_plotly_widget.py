"""Figure widgets share plotly's widget code: the first carries it (compressed), the others wait for it."""
import base64
import gzip
import pathlib
import re

import pytest

pytest.importorskip("anywidget")

import plotly  # noqa: E402
import plotly.graph_objects as go  # noqa: E402

from workbench.widgets import plotly_widget  # noqa: E402


def test_the_first_widget_carries_the_whole_bundle_and_the_others_a_few_lines():
    first = plotly_widget._bundle_widget or plotly_widget.figure_widget()
    others = [plotly_widget.figure_widget(go.Figure(go.Bar(y=[1, 2]))) for _ in range(3)]
    assert isinstance(first, go.FigureWidget) and all(isinstance(w, go.FigureWidget) for w in others)
    assert plotly_widget._bundle_widget is first
    assert all(len(w._esm) < 3000 and plotly_widget.GLOBAL in w._esm for w in others)  # 5 MB for a plain one
    assert list(others[0].data[0].y) == [1, 2]  # an ordinary, live FigureWidget otherwise
    packed = re.search(r'const packed = "([^"]+)"', first._esm).group(1)
    bundle = (pathlib.Path(plotly.__file__).parent / "package_data" / "widgetbundle.js").read_bytes()
    assert gzip.decompress(base64.b64decode(packed)) == bundle  # the unchanged bundle, compressed
    assert len(first._esm) < 0.5 * len(bundle)
