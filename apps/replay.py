"""`panel serve apps/replay.py --args --store PATH` (or $REVACNN_STORE): the replay app."""

from __future__ import annotations

import argparse
import os
import sys

from revacnn.ui.apps import create_replay_app


def store_path(argv: list[str] | None = None) -> str:
    """The store from ``--store PATH`` in the script's arguments, else ``$REVACNN_STORE``, else ``store``.

    Example:
        >>> store_path(["--store", "/tmp/s"])
        '/tmp/s'
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--store", default=os.environ.get("REVACNN_STORE", "store"))
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return args.store


create_replay_app(store_path()).servable(title="revacnn · replay")
