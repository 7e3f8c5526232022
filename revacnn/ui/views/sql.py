"""The SQL console: a query box, example queries, a results table, a quick plot and CSV download."""

from __future__ import annotations

import asyncio
import html
import io
import time
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import panel as pn
import param
from bokeh.models import ColumnDataSource, HoverTool, Range1d
from panel.viewable import Viewer

from ...errors import RevacnnError
from ...storage.sql import EXAMPLE_QUERIES, TABLES
from ..theme import ACCENT
from ._component import run_locked
from ._plots import make_figure

#: The query in the box when the console opens.
DEFAULT_QUERY = (
    "SELECT run_id, epoch, source_run_id, val_accuracy, cumulative_time_s\n"
    "FROM timeline\nORDER BY run_id, epoch"
)

#: Rows shown in the table (all rows go into the CSV download).
MAX_TABLE_ROWS = 5000

_MONO_CSS = """
textarea { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace !important;
  font-size: 12.5px !important; line-height: 1.45 !important; }
"""


def _status_html(text: str, kind: str) -> str:
    colors = {"ok": ("#ecfdf5", "#065f46", "#6ee7b7"), "error": ("#fef2f2", "#991b1b", "#fca5a5"),
              "info": ("#eff6ff", "#1e3a8a", "#93c5fd")}
    bg, fg, border = colors[kind]
    return (f'<div class="rv-sql-{kind}" style="padding:8px 12px;border-radius:8px;font-size:13px;'
            f'background:{bg};color:{fg};border:1px solid {border};white-space:pre-wrap">'
            f"{html.escape(text)}</div>")


class SQLConsole(Viewer):
    """Read-only SQL over the store with results, a quick plot of two columns and CSV download.

    Queries run in a worker thread through ``runner`` (default: the store's read-only engine:
    SELECT only, no file access, a time limit); refusals and errors show in the page.

    Args (params):
        runner: ``(sql) -> DataFrame``, raising `revacnn.SQLError` for refused or failed queries.
        query: the text in the query box.

    Example:
        >>> console = SQLConsole(runner=data.sql)
        >>> await console.run("SELECT run_id, epoch, val_accuracy FROM epochs")
    """

    runner = param.Callable(default=None, allow_None=True)
    query = param.String(default=DEFAULT_QUERY)
    result = param.DataFrame(default=None, allow_None=True)
    error = param.String(default=None, allow_None=True)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._input = pn.widgets.TextAreaInput(
            value=self.query, rows=6, sizing_mode="stretch_width", css_classes=["rv-sql-input"],
            stylesheets=[_MONO_CSS], placeholder="SELECT … FROM epochs / layers / filters / events / timeline …",
        )
        self._input.link(self, value="query")
        self._run_btn = pn.widgets.Button(label="▶ Run query", color="primary", width=130,
                                          css_classes=["rv-sql-run"])
        self._run_btn.on_click(self._on_run)
        examples = []
        for i, (title, sql) in enumerate(EXAMPLE_QUERIES.items()):
            b = pn.widgets.Button(label=title, color="light", css_classes=["rv-sql-example", f"rv-sql-example-{i}"],
                                  description=sql, margin=(2, 4))
            b.on_click(partial(self._on_example, sql))
            examples.append(b)
        self._status = pn.pane.HTML(
            _status_html(f"Tables: {', '.join(TABLES)} and the view timeline. SELECT only; "
                         "queries cannot read files.", "info"),
            sizing_mode="stretch_width", css_classes=["rv-sql-status"])
        self._table = pn.widgets.Tabulator(
            pd.DataFrame(), pagination="local", page_size=12, disabled=True, show_index=False,
            sizing_mode="stretch_width", css_classes=["rv-sql-results"], height=420,
        )
        self._download = pn.widgets.FileDownload(
            callback=self._csv, filename="revacnn-query.csv", label="⬇ CSV", color="light",
            width=90, css_classes=["rv-sql-download"], disabled=True,
        )
        self._x = pn.widgets.Select(label="x", options=[], width=160, css_classes=["rv-sql-x"])
        self._y = pn.widgets.Select(label="y", options=[], width=160, css_classes=["rv-sql-y"])
        self._kind = pn.widgets.RadioButtonGroup(options=["points", "lines"], value="points", color="light")
        self._plot_src = ColumnDataSource({"x": [], "y": [], "group": []})
        self._line_src = ColumnDataSource({"xs": [], "ys": []})
        self._xr, self._yr = Range1d(0, 1), Range1d(0, 1)
        fig = make_figure("Quick plot", "", height=300, x_label="", x_range=self._xr, y_range=self._yr)
        fig.scatter("x", "y", source=self._plot_src, size=6, color=ACCENT, alpha=0.7)
        fig.multi_line("xs", "ys", source=self._line_src, color=ACCENT, line_width=1.5, alpha=0.8)
        fig.add_tools(HoverTool(tooltips=[("x", "@x"), ("y", "@y")]))
        self._fig = fig
        for w in (self._x, self._y, self._kind):
            w.param.watch(self._replot, "value")
        self._layout = pn.Column(
            pn.pane.HTML("<b>Example queries</b> <span style='color:var(--rv-muted);font-size:12px'>"
                         "(one click loads and runs)</span>", margin=(0, 4)),
            pn.FlexBox(*examples, sizing_mode="stretch_width"),
            self._input,
            pn.Row(self._run_btn, self._download),
            self._status,
            pn.Row(
                pn.Column(self._table, sizing_mode="stretch_width"),
                pn.Column(pn.Row(self._x, self._y), self._kind, pn.pane.Bokeh(fig, sizing_mode="stretch_width"),
                          width=440),
                sizing_mode="stretch_width",
            ),
            sizing_mode="stretch_width", css_classes=["rv-sql-console"],
        )

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

    async def _on_example(self, sql: str, _: Any) -> None:
        self._input.value = sql
        await self.run(sql)

    async def _on_run(self, _: Any) -> None:
        await self.run()

    def run_sync(self, sql: str | None = None) -> pd.DataFrame | None:
        """Run ``sql`` (default: the query box) now, in this thread; show rows or the error."""
        q = self.query if sql is None else sql
        t0 = time.perf_counter()
        try:
            df = self._execute(q)
        except Exception as exc:  # noqa: BLE001 - every failure is shown, none raised
            self._show_error(exc)
            return None
        self._show_result(df, time.perf_counter() - t0)
        return df

    def _execute(self, q: str) -> pd.DataFrame:
        if self.runner is None:
            raise RevacnnError("No store to query.")
        return self.runner(q)

    async def run(self, sql: str | None = None) -> pd.DataFrame | None:
        """Run ``sql`` (default: the query box) in a worker thread; show rows or the error."""
        q = self.query if sql is None else sql
        self._run_btn.loading = True
        t0 = time.perf_counter()
        try:
            df = await asyncio.to_thread(self._execute, q)
        except Exception as exc:  # noqa: BLE001
            err = exc
            await run_locked(lambda: self._show_error(err))
            return None
        finally:
            self._run_btn.loading = False
        seconds = time.perf_counter() - t0
        await run_locked(lambda: self._show_result(df, seconds))
        return df

    def _show_error(self, exc: BaseException) -> None:
        msg = str(exc) if isinstance(exc, RevacnnError) else f"{type(exc).__name__}: {exc}"
        self.error = msg
        self.result = None
        self._status.object = _status_html(msg, "error")
        self._table.value = pd.DataFrame()
        self._download.disabled = True
        self._x.options, self._y.options = [], []
        self._replot()

    def _show_result(self, df: pd.DataFrame, seconds: float) -> None:
        self.error = None
        self.result = df
        shown = df.head(MAX_TABLE_ROWS)
        note = f" (table shows the first {MAX_TABLE_ROWS:,}; the CSV has all)" if len(df) > MAX_TABLE_ROWS else ""
        self._table.value = _displayable(shown)  # the rows first, then the line that counts them
        self._status.object = _status_html(
            f"{len(df):,} row{'s' if len(df) != 1 else ''} × {len(df.columns)} column"
            f"{'s' if len(df.columns) != 1 else ''} in {1000 * seconds:.0f} ms{note}", "ok")
        self._download.disabled = False
        cols = list(df.columns)
        numeric = [c for c in cols if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
        self._x.options = cols
        self._y.options = numeric or cols
        if cols:
            self._x.value = "epoch" if "epoch" in cols else cols[0]
        if numeric:
            pref = [c for c in numeric if c not in ("epoch", self._x.value)]
            self._y.value = pref[0] if pref else numeric[0]
        self._replot()

    def _csv(self) -> io.StringIO:
        buf = io.StringIO()
        if self.result is not None:
            self.result.to_csv(buf, index=False)
        buf.seek(0)
        return buf

    def _replot(self, *_: Any) -> None:
        df = self.result
        x, y = self._x.value, self._y.value
        if df is None or x not in getattr(df, "columns", []) or y not in df.columns:
            self._plot_src.data = {"x": [], "y": [], "group": []}
            self._line_src.data = {"xs": [], "ys": []}
            return
        xv = df[x]
        if not pd.api.types.is_numeric_dtype(xv):
            cats = list(dict.fromkeys(xv.astype(str)))
            xv = xv.astype(str).map({c: i for i, c in enumerate(cats)})
            self._fig.xaxis.axis_label = f"{x} (categories in order of appearance)"
        else:
            self._fig.xaxis.axis_label = x
        self._fig.yaxis.axis_label = y
        yv = pd.to_numeric(df[y], errors="coerce")
        xs = pd.to_numeric(xv, errors="coerce").to_numpy(np.float64)
        ys = yv.to_numpy(np.float64)
        self._plot_src.data = {"x": xs, "y": ys, "group": [""] * len(xs)}
        for rng, v in ((self._xr, xs), (self._yr, ys)):
            v = v[np.isfinite(v)]
            if len(v):
                lo, hi = float(v.min()), float(v.max())
                pad = (hi - lo) * 0.06 or max(abs(hi) * 0.1, 0.5)
                rng.start, rng.end = lo - pad, hi + pad
        if self._kind.value == "lines":
            group = "run_id" if "run_id" in df.columns and x != "run_id" else None
            lx, ly = [], []
            if group:
                for _g, idx in df.groupby(group, sort=False).groups.items():
                    order = np.argsort(xs[np.asarray([df.index.get_loc(i) for i in idx])])
                    pos = np.asarray([df.index.get_loc(i) for i in idx])[order]
                    lx.append(xs[pos])
                    ly.append(ys[pos])
            else:
                order = np.argsort(xs)
                lx, ly = [xs[order]], [ys[order]]
            self._line_src.data = {"xs": lx, "ys": ly}
        else:
            self._line_src.data = {"xs": [], "ys": []}


def _displayable(df: pd.DataFrame) -> pd.DataFrame:
    """A copy Tabulator can show: timestamps as text, long text shortened."""
    out = df.copy()
    for c in out.columns:
        s = out[c]
        if pd.api.types.is_datetime64_any_dtype(s):
            out[c] = s.astype(str)
        elif s.dtype == object:
            out[c] = s.map(lambda v: v if not isinstance(v, str) or len(v) < 300 else v[:297] + "…")
    out.columns = [str(c) for c in out.columns]
    return out
