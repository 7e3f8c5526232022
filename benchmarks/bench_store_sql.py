"""`revacnn sql` at scale: a group-by over 10M filter rows in 100 runs, fresh process and warm, peak memory.

Builds a synthetic store through the storage writer API (runs, epoch commits, compaction) with the
Parquet segments of the big tables written straight into the store's layout (fast): ``--runs`` runs of
``--epochs`` epochs, ``--filters`` filter rows per epoch; ``--live`` of the runs stay uncompacted
(one segment per table and epoch, as during training), the others are compacted (one file per table).

Then, alternated, ``--samples`` times each:

- **fresh**: ``python -m revacnn.cli sql --store S QUERY`` in a new process (wall time, and CPU time
  and peak RSS of that process from ``wait4``);
- **warm**: the same query again in one process whose engine already answered it once (wall and
  CPU time: on a shared machine the CPU time is the steadier figure);
- **fresh ``SELECT 1``**: the process start-up, the store's listing and the views, without the scan;
- with ``--old``: the engine before issue 14 (git ``--old-ref``, every row loaded into DuckDB), fresh
  and warm, in the same rounds.

Prints medians with min..max and the ratio old/new; the last line is JSON (for run_all.py).

Example:
    $ .venv/bin/python benchmarks/bench_store_sql.py --samples 5 --old
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUERY = "SELECT run_id, layer, avg(grad_l1) AS g FROM filters GROUP BY ALL"
LAYERS = 10


def _filters_table(run_id: str, epochs: list[int], n: int, rng: np.random.Generator) -> pa.Table:
    """``n`` filter rows per epoch in ``epochs``: ``LAYERS`` layers of ``n // LAYERS`` filters."""
    from revacnn.storage._schema import SEGMENT_TABLES

    per = n // LAYERS
    m = per * LAYERS * len(epochs)
    layer = np.tile(np.repeat(np.array([f"conv{i}" for i in range(LAYERS)]), per), len(epochs))
    filt = np.tile(np.arange(per, dtype=np.int32), LAYERS * len(epochs))
    cols: dict[str, Any] = {
        "run_id": pa.array([run_id] * m, pa.string()),
        "epoch": np.repeat(np.array(epochs, np.int32), per * LAYERS),
        "layer": layer,
        "filter": filt,
        "filter_uid": (np.tile(np.arange(per * LAYERS), len(epochs))).astype(np.int64),
        "frozen": np.zeros(m, bool),
        "dominant_channel": rng.integers(0, 3, m).astype(np.int8),
    }
    schema = SEGMENT_TABLES["filters"]
    arrays = []
    for f in schema:
        v = cols.get(f.name)
        if v is None:
            v = rng.random(m)
        arrays.append(pa.array(v, type=f.type) if not isinstance(v, pa.Array) else v)
    return pa.Table.from_arrays(arrays, schema=schema)


def build_store(path: Path, *, runs: int, epochs: int, filters: int, live: int, seed: int = 0) -> dict[str, Any]:
    """Write the synthetic store at ``path``; return its shape (rows, files, bytes)."""
    import revacnn
    from revacnn.storage import RunWriter, create_session
    from revacnn.storage._schema import SEGMENT_TABLES
    from revacnn.storage._tables import write_parquet_atomic

    rng = np.random.default_rng(seed)
    st = revacnn.open_store(path, durable=False)
    sid = create_session(st, dataset="synthetic", model="synthetic", probe_images=np.zeros((8, 4, 4, 3), np.uint8),
                         probe_labels=np.arange(8) % 2, probe_indices=list(range(8)), class_names=["a", "b"],
                         config={})
    lay = st.layout
    for r in range(runs):
        w = RunWriter.create(st, session_id=sid, config={"i": r}, name=f"run{r}", durable=False)
        rid = w.run_id
        for e in range(epochs):
            write_parquet_atomic(_filters_table(rid, [e], filters, rng), lay.table_segment(rid, "filters", e))
            lt = pa.table({"run_id": [rid] * LAYERS, "epoch": pa.array([e] * LAYERS, pa.int32()),
                           "layer": [f"conv{i}" for i in range(LAYERS)], "kind": ["conv"] * LAYERS,
                           "grad_l1": rng.random(LAYERS)})
            write_parquet_atomic(_conform(lt, SEGMENT_TABLES["layers"]), lay.table_segment(rid, "layers", e))
            w.commit(e, {"loss": float(rng.random()), "val_accuracy": float(rng.random())})
        if r < runs - live:
            w.compact()
            w.set_status("finished")
        w.lease.release()
    files = sum(1 for _ in (path / "runs").rglob("*.parquet"))
    size = sum(p.stat().st_size for p in (path / "runs").rglob("*.parquet"))
    return {"runs": runs, "live_runs": live, "filter_rows": runs * epochs * (filters // LAYERS * LAYERS),
            "parquet_files": files, "parquet_mb": round(size / 1e6, 1)}


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    from revacnn.storage._tables import _conform as conform

    return conform(t, schema)


def _fresh_rss(pythonpath: Path, store: Path, query: str) -> tuple[float, float, float, str]:
    """Wall seconds, CPU seconds (user + system), peak RSS (MB) and stdout of one ``revacnn sql`` process."""
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    r, w = os.pipe()
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child: stdout to the pipe, then exec the CLI
        os.close(r)
        os.dup2(w, 1)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        os.chdir(pythonpath)
        os.execve(sys.executable, [sys.executable, "-m", "revacnn.cli", "sql", "--store", str(store), query], env)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        proc = subprocess.run([sys.executable, "-m", "revacnn.cli", "sql", "--store", str(store), query],
                              capture_output=True, text=True, env=env, cwd=str(pythonpath))
        raise RuntimeError(f"revacnn sql failed: {proc.stderr.strip()}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, b"".join(chunks).decode()


WARM_SCRIPT = r"""
import json, sys, time
import revacnn
store = revacnn.open_store(sys.argv[1], mode="r")
query, n = sys.argv[2], int(sys.argv[3])
store.sql(query)
out, cpu = [], []
for _ in range(n):
    t, c = time.perf_counter(), time.process_time()
    df = store.sql(query)
    out.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
print(json.dumps({"times": out, "cpu": cpu, "rows": len(df)}))
"""


def _warm(pythonpath: Path, store: Path, query: str, n: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of ``n`` warm queries in one process (after a first one)."""
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    proc = subprocess.run([sys.executable, "-c", WARM_SCRIPT, str(store), query, str(n)], capture_output=True,
                          text=True, env=env, cwd=str(pythonpath))
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return got["times"], got["cpu"]


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _old_checkout(ref: str, where: Path) -> Path | None:
    """A copy of ``revacnn/`` at git ``ref`` (the engine before issue 14), or None if git has no such ref."""
    dest = where / "old"
    try:
        subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", ref], check=True, capture_output=True)
        dest.mkdir()
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "revacnn"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=tar.stdout, check=True)
    except (subprocess.CalledProcessError, OSError):
        return None
    return dest


def _measure(engines: dict[str, Path], store: Path, query: str, samples: int, warm_n: int) -> list[dict[str, Any]]:
    """Alternated fresh/warm samples of each engine on ``store``; an engine that fails once is dropped."""
    keys = ("fresh", "fresh_cpu", "rss", "warm", "warm_cpu", "select1", "select1_cpu")
    res: dict[str, dict[str, list[float]]] = {k: {key: [] for key in keys} for k in engines}
    failed: dict[str, str] = {}
    lines: dict[str, int] = {}
    for _ in range(samples):
        for name, path in engines.items():
            if name in failed:
                continue
            try:
                wall, cpu, rss, out = _fresh_rss(path, store, query)
                warm, warm_cpu = _warm(path, store, query, warm_n)
                one, one_cpu, _, _ = _fresh_rss(path, store, "SELECT 1")  # start-up, listing and views only
            except RuntimeError as exc:
                failed[name] = str(exc).strip().splitlines()[-1][:200]
                continue
            values = (wall, cpu, rss, statistics.median(warm), statistics.median(warm_cpu), one, one_cpu)
            for key, v in zip(keys, values, strict=True):
                res[name][key].append(v)
            lines[name] = len(out.splitlines())
    rows = []
    for name in engines:
        if name in failed:
            rows.append({"engine": name, "failed": failed[name]})
            print(f"{name:>4}: fails: {failed[name]}")
            continue
        r = res[name]
        st = {key: _stats(r[key]) for key in keys}
        rows.append({"engine": name, **{key: st[key] for key in keys}})
        f, fc, w, wc, m = (st[k] for k in ("fresh", "fresh_cpu", "warm", "warm_cpu", "rss"))
        print(f"{name:>4}: fresh {f['median']:.3f} s ({f['min']:.3f}..{f['max']:.3f}; CPU {fc['median']:.3f} s), "
              f"warm {w['median'] * 1e3:.1f} ms ({w['min'] * 1e3:.1f}..{w['max'] * 1e3:.1f}; "
              f"CPU {wc['median'] * 1e3:.1f} ms), peak RSS {m['median']:.0f} MB ({m['min']:.0f}..{m['max']:.0f}); "
              f"{lines[name]} output lines; fresh `SELECT 1` {st['select1']['median']:.3f} s "
              f"(CPU {st['select1_cpu']['median']:.3f} s)")
    if "old" in res and "new" in res and "old" not in failed and "new" not in failed:
        for key in keys:
            ratio = statistics.median(res["old"][key]) / statistics.median(res["new"][key])
            print(f"old/new {key}: {ratio:.1f}x")
    return rows


def _store(path: Path, **shape: int) -> dict[str, Any]:
    t = time.perf_counter()
    if (path / "revacnn-store.json").exists():
        out = {"reused": str(path)}
    else:
        out = build_store(path, **shape)
    print(f"store {path.name}: {out} (ready in {time.perf_counter() - t:.0f} s)", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--filters", type=int, default=5000, help="filter rows per run and epoch")
    ap.add_argument("--live", type=int, default=5, help="runs left uncompacted (per-epoch segments)")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--warm-n", type=int, default=5, help="warm queries per sample (their median is the sample)")
    ap.add_argument("--query", default=QUERY)
    ap.add_argument("--dir", type=Path, help="keep (or reuse) the synthetic stores in this folder")
    ap.add_argument("--old", action="store_true",
                    help="also time the engine of --old-ref (loads every row), here and on a 1M-row store")
    ap.add_argument("--old-ref", default="524c897")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-store-sql-"))
    where = args.dir or tmp
    where.mkdir(parents=True, exist_ok=True)
    try:
        engines = {"new": ROOT}
        if args.old:
            old = _old_checkout(args.old_ref, tmp)
            if old is None:
                print(f"old engine: git ref {args.old_ref} not found, skipped")
            else:
                engines["old"] = old
        results = {}
        big = where / "store-big"
        results["big"] = {"store": _store(big, runs=args.runs, epochs=args.epochs, filters=args.filters,
                                          live=args.live)}
        results["big"]["engines"] = _measure(engines, big, args.query, args.samples, args.warm_n)
        if "old" in engines:
            small = where / "store-1m"
            results["1m"] = {"store": _store(small, runs=10, epochs=args.epochs, filters=args.filters, live=1)}
            results["1m"]["engines"] = _measure(engines, small, args.query, args.samples, args.warm_n)
        print(f"targets (big store): fresh <= 1 s, warm <= 0.1 s; {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}")
        print(json.dumps({"query": args.query, "samples": args.samples, "results": results}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
