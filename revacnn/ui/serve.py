"""Serve the Panel apps programmatically: `revacnn serve replay|live` (one app instance per browser session)."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
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


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(app: str, *, store: str, port: int = 5006, address: str = "127.0.0.1", show: bool = False,
          basic_auth: str | None = None) -> int:
    """Serve ``app`` on ``http://address:port/<app>`` (also at ``/``) until interrupted.

    Args:
        app: ``"replay"`` or ``"live"``.
        store: the store's folder.
        port: the TCP port (0 picks a free one).
        address: the interface to listen on (default: this machine only).
        show: open a browser.
        basic_auth: a password (or a JSON file of users) for Panel's basic auth. Served on a
            non-loopback address without it, the live app disables steering and says why.

    Returns:
        The exit code: 0 after a normal stop, 2 for a bad argument.

    Example:
        >>> serve("replay", store="store", port=5006)
    """
    import panel as pn

    if app not in APPS:
        sys.stderr.write(f"revacnn serve: error: Received: app={app!r} (expected one of {', '.join(APPS)})\n")
        return 2
    from ..storage import store_key

    store = store_key(store)
    os.environ.setdefault("REVACNN_STORE", store)
    allow_steering = address in LOOPBACK or bool(basic_auth)
    factories = {
        "replay": app_factory("replay", store),
        "live": _live_factory(store, allow_steering),
    }
    if not port:
        port = free_port(address)
    origins = sorted({f"{address}:{port}", f"localhost:{port}", f"127.0.0.1:{port}"})
    print(f"revacnn {app} app: http://{address}:{port}/{app}  (store {store}; Ctrl-C to stop)", flush=True)
    if not allow_steering:
        print(f"Listening on {address} without --basic-auth: steering is disabled in the live app.", flush=True)
    extra: dict[str, Any] = {}
    if basic_auth:
        extra.update(basic_auth=basic_auth, cookie_secret=os.environ.get("REVACNN_COOKIE_SECRET")
                     or os.urandom(24).hex())
    try:
        pn.serve(
            {"/": factories[app], **factories}, port=port, address=address, show=show, threaded=False,
            title=f"revacnn · {app}", websocket_origin=origins, verbose=False, **extra,
        )
    except OSError as exc:
        sys.stderr.write(f"revacnn serve: error: cannot listen on {address}:{port}: {exc}\n")
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def _live_factory(store: str, allow_steering: bool) -> Callable[[], Any]:
    def build() -> Any:
        from .live import create_live_app

        return create_live_app(store, allow_steering=allow_steering)

    return build


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``address`` right now.

    Example:
        >>> 1024 < free_port() < 65536
        True
    """
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])
