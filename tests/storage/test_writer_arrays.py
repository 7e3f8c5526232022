"""The epoch arrays written directly to files are the Zarr documents and data zarr itself writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

import revacnn
from revacnn.storage import RunWriter, create_session
from revacnn.storage.writer import array_codec, dimension_names

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64"]


def _layers(rng: np.random.Generator) -> dict[str, dict[str, object]]:
    layers: dict[str, dict[str, object]] = {
        "conv1": {
            "kernel": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
            "activations": rng.normal(size=(2, 4, 5, 5)).astype(np.float16),
            "bias": np.zeros(4, np.float32),  # the fill value: zarr would skip the chunk
            "filter_uids": np.arange(4, dtype=np.int64),
            "frozen": np.array([0, 1, 0, 0], np.uint8),
            "embedding": rng.normal(size=(4, 2)).astype(np.float32),
            "_attrs": {"kind": "conv", "index": 0, "frozen": False},
        },
        "dense1": {
            "kernel": rng.normal(size=(5, 7)).astype(np.float32),
            "grad_l1": rng.random(5).astype(np.float32),
            "_attrs": {"kind": "dense", "index": 1, "frozen": True},
        },
        "block1/dw": {  # a nested model's layer: its parent group is implicit, as zarr makes it
            "kernel": rng.normal(size=(3, 3, 3, 1)).astype(np.float32),
            "_attrs": {"kind": "conv", "index": 3, "frozen": False},
        },
        "block1/pw": {
            "kernel": rng.normal(size=(2, 1, 1, 3)).astype(np.float32),
            "_attrs": {"kind": "conv", "index": 4, "frozen": False},
        },
        "odd": {  # 0-d, empty and big-endian arrays, and all the dtypes
            "scalar": np.float32(2.5),
            "empty": np.zeros((0,), np.float32),
            "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
            **{f"d_{t}": (rng.random(6) * 100).astype(t) for t in DTYPES},
            "_attrs": {"kind": "conv", "index": 2, "frozen": False},
        },
    }
    return layers


def _zarr_reference(path: Path, layers, attrs, extra, codec=array_codec) -> None:
    """The epoch written as `RunWriter.write_arrays` does with zarr's own API (``codec(dtype)``)."""
    root = zarr.open_group(str(path), mode="w")
    for lname, arrays in layers.items():
        g = root.create_group(lname)
        kind = dict(arrays.get("_attrs", {})).get("kind", "conv")
        for key, value in arrays.items():
            if key == "_attrs":
                continue
            a = np.ascontiguousarray(value)
            g.create_array(key, data=a, chunks=a.shape or None, compressors=codec(a.dtype),
                           dimension_names=dimension_names(key, a.ndim, kind))
        g.attrs.update(dict(arrays.get("_attrs", {})))
    for key, value in extra.items():
        a = np.ascontiguousarray(value)
        root.create_array(key, data=a, chunks=a.shape or None, compressors=codec(a.dtype),
                          dimension_names=dimension_names(key, a.ndim, "extra"))
    root.attrs.update({"layers": list(layers), **attrs})


def _docs(path: Path, *, drop_empty: bool = False) -> dict[str, dict]:
    """Every ``zarr.json`` of ``path``; ``drop_empty``: without the optional members zarr writes empty."""
    docs = {}
    for p in sorted(path.rglob("zarr.json")):
        doc = json.loads(p.read_text())
        if drop_empty:
            doc = {k: v for k, v in doc.items() if not (k in ("attributes", "storage_transformers") and not v)}
        docs[str(p.relative_to(path))] = doc
    return docs


@pytest.fixture()
def written(tmp_path):
    rng = np.random.default_rng(0)
    layers = _layers(rng)
    attrs = {"metrics": {"loss": 1.25, "val_loss": None, "lr": 1e-3, "n_batches": 3}}
    extra = {"predictions": rng.random((2, 4)).astype(np.float32)}
    store = revacnn.open_store(tmp_path / "store")
    sid = create_session(store, dataset="d", model="m", probe_images=np.zeros((2, 4, 4, 3), np.uint8),
                         probe_labels=np.array([0, 1]), probe_indices=[0, 1], class_names=["a", "b"],
                         config={})
    w = RunWriter.create(store, session_id=sid, config={}, durable=False)
    w.write_arrays(3, layers, attrs, extra=extra)
    ref = tmp_path / "ref.zarr"
    _zarr_reference(ref, layers, attrs, extra)
    return store.layout.epoch_arrays(w.run_id, 3), ref, layers, extra


def test_documents_equal_zarrs(written):
    mine, ref, _, _ = written
    assert _docs(mine, drop_empty=True) == _docs(ref, drop_empty=True)  # (0-d, empty: written by zarr)
    # compact: no indentation or spaces, and the empty optional members left out
    text = (mine / "conv1" / "kernel" / "zarr.json").read_text()
    assert " " not in text and "storage_transformers" not in text and '"attributes"' not in text


def test_codecs_by_dtype_and_the_chunks_zarr_writes(written):
    """float16 (activations): zstd 5 + byte shuffle; the rest: zstd 3 + bit shuffle; chunk bytes as zarr's."""
    mine, ref, _, _ = written
    for rel, (cname, clevel, shuffle) in {
        "conv1/activations": ("zstd", 5, "shuffle"),
        "conv1/kernel": ("zstd", 3, "bitshuffle"),
        "conv1/filter_uids": ("zstd", 3, "bitshuffle"),
        "odd/d_uint8": ("zstd", 3, "bitshuffle"),
    }.items():
        conf = json.loads((mine / rel / "zarr.json").read_text())["codecs"][1]["configuration"]
        assert (conf["cname"], conf["clevel"], conf["shuffle"]) == (cname, clevel, shuffle)
    for rel in ("conv1/activations", "conv1/kernel", "dense1/kernel", "odd/d_uint8", "odd/d_bool"):
        chunk = [p for p in (mine / rel).rglob("*") if p.is_file() and p.name != "zarr.json"]
        want = [p for p in (ref / rel).rglob("*") if p.is_file() and p.name != "zarr.json"]
        assert len(chunk) == len(want) == 1 and chunk[0].read_bytes() == want[0].read_bytes()


def test_every_array_reads_back_as_zarr_reads_its_own(written):
    mine, ref, layers, extra = written
    a, b = zarr.open_group(str(mine), mode="r"), zarr.open_group(str(ref), mode="r")
    for lname, arrays in layers.items():
        for key, value in arrays.items():
            if key == "_attrs":
                continue
            got, want = a[lname][key], b[lname][key]
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got[...], want[...])
            np.testing.assert_array_equal(got[...], np.asarray(value))
            assert got.metadata.dimension_names == want.metadata.dimension_names
    np.testing.assert_array_equal(a["predictions"][...], extra["predictions"])
    assert dict(a.attrs) == dict(b.attrs)
    assert dict(a["dense1"].attrs) == {"kind": "dense", "index": 1, "frozen": True}


def test_the_public_reader_and_the_durable_file_list(tmp_path, written):
    mine, _, layers, extra = written
    store = revacnn.open_store(mine.parents[3])
    from revacnn.storage.store import EpochRecord

    rec = EpochRecord(store, mine.parents[1].name, 3)
    assert rec.layer_names == list(layers)
    assert rec.conv_layers == ["conv1", "block1/dw", "block1/pw", "odd"]
    np.testing.assert_array_equal(rec.layer("block1/pw").kernel, layers["block1/pw"]["kernel"])
    np.testing.assert_array_equal(rec.layer("conv1").kernel, layers["conv1"]["kernel"])
    np.testing.assert_array_equal(rec.probabilities, extra["predictions"])
    # the durable writer collects every file and folder it wrote, as a walk of the tree finds them
    w = RunWriter(store, mine.parents[1].name, durable=True)
    w.write_arrays(4, layers, {}, extra=extra)
    path = store.layout.epoch_arrays(w.run_id, 4)
    on_disk = {p for p in path.rglob("*") if p.is_file()}
    assert on_disk <= set(w._sync.files)
    assert {p for p in path.rglob("*") if p.is_dir()} | {path} <= set(w._sync.dirs)


def test_an_older_stores_codec_reads_back(tmp_path, written):
    """An epoch of an older store (zstd 3 + byte shuffle for every dtype, zarr's full documents) still reads."""
    mine, _, layers, extra = written
    store = revacnn.open_store(mine.parents[3])
    run_id = mine.parents[1].name
    old = store.layout.epoch_arrays(run_id, 5)
    _zarr_reference(old, layers, {}, extra, codec=lambda dt: zarr.codecs.BloscCodec(cname="zstd", clevel=3,
                                                                                      shuffle="shuffle"))
    conf = json.loads((old / "conv1" / "activations" / "zarr.json").read_text())["codecs"][1]["configuration"]
    assert (conf["clevel"], conf["shuffle"]) == (3, "shuffle")
    from revacnn.storage.store import EpochRecord

    rec = EpochRecord(store, run_id, 5)
    np.testing.assert_array_equal(rec.layer("conv1").activations, layers["conv1"]["activations"])
    np.testing.assert_array_equal(rec.layer("dense1").kernel, layers["dense1"]["kernel"])
