"""Serve the Panel apps programmatically: `revacnn serve replay|live` (one app instance per browser session)."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

APPS = ("replay", "live")


def app_factory(app: str, store: str) -> Callable[[], Any]:
    """A function that builds ``app`` ("replay" or "live") over ``store`` for one browser session.

    Example:
        >>> page = app_factory("replay", "store")()
    """
    if app == "replay":
        from .apps import create_replay_app

        return lambda: create_replay_app(store)
    if app == "live":
        from .live import create_live_app  # imported lazily: a separate module

        return lambda: create_live_app(store)
    raise ValueError(f"Received: app={app!r} (expected one of {', '.join(APPS)})")


def serve(app: str, *, store: str, port: int = 5006, address: str = "127.0.0.1", show: bool = False) -> int:
    """Serve ``app`` on ``http://address:port/<app>`` (also at ``/``) until interrupted.

    Args:
        app: ``"replay"`` or ``"live"``.
        store: the store's folder.
        port: the TCP port (0 picks a free one).
        address: the interface to listen on (default: this machine only).
        show: open a browser.

    Returns:
        The exit code: 0 after a normal stop, 2 for a bad argument.

    Example:
        >>> serve("replay", store="store", port=5006)
    """
    import panel as pn

    if app not in APPS:
        sys.stderr.write(f"revacnn serve: error: Received: app={app!r} (expected one of {', '.join(APPS)})\n")
        return 2
    store = str(Path(store).absolute())
    os.environ.setdefault("REVACNN_STORE", store)
    factory = app_factory(app, store)
    if not port:
        port = free_port(address)
    origins = sorted({f"{address}:{port}", f"localhost:{port}", f"127.0.0.1:{port}"})
    print(f"revacnn {app} app: http://{address}:{port}/{app}  (store {store}; Ctrl-C to stop)", flush=True)
    try:
        pn.serve(
            {"/": factory, app: factory}, port=port, address=address, show=show, threaded=False,
            title=f"revacnn · {app}", websocket_origin=origins, verbose=False,
        )
    except OSError as exc:
        sys.stderr.write(f"revacnn serve: error: cannot listen on {address}:{port}: {exc}\n")
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``address`` right now.

    Example:
        >>> 1024 < free_port() < 65536
        True
    """
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])
