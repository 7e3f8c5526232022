"""The epoch player: a slider over a run's full history with play/pause/speed and marked events."""

from __future__ import annotations

from typing import Any

import panel as pn
import param
from panel.custom import JSComponent
from panel.viewable import Viewer

from ..theme import COMPONENT_CSS

_CSS = """
.rv-player { display:flex; align-items:center; gap:10px; padding:6px 4px; user-select:none; }
.rv-player button { font-size:13px; min-width:32px; height:30px; border-radius:6px; cursor:pointer;
  border:1px solid var(--rv-border); background:var(--rv-panel); color:var(--rv-fg); }
.rv-player button:hover { border-color: var(--rv-accent); }
.rv-player button.rv-play { min-width:64px; background:var(--rv-accent); color:#fff; border-color:var(--rv-accent); font-weight:600; }
.rv-player select { height:30px; border-radius:6px; border:1px solid var(--rv-border); background:var(--rv-panel);
  color:var(--rv-fg); }
.rv-track { position:relative; flex:1 1 auto; height:46px; min-width:160px; }
.rv-track input[type=range] { position:absolute; left:0; right:0; top:14px; width:100%; margin:0;
  -webkit-appearance:none; appearance:none; height:6px; border-radius:3px; background:var(--rv-border); outline:none; z-index:2; }
.rv-track input[type=range]::-webkit-slider-thumb { -webkit-appearance:none; width:16px; height:16px; border-radius:50%;
  background:var(--rv-accent); border:2px solid #fff; box-shadow:0 0 0 1px var(--rv-accent); cursor:pointer; }
.rv-track input[type=range]::-moz-range-thumb { width:16px; height:16px; border-radius:50%; background:var(--rv-accent); }
.rv-inherited { position:absolute; top:11px; height:12px; left:0; background:repeating-linear-gradient(45deg,
  rgba(148,163,184,.35) 0 4px, transparent 4px 8px); border-radius:3px; z-index:1; }
.rv-tick { position:absolute; top:24px; width:1px; height:5px; background:var(--rv-muted); transform:translateX(-0.5px); }
.rv-tick-label { position:absolute; top:29px; font-size:10px; color:var(--rv-muted); transform:translateX(-50%); }
.rv-mark { position:absolute; top:0; transform:translateX(-50%); font-size:11px; line-height:11px; cursor:help; z-index:3; }
.rv-mark.rv-fork { color:var(--rv-fork); } .rv-mark.rv-child { color:var(--rv-fork); opacity:.75; }
.rv-mark.rv-event { color:var(--rv-event); } .rv-mark.rv-rejected { color:var(--rv-muted); }
.rv-epoch-label { min-width:150px; font-size:13px; color:var(--rv-fg); font-variant-numeric: tabular-nums; }
.rv-epoch-label b { font-size:17px; }
.rv-epoch-label small { display:block; color:var(--rv-muted); font-size:11px; }
.rv-player.rv-disabled { opacity:.55; }
"""

_ESM = r"""
export function render({ model, el }) {
  const root = document.createElement('div');
  root.className = 'rv-player';
  root.innerHTML = `
    <button class="rv-first" title="first epoch">«</button>
    <button class="rv-prev" title="previous epoch (←)">◀</button>
    <button class="rv-play" title="play / pause">▶ play</button>
    <button class="rv-next" title="next epoch (→)">▶</button>
    <button class="rv-last" title="last epoch">»</button>
    <select class="rv-speed" title="epochs per second">
      <option value="0.5">0.5×</option><option value="1">1×</option><option value="2">2×</option><option value="4">4×</option>
    </select>
    <div class="rv-track"><div class="rv-inherited"></div><div class="rv-decor"></div>
      <input type="range" class="rv-range" min="0" max="0" step="1" value="0" aria-label="epoch"></div>
    <div class="rv-epoch-label"></div>`;
  el.appendChild(root);
  const $ = (s) => root.querySelector(s);
  const range = $('.rv-range'), label = $('.rv-epoch-label'), decor = $('.rv-decor');
  const E = (s) => String(s ?? '').replace(/[&<>"']/g, (c) => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
  const pos = (i, n) => n <= 1 ? 'calc(8px)' : `calc(8px + (100% - 16px) * ${i / (n - 1)})`;
  let timer = null, lastSend = 0, pending = null;
  const eps = () => model.epochs || [];
  const idxOf = (e) => Math.max(0, eps().indexOf(e));
  const showLabel = (i) => {
    const E_ = eps(); const n = E_.length;
    if (!n) { label.innerHTML = '<b>–</b><small>no epochs yet</small>'; return; }
    const e = E_[i];
    const inh = model.inherited_upto !== null && model.inherited_upto !== undefined && e < model.inherited_upto;
    label.innerHTML = `<b class="rv-epoch-value">epoch ${e}</b> <span class="rv-muted">of ${E_[0]}–${E_[n-1]}</span>` +
      `<small>${inh ? 'inherited from the parent run' : (model.caption ? E(model.caption) : '&nbsp;')}</small>`;
  };
  const send = (i) => {
    const e = eps()[i];
    if (e === undefined || e === model.value) return;
    model.value = e;
  };
  const drawDecor = () => {
    const E_ = eps(); const n = E_.length;
    range.max = Math.max(0, n - 1);
    range.value = idxOf(model.value);
    range.disabled = n <= 1;
    root.classList.toggle('rv-disabled', n <= 1);
    const inh = $('.rv-inherited');
    if (model.inherited_upto !== null && model.inherited_upto !== undefined && n > 1) {
      const k = E_.filter((e) => e < model.inherited_upto).length;
      inh.style.display = k ? 'block' : 'none';
      inh.style.width = k ? pos(Math.max(0, k - 0.5), n) : '0';
      inh.title = 'epochs inherited from the parent run';
    } else { inh.style.display = 'none'; }
    const parts = [];
    const step = n <= 12 ? 1 : Math.ceil(n / 12);
    E_.forEach((e, i) => {
      if (n <= 80) parts.push(`<span class="rv-tick" style="left:${pos(i, n)}"></span>`);
      if (i % step === 0 || i === n - 1) parts.push(`<span class="rv-tick-label" style="left:${pos(i, n)}">${e}</span>`);
    });
    const glyph = {fork: '◆', child: '◇', event: '▼', rejected: '▽'};
    const byEpoch = {};
    for (const m of (model.marks || [])) {
      const i = E_.indexOf(m.epoch);
      if (i < 0) continue;
      const k = `${i}:${m.kind}`;
      (byEpoch[k] = byEpoch[k] || {i, kind: m.kind, labels: []}).labels.push(m.label);
    }
    const offsets = {fork: -5, child: -5, event: 5, rejected: 5};
    for (const g of Object.values(byEpoch)) {
      parts.push(`<span class="rv-mark rv-${g.kind}" data-epoch="${E_[g.i]}" style="left:calc(${pos(g.i, n)} + ${offsets[g.kind] || 0}px)"
        title="epoch ${E_[g.i]}: ${E(g.labels.join('\n'))}">${glyph[g.kind] || '•'}</span>`);
    }
    decor.innerHTML = parts.join('');
    showLabel(idxOf(model.value));
  };
  const stop = () => { if (timer) { clearInterval(timer); timer = null; } $('.rv-play').textContent = '▶ play'; };
  const start = () => {
    stop();
    $('.rv-play').textContent = '❚❚ pause';
    const speed = parseFloat($('.rv-speed').value) || 1;
    timer = setInterval(() => {
      const n = eps().length; const i = idxOf(model.value);
      if (model.shown !== model.value) return;          // wait until the server has drawn it
      if (i >= n - 1) { model.playing = false; return; }
      send(i + 1);
    }, 1000 / speed);
  };
  range.addEventListener('input', () => {
    const i = parseInt(range.value); showLabel(i);
    const now = performance.now();
    if (now - lastSend > 150) { lastSend = now; send(i); }
    else { clearTimeout(pending); pending = setTimeout(() => send(parseInt(range.value)), 160); }
  });
  range.addEventListener('change', () => send(parseInt(range.value)));
  const stepBy = (d) => { const n = eps().length; const i = Math.min(n - 1, Math.max(0, idxOf(model.value) + d)); range.value = i; showLabel(i); send(i); };
  $('.rv-prev').addEventListener('click', () => stepBy(-1));
  $('.rv-next').addEventListener('click', () => stepBy(1));
  $('.rv-first').addEventListener('click', () => stepBy(-1e9));
  $('.rv-last').addEventListener('click', () => stepBy(1e9));
  $('.rv-play').addEventListener('click', () => {
    if (!model.playing && idxOf(model.value) >= eps().length - 1) stepBy(-1e9);
    model.playing = !model.playing;
  });
  $('.rv-speed').value = String(model.speed);
  $('.rv-speed').addEventListener('change', () => { model.speed = parseFloat($('.rv-speed').value); if (model.playing) start(); });
  model.on('playing', () => model.playing ? start() : stop());
  model.on(['epochs', 'marks', 'inherited_upto', 'caption'], drawDecor);
  model.on('value', () => { range.value = idxOf(model.value); showLabel(idxOf(model.value)); });
  drawDecor();
  if (model.playing) start();
}
"""


class PlayerWidget(JSComponent):
    epochs = param.List(default=[])
    value = param.Integer(default=0)
    marks = param.List(default=[])
    inherited_upto = param.Integer(default=None, allow_None=True)
    playing = param.Boolean(default=False)
    speed = param.Number(default=1.0)
    shown = param.Integer(default=None, allow_None=True)
    caption = param.String(default="")

    _esm = _ESM
    _stylesheets = [COMPONENT_CSS, _CSS]


class EpochPlayer(Viewer):
    """A slider with play/pause and speed over the epochs of a run's full history.

    Fork points (◆), forks branching from this run (◇), applied (▼) and rejected (▽) steering
    events are marked on the track, with their description on hover; epochs inherited from the
    parent run are hatched. While playing, the next epoch is requested only after the app has
    drawn the current one (`shown`), so slow views never fall behind.

    Example:
        >>> player = EpochPlayer(epochs=[0, 1, 2, 3], value=0, marks=[{"epoch": 2, "kind": "fork",
        ...                      "label": "fork point"}])
        >>> player.param.watch(lambda e: print("epoch", e.new), "value")
    """

    epochs = param.List(default=[], doc="The epochs to step through, ascending.")
    value = param.Integer(default=0, doc="The epoch shown.")
    marks = param.List(default=[], doc="Dicts with epoch, kind (fork|child|event|rejected), label.")
    inherited_upto = param.Integer(default=None, allow_None=True, doc="Epochs below this are inherited.")
    playing = param.Boolean(default=False, doc="Playing.")
    speed = param.Number(default=1.0, bounds=(0.1, 10), doc="Epochs per second while playing.")
    shown = param.Integer(default=None, allow_None=True, doc="The epoch the app has finished drawing.")
    caption = param.String(default="", doc="A line under the epoch number.")

    _SYNC = ("epochs", "value", "marks", "inherited_upto", "playing", "speed", "shown", "caption")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._widget = PlayerWidget(
            sizing_mode="stretch_width", css_classes=["rv-epoch-player"],
            **{k: getattr(self, k) for k in self._SYNC},
        )
        self._syncing = False
        self.param.watch(self._to_widget, list(self._SYNC))
        self._widget.param.watch(self._from_widget, ["value", "playing", "speed"])

    def __panel__(self) -> pn.viewable.Viewable:
        return self._widget

    def _to_widget(self, *events: Any) -> None:
        if self._syncing:
            return
        self._syncing = True
        try:
            self._widget.param.update({e.name: e.new for e in events})
        finally:
            self._syncing = False

    def _from_widget(self, *events: Any) -> None:
        if self._syncing:
            return
        self._syncing = True
        try:
            self.param.update({e.name: e.new for e in events})
        finally:
            self._syncing = False

    def step(self, delta: int) -> None:
        """Move ``delta`` epochs along the history (clamped)."""
        if not self.epochs:
            return
        i = self.epochs.index(self.value) if self.value in self.epochs else 0
        self.value = self.epochs[max(0, min(len(self.epochs) - 1, i + delta))]
