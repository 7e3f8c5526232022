"""The SQL sandbox: user queries read no file, write none, and are stopped by the time and memory limits."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import revacnn
from revacnn.errors import SQLError
from revacnn.storage import RunWriter, create_session
from revacnn.storage.sql import SQLEngine, memory_bytes, sandboxed_connection

TOKEN = f"secret-{uuid.uuid4().hex}"  # in every secret file, and in the name of every write target


def _listing(root: Path) -> set[tuple[str, int]]:
    """Every file and folder under ``root`` (hidden ones included) with its size."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out.add((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1))
    return out


def _files_named_with_token(*roots: Path) -> list[str]:
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            found += [os.path.join(dirpath, n) for n in dirnames + filenames if TOKEN in n]
            if Path(dirpath) == Path(tempfile.gettempdir()):
                dirnames[:] = []  # the shared temp folder: its top level only
    return found


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A small store, and a working folder holding secret files, DuckDB's ``.tmp`` folder among them."""
    root = tmp_path_factory.mktemp("sandbox")
    st = revacnn.open_store(root / "store")
    sid = create_session(st, dataset="toy", model="toy", probe_images=np.zeros((2, 4, 4, 3), np.uint8),
                         probe_labels=np.array([0, 1]), probe_indices=[0, 1], class_names=["a", "b"],
                         config={})
    w = RunWriter.create(st, session_id=sid, config={}, name="root")
    F = 3
    for e in range(3):
        w.write_arrays(e, {"conv1": {"kernel": np.zeros((F, 3, 3, 3), np.float32), "bias": np.zeros(F, np.float32),
                                     "filter_uids": np.arange(F), "_attrs": {"kind": "conv"}}}, {"metrics": {}})
        w.write_rows("filters", e, {"run_id": [w.run_id] * F, "epoch": [e] * F, "layer": ["conv1"] * F,
                                    "filter": list(range(F)), "filter_uid": list(range(F))})
        w.commit(e, {"loss": 1.0, "val_accuracy": 0.5})
    w.set_status("finished")

    cwd = root / "cwd"
    (cwd / ".tmp").mkdir(parents=True)
    outside = root / "outside"
    outside.mkdir()
    csv = f"name,value\n{TOKEN},1\n"
    for folder in (cwd, cwd / ".tmp", outside, st.root):
        (folder / "secret.txt").write_text(TOKEN + "\n")
        (folder / "secret.csv").write_text(csv)
        (folder / "secret.json").write_text(f'{{"value": "{TOKEN}"}}\n')
        pq.write_table(pa.table({"value": [TOKEN]}), folder / "secret.parquet")
    (cwd / "file.csv").write_text(csv)
    return st, cwd, outside


@pytest.fixture()
def in_sandbox(sandbox, monkeypatch):
    """Run in the working folder with the secrets; afterwards check that no file was created anywhere."""
    st, cwd, outside = sandbox
    monkeypatch.chdir(cwd)
    roots = (cwd, outside, st.root)
    before = [_listing(r) for r in roots]
    yield st, cwd, outside
    assert [_listing(r) for r in roots] == before, "a query created or changed a file"
    assert _files_named_with_token(cwd.parent, Path(tempfile.gettempdir())) == []


def _refused(store, query: str, fragment: str = "") -> str:
    with pytest.raises(SQLError) as info:
        store.sql(query)
    message = str(info.value)
    assert TOKEN not in message, message
    assert "\n" not in message.strip(), message  # one line
    assert fragment in message, message
    return message


def test_the_secrets_are_real_files_duckdb_would_read(sandbox, monkeypatch):
    """Without the sandbox, DuckDB reads these paths (even its own .tmp folder with external access off)."""
    _, cwd, _ = sandbox
    monkeypatch.chdir(cwd)
    con = duckdb.connect(":memory:")
    con.execute("SET enable_external_access = false")
    allowed = con.execute("SELECT current_setting('allowed_directories')").fetchone()[0]
    if any(str(a).rstrip("/").endswith(".tmp") for a in allowed):  # the DuckDB behaviour the sandbox closes
        assert con.execute("SELECT content FROM read_text('.tmp/secret.txt')").fetchone()[0].strip() == TOKEN
    plain = duckdb.connect(":memory:")
    assert plain.execute("SELECT content FROM read_text('.tmp/secret.txt')").fetchone()[0].strip() == TOKEN
    assert plain.execute("SELECT name FROM read_csv('file.csv')").fetchone()[0] == TOKEN


READERS = [
    "SELECT content FROM read_text('{p}.txt')",
    "SELECT content FROM read_blob('{p}.txt')",
    "SELECT * FROM read_csv('{p}.csv')",
    "SELECT * FROM read_csv_auto('{p}.csv')",
    "SELECT * FROM sniff_csv('{p}.csv')",
    "SELECT * FROM parquet_metadata('{p}.parquet')",
    "SELECT * FROM parquet_schema('{p}.parquet')",
    "SELECT * FROM read_parquet('{p}.parquet')",
    "SELECT * FROM read_json_auto('{p}.json')",
    "SELECT * FROM glob('{p}.*')",
    "SELECT * FROM '{p}.csv'",
    "SELECT * FROM '{p}.parquet'",
    "SELECT * FROM query_table('{p}.csv')",
    "SELECT * FROM query('SELECT content FROM read_text(''{p}.txt'')')",
    "WITH x AS (SELECT content FROM read_text('{p}.txt')) SELECT * FROM x",
    "SELECT (SELECT content FROM read_text('{p}.txt')) AS leak FROM epochs",
    "SELECT * FROM epochs WHERE EXISTS (SELECT 1 FROM read_csv('{p}.csv'))",
]
PATHS = {
    "tmp-relative": ".tmp/secret",
    "tmp-dot-relative": "./.tmp/secret",
    "tmp-absolute": "{cwd}/.tmp/secret",
    "relative": "secret",
    "absolute": "{outside}/secret",
    "traversal": ".tmp/../../outside/secret",
    "in-the-store": "{store}/secret",
}


@pytest.mark.parametrize("where", list(PATHS))
@pytest.mark.parametrize("reader", READERS)
def test_no_query_reads_a_file(in_sandbox, reader, where):
    st, cwd, outside = in_sandbox
    path = PATHS[where].format(cwd=cwd, outside=outside, store=st.root)
    _refused(st, reader.format(p=path))


def test_a_bare_file_name_is_not_a_table(in_sandbox):
    st, _, _ = in_sandbox
    _refused(st, "SELECT * FROM 'file.csv'", "cannot read or write files")
    _refused(st, "SELECT * FROM file.csv")
    _refused(st, "SELECT content FROM read_text('.tmp/secret.txt')", "cannot read or write files")


WRITES = [
    ("COPY epochs TO 'out-{t}.csv'", "Only SELECT"),
    ("COPY (SELECT * FROM epochs) TO '{tmp}/out-{t}.parquet' (FORMAT parquet)", "Only SELECT"),
    ("COPY epochs TO '.tmp/out-{t}.csv'", "Only SELECT"),
    ("COPY epochs FROM '.tmp/secret.csv'", "Only SELECT"),
    ("EXPORT DATABASE 'out-{t}'", "Only SELECT"),
    ("IMPORT DATABASE '.tmp'", "Only SELECT"),
    ("ATTACH 'out-{t}.duckdb' AS other", "Only SELECT"),
    ("ATTACH ':memory:' AS other", "Only SELECT"),
    ("DETACH memory", "Only SELECT"),
    ("INSTALL httpfs", "Only SELECT"),
    ("LOAD httpfs", "Only SELECT"),
    ("LOAD '{tmp}/out-{t}.duckdb_extension'", "Only SELECT"),
    ("SET enable_external_access = true", "Only SELECT"),
    ("SET GLOBAL disabled_filesystems = ''", "Only SELECT"),
    ("SET temp_directory = '{tmp}/out-{t}'", "Only SELECT"),
    ("RESET lock_configuration", "Only SELECT"),
    ("PRAGMA memory_limit = '100GB'", "Only SELECT"),
    ("PRAGMA enable_profiling", "Only SELECT"),
    ("CALL pragma_version()", "Only SELECT"),
    ("CREATE SECRET s (TYPE s3, KEY_ID 'k', SECRET 'v')", "Only SELECT"),
    ("CREATE TABLE t AS SELECT * FROM read_text('.tmp/secret.txt')", "Only SELECT"),
    ("CHECKPOINT", "Only SELECT"),
    ("EXPLAIN ANALYZE SELECT * FROM read_text('.tmp/secret.txt')", "Only SELECT"),
    ("SELECT * FROM query('COPY epochs TO ''out-{t}.csv''')", "SQL error"),
    ("SELECT * FROM query('ATTACH ''out-{t}.duckdb'' AS x')", "SQL error"),
    ("SELECT * FROM query('INSTALL httpfs')", "SQL error"),
    ("SELECT 1; COPY epochs TO 'out-{t}.csv'", "one statement"),
    ("SELECT 1; SELECT 2", "one statement"),
    ("SELECT * FROM epochs; DROP TABLE epochs", "one statement"),
    ("SET enable_external_access = true; SELECT content FROM read_text('.tmp/secret.txt')", "one statement"),
]


@pytest.mark.parametrize("query, fragment", WRITES, ids=[q for q, _ in WRITES])
def test_no_statement_but_one_select(in_sandbox, query, fragment):
    st, _, _ = in_sandbox
    _refused(st, query.format(t=TOKEN, tmp=tempfile.gettempdir()), fragment)


def test_the_sandbox_stays_sealed(in_sandbox):
    st, _, _ = in_sandbox
    for q in ("SET enable_external_access = true", "SELECT content FROM read_text('.tmp/secret.txt')"):
        _refused(st, q)
    got = st.sql(
        "SELECT current_setting('enable_external_access') AS ext, current_setting('temp_directory') AS tmp, "
        "current_setting('allowed_directories') AS dirs, current_setting('allowed_paths') AS paths, "
        "current_setting('lock_configuration') AS locked, current_setting('autoload_known_extensions') AS auto, "
        "current_setting('max_temp_directory_size') AS spill"
    ).iloc[0]
    assert not got.ext and got.locked and not got.auto
    assert got.tmp == "" and list(got.dirs) == []
    # the only files queries may read: the runs' committed Parquet files, which the views read in place
    committed = {str(p) for p in (st.root / "runs").rglob("*.parquet") if not p.name.startswith(".")}
    assert set(got.paths) == committed and len(committed) == 6, got.paths
    assert got.spill.startswith("0")
    # and the store's own tables still answer
    assert st.sql("SELECT count(*) AS n FROM filters").n[0] == 9
    assert st.sql("SELECT epoch FROM timeline ORDER BY epoch").epoch.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "query",
    [
        "SELECT count(*) FROM range(1000000) a, range(1000000) b",
        "SELECT count(*) FROM filters a, filters b, filters c, filters d, filters e, filters f, filters g, "
        "filters h, filters i, filters j",
    ],
)
def test_a_runaway_cross_join_is_stopped(in_sandbox, query):
    st, _, _ = in_sandbox
    with pytest.raises(SQLError, match=r"(time|memory) limit") as info:
        st.sql(query, timeout_s=0.5)
    assert "\n" not in str(info.value)


def test_a_memory_hungry_query_is_stopped_without_spilling(sandbox, tmp_path, monkeypatch):
    st, _, _ = sandbox
    monkeypatch.chdir(tmp_path)  # a folder without .tmp: DuckDB would create it to spill
    engine = SQLEngine(st, memory_limit="64MB")
    assert engine.query("SELECT count(*) AS n FROM filters").n[0] == 9
    for query in (
        "SELECT list(range) FROM range(100000000)",
        "SELECT * FROM range(50000000) ORDER BY random() OFFSET 49999999",
        "SELECT count(*) FROM range(5000000) a JOIN range(5000000) b ON a.range = b.range",
        "SELECT string_agg(repeat('x', 1000), '') FROM range(1000000)",
    ):
        with pytest.raises(SQLError, match="memory limit of 64MB"):
            engine.query(query, timeout_s=None)
    assert list(tmp_path.iterdir()) == []


def test_results_are_bounded_and_whole(sandbox):
    """A result is fetched in chunks, in order, none lost; one bigger than the memory limit is refused."""
    st, _, _ = sandbox
    engine = SQLEngine(st, memory_limit="64MB")
    got = engine.query("SELECT range AS i FROM range(200000) ORDER BY i", timeout_s=None)
    assert got.i.tolist() == list(range(200_000))  # several chunks
    assert len(engine.query("SELECT * FROM range(0)")) == 0
    # 9M rows of 8 bytes: little for DuckDB, which streams them, but 72 MB as a DataFrame
    with pytest.raises(SQLError, match="result needs more than the memory limit of 64MB"):
        engine.query("SELECT range AS i FROM range(9000000)", timeout_s=None)
    assert memory_bytes("1GB") == 10**9 and memory_bytes("512MiB") == 2**29
    with pytest.raises(SQLError, match="memory_limit='lots'"):
        SQLEngine(st, memory_limit="lots")


def test_sandboxed_connection_can_allow_named_files(tmp_path, monkeypatch):
    """For Parquet read in place: the named files only, nothing beside them."""
    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "ok.parquet")
    (tmp_path / "secret.txt").write_text(TOKEN)
    con = sandboxed_connection(lambda c: None, allowed_paths=[tmp_path / "ok.parquet"])
    assert con.execute(f"SELECT sum(x) FROM read_parquet('{tmp_path / 'ok.parquet'}')").fetchone()[0] == 3
    for q in (f"SELECT * FROM read_text('{tmp_path / 'secret.txt'}')", f"SELECT * FROM glob('{tmp_path}/*')",
              f"SELECT * FROM read_text('{tmp_path / 'ok.parquet'}/../secret.txt')"):
        with pytest.raises(duckdb.PermissionException):
            con.execute(q)
    with pytest.raises(duckdb.Error):
        con.execute("SET enable_external_access = true")


def _allowed(st) -> list[str]:
    return list(st.sql("SELECT current_setting('allowed_paths') AS p").p[0])


IN_PLACE = [
    ("SELECT * FROM read_parquet('/etc/passwd')", "cannot read or write files"),
    ("SELECT * FROM read_text('/etc/passwd')", "cannot read or write files"),
    ("SELECT * FROM read_csv('/etc/passwd')", "cannot read or write files"),
    ("SELECT * FROM glob('/etc/*')", "cannot read or write files"),
    ("SELECT * FROM read_parquet('{outside}/*.parquet')", "cannot read or write files"),
    ("SELECT * FROM read_parquet('{store}/*.parquet')", "cannot read or write files"),
    ("SELECT * FROM read_parquet('{store}/**/*.parquet')", "cannot read or write files"),
    ("SELECT * FROM read_parquet('{store}/runs/*/tables/filters/*.parquet')", "cannot read or write files"),
    ("SELECT * FROM glob('{store}/runs/*')", "cannot read or write files"),
    ("SELECT * FROM read_text('{seg_dir}/../../../run.json')", "cannot read or write files"),
    ("SELECT * FROM read_text('{allowed}/../../../../../secret.txt')", "cannot read or write files"),
    ("SELECT * FROM read_parquet(['{allowed}', '{store}/secret.parquet'])", "cannot read or write files"),
    ("COPY filters TO '{allowed}' (FORMAT parquet)", "Only SELECT"),
    ("COPY (SELECT '{t}' AS x) TO '{store}/out-{t}.parquet' (FORMAT parquet)", "Only SELECT"),
    ("SELECT * FROM query('COPY filters TO ''{allowed}'' (FORMAT parquet)')", "SQL error"),
]


@pytest.mark.parametrize("query, fragment", IN_PLACE, ids=[q for q, _ in IN_PLACE])
def test_the_views_files_are_the_only_ones_readable(in_sandbox, query, fragment):
    """The views read the store's committed Parquet files in place; a query names no other file."""
    st, _, outside = in_sandbox
    allowed = sorted(p for p in _allowed(st) if p.endswith("filters/e00001.parquet"))[0]
    seg_dir = str(Path(allowed).parent)
    before = Path(allowed).read_bytes()
    _refused(st, query.format(outside=outside, store=st.root, allowed=allowed, seg_dir=seg_dir, t=TOKEN), fragment)
    assert Path(allowed).read_bytes() == before


def test_an_uncommitted_segment_is_not_readable(tmp_path):
    """A half-written epoch's rows lie in the run's folder, beside readable segments, but stay unreadable."""
    st = revacnn.open_store(tmp_path / "store")
    sid = create_session(st, dataset="toy", model="toy", probe_images=np.zeros((2, 4, 4, 3), np.uint8),
                         probe_labels=np.array([0, 1]), probe_indices=[0, 1], class_names=["a", "b"], config={})
    w = RunWriter.create(st, session_id=sid, config={}, name="live", durable=False)
    for e in range(2):
        w.write_rows("filters", e, {"run_id": [w.run_id], "epoch": [e], "layer": ["conv1"], "filter": [0],
                                    "filter_uid": [0]})
    w.commit(0, {"loss": 1.0})
    half = st.layout.table_segment(w.run_id, "filters", 1)
    assert half.exists()
    assert st.sql("SELECT list(epoch) AS e FROM filters").e[0].tolist() == [0]
    assert str(half) not in _allowed(st)
    _refused(st, f"SELECT * FROM read_parquet('{half}')", "cannot read or write files")
    w.commit(1, {"loss": 0.5})  # committed now: the view shows it, and the file is allowed
    assert sorted(st.sql("SELECT list(epoch) AS e FROM filters").e[0].tolist()) == [0, 1]
    assert str(half) in _allowed(st)
