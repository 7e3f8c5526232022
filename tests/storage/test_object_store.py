"""A store at a URL: the store tests against a real S3 server (moto) on 127.0.0.1, trainers and readers in other caches."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

import revacnn
from revacnn.errors import StoreError, StoreNotFoundError, StoreURLError
from revacnn.storage import RunWriter, create_session

from .test_store import _epoch

BUCKET = "revacnn-test"


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on a free port of 127.0.0.1, with the environment pointing s3fs at it."""
    server_mod = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def _url() -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """``(location, open_writer_store, open_reader_store)``: a folder, or a bucket prefix with two caches.

    For s3 the writer and the reader work in separate cache folders, as two machines would.
    """
    if request.param == "local":
        loc = str(tmp_path / "store")
        return loc, (lambda: revacnn.open_store(loc, durable=False)), (lambda: revacnn.open_store(loc, mode="r"))
    request.getfixturevalue("s3_server")
    loc = _url()
    return (loc, lambda: revacnn.open_store(loc, durable=False, cache=tmp_path / "cache-writer"),
            lambda: revacnn.open_store(loc, mode="r", cache=tmp_path / "cache-reader"))


def _session(st) -> str:
    return create_session(st, dataset="toy", model="toy", probe_images=np.arange(2 * 4 * 4 * 3, dtype=np.uint8)
                          .reshape(2, 4, 4, 3), probe_labels=np.array([0, 1]), probe_indices=[5, 9],
                          class_names=["a", "b", "c"], config={})


@pytest.fixture()
def recorded(where):
    """A root run (epochs 0-3) and a fork of it at epoch 2 (epochs 2-4), written through the writer's store."""
    loc, open_w, open_r = where
    st = open_w()
    sid = _session(st)
    root = RunWriter.create(st, session_id=sid, config={"seed": 0}, name="root")
    for e in range(4):
        _epoch(root, e)
    root.set_status("finished")
    fork = RunWriter.create(st, session_id=sid, config={}, name="fork", parent_run_id=root.run_id, fork_epoch=2)
    for e in (2, 3, 4):
        _epoch(fork, e, val_acc=0.9)
    fork.set_status("finished")
    return st, open_r, (sid, root.run_id, fork.run_id)


# ---------------------------------------------------------------- the store tests, on a folder and on S3
def test_a_reader_elsewhere_sees_runs_epochs_arrays_and_probes(recorded):
    st, open_r, (sid, root, fork) = recorded
    reader = open_r()
    assert reader.run_ids() == sorted([root, fork]) and reader.session_ids() == [sid]
    assert reader.run(root).status == reader.run(fork).status == "finished"
    assert reader.run(fork).timeline() == [(0, root), (1, root), (2, fork), (3, fork), (4, fork)]
    for e in range(5):  # the kernels _epoch wrote: all equal to the epoch number
        k = reader.run(fork).epoch(e).layer("conv1").kernel
        assert k.shape == (3, 3, 3, 3) and (k == e).all()
    images, labels = reader.probes(sid)
    assert (images == np.arange(96, dtype=np.uint8).reshape(2, 4, 4, 3)).all() and labels.tolist() == [0, 1]
    tl = reader.sql(f"SELECT epoch, source_run_id, val_accuracy FROM timeline WHERE run_id='{fork}' ORDER BY epoch")
    assert tl.source_run_id.tolist() == [root, root, fork, fork, fork]
    assert tl.val_accuracy.tolist() == [0.5, 0.5, 0.9, 0.9, 0.9]


def test_half_written_epoch_is_invisible_to_readers(recorded):
    st, open_r, (_, root, _) = recorded
    w = RunWriter(st, root)
    _epoch(w, 4, commit=False)  # arrays and rows written, marker missing
    w._push()  # even pushed to the bucket, the epoch's objects are not an epoch
    reader = open_r()
    assert reader.run(root).epochs() == [0, 1, 2, 3]
    assert reader.sql(f"SELECT max(epoch) AS m FROM layers WHERE run_id='{root}'").m[0] == 3
    assert reader.sql(f"SELECT count(*) AS n FROM filters WHERE run_id='{root}'").n[0] == 4 * 3
    w.commit(4, {"loss": 0.2})
    reader.refresh()
    assert reader.run(root).epochs() == [0, 1, 2, 3, 4]
    assert (reader.run(root).epoch(4).layer("conv1").kernel == 4).all()


def test_compaction_reaches_readers_without_losing_an_epoch(recorded):
    st, open_r, (_, root, _) = recorded
    reader = open_r()
    before = reader.sql(f"SELECT * FROM filters WHERE run_id='{root}' ORDER BY epoch, filter")
    RunWriter(st, root).compact()
    reader.refresh()
    files = sorted(p.name for p in reader.layout.table_dir(root, "filters").iterdir())
    assert files == ["compact-g000001.parquet"]  # the old segments are gone from the reader's copy too
    after = reader.sql(f"SELECT * FROM filters WHERE run_id='{root}' ORDER BY epoch, filter")
    assert before.equals(after) and reader.run(root).epochs() == [0, 1, 2, 3]


def test_a_concurrent_reader_never_sees_a_half_epoch(recorded):
    """A writer commits epochs and compacts after each; a reader elsewhere polls SQL and the API."""
    st, open_r, (_, root, _) = recorded
    w = RunWriter(st, root)
    done = threading.Event()
    errors: list[BaseException] = []
    last = 10

    def write() -> None:
        try:
            for e in range(4, last):
                _epoch(w, e)
                if e % 2:
                    w.compact()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    reader = open_r()
    t = threading.Thread(target=write)
    t.start()
    reads, last_seen = 0, 0
    while not done.is_set() or reads < 3:
        reader.refresh()
        df = reader.sql(
            f"SELECT e.epoch, (SELECT count(*) FROM layers l WHERE l.run_id = e.run_id AND l.epoch = e.epoch) AS nl,"
            f" (SELECT count(*) FROM filters f WHERE f.run_id = e.run_id AND f.epoch = e.epoch) AS nf "
            f"FROM epochs e WHERE e.run_id = '{root}' ORDER BY e.epoch")
        assert (df.nl == 1).all() and (df.nf == 3).all(), df  # no half epoch
        epochs = df.epoch.tolist()
        assert epochs == list(range(len(epochs))) and len(epochs) >= last_seen, (epochs, last_seen)
        last_seen = len(epochs)
        own = reader.run(root).epochs()
        assert own == list(range(len(own)))
        assert (reader.run(root).epoch(own[-1]).layer("conv1").kernel == own[-1]).all()
        reads += 1
    t.join()
    assert not errors, errors
    reader.refresh()
    assert reader.run(root).epochs() == list(range(last))


def test_steering_commands_and_events_go_through_the_store(recorded):
    from revacnn.steering import parse, send, wait_for_event
    from revacnn.steering.channel import CommandQueue

    st, open_r, (sid, _, _) = recorded
    w = RunWriter.create(st, session_id=sid, config={}, name="steered")
    steerer = open_r()  # `revacnn steer` on another machine
    cmd = send(steerer, w.run_id, parse("freeze", ["conv1"]))
    q = CommandQueue(st, w.run_id)
    deadline = time.time() + 30
    popped: list = []
    while not popped and time.time() < deadline:  # the trainer's background sync pulls the command
        popped = q.pop(1, 0)
        if not popped and w._run_sync is not None:
            w._run_sync.once()
    (got, cid, err), = popped
    assert got.command_id == cmd.command_id and got.op == "freeze" and err is None
    w.write_event(event_id=cid, epoch=1, batch=0, kind=got.op, args=got.args, status="applied", message="ok")
    q.ack(cid)
    ev = wait_for_event(steerer, w.run_id, cmd.command_id, timeout_s=30)
    assert ev is not None and ev["status"] == "applied"
    w.set_status("finished")
    steerer.refresh()
    assert steerer.run(w.run_id).status == "finished"
    if st.url:  # the handled command left the bucket's queue for done/
        keys = st._mirror.backend.list(f"runs/{w.run_id}/commands/")
        assert [k.split("/")[-2] for k in keys] == ["done"], keys


# ---------------------------------------------------------------- URLs
def test_memory_url_works_in_process(tmp_path):
    url = f"memory://revacnn-{uuid.uuid4().hex[:8]}"
    with pytest.raises(StoreNotFoundError):
        revacnn.open_store(url, mode="r", cache=tmp_path / "x")
    st = revacnn.open_store(url, durable=False, cache=tmp_path / "a")
    sid = _session(st)
    w = RunWriter.create(st, session_id=sid, config={})
    for e in range(2):
        _epoch(w, e)
    w.set_status("finished")
    other = revacnn.open_store(url, mode="r", cache=tmp_path / "b")
    assert other.location == url and repr(other) == f"Store({url!r})"
    assert other.run(w.run_id).epochs() == [0, 1] and other.run(w.run_id).status == "finished"
    assert (other.run(w.run_id).epoch(1).layer("conv1").kernel == 1).all()
    # gc needs the whole store in one folder: on a URL it refuses, naming the store, and removes nothing
    from revacnn.storage.checkpoints import collect

    before = sorted(other._mirror.backend.list(""))
    with pytest.raises(StoreError, match="revacnn gc"):
        collect(other)
    assert sorted(other._mirror.backend.list("")) == before


def _cli(*args: str, cwd=None, env=None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    full.setdefault("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
    return subprocess.run([sys.executable, "-m", "revacnn.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=full, timeout=timeout)


@pytest.mark.parametrize("url, says", [("foo://bucket/x", "unknown protocol foo://"),
                                       ("gs://bucket/x", "gcsfs")])
def test_cli_bad_url_one_line_exit_2_no_folder(tmp_path, url, says):
    if says == "gcsfs":
        try:
            import gcsfs  # noqa: F401
            pytest.skip("gcsfs is installed here")
        except ImportError:
            pass
    r = _cli("runs", "--store", url, cwd=tmp_path)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and url in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []  # no folder named "foo:" or "gs:"
    with pytest.raises(StoreURLError):
        revacnn.open_store(url)


# ---------------------------------------------------------------- trainers on S3
TRAIN = ["--epochs", "2", "--train-size", "128", "--val-size", "64", "--batch-size", "32", "--probes", "4",
         "--no-embeddings", "--quiet"]


def _counts(store, run_id):
    df = store.sql(
        f"SELECT e.epoch, (SELECT count(*) FROM layers l WHERE l.run_id=e.run_id AND l.epoch=e.epoch) AS nl, "
        f"(SELECT count(*) FROM predictions p WHERE p.run_id=e.run_id AND p.epoch=e.epoch) AS np "
        f"FROM epochs e WHERE e.run_id='{run_id}' ORDER BY e.epoch")
    return {int(r.epoch): (int(r.nl), int(r.np)) for r in df.itertuples()}


def _start(args, cache, env=None):
    full = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "REVACNN_CACHE": str(cache), **(env or {})}
    full.setdefault("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
    return subprocess.Popen([sys.executable, "-m", "revacnn.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full)


def test_two_trainers_in_separate_caches_share_one_bucket_while_a_reader_reads(s3_server, tmp_path):
    url = _url()
    procs = [_start(["train", "--store", url, *TRAIN, "--seed", str(i)], tmp_path / f"cache-{i}") for i in range(2)]
    reader = revacnn.open_store(url, cache=tmp_path / "cache-reader")  # creates the store if first
    expected = None
    deadline = time.time() + 400
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        reader.refresh()
        for rid in reader.run_ids():
            counts = _counts(reader, rid)
            if counts:
                expected = expected or next(iter(counts.values()))
                assert set(counts.values()) == {expected}, counts  # never a half epoch
                assert sorted(counts) == list(range(len(counts)))
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    ids = sorted(o[0].split()[0] for o in outs)
    reader.refresh()
    assert reader.run_ids() == ids
    for rid in ids:
        run = reader.run(rid)
        assert run.status == "finished" and run.epochs() == [0, 1, 2]
        assert set(_counts(reader, rid).values()) == {expected}
        assert run.epoch(2).layer("conv1").kernel.ndim == 4
    seeds = reader.sql("SELECT json_extract(config, '$.seed')::INT AS s FROM runs ORDER BY s").s.tolist()
    assert seeds == [0, 1]


def test_sigkill_during_an_upload_loses_no_committed_epoch_and_resume_continues(s3_server, tmp_path):
    url = _url()
    # killed at an object put in the middle of epoch 2's push: epochs 0 and 1 are committed in the bucket
    reference = tmp_path / "ref"
    ref = _cli("train", "--store", str(reference), *TRAIN, "--epochs", "3")
    assert ref.returncode == 0, ref.stderr
    ref_store = revacnn.open_store(reference, mode="r")
    ref_id = ref_store.run_ids()[0]
    n_objects_epoch = len([p for p in (reference / "runs" / ref_id / "arrays.zarr" / "e00002").rglob("*")
                           if p.is_file()])
    proc = _start(["train", "--store", url, *TRAIN, "--epochs", "3"], tmp_path / "cache-a",
                  env={"REVACNN_FAULT": "before_commit@3", "REVACNN_SYNC_INTERVAL_S": "600"})
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == -9, err
    run_id = out.split()[0]
    # the killed trainer's cache holds uncommitted epoch 2 files; kill the next attempt mid-upload of them
    proc = _start(["resume", "--store", url, run_id, "--quiet"], tmp_path / "cache-a",
                  env={"REVACNN_FAULT": f"object_put@{n_objects_epoch // 2 + 3}",
                       "REVACNN_SYNC_INTERVAL_S": "600"})
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == -9, err
    reader = revacnn.open_store(url, mode="r", cache=tmp_path / "cache-reader")
    keys = reader._mirror.backend.list(f"runs/{run_id}/")
    assert any("/arrays.zarr/e00002/" in k for k in keys)  # killed with epoch 2 half uploaded ...
    assert f"runs/{run_id}/tables/epochs/e00002.parquet" not in keys  # ... before its marker
    counts = _counts(reader, run_id)
    want = _counts(ref_store, ref_id)
    assert counts and all(counts[e] == want[e] for e in counts), (counts, want)
    committed = reader.run(run_id).epochs()
    assert committed[:2] == [0, 1]
    for e in committed:  # every committed epoch's arrays are whole
        assert (reader.run(run_id).epoch(e).layer("conv1").kernel.shape
                == ref_store.run(ref_id).epoch(e).layer("conv1").kernel.shape)
    assert reader.run(run_id).status == "interrupted"
    # resume from another machine (a fresh cache) finishes the run
    r = _cli("resume", "--store", url, run_id, "--quiet", env={"REVACNN_CACHE": str(tmp_path / "cache-b")})
    assert r.returncode == 0, r.stderr
    reader.refresh()
    assert reader.run(run_id).status == "finished" and reader.run(run_id).epochs() == [0, 1, 2, 3]
    a = reader.sql(f"SELECT epoch, loss, val_loss FROM epochs WHERE run_id='{run_id}' ORDER BY epoch")
    b = ref_store.sql(f"SELECT epoch, loss, val_loss FROM epochs WHERE run_id='{ref_id}' ORDER BY epoch")
    assert a.equals(b), (a, b)  # the same numbers as the uninterrupted local run
    assert _counts(reader, run_id) == want


def test_steer_through_the_bucket_gets_applied(s3_server, tmp_path):
    url = _url()
    proc = _start(["train", "--store", url, *TRAIN, "--epochs", "8", "--train-size", "1024"], tmp_path / "cache-t",
                  env={"REVACNN_SYNC_INTERVAL_S": "0.2"})
    try:
        run_id = proc.stdout.readline().strip()
        assert run_id.startswith("run-"), proc.stderr.read() if proc.poll() is not None else run_id
        env = {"REVACNN_CACHE": str(tmp_path / "cache-s")}
        r = _cli("steer", "--store", url, run_id, "set-lr", "0.0005", "--timeout", "120", env=env)
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert "applied" in r.stdout + r.stderr
        proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader = revacnn.open_store(url, mode="r", cache=tmp_path / "cache-r")
    run = reader.run(run_id)
    assert run.status == "finished" and run.epochs() == list(range(9))
    ev = run.events()
    lr = ev[ev.kind == "set-lr"]
    assert len(lr) == 1 and lr.status.iloc[0] == "applied"
    applied_at = int(lr.epoch.iloc[0])  # the lr of the epochs after it is the steered one
    lrs = reader.sql(f"SELECT epoch, lr FROM epochs WHERE run_id='{run_id}' ORDER BY epoch").set_index("epoch").lr
    assert lrs[8] == pytest.approx(0.0005), (applied_at, lrs)


def test_the_apps_store_readers_take_a_url(tmp_path, monkeypatch):
    from revacnn.ui.data import ReplayData, StoreWatcher

    monkeypatch.setenv("REVACNN_CACHE", str(tmp_path / "app-cache"))
    url = f"memory://revacnn-app-{uuid.uuid4().hex[:8]}"
    st = revacnn.open_store(url, durable=False, cache=tmp_path / "trainer")
    w = RunWriter.create(st, session_id=_session(st), config={})
    _epoch(w, 0)
    watcher = StoreWatcher.shared(url)
    assert watcher.root == url and not (tmp_path / "memory:").exists()
    before = watcher.check()
    _epoch(w, 1)
    deadline = time.time() + 30
    while watcher.check() == before and time.time() < deadline:  # the poller pulls the new epoch
        time.sleep(0.05)
    assert watcher.check() > before
    data = ReplayData.shared(url)
    assert data.path == url and data.store.run(w.run_id).epochs() == [0, 1]
    assert data.store.epoch_arrays(w.run_id, 1).startswith(str(tmp_path / "app-cache"))
    w.set_status("finished")


def test_an_abandoned_run_leaves_the_bucket(tmp_path):
    url = f"memory://revacnn-abandon-{uuid.uuid4().hex[:8]}"
    st = revacnn.open_store(url, durable=False, cache=tmp_path / "a")
    w = RunWriter.create(st, session_id=_session(st), config={})
    _epoch(w, 0)
    other = revacnn.open_store(url, mode="r", cache=tmp_path / "b")
    assert other.run_ids() == [w.run_id]
    w.abandon()  # what a fork whose changes are refused does
    assert st._mirror.backend.list(f"runs/{w.run_id}/") == {}
    other.refresh()
    assert other.run_ids() == [] and st.run_ids() == []


def test_cli_missing_bucket_or_store_is_one_line(s3_server, tmp_path):
    r = _cli("runs", "--store", "s3://no-such-bucket-revacnn/x", cwd=tmp_path,
             env={"REVACNN_CACHE": str(tmp_path / "c")})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "No revacnn store at s3://no-such-bucket-revacnn/x" in r.stderr
    assert list(tmp_path.iterdir()) == []  # no cache folder for a store that is not there
