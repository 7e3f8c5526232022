"""The probe chooser: thumbnails of all probe images, marked right or wrong at the shown epoch."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import panel as pn
import param
from panel.viewable import Viewer

from ..render import display_images, sprite
from ._component import HTMLView, RenderCache

_THUMBS = RenderCache(32)

_CSS = """
.rv-probes { display:flex; flex-wrap:wrap; gap:6px; align-items:flex-end; }
.rv-thumb { position:relative; cursor:pointer; border-radius:5px; padding:2px; border:2px solid transparent;
  display:flex; flex-direction:column; align-items:center; gap:2px; }
.rv-thumb:hover { border-color: var(--rv-border); }
.rv-thumb.rv-active { border-color: var(--rv-accent); background: var(--rv-selected); }
.rv-thumb .rv-pic { width:44px; height:44px; image-rendering:pixelated; border-radius:3px;
  background-repeat:no-repeat; }
.rv-thumb .rv-cap { font-size:10px; color:var(--rv-muted); max-width:52px; white-space:nowrap;
  overflow:hidden; text-overflow:ellipsis; }
.rv-thumb .rv-dot { position:absolute; top:0; right:0; width:9px; height:9px; border-radius:50%;
  border:1px solid var(--rv-bg); }
.rv-dot.rv-right { background:#16a34a; } .rv-dot.rv-wrong { background:#dc2626; }
.rv-probes-head { font-size:12px; color:var(--rv-muted); margin-bottom:4px; }
"""

_DRAW = r"""
if (!data.n) { el.innerHTML = ''; return; }
const S = 44;
const out = [`<div class="rv-probes-head">${E(data.head)}</div><div class="rv-probes" data-value="${data.value}" style="--sprite:url('${U(data.uri)}')">`];
for (let i = 0; i < data.n; i++) {
  const c = data.correct ? data.correct[i] : null;
  const dot = c === null || c === undefined ? '' : `<span class="rv-dot ${c ? 'rv-right' : 'rv-wrong'}"></span>`;
  out.push(`<div class="rv-thumb ${i === data.value ? 'rv-active' : ''}" data-probe="${i}" data-click="${i}" tabindex="0"
     title="probe ${i}: ${E(data.names[i])}${c === null || c === undefined ? '' : (c ? ' (predicted right)' : ' (predicted wrong)')}">
     <div class="rv-pic" style="background-image:var(--sprite);${cut(data.sprite, i, S, S)}"></div>
     <span class="rv-cap">${E(data.names[i])}</span>${dot}</div>`);
}
out.push('</div>');
el.innerHTML = out.join('');
"""


class ProbeStrip(HTMLView):
    _draw = _DRAW
    _stylesheets = [*HTMLView._stylesheets, _CSS]


class ProbeChooser(Viewer):
    """Thumbnails of the session's probe images; clicking one sets `value`.

    A dot on each thumbnail says whether the network classified that probe right (green) or
    wrong (red) at the shown epoch, when `probabilities` is given.

    Example:
        >>> chooser = ProbeChooser(images=images, labels=labels, class_names=names)
        >>> chooser.param.watch(lambda e: print("probe", e.new), "value")
    """

    images = param.Array(default=None, allow_None=True, doc="(P, H, W, C) uint8 probe images.")
    labels = param.Array(default=None, allow_None=True, doc="(P,) true classes.")
    class_names = param.List(default=[], doc="Class names.")
    probabilities = param.Array(default=None, allow_None=True, doc="(P, classes) at the shown epoch.")
    value = param.Integer(default=0, bounds=(0, None), doc="The chosen probe.")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._strip = ProbeStrip(sizing_mode="stretch_width", css_classes=["rv-probe-chooser"])
        self._strip.param.watch(self._on_click, "clicked")
        self.param.watch(self._refresh, ["images", "labels", "class_names", "probabilities", "value"])
        self._refresh()

    def __panel__(self) -> pn.viewable.Viewable:
        return self._strip

    def _on_click(self, _: Any) -> None:
        try:
            self.value = int(self._strip.clicked_value)
        except ValueError:
            pass

    def render_data(self) -> dict[str, Any]:
        """The JSON the browser draws."""
        imgs = self.images
        if imgs is None or len(imgs) == 0:
            return {"n": 0}
        imgs = np.asarray(imgs)
        if imgs.ndim == 3:
            imgs = imgs[..., None]
        if imgs.shape[-1] == 1:
            imgs = np.repeat(imgs, 3, axis=-1)
        key = (imgs.shape, zlib.crc32(np.ascontiguousarray(imgs).tobytes()))
        sp = _THUMBS.get_or(key, lambda: sprite(display_images(imgs)).css())
        labels = np.asarray(self.labels) if self.labels is not None else np.zeros(len(imgs), int)
        names = [self.class_names[int(k)] if 0 <= int(k) < len(self.class_names) else str(int(k))
                 for k in labels]
        correct = None
        if self.probabilities is not None and len(self.probabilities) == len(imgs):
            correct = [bool(x) for x in np.argmax(self.probabilities, axis=1) == labels]
        n_right = sum(correct) if correct else None
        head = f"{len(imgs)} probes"
        if n_right is not None:
            head += f" · {n_right} of {len(imgs)} classified right at this epoch"
        return {"n": int(len(imgs)), "uri": sp["uri"], "sprite": sp, "names": names, "correct": correct,
                "value": int(min(self.value, len(imgs) - 1)), "head": head}

    def _refresh(self, *_: Any) -> None:
        self._strip.data = self.render_data()
