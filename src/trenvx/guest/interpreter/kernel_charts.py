"""A result's ``data`` (a pandas DataFrame's columns) and ``chart`` (what a matplotlib figure
shows), computed INSIDE each python kernel, as the module ``_trenvx_charts``.

Like :mod:`.kernelside`, the server never imports this for itself: it sends this file's source
to every python kernel when the kernel starts (:meth:`trenvx_interpreter.languages.Python.bootstrap`).
:func:`register` adds two IPython display formatters, MIME types :data:`DATA_MIME` and
:data:`CHART_MIME`, which the server turns into a result's ``data`` and ``chart``
(:data:`trenvx_interpreter.outputs.MIME_FIELDS`). They recognize their objects only once pandas or
matplotlib is imported (neither is imported for them), and they never raise: a figure or frame they cannot
read gets no ``chart`` / ``data``, and the cell's other results are unchanged.

The shapes are the ones E2B's SDKs read (``e2b_code_interpreter.charts``):

- ``data``: ``{column: [values]}``, JSON values (NaN -> null, times as ISO 8601);
- ``chart``: ``{type, title, elements}`` with ``type`` one of ``line``, ``scatter``, ``bar``,
  ``pie``, ``box_and_whisker``, ``superchart`` (a figure of several axes: one chart per axes in
  ``elements``) or ``unknown``; 2-D charts add ``x_label``, ``y_label``, ``x_unit``, ``y_unit``
  (the unit is what a label has in ``(...)`` after a space, or in ``[...]``); line and scatter
  charts add ``x_ticks``, ``x_tick_labels``, ``x_scale`` (``linear``, ``log``, ``datetime``,
  ``categorical``, ...) and the same for ``y``, and their elements are ``{label, points}``; bar
  elements ``{label, group, value}``; pie elements ``{label, angle, radius}``; box elements
  ``{label, min, first_quartile, median, third_quartile, max, outliers}`` (boxes drawn with
  ``patch_artist=True``: without it a box plot is lines only, and is read as a line chart).

Standard library only at import.
"""

import datetime
import math
import re
import sys

DATA_MIME = "e2b/data"
CHART_MIME = "e2b/chart"
MAX_DATA_CELLS = 100_000
"""A DataFrame of more cells gets no ``data`` (its html is still there, cut by pandas)."""
MAX_DATA_BYTES = 4 << 20
"""Nor does one whose ``data`` would be more JSON than this (e.g. a column of long vectors)."""
MAX_CHART_POINTS = 25_000
"""A figure of more points (bars, wedges, box parts) gets no ``chart`` (its PNG is still there):
the extraction runs in the user's kernel, before the cell's answer, and must stay short."""

_SCALES = ("linear", "log", "symlog", "logit", "function", "functionlog", "asinh")
_UNIT = re.compile(r"\s\(([^()]*)\)|\[([^\[\]]*)\]")


class _TooBig(Exception):
    pass


def register(shell=None) -> bool:
    """Add the ``data`` and ``chart`` formatters to ``shell`` (default: the running IPython);
    again after a restart is harmless. False where there is no IPython shell."""
    try:
        from IPython import get_ipython
        from IPython.core.formatters import BaseFormatter
        from traitlets import ObjectName, Unicode
    except Exception:
        return False
    shell = shell if shell is not None else get_ipython()
    if shell is None:
        return False
    try:
        _register(shell, BaseFormatter, ObjectName, Unicode)
    except Exception as exc:  # never fail the kernel's start over it: results only lack data/chart
        print(f"trenvx: data and chart formatters not registered: {exc!r}", file=sys.__stderr__)
        return False
    return True


def _register(shell, BaseFormatter, ObjectName, Unicode) -> None:
    display = shell.display_formatter

    def formatter(mime, module, name, read):
        # Objects are recognized in __call__, not through the type printers: matplotlib's inline
        # backend pops Figure from every formatter's printers whenever it is (re)configured
        # (%matplotlib inline, select_figure_formats), which would drop the chart's.
        class Formatter(BaseFormatter):
            format_type = Unicode(mime)
            print_method = ObjectName("_repr_trenvx_%s_" % mime.split("/")[-1])
            _return_type = (dict,)

            def __call__(self, obj):
                if self.enabled and _instance_of(obj, module, name):
                    return read(obj)
                return super().__call__(obj)

        return Formatter(parent=display)

    data = formatter(DATA_MIME, "pandas", "DataFrame", dataframe_data)
    chart = formatter(CHART_MIME, "matplotlib.figure", "Figure", figure_chart)
    display.formatters[DATA_MIME] = data
    display.formatters[CHART_MIME] = chart


def _instance_of(obj, module: str, name: str) -> bool:
    """isinstance(obj, module.name), without importing ``module`` when nothing has."""
    cls = getattr(sys.modules.get(module), name, None)
    return isinstance(cls, type) and isinstance(obj, cls)


# -- data ---------------------------------------------------------------------------------


def dataframe_data(frame):
    """``{column: [values]}`` of a DataFrame, or None (too big, or unreadable). Numbers are given
    whole (NaN and infinities as null), times as ISO 8601, and values that are not numbers, text,
    booleans or times as text (objects are never walked)."""
    try:
        if int(frame.size) > MAX_DATA_CELLS:
            return None
        import json

        out = {}
        size = 0
        for name in frame.columns:
            column = frame[name]
            if getattr(column, "ndim", 1) != 1:  # a duplicated column name selects a frame
                return None
            if column.dtype.kind in "biuf":
                values = [_json_number(v) for v in column.tolist()]
            elif column.dtype == object:
                values = [_plain(v) for v in column.tolist()]
            else:  # times, categories, pandas' own string and nullable types
                values = json.loads(column.to_json(orient="values", date_format="iso", double_precision=15))
            size += len(json.dumps(values))
            if size > MAX_DATA_BYTES:
                return None
            out[str(name)] = values
        return out
    except Exception:
        return None


def _json_number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _plain(value):
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return _json_number(value)
    return str(value)


# -- chart --------------------------------------------------------------------------------


def figure_chart(figure):
    """The chart of a matplotlib figure, or None (no axes, too big, or unreadable)."""
    try:
        axes = list(figure.get_axes())
        if not axes:
            return None
        budget = [MAX_CHART_POINTS]
        if len(axes) == 1:
            return axes_chart(axes[0], budget)
        suptitle = getattr(figure, "_suptitle", None)
        return {"type": "superchart", "title": _text(suptitle), "elements": [axes_chart(ax, budget) for ax in axes]}
    except Exception:
        return None


def axes_chart(ax, budget=None):
    """The chart of one matplotlib Axes (see the module's docstring for its shape)."""
    budget = budget if budget is not None else [MAX_CHART_POINTS]
    kind = chart_type(ax)
    if kind == "line":
        return _point_chart(ax, "line", [(line.get_label(), line.get_xydata()) for line in ax.get_lines()], budget)
    if kind == "scatter":
        return _point_chart(ax, "scatter", [(c.get_label(), c.get_offsets()) for c in ax.collections], budget)
    if kind == "bar":
        return _bar_chart(ax, budget)
    if kind == "pie":
        return _pie_chart(ax, budget)
    if kind == "box_and_whisker":
        return _box_chart(ax, budget)
    return {**_chart(ax, "unknown"), "elements": []}


def chart_type(ax) -> str:
    """What the artists an Axes holds (texts apart) make: line, scatter, bar, pie,
    box_and_whisker or unknown."""
    from matplotlib.collections import PathCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import PathPatch, Rectangle, Wedge
    from matplotlib.text import Text

    children = getattr(ax, "_children", None)
    if children is None:
        children = list(ax.lines) + list(ax.collections) + list(ax.patches)
    artists = [a for a in children if not isinstance(a, Text)]
    if not artists:
        return "unknown"

    def every(*types):
        return all(isinstance(a, types) for a in artists)

    if every(Line2D):
        return "line"
    if every(PathCollection):
        return "scatter"
    if every(Wedge):
        return "pie"
    if every(Rectangle) and ax.containers:
        return "bar"
    if every(PathPatch, Line2D) and any(isinstance(a, PathPatch) for a in artists):
        return "box_and_whisker"
    return "unknown"


def _text(artist):
    if artist is None:
        return None
    return artist.get_text() or None


def _spend(budget, n: int) -> None:
    budget[0] -= n
    if budget[0] < 0:
        raise _TooBig()


def _number(value):
    """A JSON number (None for NaN and infinities)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _unit(label):
    if not label:
        return None
    match = _UNIT.search(label)
    return (match.group(1) or match.group(2)) if match else None


def _chart(ax, kind):
    """The fields every chart of one Axes has: its type and title."""
    return {"type": kind, "title": ax.get_title() or None}


def _labels_2d(ax, kind, swap=False):
    x_label, y_label = ax.get_xlabel() or None, ax.get_ylabel() or None
    if swap:  # horizontal bars and boxes: x_label names the categories, as for vertical ones
        x_label, y_label = y_label, x_label
    return {**_chart(ax, kind), "x_label": x_label, "y_label": y_label,
            "x_unit": _unit(x_label), "y_unit": _unit(y_label)}


class _Axis:
    """Turns an axis's internal numbers back into what the user plotted: ISO times on a date
    axis, category names on a categorical one, numbers elsewhere. A date axis is matplotlib's
    (days since its epoch) or pandas' time series plot's (``Series.plot`` of a regular
    DatetimeIndex: period ordinals of the axis's ``freq``)."""

    def __init__(self, axis) -> None:
        getter = getattr(axis, "get_converter", None)
        converter = getter() if getter is not None else getattr(axis, "converter", None)
        name = type(converter).__name__ if converter is not None else ""
        mapping = getattr(getattr(axis, "units", None), "_mapping", None)
        self._period_freq = getattr(axis, "freq", None) if name == "PeriodConverter" else None
        if "Date" in name or self._period_freq is not None:
            self.scale = "datetime"
        elif "Categor" in name and mapping is not None:
            self.scale = "categorical"
        else:
            scale = axis.get_scale()
            self.scale = scale if scale in _SCALES else "unknown"
        self._categories = {int(v): str(k) for k, v in dict(mapping).items()} if self.scale == "categorical" else {}
        self._axis = axis
        self._ticks = None  # (positions, labels, tolerance), read once: see _raw_ticks

    def value(self, number):
        if self.scale == "datetime":
            return self.values([float(number)])[0]
        if self.scale == "categorical":
            number = float(number)
            if math.isfinite(number) and float(round(number)) == number and int(number) in self._categories:
                return self._categories[int(number)]
        return _number(number)

    def values(self, numbers):
        """:meth:`value` of many numbers (a sequence of floats)."""
        if self.scale == "datetime":
            finite = [n for n in numbers if math.isfinite(n)]
            if self._period_freq is not None:  # as matplotlib's dates come out: in UTC
                from pandas import Period

                dates = iter([Period(ordinal=int(round(n)), freq=self._period_freq).to_timestamp()
                              .to_pydatetime().replace(tzinfo=datetime.timezone.utc) for n in finite])
            else:
                from matplotlib.dates import num2date

                dates = iter(num2date(finite)) if finite else iter(())
            return [next(dates).isoformat() if math.isfinite(n) else None for n in numbers]
        return [self.value(n) for n in numbers]

    def _raw_ticks(self):
        """Tick positions inside the axis's view, their labels as matplotlib draws them, and how
        close a position must be to a tick to be at it; read once per axis."""
        if self._ticks is not None:
            return self._ticks
        low, high = sorted(float(v) for v in self._axis.get_view_interval())
        span = (high - low) * 1e-9
        locs = [float(t) for t in self._axis.get_ticklocs() if low - span <= float(t) <= high + span]
        index = 0 if self._axis.axis_name == "x" else 1
        drawn = {round(float(t.get_position()[index]), 9): t.get_text() for t in self._axis.get_ticklabels()}
        if locs and all(drawn.get(round(loc, 9)) for loc in locs):
            labels = [drawn[round(loc, 9)] for loc in locs]
        else:  # not drawn yet: formatted as a draw would
            labels = [str(s) for s in self._axis.get_major_formatter().format_ticks(locs)] if locs else []
        self._ticks = locs, labels, max(abs(high - low), 1.0) * 1e-9
        return self._ticks

    def ticks(self):
        """The ticks inside the axis's view (as values, see :meth:`value`) and their labels."""
        locs, labels, _ = self._raw_ticks()
        if self.scale not in ("datetime", "categorical"):
            locs = [float("%.12g" % loc) for loc in locs]  # 1.2, not 1.2000000000000002
        return self.values(locs), labels

    def label_at(self, position):
        """The category, or the tick label, at ``position``; else the position itself as text."""
        position = float(position)
        if self.scale == "categorical":
            value = self.value(round(position))
            if isinstance(value, str):
                return value
        locs, labels, tolerance = self._raw_ticks()
        for loc, label in zip(locs, labels):
            if label and abs(loc - position) <= tolerance:
                return label
        value = self.value(position)
        return value if isinstance(value, str) else "%g" % position


def _floats(xy):
    """An (n, 2) array-like as two lists of floats (NaN for masked or missing values)."""
    import numpy

    data = numpy.ma.filled(numpy.ma.asarray(xy, dtype=float), numpy.nan).reshape(-1, 2)
    return data[:, 0].tolist(), data[:, 1].tolist()


def _public(label, fallback: str) -> str:
    """A user's label; matplotlib's own (``_child0``, ``_container1``, ``_nolegend_``) are none."""
    label = str(label)
    return fallback if not label or label.startswith("_") else label


def _point_chart(ax, kind, series, budget):
    x, y = _Axis(ax.xaxis), _Axis(ax.yaxis)
    elements = []
    for n, (label, xy) in enumerate(series, 1):
        _spend(budget, len(xy))  # before any conversion: a refused figure costs nothing
        xs, ys = _floats(xy)
        elements.append({"label": _public(label, f"{'Line' if kind == 'line' else 'Series'} {n}"),
                         "points": [list(p) for p in zip(x.values(xs), y.values(ys))]})
    x_ticks, x_tick_labels = x.ticks()
    y_ticks, y_tick_labels = y.ticks()
    chart = _labels_2d(ax, kind)
    chart.update({"x_ticks": x_ticks, "x_tick_labels": x_tick_labels, "x_scale": x.scale,
                  "y_ticks": y_ticks, "y_tick_labels": y_tick_labels, "y_scale": y.scale, "elements": elements})
    return chart


def _all_same(values) -> bool:
    return all(math.isclose(v, values[0], rel_tol=1e-9, abs_tol=1e-12) for v in values)


def _bars_horizontal(rects, container) -> bool:
    orientation = getattr(container, "orientation", None)
    if orientation in ("vertical", "horizontal"):
        return orientation == "horizontal"
    widths = [float(r.get_width()) for r in rects]
    heights = [float(r.get_height()) for r in rects]
    if _all_same(widths) and not _all_same(heights):
        return False
    if _all_same(heights) and not _all_same(widths):
        return True
    return any(float(r.get_x()) == 0.0 for r in rects) and not any(float(r.get_y()) == 0.0 for r in rects)


def _bar_chart(ax, budget):
    from matplotlib.container import BarContainer

    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    horizontal = bool(containers) and _bars_horizontal(list(containers[0]), containers[0])
    categories = _Axis(ax.yaxis if horizontal else ax.xaxis)
    elements = []
    for n, container in enumerate(containers, 1):
        _spend(budget, len(container))
        rects = list(container)
        group = _public(container.get_label(), f"Group {n}")
        for rect in rects:
            if horizontal:
                center, value = rect.get_y() + rect.get_height() / 2, rect.get_width()
            else:
                center, value = rect.get_x() + rect.get_width() / 2, rect.get_height()
            label = categories.label_at(center)
            elements.append({"label": str(label), "group": group, "value": _number(value)})
    chart = _labels_2d(ax, "bar", swap=horizontal)
    chart["elements"] = elements
    return chart


def _pie_chart(ax, budget):
    wedges = list(ax.patches)
    _spend(budget, len(wedges))
    elements = [{"label": _public(w.get_label(), f"Wedge {n}"), "angle": round(abs(float(w.theta2) - float(w.theta1)), 4),
                 "radius": _number(w.r)} for n, w in enumerate(wedges, 1)]
    return {**_chart(ax, "pie"), "elements": elements}


def _boxes_vertical(boxes, lines) -> bool:
    """Whether the boxes stand (categories along x): a whisker starts at a box's edge, going
    away from it along the values' axis (a vertical segment from the top or bottom edge)."""
    votes = 0
    for box in boxes:
        vertices = box.get_path().vertices
        x0, x1 = float(min(vertices[:, 0])), float(max(vertices[:, 0]))
        y0, y1 = float(min(vertices[:, 1])), float(max(vertices[:, 1]))
        for _, xs, ys in lines:
            if len(xs) != 2:
                continue
            if xs[0] == xs[1] and ys[0] != ys[1] and x0 <= xs[0] <= x1 and ({y0, y1} & set(ys)):
                votes += 1
            elif ys[0] == ys[1] and xs[0] != xs[1] and y0 <= ys[0] <= y1 and ({x0, x1} & set(xs)):
                votes -= 1
    return votes >= 0


def _box_chart(ax, budget):
    from matplotlib.patches import PathPatch

    boxes = [p for p in ax.patches if isinstance(p, PathPatch)]
    raw = list(ax.get_lines())
    # Each box is compared with each line, twice: that is the work to bound, before any conversion.
    _spend(budget, len(boxes) * max(1, len(raw)) + sum(len(line.get_xdata(orig=False)) for line in raw))
    lines = [(line, [float(v) for v in line.get_xdata(orig=False)], [float(v) for v in line.get_ydata(orig=False)])
             for line in raw]
    vertical = _boxes_vertical(boxes, lines)
    categories = _Axis(ax.xaxis if vertical else ax.yaxis)
    elements = []
    for box in boxes:
        vertices = box.get_path().vertices
        along = [float(v) for v in (vertices[:, 0] if vertical else vertices[:, 1])]  # the category axis
        values = [float(v) for v in (vertices[:, 1] if vertical else vertices[:, 0])]
        lo, hi, q1, q3 = min(along), max(along), min(values), max(values)
        median, low_whisker, high_whisker, outliers = None, q1, q3, []
        for line, xs, ys in lines:
            cat, val = (xs, ys) if vertical else (ys, xs)
            if not cat or not all(lo - 1e-9 <= c <= hi + 1e-9 for c in cat):
                continue
            if line.get_linestyle() in ("None", "none", "", " "):  # fliers: markers only
                outliers.extend(v for v in val if math.isfinite(v))
            elif len(val) == 2 and val[0] == val[1] and q1 <= val[0] <= q3 and cat[0] != cat[1]:
                median = val[0]
            elif len(val) == 2 and len(set(cat)) == 1:  # a whisker, from the box's edge outwards
                low_whisker = min(low_whisker, min(val))
                high_whisker = max(high_whisker, max(val))
        elements.append({
            "label": str(categories.label_at((lo + hi) / 2)),
            "min": _number(low_whisker), "first_quartile": _number(q1),
            "median": _number(median) if median is not None else None,
            "third_quartile": _number(q3), "max": _number(high_whisker), "outliers": sorted(outliers),
        })
    chart = _labels_2d(ax, "box_and_whisker", swap=not vertical)
    chart["elements"] = elements
    return chart
