"""`make bench`: run every benchmark in its own process, print its table, save the figures to results/."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = [
    ("recording", "bench_recording.py", ["--durable"]),
    ("recording-profile", "profile_recording.py", []),
    ("freeze", "bench_freeze.py", []),
    ("surgery", "bench_surgery.py", []),
    ("patterns", "bench_patterns.py", []),
    ("embedding", "bench_embedding.py", []),
    ("replay", "bench_replay.py", []),
    ("live", "bench_live.py", []),
    ("store_sql", "bench_store_sql.py", ["--old"]),
    ("store_commit", "bench_store_commit.py", []),
    ("store", "bench_store.py", []),
    ("distributed", "bench_distributed.py", []),
]


def main() -> int:
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    only = set(sys.argv[1:])
    failed = []
    for name, script, args in ORDER:
        if only and name not in only:
            continue
        path = HERE / script
        if not path.exists():
            print(f"== {name}: {script} missing, skipped")
            continue
        print(f"== {name} ({script})", flush=True)
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        print("\n".join(ln for ln in lines if not ln.startswith("{")))
        if proc.returncode != 0:
            failed.append(name)
            print(proc.stderr[-3000:])
            continue
        for ln in reversed(lines):
            if ln.startswith("{"):
                (out_dir / f"{name}.json").write_text(ln + "\n")
                break
        print(f"({time.perf_counter() - t:.0f} s)\n", flush=True)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
