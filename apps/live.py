"""Entry point of the live app: ``panel serve apps/live.py --args --store PATH`` (or ``$REVACNN_STORE``).

Open ``/live?run=RUN_ID`` to attach to a run directly. Served on an address other than 127.0.0.1,
steering needs authentication (``--basic-auth`` or OAuth); set ``REVACNN_ALLOW_STEERING=0`` to
disable it altogether.
"""

from __future__ import annotations

import argparse
import os
import sys

from revacnn.ui.live import create_live_app


def store_path(argv: list[str] | None = None) -> str:
    """The store from ``--store PATH`` (after ``--args``), else ``$REVACNN_STORE``, else ``./store``.

    Example:
        >>> store_path(["--store", "/data/store"])
        '/data/store'
    """
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--store", default=None)
    known, _ = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    return known.store or os.environ.get("REVACNN_STORE") or "store"


create_live_app(
    store_path(),
    allow_steering=os.environ.get("REVACNN_ALLOW_STEERING", "1") not in ("0", "false", "no"),
).servable(title="revacnn · live")
