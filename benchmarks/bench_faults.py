"""Faults: SIGKILL at each commit point and at random moments, a 40 s SIGSTOP, a full disk; durable commit cost.

Prints kills survived, epochs lost, half epochs seen (by the post-kill check and by a reader polling
while the trainer ran), resumes identical to the uninterrupted run (every epoch's metrics, kernels,
biases, uids and the steering event, bit for bit), the stalled trainer's status and the refused
resume, the full-disk outcome, and the cost of durable commits as a ratio to non-durable ones
(the same epoch record written alternately both ways, median and spread).

    python benchmarks/bench_faults.py [--random-kills 20] [--stop-s 40]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table  # noqa: E402


def _watch(kit, store, proc, run_id, expected, until=None, timeout=600.0):
    seen: set[int] = set()
    halves: list[int] = []
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            counts = kit.row_counts(store, run_id)
        except Exception:  # the run may not be listed yet
            counts = {}
        halves += kit.half_epochs(counts, expected)
        seen |= set(counts)
        if until is not None and until(seen):
            break
        time.sleep(0.05)
    return seen, halves


def _check(kit, path, run_id, expected, seen, halves, stats):
    try:
        st = kit.check_store(path, run_id, expected=expected, seen=sorted(seen))
    except Exception as exc:  # the store did not open / read: a kill not survived
        stats["not_survived"].append(f"{type(exc).__name__}: {exc}")
        return None
    # a kill that lands after the run ended (its process still exiting) leaves it `finished`
    ended = st["status"] == "finished" and st["epochs"] == sorted(expected)
    ok = not st["lost"] and not st["half_epochs"] and not halves and st["contiguous"] and (
        st["status"] == "interrupted" or ended)
    stats["survived" if ok else "not_survived"].append(run_id if ok else st)
    stats["epochs_lost"] += len(st["lost"])
    stats["half_epochs_seen"] += len(st["half_epochs"]) + len(halves)
    return st


def kill_points(kit, tmp, ref, expected, epochs, stats):
    import revacnn
    from revacnn.trainer import resume

    ref_store, ref_id = ref
    rows = []
    for fault in ("before_commit@2", "checkpoint_write@2", "command_popped", "event_written",
                  "compaction_written", "compaction_published"):
        path = tmp / f"kp-{fault.replace('@', '-')}"
        proc = kit.start_child(path, epochs=epochs, env={"REVACNN_FAULT": fault})
        run_id = proc.stdout.readline().strip()
        reader = revacnn.open_store(path, mode="r")
        seen, halves = _watch(kit, reader, proc, run_id, expected)
        proc.wait()
        killed = proc.returncode == -signal.SIGKILL
        stats["kills"] += int(killed)
        st = _check(kit, path, run_id, expected, seen, halves, stats) if killed else None
        store = revacnn.open_store(path)
        resume(store, run_id, progress=False)
        same = kit.run_differences(store, run_id, ref_store, ref_id) == []
        stats["resumes"] += 1
        stats["resumes_identical"] += int(same)
        rows.append({"kill point": fault, "killed": killed, "epochs after kill": st and st["epochs"],
                     "status": st and st["status"], "resume identical": same})
    return rows


def random_kills(kit, tmp, ref, expected, epochs, n, rng, stats):
    import revacnn

    ref_store, ref_id = ref
    chains = []
    chain = 0
    while stats["random_kills"] < n:
        chain += 1
        path = tmp / f"rand-{chain}"
        proc = kit.start_child(path, epochs=epochs)
        run_id = proc.stdout.readline().strip()
        reader = revacnn.open_store(path, mode="r")
        kills_here = 0
        while True:
            # wait until this child has committed an epoch of its own (so every kill is followed by
            # progress), then kill it at a random moment within about two epochs' time
            before = set(reader.run(run_id).epochs())
            seen, halves = _watch(kit, reader, proc, run_id, expected,
                                  until=lambda s: bool(s - before))  # noqa: B023
            t_kill = time.time() + rng.uniform(0.0, 2.5)
            more, h = _watch(kit, reader, proc, run_id, expected, until=lambda s: time.time() >= t_kill)  # noqa: B023
            seen |= more
            halves += h
            if proc.poll() is None and stats["random_kills"] < n:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            if proc.returncode == -signal.SIGKILL:
                stats["kills"] += 1
                stats["random_kills"] += 1
                kills_here += 1
                _check(kit, path, run_id, expected, seen, halves, stats)
            if reader.run(run_id).status == "finished":
                break
            proc = kit.start_resume(path, run_id)  # every kill is followed by a resume
            stats["resumes"] += 1
        same = kit.run_differences(revacnn.open_store(path, mode="r"), run_id, ref_store, ref_id) == []
        stats["resumes_identical"] += int(same) * kills_here
        stats["random_resumes_checked"] += kills_here
        chains.append({"chain": chain, "kills": kills_here, "final run identical": same})
    return chains


def stalled(kit, tmp, expected, stop_s):
    import revacnn
    from revacnn.storage import store as store_mod

    path = tmp / "stalled"
    proc = kit.start_child(path, epochs=200)
    run_id = proc.stdout.readline().strip()
    reader = revacnn.open_store(path, mode="r")
    _watch(kit, reader, proc, run_id, expected, until=lambda s: 0 in s)
    proc.send_signal(signal.SIGSTOP)
    time.sleep(stop_s)  # the fault itself: the trainer stays stopped this long
    run = reader.run(run_id)
    age = time.time() - float(run.status_info["heartbeat_at"])
    status = run.status
    r = subprocess.run([sys.executable, "-m", "revacnn.cli", "resume", "--store", str(path), run_id, "--quiet"],
                       capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    msg = [ln for ln in r.stderr.splitlines() if ln.startswith("revacnn")]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return {"stopped_s": stop_s, "heartbeat_age_s": round(age, 1), "timeout_s": store_mod.HEARTBEAT_TIMEOUT_S,
            "status_while_stopped": status, "resume_exit": r.returncode, "resume_message": msg[-1] if msg else "",
            "status_after_kill": reader.run(run_id).status}


def full_disk(kit, tmp, ref, epochs):
    import numpy as np

    import revacnn

    ref_store, ref_id = ref
    path = tmp / "enospc"
    r = subprocess.run(
        [sys.executable, "-m", "revacnn.cli", "train", "--store", str(path), "--dataset", "shapes", "--model",
         "convnetjs", *kit.child_args(epochs=epochs), "--no-embeddings", "--quiet"],
        capture_output=True, text=True, env={**os.environ, "REVACNN_FAULT": "enospc@8", "TF_CPP_MIN_LOG_LEVEL": "3"})
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("revacnn")]
    run_id = r.stdout.split()[0]
    run = revacnn.open_store(path, mode="r").run(run_id)
    ref = ref_store.run(ref_id)
    intact = all(np.array_equal(run.epoch(e).layer(n).kernel, ref.epoch(e).layer(n).kernel)
                 for e in run.epochs() for n in run.epoch(e).layer_names if run.epoch(e).layer(n).has("kernel"))
    return {"exit": r.returncode, "messages": len(lines), "traceback": "Traceback" in r.stderr,
            "status": run.status, "committed": run.epochs(), "committed_intact": intact,
            "message": lines[0] if lines else ""}


def commit_cost(ref, samples):
    """The reference's epoch-1 record written again, durable and not, alternated: seconds per commit."""
    import numpy as np

    import revacnn
    from revacnn.storage import RunWriter

    ref_store, ref_id = ref
    run = ref_store.run(ref_id)
    rec = run.epoch(1)
    layers = {}
    for name in rec.layer_names:
        lr = rec.layer(name)
        arrays = {k: np.asarray(lr.group[k][:]) for k in lr.group.array_keys()}
        arrays["_attrs"] = dict(lr.group.attrs)
        layers[name] = arrays
    import pyarrow.compute as pc

    from revacnn.storage._tables import read_run_table

    def epoch1(t: str) -> dict:
        tab = read_run_table(ref_store.layout, ref_id, t)
        return tab.filter(pc.equal(tab["epoch"], 1)).to_pydict()

    rows = {t: epoch1(t) for t in ("layers", "filters", "predictions")}
    metrics = {k: v[0] for k, v in epoch1("epochs").items() if k not in ("run_id", "epoch", "committed_at")}
    with np.load(ref_store.layout.checkpoint(ref_id, 1)) as z:
        ckpt = {k: z[k] for k in z.files}
    tmp = Path(tempfile.mkdtemp(prefix="revacnn-commit-", dir=str(ref_store.root.parent)))
    store = revacnn.open_store(tmp / "store")
    w = RunWriter.create(store, session_id="bench", config={})
    times: dict[object, list[float]] = {True: [], False: [], "fsync_each": []}
    modes: list[object] = [False, True, "fsync_each"]
    epoch = 0
    for i in range(samples):
        for mode in (modes if i % 2 == 0 else modes[::-1]):  # alternated, order flipped every round
            w.durable = mode is not False
            if mode == "fsync_each":  # durable without syncfs: an fsync per file and folder
                os.environ["REVACNN_NO_SYNCFS"] = "1"
            epoch += 1
            t = time.perf_counter()
            w.write_checkpoint(epoch, ckpt)
            w.write_arrays(epoch, layers, {"metrics": {}}, extra={"predictions": rec.probabilities})
            for tname, cols in rows.items():
                w.write_rows(tname, epoch, {**cols, "epoch": [epoch] * len(cols["epoch"])})
            w.commit(epoch, metrics)
            times[mode].append(time.perf_counter() - t)
            os.environ.pop("REVACNN_NO_SYNCFS", None)
    w.set_status("finished")
    ratios = [d / n for d, n in zip(times[True], times[False], strict=True)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    from revacnn.storage._durable import syncfs

    return {"samples_each": samples, "durable_commit_ms": 1000 * statistics.median(times[True]),
            "non_durable_commit_ms": 1000 * statistics.median(times[False]),
            "durable_ratio": statistics.median(times[True]) / statistics.median(times[False]),
            "pair_ratio_median": statistics.median(ratios), "pair_ratio_iqr": [q[0], q[2]],
            "pair_ratio_range": [min(ratios), max(ratios)], "syncfs": syncfs(tmp),
            "fsync_each_commit_ms": 1000 * statistics.median(times["fsync_each"]),
            "fsync_each_ratio": statistics.median(times["fsync_each"]) / statistics.median(times[False])}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--random-kills", type=int, default=20)
    p.add_argument("--stop-s", type=float, default=40.0)
    p.add_argument("--commit-samples", type=int, default=9)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from revacnn import _faultkit as kit

    tmp = Path(tempfile.mkdtemp(prefix="revacnn-faults-"))
    t0 = time.time()
    ref = kit.train_reference(tmp / "ref", epochs=args.epochs)
    expected = kit.row_counts(*ref)
    stats = {"kills": 0, "random_kills": 0, "survived": [], "not_survived": [], "epochs_lost": 0,
             "half_epochs_seen": 0, "resumes": 0, "resumes_identical": 0, "random_resumes_checked": 0}
    points = kill_points(kit, tmp, ref, expected, args.epochs, stats)
    chains = random_kills(kit, tmp, ref, expected, args.epochs, args.random_kills, random.Random(args.seed), stats)
    stop = stalled(kit, tmp, expected, args.stop_s)
    disk = full_disk(kit, tmp, ref, args.epochs)
    cost = commit_cost(ref, args.commit_samples)
    res = {
        "kills": stats["kills"],
        "kills_survived": len(stats["survived"]),
        "random_kills": stats["random_kills"],
        "epochs_lost": stats["epochs_lost"],
        "half_epochs_seen": stats["half_epochs_seen"],
        "resumes_identical": f"{stats['resumes_identical']}/{len(points) + stats['random_resumes_checked']}",
        "stalled": stop,
        "full_disk": disk,
        "durable_commit": cost,
        "not_survived": stats["not_survived"],
        "wall_s": round(time.time() - t0, 1),
    }
    print(table(points))
    print()
    print(table(chains))
    print()
    print(table([{k: res[k] for k in ("kills", "kills_survived", "random_kills", "epochs_lost", "half_epochs_seen",
                                      "resumes_identical")}]))
    print()
    print(table([stop]))
    print()
    print(table([disk]))
    print()
    print(table([{k: v for k, v in cost.items()}]))
    print(json.dumps(res, default=str))
    return res


if __name__ == "__main__":
    main()
