"""`revacnn serve`: both apps on one server, loopback by default, steering only with auth elsewhere."""

from __future__ import annotations

import panel as pn
import pytest

from revacnn.ui import serve as serve_mod


@pytest.mark.parametrize(
    "address, auth, steering",
    [("127.0.0.1", None, True), ("0.0.0.0", None, False), ("0.0.0.0", "s3cret", True)],
)
def test_serve_guards_steering(monkeypatch, tmp_path, address, auth, steering):
    seen = {}

    def fake_serve(pages, **kw):
        seen.update(pages=pages, **kw)

    built = {}

    def fake_live(store, allow_steering):
        built["allow"] = allow_steering
        return lambda: None

    monkeypatch.setattr(pn, "serve", fake_serve)
    monkeypatch.setattr(serve_mod, "_live_factory", fake_live)
    monkeypatch.delenv("REVACNN_STORE", raising=False)  # serve() sets it for the app: undone after
    assert serve_mod.serve("live", store=str(tmp_path), port=5999, address=address, basic_auth=auth) == 0
    assert set(seen["pages"]) == {"/", "replay", "live"}
    assert seen["address"] == address and built["allow"] is steering
    assert ("basic_auth" in seen) is bool(auth)


def test_cli_serve_defaults_to_loopback():
    from revacnn.cli import build_parser

    args = build_parser().parse_args(["serve", "live"])
    assert args.address == "127.0.0.1" and args.basic_auth is None
