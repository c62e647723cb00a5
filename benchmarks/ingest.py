"""Ingest benchmark: `llmrec data prepare` on a synthetic Amazon Reviews 2023 file.

Generates a gzipped JSON Lines file in the official 2023 review schema (rating, title, text,
images, asin, parent_asin, user_id, timestamp in ms, helpful_vote, verified_purchase) with
Zipf-like user activity and item popularity, then measures, each in a child process:

1. end to end: ``llmrec data prepare FILE OUT --k-core 5`` (wall time, peak RSS);
2. the parsing stage alone: ``readers.stage_reviews`` into Parquet (wall time, peak RSS).

Writes ``benchmarks/results/ingest.json`` and ``benchmarks/results/ingest.md``.

    .venv/bin/python benchmarks/ingest.py               # 2,000,000 reviews
    .venv/bin/python benchmarks/ingest.py --lines 200000 --keep
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version as _version
from pathlib import Path

# numpy, pyarrow and duckdb are imported only in the generator child: a child started from a big
# parent would inherit the parent's peak RSS in its ru_maxrss (Linux counts the pre-exec memory).
RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RATE = 200_000  # reviews per second, end to end
TARGET_RSS_BYTES = 2 * 1024**3

WORDS = [
    "great", "product", "quality", "price", "works", "well", "love", "easy", "use", "would",
    "recommend", "bought", "gift", "daughter", "son", "small", "large", "size", "fits", "perfectly",
    "color", "bright", "nice", "soft", "cheap", "broke", "after", "weeks", "months", "returned",
    "disappointed", "excellent", "value", "money", "fast", "shipping", "arrived", "packaging",
    "damaged", "smell", "strong", "light", "heavy", "sturdy", "flimsy", "battery", "lasts", "long",
    "charge", "screen", "sound", "clear", "comfortable", "wear", "daily", "kitchen", "office",
    "car", "travel", "kids", "dog", "cat", "smells", "cleans", "easily", "instructions",
    "confusing", "setup", "simple", "minutes", "again", "definitely", "buy", "five", "stars",
    "okay", "expected", "better", "worth", "every", "penny", "replacement", "original",
]


def _zipf_choice(rng, n: int, size: int, a: float, shift: float):
    """``size`` draws from ``0..n-1`` with P(rank r) ~ 1/(r + shift)^a, ids shuffled."""
    import numpy as np

    p = 1.0 / (np.arange(n, dtype=np.float64) + shift) ** a
    draws = np.searchsorted(np.cumsum(p / p.sum()), rng.random(size), side="right")
    return rng.permutation(n)[np.minimum(draws, n - 1)]


def _phrases(rng, count: int, lo: int, hi: int, end: str) -> list[str]:
    out = []
    for _ in range(count):
        words = rng.choice(WORDS, size=int(rng.integers(lo, hi + 1)))
        out.append(" ".join(words).capitalize() + end)
    return out


def generate(path: Path, n_lines: int, n_users: int = 250_000, n_items: int = 100_000, seed: int = 0) -> dict:
    """Write ``n_lines`` reviews to gzipped JSON Lines ``path`` (DuckDB does the formatting and gzip).

    Returns the number of distinct users and items that occur.
    """
    import duckdb
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    sentences = _phrases(rng, 4000, 5, 16, ".")
    titles = _phrases(rng, 1000, 1, 6, "")
    n_sent = rng.integers(1, 6, size=n_lines)  # 1..5 sentences
    sent_idx = rng.integers(1, len(sentences) + 1, size=(5, n_lines))
    # Reviews of a user cluster in time around a user-specific date (2012-2023), unix ms.
    user = _zipf_choice(rng, n_users, n_lines, a=1.0, shift=20.0)
    base = rng.integers(1_330_000_000_000, 1_690_000_000_000, size=n_users)
    ts = base[user] + rng.integers(0, 3 * 365 * 86_400_000, size=n_lines)
    table = pa.table({
        "u": user,
        "i": _zipf_choice(rng, n_items, n_lines, a=1.0, shift=10.0),
        "variant": rng.integers(0, 3, size=n_lines),
        "rating": rng.choice([1.0, 2.0, 3.0, 4.0, 5.0], p=[0.08, 0.05, 0.08, 0.17, 0.62], size=n_lines),
        "ts": ts,
        "title_idx": rng.integers(1, len(titles) + 1, size=n_lines),
        "n_sent": n_sent,
        **{f"s{k}": sent_idx[k] for k in range(5)},
        "helpful": rng.geometric(0.6, size=n_lines) - 1,
        "verified": rng.random(n_lines) < 0.9,
        "has_image": rng.random(n_lines) < 0.05,
    })
    con = duckdb.connect(config={"threads": os.cpu_count() or 2})
    con.register("g", table)
    con.execute("CREATE TABLE sentences AS SELECT unnest(?::VARCHAR[]) AS s", [sentences])
    con.execute("CREATE TABLE titles AS SELECT unnest(?::VARCHAR[]) AS t", [titles])
    image_type = "STRUCT(small_image_url VARCHAR, medium_image_url VARCHAR, large_image_url VARCHAR, " \
                 "attachment_type VARCHAR)[]"
    sql = f"""
        WITH lists AS (SELECT (SELECT list(s) FROM sentences) AS sl, (SELECT list(t) FROM titles) AS tl)
        SELECT g.rating, tl[g.title_idx] AS title,
               array_to_string(list_slice([sl[g.s0], sl[g.s1], sl[g.s2], sl[g.s3], sl[g.s4]], 1, g.n_sent), ' ')
                 AS text,
               CASE WHEN g.has_image THEN [{{
                 'small_image_url': 'https://m.media-amazon.com/images/I/' || md5(g.ts::VARCHAR)[:11] || '._SL256_.jpg',
                 'medium_image_url': 'https://m.media-amazon.com/images/I/' || md5(g.ts::VARCHAR)[:11] || '._SL800_.jpg',
                 'large_image_url': 'https://m.media-amazon.com/images/I/' || md5(g.ts::VARCHAR)[:11] || '.jpg',
                 'attachment_type': 'IMAGE'}}]::{image_type}
               ELSE []::{image_type} END AS images,
               'B0' || upper(md5('a' || g.i::VARCHAR || '-' || g.variant::VARCHAR)[:8]) AS asin,
               'B0' || upper(md5('p' || g.i::VARCHAR)[:8]) AS parent_asin,
               'A' || upper(md5('u' || g.u::VARCHAR)[:27]) AS user_id,
               g.ts AS timestamp, g.helpful AS helpful_vote, g.verified AS verified_purchase
        FROM g, lists
    """
    con.execute(f"COPY ({sql}) TO '{path}' (FORMAT json, COMPRESSION gzip)")
    con.close()
    return {"users": int(np.unique(table.column("u").to_numpy()).size),
            "items": int(np.unique(table.column("i").to_numpy()).size)}


def _poll_hwm(pid: int, stop: threading.Event, peak: list[int]) -> None:
    """Track the child's VmHWM (peak resident set of its current image) from /proc."""
    status = Path(f"/proc/{pid}/status")
    while not stop.is_set():
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        except (OSError, ValueError, IndexError):
            pass
        stop.wait(0.05)


def _run_child(cmd: list[str]) -> dict:
    """Run ``cmd``; wall seconds, peak RSS (bytes) of that child alone, exit code, output.

    Peak RSS: ``ru_maxrss`` from ``wait4`` for this child (``getrusage(RUSAGE_CHILDREN)`` would be
    the maximum over all children), cross-checked by polling ``/proc/PID/status``.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        stop, polled = threading.Event(), [0]
        poller = threading.Thread(target=_poll_hwm, args=(proc.pid, stop, polled), daemon=True)
        poller.start()
        # wait4 (not proc.wait) reaps the child and returns its own resource usage.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        stop.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "peak_rss_polled_bytes": polled[0],
                "cpu_s": usage.ru_utime + usage.ru_stime, "rc": proc.returncode,
                "stdout": out.read(), "stderr": err.read()}


STAGE_CHILD = """
import json, sys, time
t_start = time.perf_counter()
from importlib.metadata import version as _version
from pathlib import Path
import duckdb
from llmrec.data.prepare import PrepareConfig
from llmrec.data.readers import stage_reviews
cfg = PrepareConfig()
out = Path(sys.argv[2])
con = duckdb.connect(config={"memory_limit": cfg.memory_limit, "threads": cfg.threads,
                             "temp_directory": str(out.parent / "spill"), "preserve_insertion_order": True})
t0 = time.perf_counter()
rep = stage_reviews(con, Path(sys.argv[1]), "amazon2023", out, fast=sys.argv[3] == "fast")
print(json.dumps({"seconds": time.perf_counter() - t0, "imports_seconds": t0 - t_start,
                  "lines": rep.lines, "rows": rep.rows, "bad": rep.bad_lines}))
"""


def _fmt_bytes(n: float) -> str:
    return f"{n / 1024**2:,.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=2_000_000, help="reviews to generate (default 2,000,000)")
    ap.add_argument("--users", type=int, default=250_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--k-core", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the generated file and outputs (prints where)")
    ap.add_argument("--workdir", type=Path, default=None, help="folder for the generated file (default: a temp dir)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--generate-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.generate_only:
        print(json.dumps(generate(args.generate_only, args.lines, args.users, args.items)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="llmrec-ingest-", dir=args.workdir))
    src = work / "Synthetic.jsonl.gz"
    try:
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        gen = _run_child([sys.executable, __file__, "--generate-only", str(src), "--lines", str(args.lines),
                          "--users", str(args.users), "--items", str(args.items)])
        if gen["rc"] != 0:
            print(gen["stdout"], gen["stderr"], file=sys.stderr)
            raise SystemExit(f"generating the file failed with exit code {gen['rc']}")
        gen_s = time.perf_counter() - t0
        distinct = json.loads(gen["stdout"].strip().splitlines()[-1])
        size = src.stat().st_size
        print(f"generated {args.lines:,} reviews in {gen_s:.1f}s: {src} ({_fmt_bytes(size)} gzipped)", flush=True)

        out = work / "dataset"
        cmd = [sys.executable, "-m", "llmrec.cli", "data", "prepare", str(src), str(out),
               "--k-core", str(args.k_core), "-q"]
        load_e2e = os.getloadavg()
        e2e = _run_child(cmd)
        if e2e["rc"] != 0:
            print(e2e["stdout"], e2e["stderr"], file=sys.stderr)
            raise SystemExit(f"prepare failed with exit code {e2e['rc']}")
        manifest = json.loads((out / "manifest.json").read_text())
        stats = json.loads((out / "stats.json").read_text())
        print(f"end to end: {e2e['wall_s']:.2f}s, peak RSS {_fmt_bytes(e2e['peak_rss_bytes'])}", flush=True)

        load_stage = os.getloadavg()
        stages = {}
        for mode in ("fast", "slow"):
            (work / mode).mkdir()
            stages[mode] = _run_child([sys.executable, "-c", STAGE_CHILD, str(src), str(work / mode / "raw.parquet"),
                                       mode])
            if stages[mode]["rc"] != 0:
                print(stages[mode]["stdout"], stages[mode]["stderr"], file=sys.stderr)
                raise SystemExit(f"stage_reviews failed with exit code {stages[mode]['rc']}")
            stages[mode]["info"] = json.loads(stages[mode]["stdout"].strip().splitlines()[-1])
            shutil.rmtree(work / mode)
            label = "fast" if mode == "fast" else "line-by-line"
            print(f"parsing only ({label} reader): {stages[mode]['info']['seconds']:.2f}s, "
                  f"peak RSS {_fmt_bytes(stages[mode]['peak_rss_bytes'])}", flush=True)
        stage, stage_info = stages["fast"], stages["fast"]["info"]
        slow, slow_info = stages["slow"], stages["slow"]["info"]
        load_after = os.getloadavg()
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    n = args.lines
    e2e_rate = n / e2e["wall_s"]
    stage_rate = n / stage_info["seconds"]
    peak = max(e2e["peak_rss_bytes"], stage["peak_rss_bytes"], slow["peak_rss_bytes"])
    try:
        cores_usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores_usable = os.cpu_count()
    result = {
        "lines": n,
        "file_bytes_gzipped": size,
        "distinct_users": distinct["users"],
        "distinct_items": distinct["items"],
        "generate_seconds": round(gen_s, 2),
        "end_to_end": {
            "command": " ".join(["llmrec", *cmd[3:]]),
            "wall_seconds": round(e2e["wall_s"], 3),
            "cpu_seconds": round(e2e["cpu_s"], 3),
            "reviews_per_second": round(e2e_rate),
            "peak_rss_bytes": e2e["peak_rss_bytes"],
            "peak_rss_polled_bytes": e2e["peak_rss_polled_bytes"],
            "counts": manifest["counts"],
            "final": {k: stats[k] for k in ("users", "items", "interactions")},
        },
        "parse_only": {
            "what": "readers.stage_reviews (JSON Lines -> Parquet), timed inside the child",
            "seconds": round(stage_info["seconds"], 3),
            "child_wall_seconds": round(stage["wall_s"], 3),
            "cpu_seconds": round(stage["cpu_s"], 3),
            "reviews_per_second": round(stage_rate),
            "peak_rss_bytes": stage["peak_rss_bytes"],
            "peak_rss_polled_bytes": stage["peak_rss_polled_bytes"],
            "interpreter_and_import_seconds": round(stage_info["imports_seconds"], 3),
        },
        "parse_only_line_by_line": {
            "what": "stage_reviews(fast=False): the careful reader that a file with malformed lines gets",
            "seconds": round(slow_info["seconds"], 3),
            "cpu_seconds": round(slow["cpu_s"], 3),
            "reviews_per_second": round(n / slow_info["seconds"]),
            "peak_rss_bytes": slow["peak_rss_bytes"],
        },
        "targets": {
            "reviews_per_second_end_to_end": {"target": TARGET_RATE, "value": round(e2e_rate),
                                              "met": e2e_rate >= TARGET_RATE},
            "peak_memory_bytes": {"target": TARGET_RSS_BYTES, "value": peak, "met": peak < TARGET_RSS_BYTES},
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "cores_usable": cores_usable,
            "duckdb_threads": 2,
            "load_average_1_5_15": {"before": [round(x, 2) for x in load_before],
                                    "at_end_to_end_start": [round(x, 2) for x in load_e2e],
                                    "at_parse_start": [round(x, 2) for x in load_stage],
                                    "after": [round(x, 2) for x in load_after]},
            "python": platform.python_version(),
            "duckdb": _version("duckdb"),
            "platform": platform.platform(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    t = result["targets"]
    duck_version = _version("duckdb")
    md = [
        "# Ingest benchmark",
        "",
        (f"`{result['end_to_end']['command']}` on a synthetic Amazon Reviews 2023 file: {n:,} reviews, "
         f"{_fmt_bytes(size)} gzipped; {distinct['users']:,} users and {distinct['items']:,} items "
         f"(ids drawn Zipf-like from {args.users:,} and {args.items:,}; {result['date']})."),
        "",
        "| stage | seconds | reviews/s | peak RSS | CPU seconds |",
        "|---|---:|---:|---:|---:|",
        (f"| end to end (child process, incl. start-up) | {e2e['wall_s']:.2f} | {e2e_rate:,.0f} | "
         f"{_fmt_bytes(e2e['peak_rss_bytes'])} | {e2e['cpu_s']:.1f} |"),
        (f"| parsing only (`stage_reviews`) | {stage_info['seconds']:.2f} | {stage_rate:,.0f} | "
         f"{_fmt_bytes(stage['peak_rss_bytes'])} | {stage['cpu_s']:.1f} |"),
        (f"| parsing only, line-by-line reader (files with malformed lines) | {slow_info['seconds']:.2f} | "
         f"{n / slow_info['seconds']:,.0f} | {_fmt_bytes(slow['peak_rss_bytes'])} | {slow['cpu_s']:.1f} |"),
        "",
        (f"Kept after dedup and {args.k_core}-core: {stats['users']:,} users, {stats['items']:,} items, "
         f"{stats['interactions']:,} interactions (after dedup: {manifest['counts']['after_dedup']:,})."),
        "",
        (f"- target >= {TARGET_RATE:,} reviews/s end to end: "
         f"**{met(t['reviews_per_second_end_to_end']['met'])}** ({e2e_rate:,.0f})"),
        f"- target peak memory < 2 GB: **{met(t['peak_memory_bytes']['met'])}** ({_fmt_bytes(peak)})",
        "",
        (f"Machine: {os.cpu_count()} cores ({cores_usable} usable), DuckDB {duck_version} with 2 threads; "
         f"load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
         f"at the end-to-end start {load_e2e[0]:.2f}, after {load_after[0]:.2f}. A load near or above the "
         "core count means other work shared the CPUs and the figures are pessimistic."),
        "",
    ]
    (args.results / "ingest.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
