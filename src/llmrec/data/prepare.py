"""``llmrec data prepare``: raw files -> filtered, integer-coded dataset directory.

Steps: detect the format, parse (streaming, in DuckDB), filter (verified, rating), order each
user's interactions chronologically, drop repeated (user, item) pairs keeping the first,
iterative k-core, write the dataset directory atomically (temporary directory, then rename).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import duckdb
import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from llmrec.data.dataset import stats_from_counts
from llmrec.data.filters import first_occurrence_mask, kcore_mask
from llmrec.data.readers import FORMATS, ParseReport, _run, _sql_str, stage_items, stage_reviews
from llmrec.data.stages import Stages, count
from llmrec.errors import DataError
from llmrec.fsutil import output_lock, remove_stale_temporaries


@dataclass
class PrepareConfig:
    """Options of ``data prepare``.

    format: ``auto`` detects it from the file names. k_core: minimum interactions per user and
    per item (0 = off), applied iteratively. min_history: users with fewer interactions are
    dropped (enforced inside the same iteration, so the k-core property still holds).
    """

    format: Literal["auto", "sequences", "amazon2023", "amazon2018"] = "auto"
    verified_only: bool = False
    min_rating: float | None = None
    dedup: bool = True
    k_core: int = 0
    min_history: int = 0
    strict: bool = False
    memory_limit: str = "2GB"  # DuckDB's limit; it spills to the work folder beyond it
    threads: int = 2
    engine: Literal["duckdb", "numpy"] = "duckdb"  # numpy: dedup and k-core on in-memory arrays (the reference)


def _first_existing(folder: Path, names: list[str]) -> Path | None:
    for n in names:
        if (folder / n).exists():
            return folder / n
    return None


def resolve_sources(source: Path, fmt: str = "auto", meta: Path | None = None) -> tuple[str, Path, Path | None]:
    """(format, interactions file, metadata file or None) for a folder or a file."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"{source}: unknown format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
    if not source.exists():
        raise DataError(f"{source}: not found")
    if source.is_dir():
        seq = _first_existing(source, ["sequences.jsonl.gz", "sequences.jsonl"])
        if seq and fmt in ("auto", "sequences"):
            return "sequences", seq, meta or _first_existing(source, ["items.jsonl.gz", "items.jsonl"])
        rev = _first_existing(source, ["reviews.jsonl.gz", "reviews.jsonl"])
        if rev and fmt in ("auto", "amazon2023", "amazon2018"):
            m = meta or _first_existing(source, ["meta.jsonl.gz", "meta.jsonl"])
            return ("amazon2023" if fmt == "auto" else fmt), rev, m
        candidates = sorted(
            p for p in source.iterdir()
            if p.is_file() and not p.name.startswith(("meta_", ".")) and p.name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz"))
        )
        if len(candidates) != 1:
            found = ", ".join(p.name for p in candidates) or "no JSON files"
            raise DataError(f"{source}: cannot tell which file holds the reviews ({found}); pass the file itself")
        source = candidates[0]
    name = source.name
    base = name.removesuffix(".gz")
    if fmt == "auto":
        if base.startswith("sequences"):
            fmt = "sequences"
        elif base.endswith(".jsonl"):
            fmt = "amazon2023"
        elif base.endswith(".json"):
            fmt = "amazon2018"
        else:
            raise DataError(f"{source}: cannot detect the format from the name; pass --format")
    if meta is None:
        if fmt == "sequences":
            meta = _first_existing(source.parent, ["items.jsonl.gz", "items.jsonl"])
        else:
            # a 2018 5-core file (Beauty_5.json.gz) shares the category's metadata (meta_Beauty.json.gz)
            core = base.removesuffix(".json").removesuffix(".jsonl")
            stems = [core] + ([core.removesuffix("_5")] if core.endswith("_5") else [])
            ext = base[len(core):]
            meta = _first_existing(source.parent, [f"meta_{name}", f"meta_{base}", f"meta_{base}.gz"]
                                   + [f"meta_{stem}{ext}{gz}" for stem in stems[1:] for gz in (".gz", "")])
    return fmt, source, meta


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise DataError(f"{out}: already exists (use --force to replace it)")
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(trash)
        tmp.rename(out)
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    else:
        tmp.rename(out)


def prepare_dataset(
    source: str | Path | Sequence[str | Path],
    out: str | Path,
    config: PrepareConfig | None = None,
    meta: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build a dataset directory at ``out`` from ``source`` (a file or folder, or several: their interactions
    are streamed into one dataset, each file with its metadata); returns the manifest.

    Nothing is left at ``out`` unless every step succeeds.
    """
    cfg = config or PrepareConfig()
    out = Path(out)
    sources = [Path(source)] if isinstance(source, (str, Path)) else [Path(s) for s in source]
    if not sources:
        raise DataError("data prepare: no source given")
    if meta is not None and len(sources) > 1:
        raise DataError("--meta names one metadata file: give it with a single source")
    files: list[tuple[Path, Path | None]] = []
    fmts = set()
    for src in sources:
        for fmt, reviews_path, meta_path in expand_sources(src, cfg.format, Path(meta) if meta else None):
            fmts.add(fmt)
            files.append((reviews_path, meta_path))
    if len(fmts) > 1:
        raise DataError(f"{', '.join(str(x) for x in sources)}: the review files mix formats "
                        f"({', '.join(sorted(fmts))}); prepare them apart")
    if len({f for f, _ in files}) < len(files):
        raise DataError("data prepare: the same review file is given twice")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise DataError(f"{out}: already exists (use --force to replace it)")
    with output_lock(out):
        return _prepare_locked(fmts.pop(), files, cfg, out, overwrite, progress)


def expand_sources(source: Path, fmt: str = "auto", meta: Path | None = None) -> list[tuple[str, Path, Path | None]]:
    """:func:`resolve_sources` of ``source``, or, for a folder of several category review files (2023
    ``<Category>.jsonl[.gz]`` or 2018 ``<Category>[_5].json.gz``), one entry per file with its metadata."""
    if source.is_dir():
        candidates = sorted(
            p for p in source.iterdir()
            if p.is_file() and not p.name.startswith(("meta_", ".", "sequences", "items", "reviews", "meta."))
            and p.name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz"))
        )
        if len(candidates) > 1 and not any((source / n).exists() for n in
                                           ("sequences.jsonl.gz", "sequences.jsonl", "reviews.jsonl.gz", "reviews.jsonl")):
            return [resolve_sources(p, fmt, meta) for p in candidates]
    return [resolve_sources(source, fmt, meta)]


def _prepare_locked(fmt: str, files: list[tuple[Path, Path | None]], cfg: PrepareConfig, out: Path,
                    overwrite: bool, progress: bool) -> dict[str, Any]:
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    work = tmp / "_work"
    work.mkdir()
    stages = Stages(progress, label=out.name)
    try:
        files = [(safe_source(r, work, f"reviews{k}"), safe_source(m, work, f"meta{k}") if m is not None else None)
                 for k, (r, m) in enumerate(files)]
        con = duckdb.connect(config={
            "memory_limit": cfg.memory_limit, "threads": cfg.threads, "temp_directory": str(work / "spill"),
            "preserve_insertion_order": True,
        })
        con.execute("SET enable_progress_bar = false").fetchall()
        try:
            manifest = _build(con, fmt, files, cfg, tmp, work, stages)
        finally:
            con.close()
        shutil.rmtree(work)
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _stage_all(con: duckdb.DuckDBPyConnection, fmt: str, files: list[tuple[Path, Path | None]], cfg: PrepareConfig,
               work: Path, stages: Stages) -> tuple[list[ParseReport], str, str | None]:
    """Parse every review file (and metadata file) into Parquet, one after the other (streamed): the reports
    and SQL relations over all of them. A review row gets its ``rid``: file number (the order of ``files``) times
    2^ROW_BITS plus its row index in the staged file, so ordering by ``rid`` is ordering by place in the sources;
    a metadata row gets its ``file_no``."""
    reports: list[ParseReport] = []
    raws, metas = [], []
    with stages.stage("parse", unit="lines") as bar:
        for k, (reviews_path, meta_path) in enumerate(files):
            bar.set_postfix_str(f"{reviews_path.name} ({k + 1}/{len(files)})")
            raw = work / f"raw{k}.parquet"
            reports.append(stage_reviews(con, reviews_path, fmt, raw, strict=cfg.strict))  # type: ignore[arg-type]
            count(bar, bar.n + reports[-1].lines)
            raws.append(f"SELECT CAST({k} AS BIGINT) * {1 << ROW_BITS} + file_row_number AS rid, * EXCLUDE (file_row_number) "
                        f"FROM read_parquet({_sql_str(raw)}, file_row_number=true)")
            if meta_path is not None:
                bar.set_postfix_str(f"{meta_path.name} ({k + 1}/{len(files)})")
                meta_raw = work / f"meta{k}.parquet"
                reports.append(stage_items(con, meta_path, fmt, meta_raw, strict=cfg.strict))  # type: ignore[arg-type]
                metas.append(f"SELECT {k} AS file_no, * FROM read_parquet({_sql_str(meta_raw)}, union_by_name=true)")
        bad = sum(r.bad_lines for r in reports)
        count(bar, bar.n, f"{len(files)} file(s)" + (f", {bad:,} malformed lines" if bad else ""))
    union_metas = "(" + " UNION ALL BY NAME ".join(metas) + ")" if metas else None
    return reports, "(" + " UNION ALL BY NAME ".join(raws) + ")", union_metas


def _build(
    con: duckdb.DuckDBPyConnection,
    fmt: str,
    files: list[tuple[Path, Path | None]],
    cfg: PrepareConfig,
    out: Path,
    work: Path,
    stages: Stages,
) -> dict[str, Any]:
    source_label = str(files[0][0]) if len(files) == 1 else f"{len(files)} files ({files[0][0].name}, ...)"
    reports, raw, meta_raw = _stage_all(con, fmt, files, cfg, work, stages)

    notes: list[str] = []
    where = ["bad IS NULL", "user_id IS NOT NULL", "item_id IS NOT NULL"]
    (has_ts, has_rating, has_review, has_verified) = _run(
        con,
        f"SELECT count(ts) > 0, count(rating) > 0, count(review) > 0, count(verified) > 0 "
        f"FROM {raw} WHERE bad IS NULL",
    )[0]
    if cfg.verified_only:
        if has_verified:
            where.append("verified IS TRUE")
        else:
            notes.append("verified_only: the source has no verified-purchase field; filter skipped")
    if cfg.min_rating is not None:
        if has_rating:
            where.append(f"rating >= {float(cfg.min_rating)}")
        else:
            notes.append("min_rating: the source has no ratings; filter skipped")
    with stages.stage("filter") as bar:  # only the key columns go through dedup and k-core; text joins back later
        _run(con, f"CREATE TABLE keys AS SELECT rid, ts, user_id, item_id FROM {raw} "
                  f"WHERE {' AND '.join(where)}")
        n_after_filters = int(_run(con, "SELECT count(*) FROM keys")[0][0])
        if n_after_filters == 0:
            raise DataError(f"{source_label}: no interactions left after filtering ({'; '.join(where)})")
        count(bar, n_after_filters, "kept")
        # Codes in raw-id order, so that re-coding a subset with np.unique keeps that order.
        _run(con, "CREATE TABLE umap0 AS SELECT user_id, CAST(row_number() OVER (ORDER BY user_id) - 1 AS INTEGER) AS u0 "
                  "FROM (SELECT DISTINCT user_id FROM keys)")
        _run(con, "CREATE TABLE imap0 AS SELECT item_id, CAST(row_number() OVER (ORDER BY item_id) - 1 AS INTEGER) AS i0 "
                  "FROM (SELECT DISTINCT item_id FROM keys)")
    select = _select_duckdb if cfg.engine == "duckdb" else _select_numpy
    n_after_dedup, n_final, n_users, n_items = select(con, cfg, stages)
    if n_final == 0:
        raise DataError(
            f"{source_label}: no interactions left after k-core (k_core={cfg.k_core}, "
            f"min_history={cfg.min_history}); lower them"
        )
    with stages.stage("write") as bar:  # interactions with their text, users, items
        _run(con, "CREATE TABLE umap AS SELECT user, user_id FROM ucodes JOIN umap0 USING (u0)")
        _run(con, "CREATE TABLE imap AS SELECT item, item_id FROM icodes JOIN imap0 USING (i0)")
        cols = ["kept.user AS user", "kept.item AS item", 'kept."order" AS "order"']
        if has_ts:
            cols.append("r.ts AS timestamp")
        if has_rating:
            cols.append("CAST(r.rating AS FLOAT) AS rating")
        if has_review:
            cols.append("r.review AS review")
        _run(
            con,
            f"""COPY (SELECT {', '.join(cols)} FROM kept JOIN {raw} r USING (rid)
                     ORDER BY user, "order") TO {_sql_str(out / 'interactions.parquet')} (FORMAT parquet)""",
        )
        _run(con, f"COPY (SELECT user, user_id FROM umap ORDER BY user) TO {_sql_str(out / 'users.parquet')} (FORMAT parquet)")
        n_meta_matched = 0
        if meta_raw is not None:
            _run(
                con,
                f"""COPY (SELECT imap.item, imap.item_id, m.* EXCLUDE (file_no, line_no, bad, item_id)
                         FROM imap LEFT JOIN (SELECT * FROM {meta_raw} WHERE bad IS NULL
                                              QUALIFY row_number() OVER (PARTITION BY item_id ORDER BY file_no, line_no) = 1) m
                         USING (item_id) ORDER BY imap.item) TO {_sql_str(out / 'items.parquet')} (FORMAT parquet)""",
            )
            n_meta_matched = int(_run(
                con,
                f"SELECT count(*) FROM imap SEMI JOIN (SELECT item_id FROM {meta_raw} WHERE bad IS NULL) m USING (item_id)",
            )[0][0])
            if n_meta_matched == 0:
                meta_names = ", ".join(str(m) for _, m in files if m is not None)
                raise DataError(f"{meta_names}: none of its item ids matches any of the {n_items} items of "
                                f"{source_label}; is it the metadata of another category? (pass the right one with --meta)")
            if n_meta_matched < n_items:
                notes.append(f"metadata: {n_items - n_meta_matched} of {n_items} items have no "
                             "metadata record (their title is their id)")
        else:
            notes.append("no metadata file: items have no text fields")
            _run(
                con,
                f"""COPY (SELECT item, item_id, CAST(NULL AS VARCHAR) AS title, CAST(NULL AS VARCHAR) AS brand,
                                CAST(NULL AS VARCHAR[]) AS categories, CAST(NULL AS VARCHAR) AS description
                         FROM imap ORDER BY item) TO {_sql_str(out / 'items.parquet')} (FORMAT parquet)""",
            )
        count(bar, n_final, f"{n_users:,} users, {n_items:,} items")
    with stages.stage("stats") as bar:
        stats, fp = _stats_and_fingerprint(con, out / "interactions.parquet", n_users, n_items)
        count(bar, n_final, f"fingerprint {fp}")
    manifest: dict[str, Any] = {
        "format": fmt,
        "source": {"interactions": str(files[0][0]), "metadata": str(files[0][1]) if files[0][1] else None,
                   "files": [{"interactions": str(r), "metadata": str(m) if m else None} for r, m in files]},
        "config": asdict(cfg),
        "parse_reports": [asdict(r) for r in reports],
        "counts": {
            "after_filters": n_after_filters,
            "after_dedup": n_after_dedup,
            "final": n_final,
            "items_with_metadata": n_meta_matched,
        },
        "columns": {"timestamp": bool(has_ts), "rating": bool(has_rating), "review": bool(has_review)},
        "notes": notes,
        "fingerprint": fp,
        "timings": stages.seconds,  # wall seconds per stage (the run's; not part of the data)
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def safe_source(path: Path, work: Path, name: str) -> Path:
    """``path`` itself, or, when its name holds a character DuckDB would expand as a glob pattern
    (``*?[]{}``), a link to it in ``work`` with a plain name: a path is one file, never a pattern."""
    if not any(c in str(path) for c in "*?[]{}"):
        return path
    link = work / f"{name}{''.join(path.suffixes[-2:])}"
    link.symlink_to(path.resolve())
    return link


# --- dedup, k-core and re-coding: in DuckDB (memory set by its limit), or in numpy (the reference) ----------
# Both read table ``keys`` and the raw-id code tables ``umap0`` / ``imap0`` and leave tables ``kept`` (rid,
# user, item, order), ``ucodes`` (u0 -> user) and ``icodes`` (i0 -> item); they give the same dataset.

ROW_BITS = 40  # a review row's rid: file number << ROW_BITS | row index in its staged file
_CHRONO = "ts NULLS LAST, rid"  # a user's order: time, then place in the sources


def _select_duckdb(con: duckdb.DuckDBPyConnection, cfg: PrepareConfig, stages: Stages) -> tuple[int, int, int, int]:
    """(rows after dedup, rows after k-core, users, items), every stage a DuckDB statement that spills."""
    with stages.stage("dedup") as bar:
        _run(con, "CREATE TABLE coded AS SELECT u0, i0, rid, ts FROM keys JOIN umap0 USING (user_id) "
                  "JOIN imap0 USING (item_id)")
        if cfg.dedup:  # the first of each (user, item) pair in the user's chronological order
            _run(con, f"CREATE TABLE cur AS SELECT * FROM coded "
                      f"QUALIFY row_number() OVER (PARTITION BY u0, i0 ORDER BY {_CHRONO}) = 1")
            _run(con, "DROP TABLE coded")
        else:
            _run(con, "ALTER TABLE coded RENAME TO cur")
        n = n_after_dedup = int(_run(con, "SELECT count(*) FROM cur")[0][0])
        count(bar, n, "kept" if cfg.dedup else "kept (dedup off)")
    k_user = max(cfg.k_core, cfg.min_history)
    with stages.stage("k-core") as bar:  # on the (user, item) columns alone; a row survives if both of its ends do
        _run(con, "CREATE TABLE pairs AS SELECT u0, i0 FROM cur")
        n, rounds = _kcore(con, k_user, cfg.k_core, bar) if k_user > 0 or cfg.k_core > 0 else (n, 0)
        count(bar, n, f"kept after {rounds} round(s)" if rounds else "kept (k-core off)")
    with stages.stage("recode") as bar:  # the joins with the surviving users and items drop the other rows
        _run(con, "CREATE TABLE ucodes AS SELECT u0, CAST(row_number() OVER (ORDER BY u0) - 1 AS INTEGER) AS user "
                  "FROM (SELECT DISTINCT u0 FROM pairs)")
        _run(con, "CREATE TABLE icodes AS SELECT i0, CAST(row_number() OVER (ORDER BY i0) - 1 AS INTEGER) AS item "
                  "FROM (SELECT DISTINCT i0 FROM pairs)")
        _run(con, "DROP TABLE pairs")
        _run(con, f"""CREATE TABLE kept AS SELECT rid, user, item,
                         CAST(row_number() OVER (PARTITION BY user ORDER BY {_CHRONO}) - 1 AS INTEGER) AS "order"
                      FROM cur JOIN ucodes USING (u0) JOIN icodes USING (i0)""")
        _run(con, "DROP TABLE cur")
        n_users = int(_run(con, "SELECT count(*) FROM ucodes")[0][0])
        n_items = int(_run(con, "SELECT count(*) FROM icodes")[0][0])
        count(bar, n)
    return n_after_dedup, n, n_users, n_items


def _kcore(con: duckdb.DuckDBPyConnection, k_user: int, k_item: int, bar: tqdm) -> tuple[int, int]:
    """Iterative k-core of table ``pairs`` (u0, i0) in place: (rows left, rounds). Degrees live in small per-user
    and per-item tables; each round drops the users under ``k_user`` and the items under ``k_item``, deletes
    their rows and subtracts those rows from the degrees of their other ends, so a round scans the pairs
    with two small lookups instead of re-counting and re-writing them all."""
    _run(con, "CREATE TABLE du AS SELECT u0, count(*) AS d FROM pairs GROUP BY u0")
    _run(con, "CREATE TABLE di AS SELECT i0, count(*) AS d FROM pairs GROUP BY i0")
    rounds = 0
    while True:
        _run(con, f"CREATE OR REPLACE TABLE xu AS SELECT u0 FROM du WHERE d < {k_user}")
        _run(con, f"CREATE OR REPLACE TABLE xi AS SELECT i0 FROM di WHERE d < {k_item}")
        if not _run(con, "SELECT EXISTS (FROM xu) OR EXISTS (FROM xi)")[0][0]:
            break
        rounds += 1
        hit = "u0 IN (SELECT u0 FROM xu) OR i0 IN (SELECT i0 FROM xi)"
        _run(con, f"CREATE OR REPLACE TABLE gone AS SELECT u0, i0 FROM pairs WHERE {hit}")
        _run(con, f"DELETE FROM pairs WHERE {hit}")
        for t, key, dropped in (("du", "u0", "xu"), ("di", "i0", "xi")):  # rebuilt: cheaper than UPDATE here
            _run(con, f"""CREATE OR REPLACE TABLE {t} AS SELECT {key}, d - coalesce(c, 0) AS d
                          FROM {t} ANTI JOIN {dropped} USING ({key})
                          LEFT JOIN (SELECT {key}, count(*) AS c FROM gone GROUP BY {key}) USING ({key})""")
        count(bar, int(_run(con, "SELECT sum(d) FROM du")[0][0] or 0), f"round {rounds}")
    for table in ("du", "di", "xu", "xi", "gone"):
        _run(con, f"DROP TABLE IF EXISTS {table}")
    return int(_run(con, "SELECT count(*) FROM pairs")[0][0]), rounds


def _select_numpy(con: duckdb.DuckDBPyConnection, cfg: PrepareConfig, stages: Stages) -> tuple[int, int, int, int]:
    """The same as :func:`_select_duckdb` with every interaction in numpy arrays (memory grows with the input);
    one stage, ``select``."""
    with stages.stage("select") as bar:
        n = _select_numpy_arrays(con, cfg)
        count(bar, n[1])
    return n


def _select_numpy_arrays(con: duckdb.DuckDBPyConnection, cfg: PrepareConfig) -> tuple[int, int, int, int]:
    arrays = con.execute(
        "SELECT u0, i0, rid FROM keys JOIN umap0 USING (user_id) JOIN imap0 USING (item_id) "
        f"ORDER BY u0, {_CHRONO}"
    ).fetchnumpy()
    u0 = np.asarray(arrays["u0"], dtype=np.int64)
    i0 = np.asarray(arrays["i0"], dtype=np.int64)
    rid = np.asarray(arrays["rid"], dtype=np.int64)
    del arrays
    keep = first_occurrence_mask(u0, i0) if cfg.dedup else np.ones(len(u0), dtype=bool)
    n_after_dedup = int(keep.sum())
    k_user = max(cfg.k_core, cfg.min_history)
    if k_user > 0:
        idx = np.flatnonzero(keep)
        sub = kcore_mask(u0[idx], i0[idx], k_user, cfg.k_core)
        keep[idx[~sub]] = False
    n_final = int(keep.sum())
    user_codes, users = np.unique(u0[keep], return_inverse=True)
    item_codes, items = np.unique(i0[keep], return_inverse=True)
    users, items = users.astype(np.int64), items.astype(np.int64)
    starts = np.searchsorted(users, np.arange(len(user_codes)))
    position = np.arange(n_final) - starts[users]
    kept = pa.table({
        "rid": pa.array(rid[keep]),
        "user": pa.array(users.astype(np.int32)), "item": pa.array(items.astype(np.int32)),
        "order": pa.array(position.astype(np.int32)),
    })
    for name, table in (("kept", kept),
                        ("ucodes", pa.table({"u0": user_codes, "user": np.arange(len(user_codes), dtype=np.int32)})),
                        ("icodes", pa.table({"i0": item_codes, "item": np.arange(len(item_codes), dtype=np.int32)}))):
        con.register(f"{name}_arrow", table)
        _run(con, f"CREATE TABLE {name} AS SELECT * FROM {name}_arrow")
        con.unregister(f"{name}_arrow")
    return n_after_dedup, n_final, len(user_codes), len(item_codes)


def _stats_and_fingerprint(con: duckdb.DuckDBPyConnection, interactions: Path, n_users: int,
                           n_items: int) -> tuple[dict[str, Any], str]:
    """``stats.json`` (from per-user and per-item counts, small) and the fingerprint, streamed from the
    written ``interactions.parquet`` (user codes, then item codes, int32, in row order) in bounded memory."""
    import hashlib

    import pyarrow.parquet as pq

    per_user = np.zeros(n_users, dtype=np.int64)
    per_item = np.zeros(n_items, dtype=np.int64)
    for (u, c) in _run(con, f"SELECT user, count(*) FROM read_parquet({_sql_str(interactions)}) GROUP BY user"):
        per_user[u] = c
    for (i, c) in _run(con, f"SELECT item, count(*) FROM read_parquet({_sql_str(interactions)}) GROUP BY item"):
        per_item[i] = c
    h = hashlib.sha256()
    source = pq.ParquetFile(interactions)
    for column in ("user", "item"):
        for batch in source.iter_batches(batch_size=1 << 20, columns=[column]):
            h.update(np.ascontiguousarray(batch.column(0).to_numpy(), dtype=np.int32).tobytes())
    return stats_from_counts(per_user, per_item), h.hexdigest()[:16]
