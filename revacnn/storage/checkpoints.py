"""Compact checkpoint files (zstd + byte shuffle, kernels shared with the epoch record), retention and gc.

A checkpoint file (``checkpoints/eNNNNN.ckpt``) is::

    MAGIC (8 bytes) | header length (8 bytes, little endian) | header (JSON) | blobs

The header holds the checkpoint's metadata (model and optimizer config, trainer state …) and one
entry per array: its dtype and shape, and either the offset and length of its blob (Blosc, zstd
level 3, byte shuffle: lossless, so float32 values come back bit for bit) or ``shared``: the
array is not in the file because the epoch record holds it exactly (a conv kernel or a bias);
the reader takes it from the record through the public reading API
(``run.epoch(k).layer(name).kernel``), rebuilds the variable's layout and checks its CRC-32.

Old stores' ``.npz`` checkpoints stay readable (`read_checkpoint_file` reads both).

Retention: a run recorded with ``checkpoint_every`` K has a checkpoint at every K-th epoch, at
its first epoch (0, or its fork point), its last epoch, and wherever a fork was made; `collect`
(``revacnn gc``) removes every other checkpoint file.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numcodecs import Blosc

from .._faults import kill_point, write_point
from ..errors import CorruptStoreError, StoreError
from ._layout import Layout, epoch_tag, tmp_path_for

MAGIC = b"RVCKPT2\n"
SUFFIX = ".ckpt"
LEGACY_SUFFIX = ".npz"
_CODEC = Blosc(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE)

#: How a variable is rebuilt from a record array (record layout -> the variable's layout).
TRANSFORMS: dict[str, Callable[[np.ndarray, tuple[int, ...]], np.ndarray]] = {
    # Conv2D (any groups) and a separable conv's pointwise kernel: (F, kh, kw, c) -> (kh, kw, c, F)
    "filters_last": lambda a, shape: np.moveaxis(a, 0, -1).reshape(shape),
    # DepthwiseConv2D: (cin*mult, kh, kw, 1) -> (kh, kw, 1, cin*mult) -> (kh, kw, cin, mult)
    "depthwise": lambda a, shape: np.moveaxis(a, 0, -1).reshape(shape),
    # Dense: (units, in) -> (in, units)
    "transpose": lambda a, shape: a.T.reshape(shape),
    # biases, a separable conv's depthwise kernel
    "identity": lambda a, shape: a.reshape(shape),
}


@dataclass
class SharedSource:
    """Where the epoch record holds a checkpoint variable: layer, array key and layout transform."""

    layer: str
    key: str
    transform: str


@dataclass
class CheckpointData:
    """A decoded checkpoint file: its metadata and its arrays by group (``model``, ``opt``).

    Attributes:
        meta: the JSON metadata (configs, variable paths, trainer state …).
        model: the model variables' values, in order.
        opt: the optimizer variables' values, in order.
        shared: indices of the model variables that were read from the epoch record.
        format: ``ckpt`` (compact) or ``npz`` (old stores).
    """

    meta: dict[str, Any]
    model: list[np.ndarray]
    opt: list[np.ndarray]
    shared: list[int] = field(default_factory=list)
    format: str = "ckpt"


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def encode(
    meta: Mapping[str, Any],
    model_vars: Sequence[np.ndarray],
    opt_vars: Sequence[np.ndarray],
    *,
    sources: Mapping[int, SharedSource] | None = None,
    record: Callable[[str, str], np.ndarray | None] | None = None,
) -> tuple[bytes, list[int]]:
    """Encode a checkpoint; model variables the record holds exactly are left out (shared).

    Args:
        meta: JSON-able metadata.
        model_vars: model variable values, in order.
        opt_vars: optimizer variable values, in order.
        sources: per model variable index, where the epoch record may hold it.
        record: ``record(layer, key)``: the array the epoch record holds (as it is written), or
            None. A variable is shared only when rebuilding it from that array gives the same
            bits; otherwise it is stored.

    Returns:
        The file's bytes, and the indices of the shared variables.

    Example:
        >>> data, shared = encode({"n": 1}, [np.zeros(3, np.float32)], [])
        >>> decode(data).model[0].dtype
        dtype('float32')
    """
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    offset = 0
    shared: list[int] = []
    for group, values in (("model", model_vars), ("opt", opt_vars)):
        for i, v in enumerate(values):
            a = np.asarray(v, order="C")
            e: dict[str, Any] = {"group": group, "i": i, "dtype": a.dtype.str, "shape": list(a.shape)}
            src = (sources or {}).get(i) if group == "model" else None
            if src is not None and record is not None:
                held = record(src.layer, src.key)
                if held is not None:
                    try:
                        rebuilt = TRANSFORMS[src.transform](np.asarray(held), a.shape)
                    except (ValueError, KeyError):
                        rebuilt = None
                    if rebuilt is not None and _bits_equal(np.asarray(rebuilt, order="C"), a):
                        e["shared"] = {"layer": src.layer, "key": src.key, "transform": src.transform}
                        e["crc32"] = zlib.crc32(a.tobytes())
                        entries.append(e)
                        shared.append(i)
                        continue
            blob = bytes(_CODEC.encode(a)) if a.size else b""
            e["offset"], e["nbytes"] = offset, len(blob)
            offset += len(blob)
            blobs.append(blob)
            entries.append(e)
    header = json.dumps({"format": 2, "meta": dict(meta), "entries": entries}).encode()
    return MAGIC + struct.pack("<Q", len(header)) + header + b"".join(blobs), shared


def decode(data: bytes, record: Callable[[str, str], np.ndarray] | None = None, *, name: str = "checkpoint") -> CheckpointData:
    """Decode `encode`'s bytes; shared variables come from ``record(layer, key)``.

    Raises:
        CorruptStoreError: the bytes are not a checkpoint, or a shared array does not match.
        StoreError: the checkpoint shares arrays but no record was given.
    """
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
        raise CorruptStoreError(f"Checkpoint {name} is corrupt (not a revacnn checkpoint file)")
    (n,) = struct.unpack("<Q", data[len(MAGIC) : len(MAGIC) + 8])
    start = len(MAGIC) + 8
    try:
        header = json.loads(data[start : start + n])
    except ValueError as exc:
        raise CorruptStoreError(f"Checkpoint {name} is corrupt (its header: {exc})") from None
    body = memoryview(data)[start + n :]
    out: dict[str, list[np.ndarray]] = {"model": [], "opt": []}
    shared = []
    for e in header["entries"]:
        dtype, shape = np.dtype(e["dtype"]), tuple(e["shape"])
        if "shared" in e:
            s = e["shared"]
            if record is None:
                raise StoreError(
                    f"Checkpoint {name} shares its kernels with its epoch record: read it with the run "
                    "(`revacnn.trainer.checkpoint.load_run_checkpoint(run, epoch)` or `run.read_checkpoint(epoch)`)"
                )
            a = np.asarray(TRANSFORMS[s["transform"]](np.asarray(record(s["layer"], s["key"])), shape), order="C")
            if a.dtype != dtype or zlib.crc32(a.tobytes()) != e["crc32"]:
                raise CorruptStoreError(
                    f"Checkpoint {name}: the record's {s['layer']}/{s['key']} does not match the checkpoint "
                    f"(CRC-32 differs; expected the array the checkpoint was written with)"
                )
            shared.append(int(e["i"]))
        else:
            raw = bytes(body[e["offset"] : e["offset"] + e["nbytes"]])
            try:
                flat = np.frombuffer(_CODEC.decode(raw), dtype=dtype) if e["nbytes"] else np.zeros(0, dtype)
                a = flat.reshape(shape).copy()
            except Exception as exc:  # blosc raises assorted errors on garbled bytes
                raise CorruptStoreError(
                    f"Checkpoint {name} is corrupt ({type(exc).__name__}: {exc}); fork or resume from "
                    "another epoch (its other epochs are unaffected)"
                ) from None
        out[e["group"]].append(a)
    return CheckpointData(header["meta"], out["model"], out["opt"], shared)


# ---------------------------------------------------------------------------- files
def checkpoints_dir(layout: Layout, run_id: str) -> Path:
    """The folder of a run's checkpoint files."""
    return layout.checkpoint(run_id, 0).parent


def compact_path(layout: Layout, run_id: str, epoch: int) -> Path:
    """Path of the compact checkpoint of ``epoch``: ``checkpoints/eNNNNN.ckpt``."""
    return checkpoints_dir(layout, run_id) / f"{epoch_tag(epoch)}{SUFFIX}"


def checkpoint_file(layout: Layout, run_id: str, epoch: int) -> Path | None:
    """The checkpoint file of ``run_id``'s own ``epoch`` (compact first, then an old ``.npz``), or None."""
    for p in (compact_path(layout, run_id, epoch), layout.checkpoint(run_id, epoch)):
        if p.exists():
            return p
    return None


def _epoch_of(name: str) -> int | None:
    if name.startswith("."):
        return None
    stem, _, suffix = name.partition(".")
    if "." + suffix not in (SUFFIX, LEGACY_SUFFIX) or not stem.startswith("e") or not stem[1:].isdigit():
        return None
    return int(stem[1:])


def checkpoint_files(layout: Layout, run_id: str) -> dict[int, list[Path]]:
    """Every checkpoint file of a run by epoch (an epoch may have a compact and an old file)."""
    d = checkpoints_dir(layout, run_id)
    out: dict[int, list[Path]] = {}
    if not d.exists():
        return out
    for p in sorted(d.iterdir()):
        e = _epoch_of(p.name)
        if e is not None:
            out.setdefault(e, []).append(p)
    return out


def checkpoint_epochs(layout: Layout, run_id: str) -> list[int]:
    """The epochs of ``run_id`` that have a checkpoint file, ascending.

    Example:
        >>> checkpoint_epochs(store.layout, run.run_id)
        [0, 5, 10, 12]
    """
    return sorted(checkpoint_files(layout, run_id))


def write_file(path: Path, data: bytes) -> None:
    """Write checkpoint bytes atomically (temporary sibling, then rename; kill point in between)."""
    write_point(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        kill_point("checkpoint_write")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_checkpoint_file(path: Path, record: Callable[[str, str], np.ndarray] | None = None) -> CheckpointData:
    """Read a compact ``.ckpt`` or an old ``.npz`` checkpoint.

    Raises:
        StoreError: the file is missing. CorruptStoreError: it is corrupt.
    """
    import zipfile

    try:
        if path.suffix == LEGACY_SUFFIX:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["__meta__"]))
                model = [z[f"model_{i:04d}"] for i in range(meta["n_model"])]
                opt = [z[f"opt_{i:04d}"] for i in range(meta["n_optimizer"])]
            return CheckpointData(meta, model, opt, [], "npz")
        data = path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"Checkpoint {path} is missing") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise CorruptStoreError(
            f"Checkpoint {path} is corrupt ({type(exc).__name__}: {exc}); fork or resume from "
            "another epoch (its other epochs are unaffected)"
        ) from None
    try:
        return decode(data, record, name=str(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptStoreError(f"Checkpoint {path} is corrupt ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------------------- retention
def due(epoch: int, every: int, *, first: int, last: int) -> bool:
    """Whether retention ``every`` keeps an exact checkpoint at ``epoch``.

    Example:
        >>> [e for e in range(8) if due(e, 3, first=0, last=7)]
        [0, 3, 6, 7]
    """
    return epoch % max(int(every), 1) == 0 or epoch == first or epoch >= last


@dataclass
class GcItem:
    """One checkpoint file `collect` removes (or would remove)."""

    run_id: str
    epoch: int | None
    path: Path
    nbytes: int
    reason: str


def fork_points(store: Any) -> dict[str, set[int]]:
    """Per source run, the epochs forks were made from (the run that recorded each fork epoch)."""
    out: dict[str, set[int]] = {}
    for rid in store.run_ids():
        try:
            run = store.run(rid)
            if run.parent_run_id is None or run.fork_epoch is None:
                continue
            k = int(run.fork_epoch)
            source = next((r for e, r in store.run(run.parent_run_id).history() if e == k), run.parent_run_id)
        except Exception:  # a broken run is not ours to judge here: keep its parent's points
            continue
        out.setdefault(source, set()).add(k)
    return out


def collect(store: Any, *, dry_run: bool = False, every: int | None = None) -> list[GcItem]:
    """Remove the checkpoints no fork or resume can need; return what was (or would be) freed.

    Kept per run: every ``checkpoint_every``-th epoch (``every`` overrides the run's own), the
    run's first committed epoch (0, or its fork point), its last checkpoint, and every epoch a
    fork was made from. Removed: the rest, checkpoints of uncommitted epochs and left-over
    temporary files. Runs whose trainer is alive are left alone.

    Example:
        >>> freed = collect(store, dry_run=True)
        >>> sum(i.nbytes for i in freed)
    """
    from ._tables import committed_epochs

    if getattr(store, "url", None):
        raise StoreError(
            f"Received: store={store.url!r}; `revacnn gc` works on a store folder (its local cache of an "
            "object store holds only what this machine fetched): run it where the store is a folder, or "
            "thin the bucket with your object store's lifecycle rules"
        )
    points = fork_points(store)
    items: list[GcItem] = []
    for rid in store.run_ids():
        try:
            run = store.run(rid)
            if run.status == "running":
                continue
        except Exception:
            continue
        d = checkpoints_dir(store.layout, rid)
        if not d.exists():
            continue
        k = int(every or run.config.get("checkpoint_every") or 1)
        committed = set(committed_epochs(store.layout, rid))
        files = checkpoint_files(store.layout, rid)
        have = sorted(e for e in files if e in committed)
        keep: set[int] = set(points.get(rid, set()))
        if have:
            first = min(committed)
            keep |= {e for e in have if e % k == 0 or e == first}
            keep.add(have[-1])
        for p in sorted(d.iterdir()):
            e = _epoch_of(p.name)
            if e is None:
                if p.name.startswith(".") and p.name.endswith(".tmp") or ".tmp." in p.name:
                    items.append(GcItem(rid, None, p, _size(p), "temporary file"))
                continue
            if e not in committed:
                items.append(GcItem(rid, e, p, _size(p), "uncommitted epoch"))
            elif e not in keep:
                items.append(GcItem(rid, e, p, _size(p), f"retention every {k}"))
            elif len(files[e]) > 1 and p.suffix == LEGACY_SUFFIX:
                items.append(GcItem(rid, e, p, _size(p), "replaced by a compact checkpoint"))
    if not dry_run:
        for it in items:
            it.path.unlink(missing_ok=True)
    return items


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0
