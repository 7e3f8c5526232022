"""The replay app: pick a run, scrub its recorded timeline, compare forks side by side, ask SQL."""

from __future__ import annotations

import asyncio
import html
import logging
import time
from typing import Any

import numpy as np
import panel as pn
import param
from panel.viewable import Viewer

from ..errors import RevacnnError
from .data import MEASURES, NetworkFrame, ReplayData, RunBundle
from .theme import MEASURE_LABELS, PAGE_CSS, make_template, status_badge
from .views._component import run_locked
from .views.compare import CompareView, default_pair
from .views.curves import CurvesView
from .views.doctor import DoctorForks, DoctorPanel
from .views.embedding import EmbeddingView
from .views.events import EventLog
from .views.filter_detail import FilterDetail
from .views.network import NetworkView, prerender
from .views.patterns import PatternIndicators
from .views.player import EpochPlayer
from .views.probes import ProbeChooser
from .views.runs import RunPicker
from .views.sql import SQLConsole

log = logging.getLogger("revacnn.ui")

#: Milliseconds between two checks of the store watcher by each browser session.
POLL_MS = 1000

TAB_NAMES = ("Network", "Embedding", "Curves", "Compare", "Events", "SQL")
#: Tabs whose views are built the first time they are shown (a faster first page).
LAZY_TABS = TAB_NAMES[1:]


def _message_html(text: str, kind: str = "info", css: str = "") -> str:
    colors = {"info": ("#eff6ff", "#1e3a8a", "#93c5fd"), "warn": ("#fffbeb", "#92400e", "#fcd34d"),
              "error": ("#fef2f2", "#991b1b", "#fca5a5"), "live": ("#ecfdf5", "#065f46", "#6ee7b7")}
    bg, fg, border = colors[kind]
    return (f'<div class="rv-message rv-message-{kind} {css}" style="padding:10px 14px;border-radius:8px;'
            f'font-size:13.5px;background:{bg};color:{fg};border:1px solid {border}">{text}</div>')


def _fmt(v: Any, pct: bool = False, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "–"
    if pct:
        return f"{100 * f:.1f}%"
    return f"{f:.3f}{unit}" if abs(f) < 100 else f"{f:.0f}{unit}"


class ReplayApp(Viewer):
    """The replay app's state and views over one store (one instance per browser session).

    Parameters ``run_id``, ``epoch``, ``probe``, ``measure`` and ``selected`` hold what is shown;
    every view follows them. Loading happens in worker threads (`ReplayData`), drawing on the
    event loop. `show_sync` does both in the calling thread (tests and benchmarks).

    Example:
        >>> app = ReplayApp("store")
        >>> app.show_sync(run_id, 3)          # pick a run and an epoch without a browser
        >>> app.network.render_data()["epoch"]
        3
    """

    run_id = param.String(default=None, allow_None=True)
    epoch = param.Integer(default=None, allow_None=True)
    probe = param.Integer(default=0, bounds=(0, None))
    measure = param.Selector(default="grad_l1", objects=list(MEASURES))
    selected = param.Tuple(default=None, allow_None=True, length=2)

    def __init__(self, store_path: str, *, lazy: bool | None = None, **params: Any) -> None:
        super().__init__(**params)
        self.data = ReplayData.shared(store_path)
        #: Show a run first from its light bundle (no ``filters`` rows) and read the rest in a
        #: thread afterwards (default: inside a served session; `complete` finishes it elsewhere).
        self.lazy = _in_session() if lazy is None else bool(lazy)
        self.bundle: RunBundle | None = None
        self.frame: NetworkFrame | None = None
        self._gen = 0
        self._version = -1
        self._busy = False
        self._sql_started = False
        self._starting = True
        self._active_tab = TAB_NAMES[0]
        self._stale: set[str] = set()
        self._complete_rid = ""
        #: Redraw hidden views on every epoch too (benchmarks: "rebuild every view").
        self.eager = False
        self.picker = RunPicker()
        self.player = EpochPlayer()
        self.probes = ProbeChooser()
        self.network = NetworkView(width_per_layer=250)
        self.patterns = PatternIndicators()
        self.detail = FilterDetail(kernel_loader=self._kernel)
        self.doctor = DoctorPanel(action="fork the run at this epoch with this fix")
        self.doctor_forks = DoctorForks(self.doctor, str(self.data.path))
        self.doctor_fork = self.doctor_forks.note
        self.doctor.param.watch(self._on_doctor, "request")
        self._views: dict[str, Any] = {}
        self._pair: tuple[str | None, str | None] = (None, None)
        self._tab_cols = {name: pn.Column(sizing_mode="stretch_width", css_classes=[f"rv-tab-{name.lower()}"])
                          for name in LAZY_TABS}
        self.header = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["rv-run-header"],
                                   stylesheets=[PAGE_CSS])
        self.message = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["rv-page-message"],
                                    visible=False)
        self._measure_w = pn.widgets.RadioButtonGroup(
            options={MEASURE_LABELS[m]: m for m in MEASURES}, value=self.measure, color="light",
            orientation="vertical", sizing_mode="stretch_width", css_classes=["rv-measure"])
        self._weights_w = pn.widgets.Checkbox(label="first-layer weights as RGB pictures", value=True,
                                              css_classes=["rv-show-weights"])
        self._measure_w.link(self, value="measure")
        self._weights_w.link(self.network, value="show_weights")
        self.tabs = pn.Tabs(
            ("Network", pn.Column(
                self.probes, self.network,
                pn.Row(pn.Column(pn.pane.HTML("<b>Filter detail</b>"), self.detail, sizing_mode="stretch_width"),
                       pn.Column(pn.pane.HTML("<b>Pattern indicators</b>"), self.patterns, width=400),
                       sizing_mode="stretch_width"),
                pn.pane.HTML("<b>Doctor</b> <span style='color:var(--rv-muted);font-size:11px'>findings "
                             "at this epoch; a fix gives the fork that applies it</span>"),
                self.doctor, self.doctor_fork,
                sizing_mode="stretch_width", css_classes=["rv-tab-network"])),
            *((name, self._tab_cols[name]) for name in LAZY_TABS),
            dynamic=False, sizing_mode="stretch_width", css_classes=["rv-tabs"],
        )
        self.tabs.param.watch(self._on_tab, "active")
        self.main = pn.Column(self.header, self.player, self.message, self.tabs, sizing_mode="stretch_width",
                              css_classes=["rv-main"])
        # wiring
        self.picker.param.watch(lambda e: setattr(self, "run_id", e.new), "value")
        self.player.param.watch(self._on_player, "value")
        self.probes.param.watch(lambda e: setattr(self, "probe", e.new), "value")
        self.network.param.watch(lambda e: setattr(self, "selected", e.new), "selected")
        self.param.watch(self._on_run, "run_id")
        self.param.watch(self._on_probe, "probe")
        self.param.watch(self._on_measure, "measure")
        self.param.watch(self._on_selected, "selected")
        try:
            self._start()
        finally:
            self._starting = False

    # ------------------------------------------------------------------ lazily built views
    @property
    def embedding(self) -> EmbeddingView:
        """The embedding view (built on first use)."""
        return self._view("Embedding")

    @property
    def curves(self) -> CurvesView:
        """The curves view (built on first use)."""
        return self._view("Curves")

    @property
    def compare(self) -> CompareView:
        """The compare view (built on first use)."""
        return self._view("Compare")

    @property
    def events(self) -> EventLog:
        """The event log (built on first use)."""
        return self._view("Events")

    @property
    def sql(self) -> SQLConsole:
        """The SQL console (built on first use)."""
        return self._view("SQL")

    def build_all(self) -> None:
        """Build every lazily built view now and redraw hidden views on every epoch too (benchmarks)."""
        for name in LAZY_TABS:
            self._view(name)
        self.eager = True

    def _view(self, name: str) -> Any:
        view = self._views.get(name)
        if view is not None:
            return view
        if name == "Embedding":
            view = EmbeddingView(cloud=self.data.cloud)
            view.param.watch(lambda e: setattr(self, "selected", e.new), "selected")
        elif name == "Curves":
            view = CurvesView()
        elif name == "Compare":
            view = CompareView(self.data, rows=self.picker.rows, active=False)
        elif name == "Events":
            view = EventLog()
        elif name == "SQL":
            view = SQLConsole(runner=self.data.sql)
        else:  # pragma: no cover
            raise KeyError(name)
        self._views[name] = view
        with pn.io.hold():
            self._push_bundle(name)
            self._push_frame(name, force=True)
        self._tab_cols[name].objects = [view]
        return view

    def _built(self, name: str) -> Any:
        return self._views.get(name)

    def _push_bundle(self, name: str) -> None:
        """Give a built view the current run's data."""
        view, b = self._views.get(name), self.bundle
        if view is None:
            return
        if name == "Compare":
            view.rows = self.picker.rows
            view.param.update(run_a=self._pair[0], run_b=self._pair[1])
        if b is None:
            return
        inherited = b.fork_epoch if b.parent_run_id else None
        if name == "Embedding":
            view.history = b.filters
        elif name == "Curves":
            view.param.update(metrics=b.metrics, layers=b.layers, marks=b.marks, inherited_upto=inherited)
        elif name == "Events":
            view.events = b.events

    def _push_frame(self, name: str, force: bool = False) -> None:
        """Give a built view the current epoch's frame and choices.

        The embedding (the costliest to redraw) is only redrawn while its tab is shown, unless
        `eager` is set; it catches up when its tab opens.
        """
        view, f = self._views.get(name), self.frame
        if view is None:
            return
        if name == "Embedding" and not (force or self.eager or self._active_tab == "Embedding"):
            self._stale.add(name)
            return
        self._stale.discard(name)
        epoch = f.epoch if f is not None else None
        if name == "Embedding":
            view.param.update(frame=f, probe=self.probe, measure=self.measure, selected=self.selected)
        elif name == "Curves":
            view.epoch = epoch
        elif name == "Events":
            view.epoch = epoch
        elif name == "Compare":
            view.param.update(epoch=epoch, probe=self.probe, measure=self.measure)

    # ------------------------------------------------------------------ layout
    def __panel__(self) -> pn.viewable.Viewable:
        return self.main

    def sidebar(self) -> list[Any]:
        """What goes into the page's sidebar."""
        return [
            pn.pane.HTML("<b style='font-size:14px'>Runs</b>"),
            self.picker,
            pn.layout.Divider(),
            pn.pane.HTML("<b>Filter measure</b> <span style='color:var(--rv-muted);font-size:11px'>"
                         "(bars, circles)</span>"),
            self._measure_w,
            self._weights_w,
            pn.layout.Divider(),
            pn.pane.HTML(f"<div style='font-size:11px;color:var(--rv-muted);word-break:break-all'>store: "
                         f"{html.escape(str(self.data.path))}</div>"),
        ]

    # ------------------------------------------------------------------ start and polling
    def _start(self) -> None:
        problem = self.data.problem()
        if problem:
            self._show_message(f"<b>Cannot open the store.</b> {html.escape(problem)}", "error", "rv-store-message")
            self.tabs.visible = False
            self.player.visible = False
            self.picker.empty_message = problem
            return
        try:
            rows = self.data.tree()
        except Exception as exc:  # noqa: BLE001 - shown in the page
            self._show_message(f"<b>Cannot list the runs.</b> {html.escape(str(exc))}", "error", "rv-store-message")
            return
        self._version = self.data.version()
        self._set_rows(rows)
        if not self.picker.run_ids:
            self._empty_store()
            return
        args = _session_args()
        rid = args.get("run")
        if rid not in self.picker.run_ids:
            rid = self.picker.run_ids[-1]
        want = args.get("epoch")
        self._initial_epoch = int(want) if want is not None and want.lstrip("-").isdigit() else None
        self.run_id = rid

    def _empty_store(self) -> None:
        self._show_message(
            "<b>This store has no runs yet.</b> Record one, for example "
            f"<code>revacnn train --store {html.escape(str(self.data.path))} --epochs 5</code>, "
            "and it appears here by itself.", "info", "rv-empty-store")
        self.header.object = "<div style='font-size:20px;font-weight:700'>No runs yet</div>"
        self.player.visible = False
        self.tabs.visible = False

    def start_polling(self) -> None:
        """Check the store for new runs and epochs every `POLL_MS` (call inside a served session)."""
        if pn.state.curdoc is not None:
            pn.state.add_periodic_callback(self._poll, period=POLL_MS)

    def _poll(self) -> None:
        """The periodic check: cheap (an int compare); the refresh itself runs without the lock."""
        if self.doctor_forks.job is not None:
            self.doctor_forks.poll()
        try:
            version = self.data.version()
        except Exception:  # noqa: BLE001
            return
        if version == self._version or self._busy:
            return
        self._version = version
        pn.state.execute(self._refresh)

    async def _refresh(self) -> None:
        """Re-read the run list and the shown run after the store changed (new runs, epochs, events)."""
        try:
            if self.data.problem():
                return
            rows = await asyncio.to_thread(self.data.tree)
            await run_locked(lambda: self._set_rows(rows))
            if self.tabs.visible is False and self.picker.run_ids and self.run_id is None:

                def reveal() -> None:
                    self.message.visible = False
                    self.player.visible = True
                    self.tabs.visible = True
                    self.run_id = self.picker.run_ids[-1]

                await run_locked(reveal)
                return
            if self.run_id is None:
                return
            bundle = await asyncio.to_thread(self.data.bundle, self.run_id)
            if self.bundle is None or bundle.stamp[:3] != self.bundle.stamp[:3]:
                at_end = self.bundle is not None and self.epoch == (self.bundle.epochs or [None])[-1]
                await run_locked(lambda: self._apply_bundle(bundle))
                if at_end and bundle.epochs and bundle.epochs[-1] != self.epoch:
                    await run_locked(lambda: setattr(self.player, "value", bundle.epochs[-1]))
        except Exception:  # noqa: BLE001 - a poll must never break the page
            log.debug("poll failed", exc_info=True)

    def _set_rows(self, rows: list[dict[str, Any]]) -> None:
        self.picker.rows = rows
        if "Compare" in self._views:
            self._views["Compare"].rows = rows

    # ------------------------------------------------------------------ run
    def _on_run(self, event: Any) -> None:
        self.picker.value = self.run_id
        if self.run_id is None:
            return
        if self._starting or pn.state.curdoc is None or pn.state.curdoc.session_context is None:
            self._load_run_sync()  # the first page shows the run at once, without a flash of empty views
        else:
            pn.state.execute(self._load_run_async)

    def _load_run_sync(self) -> None:
        try:
            bundle = self.data.bundle(self.run_id, light=self.lazy)
        except Exception as exc:  # noqa: BLE001
            self._run_failed(exc)
            return
        self._apply_bundle(bundle, choose_epoch=True)
        f = self.frame
        if f is None or f.run_id != bundle.run_id or f.epoch != self.epoch:
            self._show_sync()
        if bundle.partial and _in_session():
            # the rest (every epoch's filters rows) after the page is shown, read in a thread
            self._complete_rid = bundle.run_id
            pn.state.onload(self._complete_onload)

    async def _load_run_async(self) -> None:
        self._gen += 1
        gen = self._gen
        rid = self.run_id
        try:
            bundle = await asyncio.to_thread(self.data.bundle, rid, light=self.lazy)
        except Exception as exc:  # noqa: BLE001
            err = exc
            await run_locked(lambda: self._run_failed(err))
            return
        if gen != self._gen or rid != self.run_id:
            return
        await run_locked(lambda: self._apply_bundle(bundle, choose_epoch=True))
        await self._show_async()
        if bundle.partial:
            await self._complete_async(rid)

    @property
    def complete_bundle(self) -> bool:
        """Whether the shown run's bundle is the full one (its ``filters`` rows read)."""
        return self.bundle is not None and not self.bundle.partial

    def complete(self) -> None:
        """Replace a partial (first-paint) bundle by the full one now, in the calling thread."""
        if self.bundle is None or not self.bundle.partial:
            return
        self._apply_bundle(self.data.bundle(self.bundle.run_id))
        self._show_sync()

    async def _complete_onload(self) -> None:
        await self._complete_async(self._complete_rid)

    async def _complete_async(self, rid: str) -> None:
        """Read the full bundle in a thread and show it (the measures and histories arrive)."""
        if self.bundle is None or not self.bundle.partial or self.bundle.run_id != rid:
            return
        try:
            bundle = await asyncio.to_thread(self.data.bundle, rid)
        except Exception:  # noqa: BLE001 - the page keeps its first paint
            log.debug("full bundle failed", exc_info=True)
            return
        if self.bundle is None or not self.bundle.partial or self.bundle.run_id != rid:
            return
        await run_locked(lambda: self._apply_bundle(bundle))
        await self._show_async()

    def _run_failed(self, exc: BaseException) -> None:
        text = str(exc) if isinstance(exc, RevacnnError) else f"{type(exc).__name__}: {exc}"
        self._show_message(f"<b>Cannot read run {html.escape(str(self.run_id))}.</b> {html.escape(text)}", "error",
                           "rv-run-error")

    def _apply_bundle(self, bundle: RunBundle, choose_epoch: bool = False) -> None:
        self.bundle = bundle
        inherited = bundle.fork_epoch if bundle.parent_run_id else None
        epochs = bundle.epochs
        with pn.io.hold():
            self.probes.param.update(images=bundle.probe_images, labels=bundle.probe_labels,
                                     class_names=bundle.class_names)
            self.patterns.layers = bundle.layers
            self.detail.history = bundle.filters
            self.doctor.diagnoses = bundle.diagnoses
            self.doctor_forks.refresh_handled(bundle.run_id)
            if choose_epoch:
                self._pair = default_pair(self.picker.rows, bundle.run_id)
            for name in LAZY_TABS:
                self._push_bundle(name)
            caption = ""
            if bundle.parent_run_id:
                caption = f"fork of {bundle.parent_run_id[-6:]} at epoch {bundle.fork_epoch}"
            self.player.param.update(epochs=epochs, marks=bundle.marks, inherited_upto=inherited, caption=caption)
            if choose_epoch:
                want = getattr(self, "_initial_epoch", None)
                self._initial_epoch = None
                if want in epochs:
                    epoch = want
                elif self.epoch in epochs:
                    epoch = self.epoch
                else:
                    epoch = epochs[-1] if epochs else None
                self.selected = None
                self.param.update(epoch=epoch)
                if epoch is not None:
                    self.player.value = epoch
            self._run_messages(bundle)

    def _run_messages(self, bundle: RunBundle) -> None:
        msgs = []
        if not bundle.epochs:
            msgs.append(_message_html(
                f"<b>Run {html.escape(bundle.label)} has no committed epoch yet.</b> "
                + ("It is still being written: epochs appear here as they are committed."
                   if bundle.status == "running" else f"Its status is {html.escape(bundle.status)}."),
                "warn", "rv-no-epochs"))
        elif len(bundle.epochs) == 1:
            msgs.append(_message_html(
                f"<b>This run has a single recorded epoch (epoch {bundle.epochs[0]}).</b> "
                "There is nothing to play yet: the views show that one state.", "info", "rv-single-epoch"))
        if bundle.status == "running":
            msgs.append(_message_html(
                "<b>This run is still being written.</b> New epochs appear on the player as they are "
                "committed; stay on the last epoch to follow them.", "live", "rv-running"))
        elif bundle.status in ("interrupted", "failed"):
            msgs.append(_message_html(
                f"This run is <b>{html.escape(bundle.status)}</b>: it shows the epochs committed before it "
                "stopped" + (" (continue it with <code>revacnn resume</code>)." if bundle.status == "interrupted"
                             else "."), "warn", "rv-stopped"))
        self.message.object = "".join(msgs)
        self.message.visible = bool(msgs)

    def _show_message(self, text: str, kind: str, css: str = "") -> None:
        self.message.object = _message_html(text, kind, css)
        self.message.visible = True

    # ------------------------------------------------------------------ epoch
    def _on_player(self, event: Any) -> None:
        if event.new == self.epoch:
            self.player.shown = self.epoch
            return
        self.epoch = event.new
        if self._starting or pn.state.curdoc is None or pn.state.curdoc.session_context is None:
            self._show_sync()
        else:
            pn.state.execute(self._show_async)

    def goto(self, epoch: int) -> None:
        """Show ``epoch`` of the current run (as if the player moved there)."""
        self.player.value = epoch

    def _show_sync(self) -> None:
        if self.bundle is None or self.epoch is None:
            self._apply_frame(NetworkFrame.empty("This run has no committed epoch yet."))
            return
        # a first paint from a partial bundle leaves the neighbours' prefetch to the full one
        self._apply_frame(self.data.frame(self.bundle, self.epoch, prefetch=not self.bundle.partial))

    async def _show_async(self) -> None:
        if self.bundle is None or self.epoch is None:
            await run_locked(lambda: self._apply_frame(NetworkFrame.empty("This run has no committed epoch yet.")))
            return
        self._gen += 1
        gen = self._gen
        bundle, epoch = self.bundle, self.epoch
        self._busy = True
        probe, width = self.probe, self.network.width_per_layer
        try:
            frame = await self.data.aframe(bundle, epoch)
            # the sprites too, in the worker: the event loop only looks them up
            await asyncio.to_thread(_prerender, frame, probe, width)
        except Exception as exc:  # noqa: BLE001
            frame = NetworkFrame.empty(f"Cannot read epoch {epoch}: {exc}")
        finally:
            self._busy = False
        if gen != self._gen or bundle is not self.bundle:
            return
        await run_locked(lambda: self._apply_frame(frame) if gen == self._gen else None)
        if not bundle.partial:
            self._warm(bundle, epoch, probe, width)

    def _warm(self, bundle: RunBundle, epoch: int, probe: int, width: int) -> None:
        """Build the next and previous epochs' frames and sprites in the prefetch thread (after
        their arrays are read there), so that the player's next step finds them ready."""
        eps = bundle.epochs
        if epoch not in eps:
            return
        i = eps.index(epoch)
        for j in (i + 1, i - 1):
            if 0 <= j < len(eps):
                e = eps[j]
                self.data.background(lambda e=e: _prerender(self.data.frame(bundle, e, prefetch=False), probe, width))

    def show_sync(self, run_id: str, epoch: int | None = None) -> float:
        """Show ``run_id`` at ``epoch`` synchronously and return the seconds the epoch switch took.

        The time covers reading the epoch's arrays (unless cached) and rebuilding every view.
        """
        if run_id != self.run_id or self.bundle is None:
            self.run_id = run_id
        t0 = time.perf_counter()
        if epoch is not None and epoch != self.epoch:
            self.epoch = epoch
            self.player.value = epoch
            self._show_sync()
        return time.perf_counter() - t0

    def _apply_frame(self, frame: NetworkFrame) -> None:
        self.frame = frame
        with pn.io.hold():
            b = self.bundle
            touched = b.touched(frame.epoch) if b is not None and frame.run_id == b.run_id else {}
            if self.doctor.epoch != frame.epoch:
                self.doctor_fork.visible = False
            self.doctor.epoch = frame.epoch
            # one network redraw per switch: the frame and this epoch's findings together
            self.network.param.update(frame=frame, probe=min(self.probe, max(frame.n_probes - 1, 0)),
                                      measure=self.measure, touched=touched, findings=self.doctor.recorded_rows())
            self.probes.probabilities = frame.probabilities
            self.detail.param.update(frame=frame, probe=self.probe)
            self.patterns.epoch = frame.epoch
            for name in LAZY_TABS:
                self._push_frame(name)
            self._header(frame)
            self.player.shown = frame.epoch

    def _header(self, frame: NetworkFrame) -> None:
        b = self.bundle
        if b is None:
            return
        m = frame.metrics or {}
        lineage = ""
        if b.parent_run_id:
            lineage = (f" · fork of <code>{html.escape(b.parent_run_id)}</code> at epoch {b.fork_epoch}")
        src = ""
        if frame.source_run_id and frame.source_run_id != b.run_id:
            src = (" <span style='color:var(--rv-muted);font-size:12px'>(this epoch was recorded by the parent "
                   f"run {html.escape(frame.source_run_id[-6:])})</span>")
        stats = "".join(
            f"<div class='rv-stat'><b class='rv-stat-{k}'>{v}</b><span>{label}</span></div>"
            for k, v, label in (
                ("epoch", "–" if frame.epoch is None else frame.epoch, "epoch"),
                ("val-acc", _fmt(m.get("val_accuracy"), pct=True), "val accuracy"),
                ("acc", _fmt(m.get("accuracy"), pct=True), "train accuracy"),
                ("loss", _fmt(m.get("val_loss")), "val loss"),
                ("time", _fmt(m.get("cumulative_time_s"), unit=" s"), "training time"),
            )
        )
        self.header.object = (
            f"<div class='rv-title-bar' data-run='{html.escape(b.run_id)}' data-epoch='{frame.epoch}'>"
            f"<div><div style='font-size:20px;font-weight:700'>{html.escape(b.label)} {status_badge(b.status)}</div>"
            f"<div style='font-size:12px;color:var(--rv-muted)'><code>{html.escape(b.run_id)}</code>{lineage}{src}</div>"
            f"</div><div style='display:flex;gap:6px;margin-left:auto'>{stats}</div></div>"
        )

    # ------------------------------------------------------------------ other state
    def _on_probe(self, event: Any) -> None:
        with pn.io.hold():
            self.probes.value = self.probe
            self.network.probe = self.probe
            self.detail.probe = self.probe
            self._push_frame("Embedding")
            if "Compare" in self._views:
                self._views["Compare"].probe = self.probe

    def _on_measure(self, event: Any) -> None:
        with pn.io.hold():
            self.network.measure = self.measure
            self._push_frame("Embedding")
            if "Compare" in self._views:
                self._views["Compare"].measure = self.measure
            if self._measure_w.value != self.measure:
                self._measure_w.value = self.measure

    def _on_selected(self, event: Any) -> None:
        self.network.selected = self.selected
        self.detail.selected = self.selected
        self._push_frame("Embedding")

    def _on_tab(self, event: Any) -> None:
        name = TAB_NAMES[event.new]
        self._active_tab = name
        if name in LAZY_TABS:
            self._view(name)
        if name in self._stale:
            self._push_frame(name, force=True)
        if "Compare" in self._views:
            self._views["Compare"].active = name == "Compare"
        if name == "SQL" and self.sql.result is None and self.sql.error is None and not self._sql_started:
            self._sql_started = True
            pn.state.execute(self.sql.run)

    def _on_doctor(self, event: Any) -> None:
        """A click on a finding's fix: start ``revacnn fork`` at this epoch with it (and show the line)."""
        req, b = event.new, self.bundle
        if not req or b is None or self.epoch is None:
            return
        self.doctor_forks.click(b.run_id, self.epoch, req)

    def _kernel(self, layer: str) -> np.ndarray | None:
        if self.bundle is None or self.epoch is None:
            return None
        return self.data.kernel(self.bundle, self.epoch, layer)


def _prerender(frame: NetworkFrame, probe: int, width: int) -> None:
    """`prerender` the network view's sprites of ``frame`` (a failure only logs: drawing retries)."""
    try:
        prerender(frame, probe, width)
    except Exception:  # noqa: BLE001 - the view renders (and reports) it again when it draws
        log.debug("prerender failed", exc_info=True)


def _in_session() -> bool:
    """Whether this runs inside a served Panel session (a browser page)."""
    doc = pn.state.curdoc
    return doc is not None and getattr(doc, "session_context", None) is not None


def _session_args() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        for k, v in (pn.state.session_args or {}).items():
            val = v[0] if isinstance(v, list) and v else v
            out[k] = val.decode() if isinstance(val, bytes) else str(val)
    except Exception:  # noqa: BLE001 - outside a session
        pass
    return out


def create_replay_app(store_path: str, *, lazy: bool | None = None) -> pn.viewable.Viewable:
    """Build the replay app for one browser session.

    Args:
        store_path: the store's folder.
        lazy: first paint from the run's light bundle, the rest read afterwards (see
            `ReplayApp`; default: inside a served session).

    Returns:
        A servable page (a FastListTemplate): run picker in the sidebar; epoch player and the
        network, embedding, curves, compare, events and SQL views in the main area. A missing
        or empty store shows a message instead of failing.

    Example:
        >>> pn.serve({"replay": lambda: create_replay_app("store")})
    """
    pn.extension("tabulator")  # the SQL tab is built on demand: load its table's JavaScript up front
    app = ReplayApp(store_path, lazy=lazy)
    app.start_polling()
    tpl = make_template("revacnn · replay", sidebar=app.sidebar(), main=[app])
    tpl.replay_app = app  # type: ignore[attr-defined]  # for tests and notebooks
    return tpl
