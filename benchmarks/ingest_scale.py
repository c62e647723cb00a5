"""Ingest at scale: `llmrec data prepare --k-core 5` on generated Amazon Reviews 2023 files of growing size.

For each size (default 2M, 10M, 30M reviews) one synthetic file is generated (``benchmarks/ingest.py``'s
generator: the official schema, Zipf-like users and items), then prepared end to end in a child process:
with the default DuckDB path and memory limit; at the sizes given by ``--low-limit-at``, again with a lower
DuckDB memory limit; and at the sizes given by ``--numpy-at``, with the in-memory numpy path (the code
before dedup and k-core moved into DuckDB) for comparison. Records wall time, reviews/s, peak RSS of the
child and the load average. Writes ``benchmarks/results/ingest_scale.json`` and ``ingest_scale.md``.

    python benchmarks/ingest_scale.py --cache work/ingest-cache         # about 25 minutes on 2 cores (generating)
    python benchmarks/ingest_scale.py --sizes 200000,1000000 --numpy-at 200000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import _run_child  # the same child runner and RSS measurement

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RATE, TARGET_RSS = 200_000, int(2.5e9)  # 2.5 GB read as 10^9 bytes, the stricter reading


def wait_quiet(below: float, max_wait_s: float) -> float:
    """Wait until the 1-minute load average drops below ``below`` (the previous run's own load decays at the
    pace of that average), at most ``max_wait_s``; returns the load average then."""
    t0 = time.monotonic()
    while os.getloadavg()[0] >= below and time.monotonic() - t0 < max_wait_s:
        time.sleep(5)
    return os.getloadavg()[0]


def prepare(src: Path, out: Path, *extra: str, quiet_below: float = 0.5, max_wait_s: float = 150.0) -> dict:
    cmd = [sys.executable, "-m", "llmrec.cli", "data", "prepare", str(src), str(out), "--k-core", "5", "-q", *extra]
    load = wait_quiet(quiet_below, max_wait_s)
    run = _run_child(cmd)
    if run["rc"] != 0:
        raise SystemExit(f"prepare {' '.join(extra)} failed:\n{run['stderr'][-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    shutil.rmtree(out)
    return {"wall_s": run["wall_s"], "cpu_s": run["cpu_s"], "peak_rss_bytes": max(run["peak_rss_bytes"],
                                                                                   run["peak_rss_polled_bytes"]),
            "load_avg_1min_before": load, "load_avg_1min_after": os.getloadavg()[0],
            "fingerprint": manifest["fingerprint"], "counts": manifest["counts"], "stage_seconds": manifest["timings"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000000,10000000,30000000")
    ap.add_argument("--numpy-at", default="2000000", help="sizes also prepared by the numpy path ('' = none)")
    ap.add_argument("--low-limit-at", default="10000000", help="sizes also prepared with --memory-limit LOW")
    ap.add_argument("--low-limit", default="1GB")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--quiet-below", type=float, default=0.5,
                    help="before each run, wait (at most --max-wait seconds) for the 1-minute load average to drop below this")
    ap.add_argument("--max-wait", type=float, default=150.0)
    ap.add_argument("--cache", type=Path, default=None,
                    help="keep generated files here (Synthetic-<N>.jsonl.gz) and reuse them on the next run")
    args = ap.parse_args()
    numpy_at = {int(x) for x in args.numpy_at.split(",") if x}
    low_at = {int(x) for x in args.low_limit_at.split(",") if x}
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        work = Path(tempfile.mkdtemp(prefix="llmrec-scale-", dir=args.workdir))
        try:
            src = (args.cache or work) / f"Synthetic-{n}.jsonl.gz"
            if not src.exists():
                src.parent.mkdir(parents=True, exist_ok=True)
                print(f"generating {n:,} reviews ...", flush=True)
                t0 = time.perf_counter()
                gen = _run_child([sys.executable, str(Path(__file__).parent / "ingest.py"), "--generate-only", str(src),
                                  "--lines", str(n), "--users", str(max(250_000, n // 8)),
                                  "--items", str(max(100_000, n // 20))])
                if gen["rc"] != 0:
                    raise SystemExit(gen["stderr"][-3000:])
                print(f"{n:,} reviews generated in {time.perf_counter() - t0:.0f}s "
                      f"({src.stat().st_size / 1024**2:,.0f} MiB)", flush=True)
            variants = [("duckdb, memory limit 2GB (default)", ())]
            if n in low_at:
                variants.append((f"duckdb, memory limit {args.low_limit}", ("--memory-limit", args.low_limit)))
            if n in numpy_at:
                variants.append(("numpy (the path before this change)", ("--engine", "numpy")))
            for label, extra in variants:
                r = prepare(src, work / "out", *extra, quiet_below=args.quiet_below, max_wait_s=args.max_wait)
                row = {"lines": n, "variant": label, "reviews_per_s": n / r["wall_s"], **r}
                print(json.dumps({k: v for k, v in row.items() if k != "counts"}), flush=True)
                rows.append(row)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    same = {}
    for r in rows:
        same.setdefault(r["lines"], set()).add(r["fingerprint"])
    defaults = [r for r in rows if r["variant"].endswith("(default)")]
    targets = {
        "peak_rss<=2.5GB_at_every_size": all(r["peak_rss_bytes"] <= TARGET_RSS for r in defaults),
        ">=200k_reviews_per_s_at_10M_and_30M": all(r["reviews_per_s"] >= TARGET_RATE for r in defaults
                                                   if r["lines"] >= 10_000_000),
        "same_fingerprint_across_variants": all(len(v) == 1 for v in same.values()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ingest_scale.json").write_text(json.dumps({"rows": rows, "targets": targets, "cpus": os.cpu_count()},
                                                          indent=2))
    md = ["# Ingest at scale (`llmrec data prepare --k-core 5`, generated 2023-schema reviews, 2 cores)", "",
          ("End to end in a child process (start-up included); peak RSS of the child in MiB and in GB (10^9 bytes); "
           "the 1-minute load average before and after each run (2 cores: near 0 is a quiet machine; each run waits "
           f"for it to drop below {args.quiet_below}, at most {args.max_wait:.0f} s, since the previous run's own "
           "load decays slowly)."), "",
          "| reviews | variant | seconds | reviews/s | peak RSS | load avg before / after | kept interactions |",
          "|---:|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['lines']:,} | {r['variant']} | {r['wall_s']:.1f} | {r['reviews_per_s']:,.0f} | "
           f"{r['peak_rss_bytes'] / 1024**2:,.0f} MiB ({r['peak_rss_bytes'] / 1e9:.2f} GB) | "
           f"{r['load_avg_1min_before']:.2f} / {r.get('load_avg_1min_after', float('nan')):.2f} | "
           f"{r['counts']['final']:,} |" for r in rows]
    stages = list(dict.fromkeys(k for r in rows for k in r.get("stage_seconds", {})))
    md += ["", "Seconds per stage (the manifest's `timings`):", "",
           "| reviews | variant | " + " | ".join(stages) + " |", "|---:|---|" + "---:|" * len(stages)]
    md += [f"| {r['lines']:,} | {r['variant']} | "
           + " | ".join(f"{r['stage_seconds'][k]:.1f}" if k in r.get("stage_seconds", {}) else "-" for k in stages)
           + " |" for r in rows]
    md += ["", "Targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in targets.items()), ""]
    (RESULTS / "ingest_scale.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
