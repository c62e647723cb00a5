"""Load benchmark of ``llmrec serve`` on loopback: throughput and latency under concurrency.

For each model (SASRec, and one LLM family: the semantic-ID model), with micro-batching on and off, one
``llmrec serve`` process (one uvicorn worker) serves ``GET /users/{id}/recommend?k=10`` for random
Office users, and ``wrk`` (Debian's package; one thread, on the same 2-core machine as the server) drives
it at concurrency 1, 8 and 32 for a fixed time. Bounded: every cell runs ``--seconds`` and only against
127.0.0.1. Writes ``benchmarks/results/serve.json`` and ``serve.md``.

    python benchmarks/serve.py                 # about 6 minutes (trains the runs first if missing)
    python benchmarks/serve.py --seconds 5 --concurrency 1,32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OFFICE = ROOT.parent / "shared" / "data" / "amazon-office-2014"
LLMREC = str(Path(sys.executable).parent / "llmrec")
# the LLM family's run: a small semantic-ID model (its throughput is the point here, not its accuracy)
MODELS = {
    "sasrec": {"max_minutes": 10.0},
    "semantic-id": {"max_epochs": 30, "max_minutes": 4.0, "rq_steps": 600, "beam_size": 20, "num_threads": 1},
}
LUA = r"""
local users = {}
for line in io.lines("USERS") do users[#users + 1] = line end
math.randomseed(7)
request = function()
  return wrk.format("GET", "/users/" .. users[math.random(#users)] .. "/recommend?k=10&model=MODEL")
end
done = function(summary, latency, requests)
  io.write(string.format("JSON {\"p50\": %f, \"p95\": %f, \"p99\": %f, \"requests\": %d, \"connect_errors\": %d, " ..
    "\"read_errors\": %d, \"write_errors\": %d, \"status_errors\": %d, \"timeouts\": %d, \"duration_us\": %d}\n",
    latency:percentile(50), latency:percentile(95), latency:percentile(99), summary.requests, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.status, summary.errors.timeout, summary.duration))
end
"""


def ensure_runs(workdir: Path) -> dict[str, Path]:
    """Office dataset and one trained (and evaluated) run per model, trained once and reused."""
    from llmrec.config import from_dict
    from llmrec.pipeline import ensure_dataset
    from llmrec.runs import ModelSection, RunConfig, evaluate_run, load_run, train

    ds = workdir / "datasets" / "amazon-office-2014"
    ensure_dataset(OFFICE, ds, progress=False)
    runs = {}
    for name, params in MODELS.items():
        out = workdir / "runs" / name
        if not (out / "run.json").exists():
            print(f"training {name} on Office ...", flush=True)
            cfg = from_dict(RunConfig, {"dataset": str(ds), "seed": 0})
            cfg.model = ModelSection(name=name, params=dict(params))
            train(cfg, out, overwrite=True, progress=False)
            evaluate_run(load_run(out), progress=False)
        runs[name] = out
    return runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(run: Path, microbatch: bool, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [LLMREC, "serve", str(run), "--port", str(port), "--workdir", str(workdir / "serve-events")]
    if not microbatch:
        cmd.append("--no-microbatch")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server for {run} did not become ready")


def run_wrk(port: int, model: str, users_file: Path, concurrency: int, seconds: int) -> dict[str, float]:
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(LUA.replace("USERS", str(users_file)).replace("MODEL", model))
    try:
        out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s", "-s", str(script),
                              f"http://127.0.0.1:{port}"], capture_output=True, text=True, check=True,
                             timeout=seconds + 60).stdout
    finally:
        script.unlink()
    stats = json.loads(next(ln for ln in out.splitlines() if ln.startswith("JSON "))[5:])
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = sum(int(stats[k]) for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    errors += int(non2xx.group(1)) if non2xx else 0
    return {"requests_per_s": stats["requests"] / (stats["duration_us"] / 1e6), "p50_ms": stats["p50"] / 1000,
            "p95_ms": stats["p95"] / 1000, "p99_ms": stats["p99"] / 1000, "requests": stats["requests"], "errors": errors}


def mean_batch(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/models", timeout=10) as r:
        return float(json.loads(r.read())[0]["batching"]["mean_batch"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=ROOT / "work" / "bench-serve")
    ap.add_argument("--seconds", type=int, default=10, help="duration of each cell")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("benchmarks/serve.py needs wrk (apt-get install wrk)")
    runs = ensure_runs(args.workdir)
    from llmrec.data.dataset import Dataset

    users_file = args.workdir / "users.txt"
    users_file.write_text("\n".join(Dataset.load(args.workdir / "datasets" / "amazon-office-2014").user_ids) + "\n")
    rows = []
    for name in args.models.split(","):
        for microbatch in (True, False):
            proc, port = start_server(runs[name], microbatch, args.workdir)
            try:
                run_wrk(port, name, users_file, 8, 2)  # warm-up (not recorded)
                for c in (int(x) for x in args.concurrency.split(",")):
                    cell = run_wrk(port, name, users_file, c, args.seconds)
                    row = {"model": name, "microbatch": microbatch, "concurrency": c, **cell, "mean_batch": mean_batch(port)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    targets = {}
    for r in rows:
        if r["model"] == "sasrec" and r["microbatch"] and r["concurrency"] == 32:
            targets["sasrec_c32_rps>=1000"] = r["requests_per_s"] >= 1000
            targets["sasrec_c32_p99<=50ms"] = r["p99_ms"] <= 50
            targets["sasrec_c32_zero_errors"] = r["errors"] == 0
        if r["model"] != "sasrec" and r["microbatch"] and r["concurrency"] == 32:
            targets[f"{r['model']}_c32_rps>=20"] = r["requests_per_s"] >= 20
            targets[f"{r['model']}_c32_zero_errors"] = r["errors"] == 0
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_at_end": os.getloadavg()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps({
        "what": "GET /users/{id}/recommend?k=10, random Office users, one uvicorn worker, loopback",
        "generator": "wrk -t1 (one thread) on the same 2-core machine", "seconds_per_cell": args.seconds,
        "machine": machine, "models": {n: MODELS[n] for n in args.models.split(",")}, "targets": targets, "rows": rows,
    }, indent=2))
    md = ["# `llmrec serve` under load (loopback, one worker, wrk -t1 on the same 2 cores)", "",
          (f"`GET /users/{{id}}/recommend?k=10` for random Office users, {args.seconds} s per cell; "
           "the semantic-ID run is a small one trained for throughput, not accuracy."), "",
          "| model | micro-batching | concurrency | requests/s | p50 ms | p95 ms | p99 ms | errors | mean batch |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['model']} | {'on' if r['microbatch'] else 'off'} | {r['concurrency']} | {r['requests_per_s']:.0f} | "
           f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {r['mean_batch']:.1f} |" for r in rows]
    md += ["", "Targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in targets.items()), ""]
    (RESULTS / "serve.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
