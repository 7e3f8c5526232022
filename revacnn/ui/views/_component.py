"""The small JavaScript component the HTML views render into: JSON data in, click events out."""

from __future__ import annotations

import json
import math
import threading
import zlib
from collections import OrderedDict
from typing import Any

import param
from panel.custom import JSComponent

from ..theme import COMPONENT_CSS


class HTMLView(JSComponent):
    """A component that draws ``data`` with a JavaScript ``draw(data)`` function and reports clicks.

    Subclasses set ``_esm`` to a module that defines ``draw(model, el)``; the shared wrapper calls
    it on every change of ``data`` and turns clicks on elements with a ``data-click`` attribute
    into the ``clicked`` parameter (``"<value>|<counter>"`` so that the same click repeats).
    Each draw is timed as a ``rv-draw <class name>`` performance measure (devtools, benchmarks), and
    ``U(uri)`` turns a data URI into a blob: URL for CSS variables (see the module's JavaScript).

    Example:
        >>> class Hello(HTMLView):
        ...     _draw = "el.innerHTML = `<b>${data.text}</b>`;"
        >>> Hello(data={"text": "hi"})
    """

    data = param.Dict(default={}, doc="What to draw (JSON-serialisable).")
    clicked = param.String(default="", doc="Last click: '<data-click value>|<counter>'.")
    text = param.String(default="", doc="`data` as JSON text: what is sent to the browser.")

    _draw = "el.textContent = JSON.stringify(data);"
    # `data` goes to the browser as one JSON string (`text`), not as a Bokeh Dict property: for a
    # Dict, Bokeh walks every nested value looking for model references on each change (about
    # 0.4 s per epoch switch of a 3 x 256 network view) and serialises each list element; a string
    # is neither walked nor re-encoded.
    _rename = {"data": None}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.param.watch(self._send, "data")
        self._send()

    def _send(self, *_: Any) -> None:
        self.text = to_json(self.data)

    _stylesheets = [COMPONENT_CSS]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._esm = _ESM_TEMPLATE.replace("/*DRAW*/", cls._draw).replace("/*NAME*/", cls.__name__)

    @property
    def clicked_value(self) -> str:
        """The ``data-click`` value of the last click (without the counter)."""
        return self.clicked.rsplit("|", 1)[0] if self.clicked else ""


_ESM_TEMPLATE = """
const E = (s) => String(s ?? '').replace(/[&<>"']/g, (c) => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
// CSS that shows tile i of an edge-padded sprite S = {n, w, h, pad} at w x h pixels
// (the image itself comes from a CSS variable set once on the container).
function cut(S, i, w, h) {
  const sx = w / S.w, sy = h / S.h, cw = S.w + 2 * S.pad, ch = S.h + 2 * S.pad;
  return `width:${w}px;height:${h}px;background-size:${(S.n * cw * sx).toFixed(2)}px ${(ch * sy).toFixed(2)}px;` +
         `background-position:-${((i * cw + S.pad) * sx).toFixed(2)}px -${(S.pad * sy).toFixed(2)}px`;
}
// A data URI as a short blob: URL, for CSS variables. A tile's `background-image:var(--sprite)`
// substitutes the variable's text on every tile; with a 300 KB data URI that is most of a page's
// style recalculation (seconds for 768 tiles), with a blob: URL it is nothing. The last 96 URLs are
// kept (the pictures shown are among them) and older ones released.
const _URLS = new Map();
function U(uri) {
  if (!uri || !uri.startsWith('data:')) return uri || '';
  let u = _URLS.get(uri);
  if (u !== undefined) { _URLS.delete(uri); _URLS.set(uri, u); return u; }
  const comma = uri.indexOf(','), head = uri.slice(5, comma);
  const text = head.endsWith(';base64') ? atob(uri.slice(comma + 1)) : decodeURIComponent(uri.slice(comma + 1));
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  u = URL.createObjectURL(new Blob([bytes], {type: head.split(';')[0] || 'application/octet-stream'}));
  _URLS.set(uri, u);
  while (_URLS.size > 96) {
    const [k, v] = _URLS.entries().next().value;
    _URLS.delete(k); URL.revokeObjectURL(v); _IMGS.delete(v);
  }
  return u;
}
// The decoded image of a blob: URL made by U (kept as long as the URL), for canvas drawing.
const _IMGS = new Map();
function IMG(url) {
  let img = _IMGS.get(url);
  if (!img) { img = new Image(); img.src = url; _IMGS.set(url, img); }
  return img;
}
function draw(model, el, data) {
/*DRAW*/
}
export function render({ model, el }) {
  let counter = 0;
  const root = document.createElement('div');
  root.className = 'rv-root';
  el.appendChild(root);
  const redraw = () => {
    const t0 = performance.now();
    try { draw(model, root, model.text ? JSON.parse(model.text) : {}); performance.measure('rv-draw /*NAME*/', {start: t0}); }
    catch (err) { root.innerHTML = '<div class="rv-alert">Could not draw this view: ' +
                  String(err).replace(/[<>&]/g, '') + '</div>'; }
  };
  root.addEventListener('click', (ev) => {
    const t = ev.target.closest('[data-click]');
    if (!t || !root.contains(t)) return;
    counter += 1;
    model.clicked = t.getAttribute('data-click') + '|' + counter;
  });
  root.addEventListener('keydown', (ev) => {
    if (ev.key !== 'Enter' && ev.key !== ' ') return;
    const t = ev.target.closest('[data-click]');
    if (!t) return;
    ev.preventDefault();
    counter += 1;
    model.clicked = t.getAttribute('data-click') + '|' + counter;
  });
  model.on('text', redraw);
  redraw();
}
"""

HTMLView._esm = _ESM_TEMPLATE.replace("/*DRAW*/", HTMLView._draw).replace("/*NAME*/", "HTMLView")


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    """A numpy scalar or array as a plain Python value (for `json.dumps`)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot send a {type(value).__name__} to the browser; expected JSON-serialisable data")


def to_json(data: dict[str, Any]) -> str:
    """``data`` as compact JSON text, NaN and infinities as null (what `HTMLView` sends).

    Example:
        >>> to_json({"a": [1, float("nan")]})
        '{"a":[1,null]}'
    """
    try:
        return json.dumps(data, separators=(",", ":"), allow_nan=False, default=_plain)
    except ValueError:  # a NaN or infinity somewhere: the slow path
        plain = json.loads(json.dumps(data, default=_plain))
        return json.dumps(_finite(plain), separators=(",", ":"), allow_nan=False)


class RenderCache:
    """A small thread-safe LRU of rendered pictures (data URIs), keyed by what they show.

    Example:
        >>> cache = RenderCache(4)
        >>> cache.get_or(("k",), lambda: "v")
        'v'
    """

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._d: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get_or(self, key: Any, make: Any) -> Any:
        """The cached value of ``key``, made with ``make()`` on a miss."""
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        value = make()
        with self._lock:
            self._d[key] = value
            while len(self._d) > self.size:
                self._d.popitem(last=False)
        return value


def signature(text: str) -> str:
    """A short checksum of ``text`` (lets tests see that a picture changed).

    Example:
        >>> signature("abc")
        '352441c2'
    """
    return f"{zlib.crc32(text.encode()):08x}"


def esc(text: Any) -> str:
    """HTML-escape ``text``.

    Example:
        >>> esc("<b>")
        '&lt;b&gt;'
    """
    import html

    return html.escape(str(text), quote=True)


async def run_locked(fn: Any) -> None:
    """Run ``fn()`` with the session's document lock, from async code (after awaiting a thread).

    Bokeh models (data sources, ranges) may only change while the document lock is held;
    Panel runs async callbacks without it. Outside a served session ``fn`` just runs.

    Example:
        >>> frame = await asyncio.to_thread(load)
        >>> await run_locked(lambda: view.update(frame))
    """
    import asyncio

    import panel as pn

    doc = pn.state.curdoc
    if doc is None or doc.session_context is None:
        fn()
        return
    fut = asyncio.get_running_loop().create_future()

    def callback() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            if not fut.done():
                fut.set_exception(exc)
            return
        if not fut.done():
            fut.set_result(None)

    doc.add_next_tick_callback(callback)
    await fut
