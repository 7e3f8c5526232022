"""Bokeh helpers shared by the plot views: a styled figure and the epoch/mark overlays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from bokeh.models import ColumnDataSource, HoverTool, Range1d
from bokeh.plotting import figure

from ..theme import CURRENT, EVENT, FORK


def make_figure(title: str, y_label: str = "", *, height: int | None = 230, x_range: Any = None,
                x_label: str = "epoch", tooltips: Sequence[tuple[str, str]] | None = None,
                **kwargs: Any) -> Any:
    """A Bokeh figure in the revacnn style (light grid, no logo, stretch to width).

    Example:
        >>> fig = make_figure("Loss", "loss")
    """
    if x_range is not None:
        kwargs["x_range"] = x_range
    if height is not None:
        kwargs["height"] = height
    kwargs.setdefault("sizing_mode", "stretch_width")
    fig = figure(
        title=title,
        tools="pan,wheel_zoom,box_zoom,reset,save", toolbar_location="right",
        active_scroll=None, **kwargs,
    )
    fig.toolbar.logo = None
    fig.toolbar.autohide = True
    fig.title.text_font_size = "12.5px"
    fig.title.text_font_style = "bold"
    fig.xaxis.axis_label = x_label
    fig.yaxis.axis_label = y_label
    fig.axis.axis_label_text_font_size = "11px"
    fig.axis.axis_label_text_font_style = "normal"
    fig.grid.grid_line_alpha = 0.35
    fig.outline_line_color = None
    fig.min_border_left = 40
    if tooltips:
        fig.add_tools(HoverTool(tooltips=list(tooltips), mode="mouse"))
    return fig


class EpochOverlays:
    """Dotted lines at fork points and steering events, the current epoch, and inherited epochs.

    One set of data sources shared by any number of figures, so that moving the current epoch
    is one small update.

    Example:
        >>> ov = EpochOverlays()
        >>> ov.attach(make_figure("Loss"))
        >>> ov.set_marks([{"epoch": 2, "kind": "fork", "label": "fork"}]); ov.set_epoch(3)
    """

    def __init__(self) -> None:
        self.marks = ColumnDataSource({"x": [], "color": [], "label": [], "dash": []})
        self.current = ColumnDataSource({"x": []})
        self.inherited = ColumnDataSource({"x0": [], "x1": []})

    def attach(self, fig: Any) -> None:
        """Draw the overlays on ``fig``."""
        fig.vstrip(x0="x0", x1="x1", source=self.inherited, fill_color="#94a3b8", fill_alpha=0.12,
                   line_alpha=0, level="underlay")
        fig.vspan(x="x", source=self.marks, line_color="color", line_dash="dash", line_width=1.6,
                  line_alpha=0.9)
        fig.vspan(x="x", source=self.current, line_color=CURRENT, line_width=2, line_alpha=0.55)

    def set_marks(self, marks: Sequence[dict[str, Any]], inherited_upto: int | None = None,
                  first_epoch: int | None = None) -> None:
        """Fork points (purple) and steering events (orange) as dotted lines."""
        xs, colors, labels, dashes = [], [], [], []
        for m in marks:
            if m.get("kind") == "child":
                continue
            xs.append(float(m["epoch"]))
            colors.append(FORK if m["kind"] == "fork" else (EVENT if m["kind"] == "event" else "#94a3b8"))
            labels.append(str(m.get("label", "")))
            dashes.append("dotted" if m["kind"] != "fork" else "dashed")
        self.marks.data = {"x": xs, "color": colors, "label": labels, "dash": dashes}
        if inherited_upto is not None and first_epoch is not None and inherited_upto > first_epoch:
            self.inherited.data = {"x0": [float(first_epoch) - 0.5], "x1": [float(inherited_upto) - 0.5]}
        else:
            self.inherited.data = {"x0": [], "x1": []}

    def set_epoch(self, epoch: int | None) -> None:
        """Move the current-epoch line."""
        self.current.data = {"x": [] if epoch is None else [float(epoch)]}


def column(df: pd.DataFrame, name: str) -> np.ndarray:
    """``df[name]`` as float64 with NaN for missing values (an all-NaN column when absent).

    Example:
        >>> column(pd.DataFrame({"a": [1, None]}), "a").tolist()
        [1.0, nan]
    """
    if name not in df:
        return np.full(len(df), np.nan)
    return pd.to_numeric(df[name], errors="coerce").to_numpy(np.float64)


def padded_range(values: np.ndarray, pad: float = 0.5) -> Range1d:
    """An x range around ``values`` with half an epoch of padding.

    Example:
        >>> padded_range(np.array([0, 4])).end
        4.5
    """
    v = values[np.isfinite(values)] if len(values) else values
    if not len(v):
        return Range1d(-0.5, 1.5)
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1:
        hi = lo + 1
    return Range1d(lo - pad, hi + pad)


def fit_range(rng: Range1d, *arrays: np.ndarray, pad: float = 0.08, include_zero: bool = False) -> None:
    """Set ``rng`` around the finite values of ``arrays`` (explicit ranges never warn in the browser).

    Example:
        >>> r = Range1d(0, 1); fit_range(r, np.array([2.0, 4.0])); (r.start < 2, r.end > 4)
        (True, True)
    """
    vals = [np.asarray(a, np.float64).ravel() for a in arrays if a is not None and len(a)]
    v = np.concatenate(vals) if vals else np.zeros(0)
    v = v[np.isfinite(v)]
    if not len(v):
        return
    lo, hi = float(v.min()), float(v.max())
    if include_zero:
        lo = min(lo, 0.0)
    span = hi - lo
    p = span * pad if span > 0 else max(abs(hi) * 0.1, 0.5)
    rng.start, rng.end = lo - p, hi + p
