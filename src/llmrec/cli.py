"""The ``llmrec`` command line: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# On a shared CPU, spinning OpenMP threads make multi-threaded torch several times slower;
# set before torch is imported (a user's own setting wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from llmrec.config import ConfigError
from llmrec.errors import LlmrecError


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmrec", description="Next-product recommendation on Amazon review data.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="prepare, inspect and download datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("prepare", help="raw files -> dataset directory")
    p.add_argument("source", type=Path, nargs="+",
                   help="a file or a folder (sequences.jsonl.gz, reviews/meta, one or several <Category>.jsonl.gz), "
                        "or several: their interactions go into one dataset")
    p.add_argument("out", type=Path, help="dataset directory to write")
    p.add_argument("--format", default="auto", choices=["auto", "sequences", "amazon2023", "amazon2018"])
    p.add_argument("--meta", type=Path, default=None, help="item metadata file (default: found beside the source)")
    p.add_argument("--verified-only", action="store_true", help="keep verified purchases only")
    p.add_argument("--min-rating", type=float, default=None)
    p.add_argument("--no-dedup", action="store_true", help="keep repeated (user, item) pairs")
    p.add_argument("--k-core", type=int, default=0, help="iterative k-core on users and items (0 = off)")
    p.add_argument("--min-history", type=int, default=0, help="drop users with fewer interactions")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed line")
    p.add_argument("--memory-limit", default="2GB", help="DuckDB's memory limit (it spills to disk beyond it)")
    p.add_argument("--engine", choices=["duckdb", "numpy"], default="duckdb",
                   help="where dedup and k-core run (numpy: the in-memory reference path)")
    p.add_argument("--force", action="store_true", help="replace an existing dataset directory")
    _add_quiet(p)
    p = dsub.add_parser("stats", help="print a dataset's statistics")
    p.add_argument("dataset", type=Path)
    p = dsub.add_parser("download", help="fetch the Amazon Reviews 2023 files of a category")
    p.add_argument("category", help="e.g. All_Beauty, Office_Products")
    p.add_argument("--out", type=Path, default=Path("data/raw"), help="folder for the files (default data/raw)")
    p.add_argument("--base-url", default=None, help="mirror of the official host")
    p.add_argument("--no-meta", action="store_true", help="reviews only")
    _add_quiet(p)

    p = sub.add_parser("train", help="train a model into a run directory")
    p.add_argument("--config", type=Path, default=None, help="TOML run config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.params.lr=0.002 (repeatable)")
    p.add_argument("--model", default=None, help="model name (overrides model.name)")
    p.add_argument("--dataset", default=None, help="dataset directory (overrides dataset)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", type=Path, required=True, help="run directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing run directory")
    _add_quiet(p)

    p = sub.add_parser("evaluate", help="evaluate runs; several runs (seeds) are summarized with a 95%% CI")
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--on", choices=["test", "valid"], default=None)
    p.add_argument("--protocol", choices=["full", "sampled"], default=None)
    p.add_argument("--negatives", type=positive_int, default=None, help="negatives per user (sampled protocol)")
    p.add_argument("--sampling", choices=["uniform", "popularity"], default=None)
    p.add_argument("--ks", type=cutoffs, default=None, help="comma-separated cut-offs >= 1, e.g. 5,10,20")
    p.add_argument("--include-seen", action="store_true", help="do not exclude history items from the ranking")
    p.add_argument("--prior-weight", default=None, metavar="W",
                   help="LLM models with a SASRec companion: score at prior weight W instead of the one chosen "
                        "on validation (0 = the LLM alone; 'alone' = the companion alone); "
                        "writes metrics.prior-W.json")
    _add_quiet(p)

    p = sub.add_parser("recommend", help="top-K next products for users of the run's dataset, or for a history")
    p.add_argument("run", type=Path)
    p.add_argument("--user", dest="users", action="append", default=[], help="raw user id (repeatable)")
    p.add_argument("--history", type=item_list, default=None, metavar="ITEM,ITEM,...",
                   help="raw item ids, oldest first: recommend for this history instead of a user's")
    p.add_argument("-k", "--k", type=positive_int, default=10, help="how many (capped at the catalog size)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("demo", help="the main job: prepare, train baselines, evaluate, recommend")
    p.add_argument("--data", type=Path, default=Path("../shared/data/amazon-office-2014"))
    p.add_argument("--workdir", type=Path, default=Path("work"))
    p.add_argument("--models", default="popularity,itemknn,sasrec")
    p.add_argument("--users", type=int, default=3, help="users to show recommendations for")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve", action="store_true",
                   help="then serve the trained runs (API and web page) until interrupted; "
                        "LLMREC_DEMO_SERVE=0 turns this off for non-interactive use")
    p.add_argument("--port", type=int, default=None, help="port of --serve (default 8000)")
    _add_quiet(p)

    p = sub.add_parser("serve", help="REST API and web shop page over trained run directories")
    p.add_argument("runs", type=Path, nargs="+", help="run directories (of one dataset)")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (they share the event store)")
    p.add_argument("--workdir", type=Path, default=None, help="where the event database lives (default work/serve)")
    p.add_argument("--no-microbatch", action="store_true", help="score every request alone (for comparison)")

    p = sub.add_parser("analyze", help="error analysis of an instruct-lm run (markdown + plots in RUN/analysis)")
    p.add_argument("run", type=Path)
    p.add_argument("--users", type=positive_int, default=500, help="test users (a fixed seeded sample)")
    p.add_argument("--seed", type=int, default=None, help="draws the users and candidates (default: the run's seed)")
    return parser


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cutoffs(text: str) -> list[int]:
    """argparse type: comma-separated cut-offs >= 1 (``5,10,20``)."""
    return [positive_int(part.strip()) for part in text.split(",") if part.strip()] or [positive_int(text)]


def item_list(text: str) -> list[str]:
    """argparse type: comma-separated raw item ids."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give at least one item id")
    return items


def _cmd_data(args: argparse.Namespace) -> None:
    if args.data_command == "prepare":
        from llmrec.data.prepare import PrepareConfig, prepare_dataset

        cfg = PrepareConfig(format=args.format, verified_only=args.verified_only, min_rating=args.min_rating,
                            dedup=not args.no_dedup, k_core=args.k_core, min_history=args.min_history,
                            strict=args.strict, memory_limit=args.memory_limit, engine=args.engine)
        manifest = prepare_dataset(args.source, args.out, cfg, meta=args.meta, overwrite=args.force,
                                   progress=not args.quiet)
        for rep in manifest["parse_reports"]:
            line = f"{rep['file']}: {rep['lines']} lines, {rep['bad_lines']} malformed"
            if rep["examples"]:
                line += " (" + "; ".join(f"line {n}: {why}" for n, why in rep["examples"][:10]) + ")"
            print(line)
        for note in manifest["notes"]:
            print(f"note: {note}")
        _print_stats(args.out, stats=json.loads((args.out / "stats.json").read_text()),
                     fingerprint=manifest["fingerprint"])  # what prepare just wrote: no need to load the data
    elif args.data_command == "stats":
        _print_stats(args.dataset)
    elif args.data_command == "download":
        from llmrec.data.download import OFFICIAL_BASE_URL, download_category

        paths = download_category(args.category, args.out, base_url=args.base_url or OFFICIAL_BASE_URL,
                                  include_meta=not args.no_meta, progress=not args.quiet)
        for path in paths:
            print(path)
        print(f"next: llmrec data prepare {paths[0]} data/{paths[0].name.split('.')[0]} --k-core 5")


def _print_stats(path: Path, stats: dict | None = None, fingerprint: str | None = None) -> None:
    """Print a dataset's statistics (loading and checking it unless they are given)."""
    if stats is None or fingerprint is None:
        from llmrec.data.dataset import Dataset

        ds = Dataset.load(path)
        stats, fingerprint = ds.stats, ds.fingerprint
    s = stats
    h = s["history_length"]
    print(f"{path}: {s['users']} users, {s['items']} items, {s['interactions']} interactions, "
          f"density {s['density']:.6f}")
    print(f"history length: min {h['min']}, median {h['median']:.0f}, mean {h['mean']:.2f}, "
          f"p90 {h['p90']:.0f}, max {h['max']}")
    print("histogram: " + ", ".join(f"{k}: {v}" for k, v in h["histogram"].items()))
    print(f"fingerprint {fingerprint}")


def _cmd_train(args: argparse.Namespace) -> None:
    from llmrec.models.train import is_main_process
    from llmrec.runs import load_run_config, train

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f'model.name="{args.model}"')
    if args.dataset:
        overrides.append(f"dataset={json.dumps(args.dataset)}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    cfg = load_run_config(args.config, overrides)
    record = train(cfg, args.out, overwrite=args.force, progress=not args.quiet)
    if is_main_process():  # under accelerate launch / torchrun the other processes stay quiet
        print(f"trained {cfg.model.name} in {record['train_seconds']:.1f}s -> {args.out}")
        print(json.dumps(record["fit"], default=str))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    import dataclasses

    from llmrec.eval.report import format_summary_table, format_table, summarize_seeds
    from llmrec.runs import evaluate_run, load_run

    rows: dict[str, dict[str, float]] = {}
    by_model: dict[str, list[dict[str, float]]] = {}
    for path in args.runs:
        run = load_run(path)
        ecfg = run.config.eval
        changes = {k: v for k, v in {
            "on": args.on, "protocol": args.protocol, "n_negatives": args.negatives, "sampling": args.sampling,
            "ks": args.ks,
        }.items() if v is not None}
        if args.include_seen:
            changes["exclude_seen"] = False
        ecfg = dataclasses.replace(ecfg, **changes)
        result = evaluate_run(run, ecfg, progress=not args.quiet, prior_weight=args.prior_weight)
        label = f"{run.config.model.name} (seed {run.config.seed})"
        if args.prior_weight is not None:
            label += f", prior {args.prior_weight}"
        rows[label] = result.overall
        by_model.setdefault(run.config.model.name, []).append(result.overall)
        protocol = result.protocol
        ks = result.ks
    cols = [f"{m}@{k}" for m in ("ndcg", "hit_rate", "recall", "mrr") for k in ks]
    print(f"protocol: {protocol} ({'test' if not args.on else args.on} set)")
    print(format_table(rows, cols))
    groups = {f"{name} ({len(rs)} runs)": summarize_seeds(rs) for name, rs in by_model.items() if len(rs) > 1}
    if groups:
        print("\nmean ± half-width of the 95% confidence interval (Student t) over runs:")
        print(format_summary_table(groups, cols))


def _cmd_recommend(args: argparse.Namespace) -> None:
    from llmrec.runs import load_run, recommend_for_users

    if bool(args.users) == (args.history is not None):
        raise LlmrecError("recommend: give --user (repeatable) or --history, not both and not neither")
    recs = recommend_for_users(load_run(args.run), args.users, k=args.k, history=args.history)
    if args.json:
        print(json.dumps(recs, indent=2))
        return
    for rec in recs:
        print(f"user {rec['user_id']}")
        for r in rec["recommendations"]:
            print(f"  {r['rank']:>2}. {r['title'][:100]}  ({r['item_id']}, score {r['score']:.4f})")


def _cmd_demo(args: argparse.Namespace) -> None:
    from llmrec.pipeline import DEFAULT_MODELS, demo_run_dir, run_demo

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    from llmrec.models.registry import model_class

    for name in names:
        model_class(name)
    run_demo(args.data, args.workdir, {n: DEFAULT_MODELS.get(n, {}) for n in names}, n_users=args.users,
             seed=args.seed, progress=not args.quiet)
    if args.serve and os.environ.get("LLMREC_DEMO_SERVE", "1") != "0":
        runs = [demo_run_dir(args.workdir, args.data, n, args.seed) for n in names]
        serve_args = argparse.Namespace(runs=runs, host=None, port=args.port, workers=1,
                                        workdir=args.workdir / "serve", no_microbatch=False)
        _cmd_serve(serve_args)


def _cmd_analyze(args: argparse.Namespace) -> None:
    from llmrec.models.instruct.analysis import analyze

    try:
        analyze(args.run, n_users=args.users, seed=args.seed)
    except ValueError as e:
        raise LlmrecError(str(e)) from None
    print(f"wrote {args.run / 'analysis' / 'analysis.md'} and its plots")


def _cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from llmrec.serve.app import create_app
    from llmrec.serve.host import load_models
    from llmrec.serve.settings import ServeSettings

    given = {"runs": [Path(r).resolve() for r in args.runs], "host": args.host, "port": args.port,
             "workdir": args.workdir, "microbatch": False if args.no_microbatch else None}
    settings = ServeSettings(**{k: v for k, v in given.items() if v is not None})
    if args.workers < 1:
        raise LlmrecError(f"--workers must be >= 1, got {args.workers}")
    loaded = load_models(settings)  # a run that cannot be served stops here, naming it
    url = f"http://{settings.host}:{settings.port}/"
    print(f"llmrec: serving {', '.join(loaded[1])} at {url} (API docs at {url}docs; Ctrl-C stops)", flush=True)
    if args.workers == 1:
        uvicorn.run(create_app(settings, loaded), host=settings.host, port=settings.port, log_level="warning")
        return
    os.environ.update({"LLMREC_RUNS": json.dumps([str(r) for r in settings.runs]),
                       "LLMREC_WORKDIR": str(settings.workdir), "LLMREC_MICROBATCH": json.dumps(settings.microbatch)})
    uvicorn.run("llmrec.serve.app:app_from_env", factory=True, host=settings.host, port=settings.port,
                workers=args.workers, log_level="warning")


def main(argv: list[str] | None = None) -> int:
    from llmrec.data.download import DownloadError


    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage error (or the help)
        return int(e.code or 0)
    handlers = {"data": _cmd_data, "train": _cmd_train, "evaluate": _cmd_evaluate,
                "recommend": _cmd_recommend, "demo": _cmd_demo, "serve": _cmd_serve,
                "analyze": _cmd_analyze}
    try:
        handlers[args.command](args)
    except (LlmrecError, ConfigError, DownloadError) as e:
        print(f"llmrec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmrec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``llmrec recommend ... | head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
