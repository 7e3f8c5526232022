"""Compare two runs side by side at the same epoch, with their curves overlaid."""

from __future__ import annotations

import asyncio
import html
from typing import Any

import numpy as np
import pandas as pd
import panel as pn
import param
from bokeh.models import ColumnDataSource, HoverTool, Range1d
from panel.viewable import Viewer

from ..data import NetworkFrame, ReplayData, RunBundle
from ..theme import RUN_COLORS
from ._component import run_locked
from ._plots import EpochOverlays, column, fit_range, make_figure
from .network import NetworkView

_METRICS = (
    ("val_accuracy", "Validation accuracy", "accuracy"),
    ("val_loss", "Validation loss", "cross-entropy"),
    ("cumulative_time_s", "Cumulative training time", "seconds"),
)


def default_pair(rows: list[dict[str, Any]], run_id: str | None) -> tuple[str | None, str | None]:
    """The natural pair to compare with ``run_id``: its parent, else its first fork, else itself.

    Example:
        >>> default_pair(data.tree(), fork_id)
        ('run-…-parent', 'run-…-fork')
    """
    runs = [r for r in rows if r.get("kind") == "run"]
    by_id = {r["run_id"]: r for r in runs}
    if run_id is None or run_id not in by_id:
        return (runs[0]["run_id"], runs[1]["run_id"]) if len(runs) > 1 else (
            (runs[0]["run_id"], runs[0]["run_id"]) if runs else (None, None))
    r = by_id[run_id]
    if r.get("parent_run_id") in by_id:
        return r["parent_run_id"], run_id
    kids = [k for k in runs if k.get("parent_run_id") == run_id]
    if kids:
        return run_id, kids[0]["run_id"]
    same = [k for k in runs if k["session_id"] == r["session_id"] and k["run_id"] != run_id]
    return run_id, (same[0]["run_id"] if same else run_id)


class CompareView(Viewer):
    """Two runs (typically a parent and its fork) side by side at the same epoch.

    Top: a summary of both runs at the shown epoch and at their last epoch. Middle: validation
    accuracy, validation loss and cumulative training time of both runs overlaid (run A blue,
    run B orange; dashed purple lines at fork points). Bottom: the two network views at the
    shown epoch for the same probe.

    Example:
        >>> cmp = CompareView(data=ReplayData.shared("store"), rows=data.tree())
        >>> cmp.param.update(run_a=parent_id, run_b=fork_id, epoch=3)
        >>> cmp.update_sync()
    """

    rows = param.List(default=[], doc="Rows of ReplayData.tree().")
    run_a = param.String(default=None, allow_None=True)
    run_b = param.String(default=None, allow_None=True)
    epoch = param.Integer(default=None, allow_None=True)
    probe = param.Integer(default=0, bounds=(0, None))
    measure = param.String(default="grad_l1")
    active = param.Boolean(default=True, doc="Load frames only while shown.")

    def __init__(self, data: ReplayData, **params: Any) -> None:
        super().__init__(**params)
        self.data = data
        self._bundles: dict[str, RunBundle | None] = {"a": None, "b": None}
        self._frames: dict[str, NetworkFrame | None] = {"a": None, "b": None}
        self._dirty = True
        self._gen = 0
        self._sel_a = pn.widgets.Select(label="Run A", options={}, width=320, css_classes=["rv-compare-a"])
        self._sel_b = pn.widgets.Select(label="Run B", options={}, width=320, css_classes=["rv-compare-b"])
        self._sel_a.link(self, value="run_a")
        self._sel_b.link(self, value="run_b")
        self._summary = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["rv-compare-summary"])
        self.x_range = Range1d(-0.5, 1.5)
        self.overlays = EpochOverlays()
        self._src = {k: ColumnDataSource({"epoch": [], **{m: [] for m, _, _ in _METRICS}}) for k in "ab"}
        figs = []
        self._y = {m: Range1d(0, 1) for m, _, _ in _METRICS}
        for metric, title, ylab in _METRICS:
            f = make_figure(title, ylab, height=220, x_range=self.x_range, y_range=self._y[metric])
            self.overlays.attach(f)
            rs = []
            for k, color, dash in (("a", RUN_COLORS[0], "solid"), ("b", RUN_COLORS[1], "solid")):
                r = f.line("epoch", metric, source=self._src[k], color=color, line_width=2.2, line_dash=dash,
                           legend_label=f"run {k.upper()}")
                f.scatter("epoch", metric, source=self._src[k], color=color, size=5)
                rs.append(r)
            f.add_tools(HoverTool(renderers=rs, tooltips=[("epoch", "@epoch"), (metric, f"@{metric}{{0.000}}")]))
            f.legend.location = "bottom_right" if metric == "val_accuracy" else "top_right"
            f.legend.label_text_font_size = "10.5px"
            f.legend.background_fill_alpha = 0.6
            f.legend.click_policy = "hide"
            figs.append(f)
        self.figures = figs
        self.net_a = NetworkView(width_per_layer=150, show_weights=False, compact=True)
        self.net_b = NetworkView(width_per_layer=150, show_weights=False, compact=True)
        self._title_a = pn.pane.HTML("", css_classes=["rv-compare-title-a"])
        self._title_b = pn.pane.HTML("", css_classes=["rv-compare-title-b"])
        self._layout = pn.Column(
            pn.Row(self._sel_a, self._sel_b),
            self._summary,
            pn.GridBox(*(pn.pane.Bokeh(f, sizing_mode="stretch_width") for f in figs), ncols=3,
                       sizing_mode="stretch_width"),
            pn.Row(
                pn.Column(self._title_a, self.net_a, sizing_mode="stretch_width", css_classes=["rv-compare-side-a"]),
                pn.Column(self._title_b, self.net_b, sizing_mode="stretch_width", css_classes=["rv-compare-side-b"]),
                sizing_mode="stretch_width",
            ),
            sizing_mode="stretch_width", css_classes=["rv-compare"],
        )
        self.param.watch(self._on_rows, ["rows"])
        self.param.watch(self._on_change, ["run_a", "run_b", "epoch", "probe", "measure", "active"])
        self._on_rows()

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

    # ------------------------------------------------------------------ wiring
    def _on_rows(self, *_: Any) -> None:
        opts = {}
        for r in self.rows:
            if r.get("kind") != "run":
                continue
            label = f"{'↳ ' * min(r['depth'], 1)}{r.get('name') or r['run_id']} · {r['run_id'][-6:]}"
            opts[label] = r["run_id"]
        self._sel_a.options = opts
        self._sel_b.options = opts
        if self.run_a in opts.values():
            self._sel_a.value = self.run_a
        if self.run_b in opts.values():
            self._sel_b.value = self.run_b

    def _on_change(self, *events: Any) -> None:
        names = {e.name for e in events}
        if "run_a" in names and self._sel_a.value != self.run_a:
            self._sel_a.value = self.run_a
        if "run_b" in names and self._sel_b.value != self.run_b:
            self._sel_b.value = self.run_b
        self._dirty = True
        if not self.active:
            return
        if names <= {"probe", "measure"}:
            self._apply_frames()
            return
        if pn.state.curdoc is not None and pn.state.curdoc.session_context is not None:
            pn.state.execute(self.update)
        else:
            self.update_sync()

    # ------------------------------------------------------------------ loading
    def _load(self) -> tuple[dict[str, RunBundle | None], dict[str, NetworkFrame | None], dict[str, str]]:
        bundles: dict[str, RunBundle | None] = {}
        frames: dict[str, NetworkFrame | None] = {}
        errors: dict[str, str] = {}
        for k, rid in (("a", self.run_a), ("b", self.run_b)):
            bundles[k], frames[k] = None, None
            if not rid:
                continue
            try:
                b = self.data.bundle(rid)
            except Exception as exc:  # noqa: BLE001 - shown in the page
                errors[k] = str(exc)
                continue
            bundles[k] = b
            if self.epoch is None:
                continue
            if self.epoch in b.epochs:
                frames[k] = self.data.frame(b, self.epoch, prefetch=False)
            else:
                span = f"{b.epochs[0]}–{b.epochs[-1]}" if b.epochs else "none"
                frames[k] = NetworkFrame.empty(f"{b.label} has no epoch {self.epoch} (its epochs: {span}).")
        return bundles, frames, errors

    def update_sync(self) -> None:
        """Load both runs and redraw now (in this thread)."""
        bundles, frames, errors = self._load()
        self._apply(bundles, frames, errors)

    async def update(self) -> None:
        """Load both runs in a worker thread and redraw."""
        self._gen += 1
        gen = self._gen
        bundles, frames, errors = await asyncio.to_thread(self._load)
        if gen == self._gen:
            await run_locked(lambda: self._apply(bundles, frames, errors) if gen == self._gen else None)

    # ------------------------------------------------------------------ drawing
    def _apply(self, bundles: dict[str, RunBundle | None], frames: dict[str, NetworkFrame | None],
               errors: dict[str, str]) -> None:
        same = all(bundles.get(k) is self._bundles.get(k) for k in "ab")
        self._bundles, self._frames = bundles, frames
        self._dirty = False
        self.overlays.set_epoch(self.epoch)
        self._summary.object = self._summary_html(bundles, errors)
        self._apply_frames()
        if not same or errors:
            self._apply_curves(bundles)

    def _apply_curves(self, bundles: dict[str, RunBundle | None]) -> None:
        lo, hi = np.inf, -np.inf
        for k in "ab":
            b = bundles.get(k)
            m = b.metrics if b is not None else pd.DataFrame({"epoch": []})
            ep = column(m, "epoch")
            self._src[k].data = {"epoch": ep, **{name: column(m, name) for name, _, _ in _METRICS}}
            if len(ep):
                lo, hi = min(lo, float(np.nanmin(ep))), max(hi, float(np.nanmax(ep)))
        if np.isfinite(lo):
            self.x_range.start, self.x_range.end = lo - 0.5, max(hi, lo + 1) + 0.5
        for name, _, _ in _METRICS:
            fit_range(self._y[name], self._src["a"].data[name], self._src["b"].data[name],
                      include_zero=name == "cumulative_time_s")
        marks = []
        for b in (bundles.get("a"), bundles.get("b")):
            if b is not None:
                marks += [m for m in b.marks if m["kind"] == "fork"]
        self.overlays.set_marks(marks)

    def _apply_frames(self) -> None:
        for k, view, title in (("a", self.net_a, self._title_a), ("b", self.net_b, self._title_b)):
            b, f = self._bundles.get(k), self._frames.get(k)
            color = RUN_COLORS[0] if k == "a" else RUN_COLORS[1]
            name = html.escape(b.label) if b is not None else "–"
            title.object = (f'<div style="font-weight:700;font-size:13px;border-left:4px solid {color};'
                            f'padding-left:8px">Run {k.upper()}: {name} '
                            f'<span style="font-weight:400;color:var(--rv-muted)">'
                            f'{"epoch " + str(self.epoch) if self.epoch is not None else ""}</span></div>')
            view.param.update(frame=f, probe=self.probe, measure=self.measure
                              if self.measure in view.param["measure"].objects else "grad_l1")

    def _summary_html(self, bundles: dict[str, RunBundle | None], errors: dict[str, str]) -> str:
        def val(b: RunBundle | None, epoch: int | None, col: str) -> float | None:
            if b is None or epoch is None:
                return None
            v = b.metrics_at(epoch).get(col)
            try:
                f = float(v)
            except (TypeError, ValueError):
                return None
            return f if np.isfinite(f) else None

        def fmt(v: float | None, pct: bool = False) -> str:
            if v is None:
                return "–"
            return f"{100 * v:.1f}%" if pct else f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"

        a, b = bundles.get("a"), bundles.get("b")
        rows = []
        for col, label, pct in (("val_accuracy", "val accuracy", True), ("val_loss", "val loss", False),
                                ("cumulative_time_s", "training time (s)", False)):
            va, vb = val(a, self.epoch, col), val(b, self.epoch, col)
            la = val(a, a.epochs[-1] if a is not None and a.epochs else None, col)
            lb = val(b, b.epochs[-1] if b is not None and b.epochs else None, col)
            diff = "–" if va is None or vb is None else (
                f"{100 * (vb - va):+.1f} pt" if pct else f"{vb - va:+.3f}")
            rows.append(f"<tr><td>{label}</td><td>{fmt(va, pct)}</td><td>{fmt(vb, pct)}</td><td><b>{diff}</b></td>"
                        f"<td>{fmt(la, pct)}</td><td>{fmt(lb, pct)}</td></tr>")
        err = "".join(f'<div class="rv-compare-error" style="color:#b91c1c">Run {k.upper()}: {html.escape(v)}</div>'
                      for k, v in errors.items())
        ep = self.epoch if self.epoch is not None else "–"
        style = ("border-collapse:collapse;font-size:12.5px;min-width:520px;"
                 "font-variant-numeric:tabular-nums")
        head = (f'<tr style="color:var(--rv-muted);text-align:left"><th></th>'
                f'<th style="color:{RUN_COLORS[0]}">A @ {ep}</th><th style="color:{RUN_COLORS[1]}">B @ {ep}</th>'
                f"<th>B − A</th><th>A last</th><th>B last</th></tr>")
        return (f'{err}<table class="rv-compare-table" style="{style}">{head}{"".join(rows)}</table>'
                .replace("<td>", '<td style="padding:3px 12px 3px 0">'))
