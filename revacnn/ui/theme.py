"""Colours, CSS and the page template shared by the revacnn apps (light and dark palettes)."""

from __future__ import annotations

from typing import Any

import panel as pn
from panel.theme.fast import Fast

#: Okabe–Ito colours for runs (colour-blind safe); run A of a comparison takes the first.
RUN_COLORS: tuple[str, ...] = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#F0E442",
    "#6B7280",
)

#: Colour of each per-filter measure's bar.
MEASURE_COLORS: dict[str, str] = {
    "grad_l1": "#F59E0B",
    "act_mean": "#10B981",
    "weight_change_l1": "#8B5CF6",
}

#: Human labels of the per-filter measures.
MEASURE_LABELS: dict[str, str] = {
    "grad_l1": "gradient L1 (epoch sum)",
    "act_mean": "mean activation",
    "weight_change_l1": "weight change L1",
}

ACCENT = "#2563EB"
FROZEN = "#38BDF8"
ADDED = "#22C55E"
DELETED = "#EF4444"
EVENT = "#F97316"
FORK = "#A855F7"
CURRENT = "#2563EB"

STATUS_COLORS: dict[str, str] = {
    "running": "#22C55E",
    "paused": "#EAB308",
    "finished": "#64748B",
    "stopped": "#F59E0B",
    "interrupted": "#F97316",
    "failed": "#EF4444",
}

_PALETTES: dict[str, dict[str, str]] = {
    "default": {
        "--rv-bg": "#ffffff",
        "--rv-panel": "#f8fafc",
        "--rv-fg": "#0f172a",
        "--rv-muted": "#64748b",
        "--rv-border": "#e2e8f0",
        "--rv-hover": "#eef2ff",
        "--rv-tile-bg": "#0b1020",
        "--rv-selected": "#dbeafe",
    },
    "dark": {
        "--rv-bg": "#181818",
        "--rv-panel": "#222427",
        "--rv-fg": "#e5e7eb",
        "--rv-muted": "#9ca3af",
        "--rv-border": "#374151",
        "--rv-hover": "#1f2a44",
        "--rv-tile-bg": "#05070d",
        "--rv-selected": "#1e3a8a",
    },
}

_COMMON_VARS = {
    "--rv-accent": ACCENT,
    "--rv-frozen": FROZEN,
    "--rv-added": ADDED,
    "--rv-deleted": DELETED,
    "--rv-event": EVENT,
    "--rv-fork": FORK,
    "--rv-font": "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif",
    "--rv-mono": "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace",
}

#: The Fast design without its Google-Fonts stylesheet: the apps must work offline, and a failed
#: font request is an error in the browser console. (The class keeps the name ``Fast`` so that
#: Panel resolves the design's bundled JavaScript from the same folder.)
OfflineFast: Any = type("Fast", (Fast,), {"_resources": {k: v for k, v in Fast._resources.items() if k != "font"}})


def current_theme() -> str:
    """``"dark"`` when the page was asked for the dark theme (``?theme=dark``), else ``"default"``.

    Example:
        >>> current_theme()
        'default'
    """
    try:
        args = pn.state.session_args or {}
        value = args.get("theme", [b""])[0]
        value = value.decode() if isinstance(value, bytes) else str(value)
    except Exception:  # noqa: BLE001 - outside a session
        value = ""
    return "dark" if value == "dark" else "default"


def css_vars(theme: str = "default") -> str:
    """The ``:root`` block of CSS custom properties every revacnn component reads.

    Example:
        >>> "--rv-accent" in css_vars("dark")
        True
    """
    values = {**_PALETTES.get(theme, _PALETTES["default"]), **_COMMON_VARS}
    body = "".join(f"{k}:{v};" for k, v in values.items())
    return f":root{{{body}}}"


PAGE_CSS = """
body { font-family: var(--rv-font); }
:host { font-family: var(--rv-font); color: var(--rv-fg); }
code { font-family: var(--rv-mono); font-size: 0.92em; }
.rv-title-bar { display:flex; align-items:center; gap:14px; flex-wrap:wrap; font-family: var(--rv-font); }
.rv-badge { display:inline-block; padding:1px 9px; border-radius:999px; font-size:11.5px;
  font-weight:600; color:#fff; line-height:18px; vertical-align:middle; letter-spacing:.02em; }
.rv-stat { display:inline-flex; flex-direction:column; padding:4px 14px; min-width:84px;
  border-left:3px solid var(--rv-accent); background: var(--rv-panel); border-radius: 0 8px 8px 0; }
.rv-stat b { font-size:19px; color: var(--rv-fg); font-variant-numeric: tabular-nums; line-height:1.2; }
.rv-stat span { font-size:10.5px; color: var(--rv-muted); text-transform: uppercase; letter-spacing: .05em; }
.rv-message { font-family: var(--rv-font); }
"""

#: CSS shared by the HTML-rendering components (inside their shadow roots).
COMPONENT_CSS = """
:host { font-family: var(--rv-font); color: var(--rv-fg); }
.rv-muted { color: var(--rv-muted); }
.rv-empty { padding: 18px; color: var(--rv-muted); font-size: 14px; border: 1px dashed var(--rv-border);
  border-radius: 8px; background: var(--rv-panel); }
.rv-alert { padding: 10px 14px; border-radius: 8px; font-size: 13px; margin: 4px 0 8px 0;
  border: 1px solid #fca5a5; background: #fef2f2; color: #991b1b; }
.rv-info { padding: 10px 14px; border-radius: 8px; font-size: 13px; margin: 4px 0 8px 0;
  border: 1px solid #93c5fd; background: #eff6ff; color: #1e3a8a; }
table.rv-table { border-collapse: collapse; width: 100%; font-size: 12.5px; }
table.rv-table th { text-align: left; color: var(--rv-muted); font-weight: 600; padding: 4px 8px;
  border-bottom: 1px solid var(--rv-border); position: sticky; top: 0; background: var(--rv-bg); }
table.rv-table td { padding: 4px 8px; border-bottom: 1px solid var(--rv-border); vertical-align: top; }
.rv-badge { display:inline-block; padding:0 7px; border-radius:999px; font-size:11px; font-weight:600;
  color:#fff; line-height:17px; }
"""


def status_badge(status: str) -> str:
    """An HTML badge for a run status.

    Example:
        >>> "finished" in status_badge("finished")
        True
    """
    color = STATUS_COLORS.get(status, "#64748B")
    return f'<span class="rv-badge rv-status-{status}" style="background:{color}">{status}</span>'


def make_template(title: str, *, theme: str | None = None, **params: Any) -> pn.template.FastListTemplate:
    """A FastListTemplate in the revacnn look that loads nothing from the internet.

    Args:
        title: the page title.
        theme: ``"default"`` or ``"dark"``; default: from the page's ``?theme=`` argument.
        **params: more FastListTemplate parameters (``sidebar``, ``main`` …).

    Example:
        >>> tpl = make_template("revacnn · replay", main=[pn.pane.Markdown("hi")])
    """
    theme = theme or current_theme()
    tpl = pn.template.FastListTemplate(
        title=title,
        design=OfflineFast,
        theme=theme,
        accent_base_color=ACCENT,
        header_background="#111827" if theme == "default" else "#0b1220",
        header_accent_base_color="#93C5FD",
        sidebar_width=330,
        main_layout=None,
        **params,
    )
    tpl.config.raw_css.append(css_vars(theme) + PAGE_CSS)
    _skip_mathjax(pn.state.curdoc)
    return tpl


def _skip_mathjax(doc: Any) -> None:
    """Leave Bokeh's MathJax bundle (1.8 MB of JavaScript) out of ``doc``'s page.

    Panel loads it for every page that has an HTML pane, in case one shows TeX; ours never do,
    and evaluating it was a sixth of the browser's script time of a first page load. Only
    documents marked here are affected (another app served beside ours keeps Panel's choice),
    and if Panel's resource code changes, the page simply keeps the bundle.
    """
    if doc is None:
        return
    from panel.io import resources

    doc._revacnn_no_mathjax = True  # read by the wrapper below, while the page is rendered
    orig = getattr(resources, "_panel_use_mathjax", None)
    if orig is None or getattr(orig, "_revacnn", False):
        return

    def use_mathjax(roots: Any) -> bool:
        cur = pn.state.curdoc
        if cur is not None and getattr(cur, "_revacnn_no_mathjax", False):
            return False
        return orig(roots)

    use_mathjax._revacnn = True  # type: ignore[attr-defined]
    resources._panel_use_mathjax = use_mathjax
