"""kernel_charts: a result's ``data`` (DataFrame) and ``chart`` (matplotlib figure), E2B's shapes.

In this process with this Python's matplotlib and pandas, and once more with Debian's python3 (the
versions the code-interpreter template has: matplotlib 3.6, pandas 1.5, IPython 8.5) when this
host has them. The charts go through IPython's real display formatters, and E2B's unmodified
client parses them. End to end in a VM: tests/e2e/test_code_interpreter.py."""

from __future__ import annotations

import importlib.util
import inspect
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

plt = pytest.importorskip("matplotlib.pyplot")
pd = pytest.importorskip("pandas")
pytest.importorskip("IPython")

SOURCE = Path(__file__).resolve().parents[2] / "src" / "trenvx" / "guest" / "interpreter" / "kernel_charts.py"
DEBIAN_PYTHON = "/usr/bin/python3"


def load_module() -> Any:
    spec = importlib.util.spec_from_file_location("_trenvx_charts_test", SOURCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shell() -> Any:
    import matplotlib
    from IPython.core.interactiveshell import InteractiveShell

    matplotlib.use("Agg")
    sh = InteractiveShell.instance()
    assert load_module().register(sh)
    return sh


def formats(shell: Any, obj: Any) -> dict[str, Any]:
    data, _ = shell.display_formatter.format(obj)
    return data


def chart_of(shell: Any, draw: Any) -> dict[str, Any]:
    fig = plt.figure()
    try:
        draw(fig)
        return formats(shell, fig)["e2b/chart"]
    finally:
        plt.close(fig)


def test_a_line_chart_with_its_labels_units_ticks_and_points(shell: Any) -> None:
    def draw(fig: Any) -> None:
        plt.plot([1, 2, 3], [1, 4, 9], label="squares")
        plt.title("growth")
        plt.xlabel("time (s)")
        plt.ylabel("distance [m]")
    chart = chart_of(shell, draw)
    assert chart["type"] == "line" and chart["title"] == "growth"
    assert (chart["x_label"], chart["x_unit"], chart["y_label"], chart["y_unit"]) == ("time (s)", "s", "distance [m]", "m")
    assert chart["elements"] == [{"label": "squares", "points": [[1.0, 1.0], [2.0, 4.0], [3.0, 9.0]]}]
    assert chart["x_scale"] == chart["y_scale"] == "linear"
    assert len(chart["x_ticks"]) == len(chart["x_tick_labels"]) > 1
    assert all(1 <= t <= 3 for t in chart["x_ticks"])  # only ticks inside the view
    json.dumps(chart, allow_nan=False)


def test_scatter_log_scale_and_dates(shell: Any) -> None:
    import datetime

    chart = chart_of(shell, lambda fig: (plt.scatter([1, 10, 100], [2, 3, 4], label="s"), plt.xscale("log")))
    assert chart["type"] == "scatter" and chart["x_scale"] == "log"
    assert chart["elements"] == [{"label": "s", "points": [[1.0, 2.0], [10.0, 3.0], [100.0, 4.0]]}]
    chart = chart_of(shell, lambda fig: plt.plot([1, 2, 3], [1, float("nan"), 3]))
    assert chart["elements"][0]["points"][1] == [2.0, None]  # JSON has no NaN
    days = [datetime.datetime(2024, 1, d) for d in (1, 2, 3)]
    chart = chart_of(shell, lambda fig: plt.plot(days, [5, 6, 7]))
    assert chart["x_scale"] == "datetime"
    assert chart["elements"][0]["points"][0] == ["2024-01-01T00:00:00+00:00", 5.0]
    assert all(isinstance(t, str) for t in chart["x_ticks"])


def test_a_pandas_time_series_plot_has_dates(shell: Any) -> None:
    """``Series.plot`` of a regular DatetimeIndex puts period ordinals on the axis (days, hours or
    months since 1970, as its ``freq`` says), not matplotlib's dates: they come out as ISO times."""
    import pandas as pd

    for freq, second in (("D", "2024-01-02T00:00:00+00:00"), ("h", "2024-01-01T01:00:00+00:00"),
                         ("MS", "2024-02-01T00:00:00+00:00")):
        series = pd.Series([5, 6, 7], index=pd.date_range("2024-01-01", periods=3, freq=freq), name="n")
        chart = chart_of(shell, lambda fig, series=series: series.plot())
        assert chart["type"] == "line" and chart["x_scale"] == "datetime", (freq, chart)
        assert chart["elements"][0]["points"] == [[chart["elements"][0]["points"][0][0], 5.0], [second, 6.0],
                                                  [chart["elements"][0]["points"][2][0], 7.0]], freq
        assert chart["elements"][0]["points"][0][0] == "2024-01-01T00:00:00+00:00", freq
        assert all(isinstance(t, str) and t.startswith("2024-") for t in chart["x_ticks"]), chart["x_ticks"]


def test_bars_vertical_horizontal_and_grouped(shell: Any) -> None:
    chart = chart_of(shell, lambda fig: plt.bar(["a", "b", "c"], [3, 1, 2], label="2024"))
    assert chart["type"] == "bar"
    assert chart["elements"] == [{"label": "a", "group": "2024", "value": 3.0}, {"label": "b", "group": "2024", "value": 1.0},
                                 {"label": "c", "group": "2024", "value": 2.0}]

    def horizontal(fig: Any) -> None:
        plt.barh(["x", "y"], [5, 7])
        plt.xlabel("count")
        plt.ylabel("name")
    chart = chart_of(shell, horizontal)
    assert [(e["label"], e["value"]) for e in chart["elements"]] == [("x", 5.0), ("y", 7.0)]
    assert (chart["x_label"], chart["y_label"]) == ("name", "count")  # x_label names the categories

    def grouped(fig: Any) -> None:
        plt.bar([0.8, 1.8], [1, 2], width=0.4, label="g1")
        plt.bar([1.2, 2.2], [3, 4], width=0.4, label="g2")
    chart = chart_of(shell, grouped)
    assert [(e["group"], e["value"]) for e in chart["elements"]] == [("g1", 1.0), ("g1", 2.0), ("g2", 3.0), ("g2", 4.0)]


def test_bars_on_a_number_axis_are_labelled_by_their_centre_and_unnamed_series_get_names(shell: Any) -> None:
    chart = chart_of(shell, lambda fig: plt.bar([0.45, 1.35, 2.25], [1, 2, 3], width=0.9))
    assert [(e["label"], e["group"]) for e in chart["elements"]] == [("0.45", "Group 1"), ("1.35", "Group 1"),
                                                                     ("2.25", "Group 1")]
    chart = chart_of(shell, lambda fig: (plt.plot([1, 2]), plt.plot([3, 4])))
    assert [e["label"] for e in chart["elements"]] == ["Line 1", "Line 2"]  # not matplotlib's _child0


def test_pie_and_box_and_whisker(shell: Any) -> None:
    chart = chart_of(shell, lambda fig: plt.pie([1, 2, 3], labels=["x", "y", "z"]))
    assert chart == {"type": "pie", "title": None, "elements": [
        {"label": "x", "angle": 60.0, "radius": 1.0}, {"label": "y", "angle": 120.0, "radius": 1.0},
        {"label": "z", "angle": 180.0, "radius": 1.0}]}
    for vertical in (True, False):
        def box(fig: Any, vertical: bool = vertical) -> None:
            # matplotlib 3.10 takes orientation= (and deprecates vert=, which the template's 3.6 takes)
            way = ({"orientation": "vertical" if vertical else "horizontal"}
                   if "orientation" in inspect.signature(plt.boxplot).parameters else {"vert": vertical})
            artists = plt.boxplot([[1, 2, 3, 4, 5, 20], [2, 3, 4]], patch_artist=True, **way)
            assert artists["boxes"]
        chart = chart_of(shell, box)
        assert chart["type"] == "box_and_whisker", vertical
        first, second = chart["elements"]
        assert (first["min"], first["first_quartile"], first["median"], first["third_quartile"], first["max"]) == \
            (1.0, 2.25, 3.5, 4.75, 5.0), vertical
        assert first["outliers"] == [20.0] and second["outliers"] == [] and second["median"] == 3.0
        assert (first["label"], second["label"]) == ("1", "2")


def test_several_axes_make_a_superchart_and_unknown_artists_an_unknown_chart(shell: Any) -> None:
    fig, (left, right) = plt.subplots(1, 2)
    try:
        left.plot([1, 2])
        right.imshow([[1, 2], [3, 4]])
        fig.suptitle("both")
        chart = formats(shell, fig)["e2b/chart"]
    finally:
        plt.close(fig)
    assert chart["type"] == "superchart" and chart["title"] == "both"
    assert [c["type"] for c in chart["elements"]] == ["line", "unknown"]


def test_a_figure_without_axes_or_too_many_points_has_no_chart_and_nothing_breaks(shell: Any) -> None:
    module = load_module()
    empty = plt.figure()
    try:
        assert "e2b/chart" not in formats(shell, empty)
    finally:
        plt.close(empty)
    fig = plt.figure()
    try:
        plt.plot(range(module.MAX_CHART_POINTS + 1))
        assert module.figure_chart(fig) is None
    finally:
        plt.close(fig)
    assert module.figure_chart(object()) is None  # never raises


def test_a_dataframes_data_is_its_columns_as_json(shell: Any) -> None:
    class Thing:
        def __str__(self) -> str:
            return "a thing"

    frame = pd.DataFrame({"n": [1, 2, None], "s": ["x", "y", "z"], 3: pd.to_datetime(["2024-01-01"] * 3),
                          "f": [0.1 + 0.2, 1 / 3, 2.0], "o": [Thing(), None, 7]})
    data = formats(shell, frame)
    assert data["e2b/data"] == {"n": [1.0, 2.0, None], "s": ["x", "y", "z"],
                                "3": ["2024-01-01T00:00:00.000"] * 3,
                                "f": [0.1 + 0.2, 1 / 3, 2.0],  # all the digits a float has
                                "o": ["a thing", None, 7]}  # objects as text, never walked
    assert "text/html" in data
    module = load_module()
    big = pd.DataFrame({"a": range(module.MAX_DATA_CELLS + 1)})
    assert "e2b/data" not in formats(shell, big) and "text/html" in formats(shell, big)
    wide = pd.DataFrame({"v": ["x" * (module.MAX_DATA_BYTES // 10)] * 11})  # few cells, too much JSON
    assert "e2b/data" not in formats(shell, wide)


def test_e2bs_client_reads_them(shell: Any) -> None:
    models = pytest.importorskip("e2b_code_interpreter.models")
    from trenvx.guest.interpreter import outputs

    chart = chart_of(shell, lambda fig: plt.plot([1, 2], [3, 4], label="l"))
    line = outputs.result({"text/plain": "<Figure>", "image/png": "iVBOR", "e2b/chart": chart}, False)
    frame = outputs.result(formats(shell, pd.DataFrame({"c": [1, 2]})), True)
    execution = models.Execution()
    for out in (line, frame):
        models.parse_output(execution, json.dumps(out))
    figure, table = execution.results
    assert figure.chart.type == "line" and figure.chart.elements[0].points == [(1.0, 3.0), (2.0, 4.0)]
    assert figure.chart.elements[0].label == "l" and figure.png == "iVBOR"
    assert table.data == {"c": [1, 2]} and table.is_main_result


DEBIAN_PROBE = r"""
import importlib.util, json, sys
import matplotlib; matplotlib.use("Agg")
import matplotlib.pyplot as plt, pandas as pd
from IPython.core.interactiveshell import InteractiveShell
spec = importlib.util.spec_from_file_location("_trenvx_charts", sys.argv[1])
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
sh = InteractiveShell.instance(); assert m.register(sh)
out = {}
def fmt(obj): return sh.display_formatter.format(obj)[0]
fig = plt.figure(); plt.plot([1, 2], [3, 4]); out["line"] = fmt(fig)["e2b/chart"]; plt.close(fig)
fig = plt.figure(); plt.bar(["a", "b"], [1, 2]); out["bar"] = fmt(fig)["e2b/chart"]; plt.close(fig)
fig = plt.figure(); plt.boxplot([[1, 2, 3, 4, 5, 20]], patch_artist=True); out["box"] = fmt(fig)["e2b/chart"]; plt.close(fig)
import datetime
fig = plt.figure(); plt.plot([datetime.datetime(2024, 1, 1, h) for h in range(5)], range(5)); out["dates"] = fmt(fig)["e2b/chart"]; plt.close(fig)
out["data"] = fmt(pd.DataFrame({"c": [1, 2]}))["e2b/data"]
fig = plt.figure(); pd.Series([5, 6], index=pd.date_range("2024-01-01", periods=2, freq="H")).plot(); out["series"] = fmt(fig)["e2b/chart"]; plt.close(fig)
print(json.dumps(out))
"""


def test_the_templates_versions_debians_python3() -> None:
    if not Path(DEBIAN_PYTHON).exists():
        pytest.skip(f"{DEBIAN_PYTHON} is missing")
    probe = subprocess.run([DEBIAN_PYTHON, "-c", "import matplotlib, pandas, IPython"], capture_output=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip("Debian's python3 has no matplotlib/pandas/IPython (apt-get install python3-matplotlib python3-pandas "
                    "python3-ipykernel)")
    r = subprocess.run([DEBIAN_PYTHON, "-c", DEBIAN_PROBE, str(SOURCE)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["line"]["type"] == "line" and out["line"]["elements"][0]["points"] == [[1.0, 3.0], [2.0, 4.0]]
    assert [(e["label"], e["value"]) for e in out["bar"]["elements"]] == [("a", 1.0), ("b", 2.0)]
    box = out["box"]["elements"][0]
    assert (box["min"], box["median"], box["max"], box["outliers"]) == (1.0, 3.5, 5.0, [20.0])
    assert out["data"] == {"c": [1, 2]}
    assert out["series"]["x_scale"] == "datetime"
    assert out["series"]["elements"][0]["points"] == [["2024-01-01T00:00:00+00:00", 5.0], ["2024-01-01T01:00:00+00:00", 6.0]]
    assert out["dates"]["x_scale"] == "datetime"
    assert out["dates"]["elements"][0]["points"][1] == ["2024-01-01T01:00:00+00:00", 1.0]
    assert all(t.endswith(":00+00:00") for t in out["dates"]["x_ticks"]), out["dates"]["x_ticks"]  # no rounding drift
