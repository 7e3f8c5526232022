"""Where a store's bytes live: the backend interface (a local folder or an fsspec URL) and store URLs.

A store location is a folder or a URL (``s3://bucket/prefix``, ``gs://…``, ``memory://name``).
`parse_location` tells them apart and refuses a URL whose protocol is unknown or whose fsspec
package is missing with one `StoreURLError` (never a local folder named ``s3:``). A `Backend` is
the small interface the sync layer (`revacnn.storage._sync`) uses: put, get, list, exists and
delete of whole objects by key (a ``/``-separated path below the store's root). Object stores have
no rename, so the commit protocol on them is an ordering of puts (see `revacnn.storage._sync`).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StoreURLError

_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$")

#: fsspec implementation packages of common protocols, for the "install it" hint.
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "abfss": "adlfs", "hf": "huggingface_hub", "oss": "ossfs"}


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URL (``proto://…``) rather than a folder; ``file://`` counts as a folder.

    Example:
        >>> is_url("s3://bucket/runs"), is_url("store"), is_url("file:///tmp/s")
        (True, False, False)
    """
    m = _URL_RE.match(str(location)) if isinstance(location, str) else None
    return bool(m) and m.group(1).lower() not in ("file", "local")


def local_path(location: str | os.PathLike[str]) -> Path:
    """The folder of a non-URL location (``file://`` stripped)."""
    s = os.fspath(location)
    m = _URL_RE.match(s)
    if m and m.group(1).lower() in ("file", "local"):
        s = m.group(2)
    return Path(s)


def store_key(location: str | os.PathLike[str]) -> str:
    """One string per store location: a URL as given (no trailing ``/``), a folder made absolute.

    Example:
        >>> store_key("s3://bucket/team/"), store_key("store") == str(Path("store").absolute())
        ('s3://bucket/team', True)
    """
    if is_url(location):
        return str(location).rstrip("/")
    return str(local_path(location).absolute())


def cache_root() -> Path:
    """Where local caches of remote stores live: ``$REVACNN_CACHE`` or ``~/.cache/revacnn``."""
    env = os.environ.get("REVACNN_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "revacnn"


def cache_dir_for(url: str) -> Path:
    """The default local cache folder of store ``url``: `cache_root` / a short hash of the URL.

    Example:
        >>> cache_dir_for("s3://bucket/team").name[:6]
        'store-'
    """
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return cache_root() / f"store-{digest}"


class Backend:
    """Whole-object I/O below one root: the only way the sync layer touches a remote store.

    Keys are ``/``-separated paths relative to the root (``runs/<run>/status.json``).

    Example:
        >>> b = open_backend("memory://demo")
        >>> b.put("a/b.txt", b"hi"); b.get("a/b.txt")
        b'hi'
    """

    url: str

    def put(self, key: str, data: bytes) -> None:
        """Write the object ``key`` whole (readers see the old or the new bytes, nothing between)."""
        raise NotImplementedError

    def put_file(self, key: str, path: Path) -> None:
        """Upload the local file ``path`` as ``key``."""
        self.put(key, Path(path).read_bytes())

    def get(self, key: str) -> bytes:
        """The bytes of ``key``.

        Raises:
            FileNotFoundError: there is no such object.
        """
        raise NotImplementedError

    def list(self, prefix: str = "") -> dict[str, tuple[Any, ...]]:
        """Every object whose key starts with ``prefix``: ``{key: version}`` (version changes with the object)."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        """Whether the object ``key`` exists."""
        raise NotImplementedError

    def delete(self, keys: list[str]) -> None:
        """Remove the objects ``keys`` (missing ones are ignored)."""
        raise NotImplementedError


class LocalBackend(Backend):
    """A `Backend` over a local folder (used to test the sync layer against a plain folder).

    Example:
        >>> LocalBackend("/tmp/remote").put("x", b"1")
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.url = str(self.root)

    def put(self, key: str, data: bytes) -> None:
        from ._layout import atomic_write_bytes

        atomic_write_bytes(self.root / key, data)

    def get(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def list(self, prefix: str = "") -> dict[str, tuple[Any, ...]]:
        out: dict[str, tuple[Any, ...]] = {}
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root / folder if folder else self.root
        for here, _dirs, names in os.walk(base):
            for n in names:
                if n.startswith("."):
                    continue
                p = Path(here) / n
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                key = p.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    out[key] = (st.st_size, st.st_mtime_ns)
        return out

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def delete(self, keys: list[str]) -> None:
        for k in keys:
            (self.root / k).unlink(missing_ok=True)


class FsspecBackend(Backend):
    """A `Backend` over any fsspec filesystem (``s3://``, ``gs://``, ``memory://`` …).

    Listings are never taken from fsspec's cache: every `list` asks the server.

    Example:
        >>> FsspecBackend("memory://team").put("runs/x", b"{}")
    """

    def __init__(self, url: str, **storage_options: Any) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.root = root.rstrip("/")

    def _p(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def put(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._p(key), data)

    def put_file(self, key: str, path: Path) -> None:
        self.fs.put_file(str(path), self._p(key))

    def get(self, key: str) -> bytes:
        try:
            return self.fs.cat_file(self._p(key))
        except FileNotFoundError:
            raise
        except OSError as exc:  # some filesystems say "no such key" in other words
            if not self.fs.exists(self._p(key)):
                raise FileNotFoundError(self._p(key)) from exc
            raise

    def list(self, prefix: str = "") -> dict[str, tuple[Any, ...]]:
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        path = self._p(folder)
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return {}
        out: dict[str, tuple[Any, ...]] = {}
        for name, info in found.items():
            if info.get("type") == "directory":
                continue
            key = _rel(name, self.root)
            if key is None or not key.startswith(prefix) or key.rsplit("/", 1)[-1].startswith("."):
                continue
            version = (info.get("size"), info.get("ETag") or info.get("etag") or info.get("mtime")
                       or info.get("LastModified") or info.get("created"))
            out[key] = version
        return out

    def exists(self, key: str) -> bool:
        self.fs.invalidate_cache()
        return bool(self.fs.exists(self._p(key)))

    def delete(self, keys: list[str]) -> None:
        if not keys:
            return
        paths = [self._p(k) for k in keys]
        try:
            self.fs.rm(paths)
        except FileNotFoundError:
            for p in paths:
                try:
                    self.fs.rm_file(p)
                except FileNotFoundError:
                    pass
        self.fs.invalidate_cache()


def _rel(name: str, root: str) -> str | None:
    n, r = name.strip("/"), root.strip("/")
    if not r:
        return n
    if n.startswith(r + "/"):
        return n[len(r) + 1:]
    return None


@dataclass(frozen=True)
class Location:
    """A parsed store location: ``url`` is None for a local folder; ``cache`` is the folder the code uses."""

    url: str | None
    cache: Path


def parse_location(location: str | os.PathLike[str], *, cache: str | os.PathLike[str] | None = None) -> Location:
    """Tell a folder from a URL and check the URL can be opened (its fsspec package is installed).

    Args:
        location: a folder, or a URL such as ``s3://bucket/prefix`` or ``memory://tests``.
        cache: the local cache folder of a URL (default `cache_dir_for`); ignored for a folder.

    Raises:
        StoreURLError: the protocol is unknown, or its package (``s3fs`` for ``s3://``) is missing.

    Example:
        >>> parse_location("store").url is None
        True
    """
    if not is_url(location):
        return Location(None, local_path(location).absolute())
    url = str(location).rstrip("/")
    proto = url.split("://", 1)[0].lower()
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with the dependencies
        raise StoreURLError(
            f"Received: store={url!r}, a URL; opening URLs needs fsspec (pip install fsspec)"
        ) from None
    try:
        fsspec.get_filesystem_class(proto)
    except ImportError:
        pkg = _PACKAGES.get(proto, f"the fsspec package for {proto}://")
        raise StoreURLError(
            f"Received: store={url!r}; the {proto}:// protocol needs {pkg}, which is not installed "
            f"(pip install {pkg if proto in _PACKAGES else 'it'}; or pass a local folder)"
        ) from None
    except ValueError:
        raise StoreURLError(
            f"Received: store={url!r}, with an unknown protocol {proto}:// (expected a folder, or a URL "
            "fsspec knows: s3://bucket/prefix, gs://…, memory://…)"
        ) from None
    return Location(url, Path(cache).absolute() if cache is not None else cache_dir_for(url))


def open_backend(url: str) -> Backend:
    """The `Backend` of a store URL (`parse_location` it first for a clear error).

    Example:
        >>> open_backend("memory://x").url
        'memory://x'
    """
    try:
        return FsspecBackend(url)
    except ImportError as exc:
        raise StoreURLError(f"Received: store={url!r}; cannot open it: {exc}") from None
