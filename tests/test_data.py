"""Tests of the raw-file readers and ``data prepare`` on the real samples and on hand-built fixtures."""

from __future__ import annotations

import gzip
import json
import os
from collections import defaultdict
from itertools import pairwise
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from llmrec.cli import main
from llmrec.data.dataset import Dataset
from llmrec.data.prepare import PrepareConfig, prepare_dataset
from llmrec.data.readers import _stage_reviews_fast, stage_reviews
from llmrec.errors import DataError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
SAMPLE_2023 = DATA / "amazon-2023-sample"
OFFICE = DATA / "amazon-office-2014"

needs_2023 = pytest.mark.skipif(not SAMPLE_2023.is_dir(), reason="amazon-2023-sample not available")
needs_office = pytest.mark.skipif(not OFFICE.is_dir(), reason="amazon-office-2014 not available")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_lines(path: Path, lines: list[Any], newline: str = "\n") -> Path:
    """Write dicts (as JSON) and raw strings, one per line; gzipped when the name ends in .gz."""
    text = newline.join(x if isinstance(x, str) else json.dumps(x) for x in lines) + newline
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def prepare(source: Path, out: Path, **cfg: Any) -> dict[str, Any]:
    meta = cfg.pop("meta", None)
    overwrite = cfg.pop("overwrite", False)
    return prepare_dataset(source, out, PrepareConfig(**cfg), meta=meta, overwrite=overwrite, progress=False)


def histories(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Raw user id -> that user's interactions in stored order, with raw item ids."""
    inter = pq.read_table(out / "interactions.parquet").to_pylist()
    users = pq.read_table(out / "users.parquet").column("user_id").to_pylist()
    items = pq.read_table(out / "items.parquet").column("item_id").to_pylist()
    result: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in inter:
        result[users[row["user"]]].append({**row, "item_id": items[row["item"]]})
    return dict(result)


def assert_no_leftovers(out: Path) -> None:
    assert not out.exists(), f"{out} must not exist after a failure"
    if out.parent.exists():
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert leftovers == [], f"temporary folders left beside {out}: {leftovers}"


# --------------------------------------------------------------------------- Amazon 2023 sample


@pytest.fixture(scope="module")
def sample_2023(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("s2023") / "ds"
    return out, prepare(SAMPLE_2023, out)


@needs_2023
def test_2023_sample_counts_match_raw(sample_2023):
    out, manifest = sample_2023
    raw = read_jsonl(SAMPLE_2023 / "reviews.jsonl.gz")
    assert len(raw) == 3455
    pairs = {(r["user_id"], r["parent_asin"]) for r in raw}
    assert manifest["format"] == "amazon2023"
    rep = manifest["parse_reports"][0]
    assert (rep["lines"], rep["rows"], rep["bad_lines"]) == (3455, 3455, 0)
    assert manifest["counts"]["after_filters"] == 3455
    assert manifest["counts"]["after_dedup"] == manifest["counts"]["final"] == len(pairs) < 3455
    stats = json.loads((out / "stats.json").read_text())
    assert stats["users"] == len({r["user_id"] for r in raw}) == 354
    assert stats["items"] == len({r["parent_asin"] for r in raw})
    assert stats["interactions"] == len(pairs)
    assert manifest["columns"] == {"timestamp": True, "rating": True, "review": True}


@needs_2023
def test_2023_sample_histories_equal_raw_file(sample_2023):
    out, _ = sample_2023
    raw = read_jsonl(SAMPLE_2023 / "reviews.jsonl.gz")
    # Independent reference: per user, sort by (timestamp, line), keep each item's first row.
    expected: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line_no, r in sorted(enumerate(raw), key=lambda x: (x[1]["user_id"], x[1]["timestamp"], x[0])):
        if all(e["parent_asin"] != r["parent_asin"] for e in expected[r["user_id"]]):
            expected[r["user_id"]].append(r)
    got = histories(out)
    assert set(got) == set(expected)
    for user, rows in got.items():
        exp = expected[user]
        assert [x["item_id"] for x in rows] == [e["parent_asin"] for e in exp]
        assert [x["order"] for x in rows] == list(range(len(rows)))
        ts = [x["timestamp"] for x in rows]
        assert ts == [e["timestamp"] for e in exp]
        assert all(a <= b for a, b in pairwise(ts)), "not chronological"
        assert all(t > 10**12 for t in ts), "timestamps must stay unix milliseconds"
        assert [x["rating"] for x in rows] == [e["rating"] for e in exp]
        for x, e in zip(rows, exp, strict=True):
            assert e["text"] in x["review"] and e["title"] in x["review"]



@needs_2023
def test_2023_sample_feedback_is_aligned_with_sequences(sample_2023):
    from llmrec.data.dataset import Dataset

    out, _ = sample_2023
    ds = Dataset.load(out)
    fb = ds.feedback()
    got = histories(out)
    assert fb.ratings is not None and fb.reviews is not None
    for u, uid in enumerate(ds.user_ids[:50]):
        rows = got[uid]
        assert [float(r) for r in fb.ratings[u]] == [x["rating"] for x in rows]
        assert fb.reviews[u] == [x["review"] for x in rows]
        r, v = fb.of(u, ds.sequences[u][:2])
        assert r is not None and v is not None and len(r) == len(v) == min(2, len(rows))

@needs_2023
def test_2023_sample_ids_and_titles_round_trip(sample_2023):
    out, manifest = sample_2023
    raw = read_jsonl(SAMPLE_2023 / "reviews.jsonl.gz")
    meta = {m["parent_asin"]: m for m in read_jsonl(SAMPLE_2023 / "meta.jsonl.gz")}
    users = pq.read_table(out / "users.parquet")
    items = pq.read_table(out / "items.parquet")
    assert users.column("user").to_pylist() == list(range(users.num_rows))
    assert items.column("item").to_pylist() == list(range(items.num_rows))
    assert sorted(users.column("user_id").to_pylist()) == sorted({r["user_id"] for r in raw})
    assert sorted(items.column("item_id").to_pylist()) == sorted({r["parent_asin"] for r in raw})
    titles = dict(zip(items.column("item_id").to_pylist(), items.column("title").to_pylist(), strict=True))
    matched = [i for i in titles if i in meta]
    assert len(matched) == manifest["counts"]["items_with_metadata"] > 0
    for item_id in matched:
        assert titles[item_id] == meta[item_id]["title"]
    cats = dict(zip(items.column("item_id").to_pylist(), items.column("main_category").to_pylist(), strict=True))
    assert all(cats[i] == meta[i]["main_category"] for i in matched)
    ds = Dataset.load(out)
    assert ds.n_users == 354 and ds.n_items == items.num_rows
    assert ds.timestamps is not None
    assert all(np.all(np.diff(t) >= 0) for t in ds.timestamps)
    assert ds.fingerprint == manifest["fingerprint"]


# --------------------------------------------------------------------------- sequence format


@pytest.fixture(scope="module")
def office(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("office") / "ds"
    return out, prepare(OFFICE, out)


@needs_office
def test_sequence_format_has_no_feedback(office):
    from llmrec.data.dataset import Dataset

    out, _ = office
    ds = Dataset.load(out)
    fb = ds.feedback()
    assert fb.ratings is None and fb.reviews is None
    assert fb.of(0, ds.sequences[0][:1]) == (None, None)

@needs_office
def test_sequences_office_counts_and_stats(office):
    out, manifest = office
    assert manifest["format"] == "sequences"
    assert manifest["counts"] == {"after_filters": 53258, "after_dedup": 53258, "final": 53258,
                                  "items_with_metadata": 2420}
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (4905, 2420, 53258)
    assert stats["density"] == pytest.approx(53258 / (4905 * 2420))
    assert stats["history_length"]["min"] == 5  # a 5-core
    assert stats["item_popularity"]["min"] == 5
    assert stats["history_length"]["mean"] == pytest.approx(53258 / 4905)
    assert sum(stats["history_length"]["histogram"].values()) == 4905
    assert manifest["columns"] == {"timestamp": False, "rating": False, "review": False}


@needs_office
def test_sequences_office_match_raw_lists(office):
    out, _ = office
    raw = read_jsonl(OFFICE / "sequences.jsonl.gz")
    ds = Dataset.load(out)
    assert ds.timestamps is None
    vocab = {item_id: i for i, item_id in enumerate(ds.item_ids)}
    first = raw[0]
    u = ds.user_index(first["user_id"])
    assert ds.sequences[u].tolist() == [vocab[i] for i in first["item_ids"]]
    for rec in raw:  # every user, not only the first
        assert ds.sequences[ds.user_index(rec["user_id"])].tolist() == [vocab[i] for i in rec["item_ids"]]
    items = {m["item_id"]: m for m in read_jsonl(OFFICE / "items.jsonl.gz")}
    titles = ds.items.column("title").to_pylist()
    cats = ds.items.column("categories").to_pylist()
    for i, item_id in enumerate(ds.item_ids[:200]):
        assert titles[i] == items[item_id]["title"]
        assert cats[i] == items[item_id]["categories"]


def test_sequences_dedup_and_order(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    write_lines(src / "sequences.jsonl.gz", [
        {"user_id": "u1", "item_ids": ["c", "a", "c", "b"]},
        {"user_id": "u2", "item_ids": ["b", "a"]},
    ])
    write_lines(src / "items.jsonl.gz", [{"item_id": "a", "title": "A"}, {"item_id": "b", "title": None}])
    manifest = prepare(src, tmp_path / "ds")
    got = {u: [x["item_id"] for x in rows] for u, rows in histories(tmp_path / "ds").items()}
    assert got == {"u1": ["c", "a", "b"], "u2": ["b", "a"]}  # list order, first "c" kept
    assert manifest["counts"]["after_dedup"] == 5
    prepare(src, tmp_path / "nodedup", dedup=False)
    got = {u: [x["item_id"] for x in rows] for u, rows in histories(tmp_path / "nodedup").items()}
    assert got["u1"] == ["c", "a", "c", "b"]
    titles = pq.read_table(tmp_path / "ds" / "items.parquet").to_pydict()
    assert dict(zip(titles["item_id"], titles["title"], strict=True)) == {"a": "A", "b": None, "c": None}


# --------------------------------------------------------------------------- Amazon 2018 fixture


def review18(user: str, asin: str, t: int, overall: float = 5.0, verified: bool | None = True,
             text: str = "", summary: str = "") -> dict[str, Any]:
    r: dict[str, Any] = {"reviewerID": user, "asin": asin, "overall": overall, "unixReviewTime": t,
                         "reviewText": text or f"{user} on {asin}", "summary": summary or f"sum {asin}",
                         "reviewTime": "01 1, 2015", "style": {"Format:": " Paperback"}}
    if verified is not None:
        r["verified"] = verified
    return r


def meta18(asin: str, **extra: Any) -> dict[str, Any]:
    return {"asin": asin, "title": f"Title {asin}", "brand": f"Brand {asin}", "category": ["Cat", asin],
            "description": [f"Desc {asin}.", "More."], "price": "$1.00", "also_buy": [], **extra}


def write_2018(folder: Path, reviews: list[Any], metas: list[Any] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = write_lines(folder / "Cat.json.gz", reviews)
    if metas is not None:
        write_lines(folder / "meta_Cat.json.gz", metas)
    return path


def test_2018_fields_and_metadata(tmp_path):
    src = write_2018(tmp_path / "raw", [
        review18("U1", "A", 1_400_000_100, 4.0, text="Great pen", summary="Nice"),
        review18("U1", "B", 1_400_000_000, 2.0),
        review18("U2", "A", 1_400_000_050, 5.0, verified=None),
        review18("U2", "Z", 1_400_000_060, 3.0),  # Z has no metadata
    ], [meta18("A"), meta18("B", description="plain string"), meta18("A", title="second A: ignored"),
        meta18("Q")])  # Q is never reviewed
    manifest = prepare(src, tmp_path / "ds")
    assert manifest["format"] == "amazon2018"
    assert manifest["source"]["metadata"].endswith("meta_Cat.json.gz")
    got = histories(tmp_path / "ds")
    assert [(x["item_id"], x["timestamp"], x["rating"]) for x in got["U1"]] == [
        ("B", 1_400_000_000_000, 2.0), ("A", 1_400_000_100_000, 4.0)]  # seconds -> ms, chronological
    assert got["U1"][1]["review"] == "Nice. Great pen"
    assert [x["item_id"] for x in got["U2"]] == ["A", "Z"]
    items = {r["item_id"]: r for r in pq.read_table(tmp_path / "ds" / "items.parquet").to_pylist()}
    assert sorted(items) == ["A", "B", "Z"]
    assert items["A"]["title"] == "Title A" and items["A"]["brand"] == "Brand A"
    assert items["A"]["categories"] == ["Cat", "A"]
    assert items["A"]["description"] == "Desc A. More."
    assert items["B"]["description"] == "plain string"
    assert items["Z"]["title"] is None
    assert manifest["counts"]["items_with_metadata"] == 2


def test_2018_verified_and_min_rating(tmp_path):
    src = write_2018(tmp_path / "raw", [
        review18("U1", "A", 10, 5.0, verified=True),
        review18("U1", "B", 20, 2.0, verified=True),
        review18("U1", "C", 30, 4.0, verified=False),
        review18("U2", "A", 40, 3.0, verified=True),
        review18("U2", "C", 50, 5.0, verified=None),  # no field: not a verified purchase
    ])

    def kept(name: str, **cfg: Any) -> set[tuple[str, str]]:
        prepare(src, tmp_path / name, **cfg)
        return {(u, x["item_id"]) for u, rows in histories(tmp_path / name).items() for x in rows}

    assert kept("all") == {("U1", "A"), ("U1", "B"), ("U1", "C"), ("U2", "A"), ("U2", "C")}
    assert kept("verified", verified_only=True) == {("U1", "A"), ("U1", "B"), ("U2", "A")}
    assert kept("rating", min_rating=4) == {("U1", "A"), ("U1", "C"), ("U2", "C")}
    assert kept("both", verified_only=True, min_rating=4.0) == {("U1", "A")}
    m = json.loads((tmp_path / "both" / "manifest.json").read_text())
    assert m["counts"]["after_filters"] == 1 and m["config"]["verified_only"] is True


# u1: A B E | u2: A B | u3: A C | u4: C D | u5: D. With k=2 removal cascades
# u5 -> D -> u4 -> C -> u3, and E (one user) goes: the 2-core is {u1, u2} x {A, B}.
KCORE_ROWS = [("u1", "A"), ("u1", "B"), ("u1", "E"), ("u2", "A"), ("u2", "B"),
              ("u3", "A"), ("u3", "C"), ("u4", "C"), ("u4", "D"), ("u5", "D")]


def test_2018_kcore_by_hand(tmp_path):
    rows = [review18(u, i, 100 + n) for n, (u, i) in enumerate(KCORE_ROWS)]
    # A low-rated u3-B review would rescue u3 (then {A, B} x {u1, u2, u3}) unless min_rating drops it.
    rows.append(review18("u3", "B", 999, overall=1.0))
    src = write_2018(tmp_path / "raw", rows)

    def core(name: str, **cfg: Any) -> dict[str, list[str]]:
        prepare(src, tmp_path / name, **cfg)
        return {u: [x["item_id"] for x in r] for u, r in histories(tmp_path / name).items()}

    assert core("k2", k_core=2) == {"u1": ["A", "B"], "u2": ["A", "B"], "u3": ["A", "B"]}
    assert core("k2r", k_core=2, min_rating=3) == {"u1": ["A", "B"], "u2": ["A", "B"]}
    stats = json.loads((tmp_path / "k2r" / "stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (2, 2, 4)
    # min_history=3 constrains users only: u1 (A B E) and u3 (A C B) have 3 rows, items need 1.
    assert core("h3", min_history=3) == {"u1": ["A", "B", "E"], "u3": ["A", "C", "B"]}
    assert core("none") == {u: [i for uu, i in KCORE_ROWS + [("u3", "B")] if uu == u]
                            for u in ["u1", "u2", "u3", "u4", "u5"]}
    # Every kept user and item meets k, and the codes are dense.
    inter = pq.read_table(tmp_path / "k2" / "interactions.parquet")
    assert np.bincount(inter.column("user").to_numpy()).min() >= 2
    assert np.bincount(inter.column("item").to_numpy()).min() >= 2


# --------------------------------------------------------------------------- dedup and chronology


def review23(user: str, item: str, ts: int | None, text: str, **extra: Any) -> dict[str, Any]:
    r = {"rating": 5.0, "title": "", "text": text, "images": [], "asin": item + "-v", "parent_asin": item,
         "user_id": user, "helpful_vote": 0, "verified_purchase": True, **extra}
    if ts is not None:
        r["timestamp"] = ts
    return r


def test_dedup_keeps_earliest_and_ties_follow_file_order(tmp_path):
    src = write_lines(tmp_path / "Toys.jsonl.gz", [
        review23("U", "X", 300, "late X"),
        review23("U", "Y", 200, "Y"),
        review23("U", "X", 100, "early X"),   # earlier in time, later in the file: this one is kept
        review23("U", "P", 400, "P"),
        review23("U", "Q", 400, "Q"),         # same time as P, later in the file
        review23("V", "Q", 50, "first Q"),
        review23("V", "P", 50, "P again"),
        review23("V", "Q", 50, "second Q"),   # same pair, same time: the first line wins
    ])
    manifest = prepare(src, tmp_path / "ds")
    assert manifest["counts"]["after_filters"] == 8 and manifest["counts"]["after_dedup"] == 6
    got = histories(tmp_path / "ds")
    # timestamps this small are seconds (below 1e11): stored as milliseconds
    assert [(x["item_id"], x["timestamp"], x["review"]) for x in got["U"]] == [
        ("X", 100_000, "early X"), ("Y", 200_000, "Y"), ("P", 400_000, "P"), ("Q", 400_000, "Q")]
    assert [(x["item_id"], x["review"]) for x in got["V"]] == [("Q", "first Q"), ("P", "P again")]
    assert [x["order"] for x in got["U"]] == [0, 1, 2, 3]

    prepare(src, tmp_path / "all", dedup=False)
    got = histories(tmp_path / "all")
    assert [x["review"] for x in got["U"]] == ["early X", "Y", "late X", "P", "Q"]
    assert [x["review"] for x in got["V"]] == ["first Q", "P again", "second Q"]


def test_2023_item_falls_back_to_asin_and_missing_timestamp_sorts_last(tmp_path):
    no_parent = review23("U", "ignored", 5, "asin only")
    del no_parent["parent_asin"]
    src = write_lines(tmp_path / "Toys.jsonl.gz", [
        review23("U", "N", None, "no time"),
        review23("U", "M", 20, "M"),
        no_parent,
    ])
    prepare(src, tmp_path / "ds")
    got = histories(tmp_path / "ds")
    assert [(x["item_id"], x["timestamp"]) for x in got["U"]] == [("ignored-v", 5000), ("M", 20000), ("N", None)]


# --------------------------------------------------------------------------- fast and careful readers


def stage_both(src: Path, fmt: str, tmp_path: Path) -> tuple[Any, Any, Any]:
    """(fast-path report or None, fast rows, line-by-line rows) of ``stage_reviews`` on ``src``."""
    con = duckdb.connect()
    fast_only = _stage_reviews_fast(con, src, fmt, tmp_path / "fast_only.parquet")
    stage_reviews(con, src, fmt, tmp_path / "fast.parquet")
    stage_reviews(con, src, fmt, tmp_path / "slow.parquet", fast=False)
    fast = pq.read_table(tmp_path / "fast.parquet")
    slow = pq.read_table(tmp_path / "slow.parquet")
    if "broken" in fast.schema.names:  # the fast reader's own flag (all false in a file it kept)
        assert not any(fast.column("broken").to_pylist())
        fast = fast.drop_columns(["broken"])
    assert fast.schema.names == slow.schema.names
    assert [f.type for f in fast.schema] == [f.type for f in slow.schema]
    if fast_only is not None:  # the fast reader numbers no lines: the rows' order is the file's
        assert fast.column("line_no").null_count == fast.num_rows
    numbers = slow.column("line_no").to_pylist()
    assert numbers == sorted(numbers)
    keys = [n for n in fast.schema.names if n != "line_no"]
    return fast_only, fast.select(keys).to_pylist(), slow.select(keys).to_pylist()


@needs_2023
def test_fast_reader_equals_line_by_line_reader_on_2023_sample(tmp_path):
    report, fast, slow = stage_both(SAMPLE_2023 / "reviews.jsonl.gz", "amazon2023", tmp_path)
    assert report is not None and (report.lines, report.rows, report.bad_lines) == (3455, 3455, 0)
    assert fast == slow


ODD_BUT_VALID_2018 = [
    review18("U1", "A", 1_400_000_000, 4.0),
    {"reviewerID": "U2", "asin": "B", "overall": "3.0", "unixReviewTime": "1400000001", "verified": "true",
     "reviewText": "", "summary": "only a summary"},                        # numbers and booleans as strings
    {"reviewerID": 12345, "asin": "C", "overall": 5, "unixReviewTime": 1_400_000_002, "verified": False},
    {"reviewerID": "U3", "asin": "A", "overall": None, "unixReviewTime": None, "summary": "", "reviewText": ""},
    {"reviewerID": "U3", "asin": "D", "image": ["x.jpg"], "vote": "2", "style": {"Size:": " L"}},
    {"asin": "E", "reviewerID": "U4", "reviewText": "A \"quoted\" text\nwith a newline", "overall": 1.0},
]


def test_fast_reader_equals_line_by_line_reader_on_odd_values(tmp_path):
    src = write_lines(tmp_path / "Cat.json.gz", ODD_BUT_VALID_2018)
    report, fast, slow = stage_both(src, "amazon2018", tmp_path)
    assert report is not None and report.rows == len(ODD_BUT_VALID_2018)
    assert fast == slow
    assert [r["user_id"] for r in fast] == ["U1", "U2", "12345", "U3", "U3", "U4"]
    assert fast[1]["rating"] == 3.0 and fast[1]["ts"] == 1_400_000_001_000 and fast[1]["verified"] is True
    assert fast[1]["review"] == "only a summary" and fast[3]["review"] is None
    assert fast[5]["review"] == 'A "quoted" text\nwith a newline'


def test_fast_reader_keeps_order_across_blank_lines(tmp_path):
    lines: list[Any] = [review23("u", f"p{i}", 5, f"t{i}") for i in range(6)]
    lines[2:2] = ["", "   "]
    src = write_lines(tmp_path / "Toys.jsonl.gz", lines, newline="\r\n")
    report, fast, slow = stage_both(src, "amazon2023", tmp_path)
    assert report is not None and report.lines == 6
    assert fast == slow
    assert [r["review"] for r in fast] == [f"t{i}" for i in range(6)]


@pytest.mark.parametrize("bad", [
    "{not json",
    '{"user_id": "u", "parent_asin": "p", "rating": "five"}',
    '{"parent_asin": "p", "rating": 1.0}',                 # valid JSON, no user_id
    '["a", "list"]',
])
def test_fast_reader_gives_way_on_any_malformed_line(tmp_path, bad):
    lines: list[Any] = [review23(f"u{i}", f"p{i}", i, "x") for i in range(10)]
    lines.insert(7, bad)
    src = write_lines(tmp_path / "Toys.jsonl.gz", lines)
    out = tmp_path / "fast.parquet"
    assert _stage_reviews_fast(duckdb.connect(), src, "amazon2023", out) is None
    assert not out.exists()
    report = stage_reviews(duckdb.connect(), src, "amazon2023", tmp_path / "all.parquet")
    assert report.bad_lines == 1 and report.examples[0][0] == 8


# --------------------------------------------------------------------------- malformed lines


GOOD = [review23(f"u{i % 4}", f"p{i}", 1000 + i, f"text {i}") for i in range(20)]


def with_bad_lines() -> list[Any]:
    lines: list[Any] = list(GOOD)
    lines.insert(2, "")                                                  # line 3: blank, skipped
    lines.insert(6, '{"user_id": "u1", "parent_asin": "p99", "rating": ')  # line 7: invalid JSON
    lines.insert(11, {"parent_asin": "p98", "rating": 1.0})               # line 12: no user_id
    lines.insert(14, review23("u2", "p97", 5, "x", rating="five"))        # line 15: wrong type
    return lines


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("name", ["Toys.jsonl.gz", "Toys.jsonl"])
def test_malformed_lines_are_counted_with_line_numbers(tmp_path, name, newline):
    src = write_lines(tmp_path / name, with_bad_lines(), newline=newline)
    manifest = prepare(src, tmp_path / "ds")
    rep = manifest["parse_reports"][0]
    assert rep["file"] == str(src)
    assert rep["lines"] == 23 and rep["bad_lines"] == 3 and rep["rows"] == 20
    assert [tuple(e) for e in rep["examples"]] == [
        (7, "invalid JSON"), (12, "missing field user_id"), (15, "field rating is not a number")]
    assert manifest["counts"]["final"] == 20
    assert {x["review"] for rows in histories(tmp_path / "ds").values() for x in rows} == {
        f"text {i}" for i in range(20)}


def test_malformed_line_is_fatal_with_strict(tmp_path):
    src = write_lines(tmp_path / "Toys.jsonl.gz", with_bad_lines())
    out = tmp_path / "ds"
    with pytest.raises(DataError, match=r"invalid JSON") as ei:
        prepare(src, out, strict=True)
    assert f"{src}:7" in str(ei.value)
    assert_no_leftovers(out)


def test_malformed_metadata_line_is_reported(tmp_path):
    src = write_2018(tmp_path / "raw", [review18("U1", "A", 1), review18("U1", "B", 2)],
                     [meta18("A"), "not json at all", meta18("B"), {"title": "no asin"}, meta18("C")])
    manifest = prepare(src, tmp_path / "ds")
    rep = manifest["parse_reports"][1]
    assert rep["file"].endswith("meta_Cat.json.gz")
    assert [tuple(e) for e in rep["examples"]] == [(2, "invalid JSON"), (4, "missing field asin")]
    assert manifest["counts"]["items_with_metadata"] == 2


# --------------------------------------------------------------------------- bad input


def _case_missing(d: Path) -> tuple[Path, dict[str, Any], Path]:
    return d / "nope.jsonl.gz", {}, d / "nope.jsonl.gz"


def _case_missing_meta(d: Path) -> tuple[Path, dict[str, Any], Path]:
    src = write_lines(d / "Toys.jsonl.gz", GOOD)
    return src, {"meta": d / "meta_nope.jsonl.gz"}, d / "meta_nope.jsonl.gz"


def _case_empty(d: Path) -> tuple[Path, dict[str, Any], Path]:
    (d / "Toys.jsonl").write_bytes(b"")
    return d / "Toys.jsonl", {}, d / "Toys.jsonl"


def _case_empty_gzip(d: Path) -> tuple[Path, dict[str, Any], Path]:
    (d / "Toys.jsonl.gz").write_bytes(gzip.compress(b""))
    return d / "Toys.jsonl.gz", {}, d / "Toys.jsonl.gz"


def _case_blank_lines(d: Path) -> tuple[Path, dict[str, Any], Path]:
    (d / "Toys.jsonl.gz").write_bytes(gzip.compress(b"\n  \n\n"))
    return d / "Toys.jsonl.gz", {}, d / "Toys.jsonl.gz"


def _truncated(path: Path) -> Path:
    lines = [review23(f"u{i % 50}", f"p{i}", i, f"review number {i} " * (i % 7 + 1)) for i in range(3000)]
    data = gzip.compress(("\n".join(json.dumps(x) for x in lines) + "\n").encode())
    path.write_bytes(data[: len(data) // 2])
    return path


def _case_truncated_gzip(d: Path) -> tuple[Path, dict[str, Any], Path]:
    src = _truncated(d / "Toys.jsonl.gz")
    return src, {}, src


def _case_truncated_meta(d: Path) -> tuple[Path, dict[str, Any], Path]:
    src = write_2018(d, [review18("U1", "A", 1)])
    meta = _truncated(d / "meta_Cat.json.gz")
    return src, {}, meta


def _case_2018_as_2023(d: Path) -> tuple[Path, dict[str, Any], Path]:
    src = write_2018(d, [review18(f"U{i}", "A", i) for i in range(10)])
    return src, {"format": "amazon2023"}, src


def _case_not_json(d: Path) -> tuple[Path, dict[str, Any], Path]:
    src = write_lines(d / "Toys.jsonl", ["user,item,rating", "a,b,5", "c,d,4"])
    return src, {}, src


def _case_seq_not_list(d: Path) -> tuple[Path, dict[str, Any], Path]:
    src = write_lines(d / "sequences.jsonl.gz", [{"user_id": f"u{i}", "item_ids": "a b c"} for i in range(4)])
    return src, {}, src


def _case_unknown_format(d: Path) -> tuple[Path, dict[str, Any], Path]:
    src = write_lines(d / "Toys.jsonl.gz", GOOD)
    return src, {"format": "amazon2099"}, src


def _case_kcore_empties(d: Path) -> tuple[Path, dict[str, Any], Path]:
    src = write_lines(d / "Toys.jsonl.gz", GOOD)
    return src, {"k_core": 3}, src  # every item has one review


def _case_rating_empties(d: Path) -> tuple[Path, dict[str, Any], Path]:
    src = write_lines(d / "Toys.jsonl.gz", GOOD)
    return src, {"min_rating": 5.5}, src


def _case_ambiguous_folder(d: Path) -> tuple[Path, dict[str, Any], Path]:
    write_lines(d / "Toys.jsonl.gz", GOOD)  # a 2023 file beside a 2018 one: one dataset cannot mix them
    write_lines(d / "Games.json.gz", GOOD)
    return d, {}, d


BAD_CASES = {
    "missing path": (_case_missing, "not found"),
    "missing meta": (_case_missing_meta, "not found"),
    "empty file": (_case_empty, "empty"),
    "empty gzip": (_case_empty_gzip, "empty"),
    "only blank lines": (_case_blank_lines, "no lines"),
    "truncated gzip": (_case_truncated_gzip, "could not be read"),
    "truncated meta gzip": (_case_truncated_meta, ""),
    "2018 file as amazon2023": (_case_2018_as_2023, "wrong schema"),
    "not JSON": (_case_not_json, "wrong schema"),
    "item_ids not a list": (_case_seq_not_list, "wrong schema"),
    "unknown format": (_case_unknown_format, "unknown format"),
    "k-core removes everything": (_case_kcore_empties, "k-core"),
    "min_rating removes everything": (_case_rating_empties, "no interactions left"),
    "folder with files of two formats": (_case_ambiguous_folder, "mix formats"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_raises_data_error_and_leaves_nothing(tmp_path, case):
    make, fragment = BAD_CASES[case]
    raw = tmp_path / "raw"
    raw.mkdir()
    src, kwargs, named = make(raw)
    out = tmp_path / "dest" / "out"
    with pytest.raises(DataError) as ei:
        prepare(src, out, **kwargs)
    msg = str(ei.value)
    assert str(named) in msg, msg
    assert fragment in msg, msg
    assert_no_leftovers(out)


def test_existing_output_refused_without_overwrite_and_replaced_with_it(tmp_path):
    src = write_lines(tmp_path / "Toys.jsonl.gz", GOOD)
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="already exists") as ei:
        prepare(src, out)
    assert str(out) in str(ei.value)
    assert (out / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ds.")] == []

    manifest = prepare(src, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert Dataset.load(out).fingerprint == manifest["fingerprint"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ds.")] == []
    # A failing overwrite leaves the old dataset in place.
    with pytest.raises(DataError):
        prepare(src, out, overwrite=True, k_core=50)
    assert Dataset.load(out).fingerprint == manifest["fingerprint"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ds.")] == []


# --------------------------------------------------------------------------- CLI


def test_cli_prepare_and_stats(tmp_path, capsys):
    src = write_2018(tmp_path / "raw", [review18(u, i, 100 + n) for n, (u, i) in enumerate(KCORE_ROWS)],
                     [meta18("A"), "broken", meta18("B")])
    out = tmp_path / "ds"
    assert main(["data", "prepare", str(src), str(out), "--k-core", "2", "-q"]) == 0
    printed = capsys.readouterr().out
    assert f"{out}: 2 users, 2 items, 4 interactions" in printed
    assert "1 malformed (line 2: invalid JSON)" in printed
    assert "fingerprint" in printed
    assert main(["data", "stats", str(out)]) == 0
    assert "2 users, 2 items, 4 interactions" in capsys.readouterr().out
    # Existing output: refused without --force, replaced with it.
    assert main(["data", "prepare", str(src), str(out), "-q"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "prepare", str(src), str(out), "-q", "--force"]) == 0
    assert "5 users, 5 items, 10 interactions" in capsys.readouterr().out


@pytest.mark.parametrize("make", [_case_missing, _case_truncated_gzip, _case_not_json],
                         ids=["missing", "truncated", "not-json"])
def test_cli_prepare_bad_input_exits_2(tmp_path, capsys, make):
    src, _, named = make(tmp_path)
    out = tmp_path / "ds"
    assert main(["data", "prepare", str(src), str(out), "-q"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("llmrec: error: ")
    assert str(named) in captured.err
    assert "Traceback" not in captured.err
    assert_no_leftovers(out)


def test_cli_strict_names_file_and_line(tmp_path, capsys):
    src = write_lines(tmp_path / "Toys.jsonl.gz", with_bad_lines())
    assert main(["data", "prepare", str(src), str(tmp_path / "ds"), "-q", "--strict"]) == 2
    assert f"{src}:7" in capsys.readouterr().err
    assert main(["data", "prepare", str(src), str(tmp_path / "ds"), "-q"]) == 0
    assert "3 malformed (line 7: invalid JSON; line 12: missing field user_id" in capsys.readouterr().out


def test_no_stray_files_in_cwd(tmp_path, monkeypatch):
    """prepare must write only under the output's parent (DuckDB spill files included)."""
    monkeypatch.chdir(tmp_path)
    src = write_lines(tmp_path / "Toys.jsonl.gz", GOOD)
    before = set(os.listdir(tmp_path))
    prepare(src, tmp_path / "ds")
    assert set(os.listdir(tmp_path)) - before == {"ds"}
