"""``data prepare``: the DuckDB path (dedup, k-core, re-coding inside DuckDB) gives the same dataset as the
numpy reference path, on generated data with duplicates, timestamp ties and missing times, and k-core cascades."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_data import review23, write_lines

from llmrec.data.prepare import PrepareConfig, prepare_dataset


def prepared(src: Path, out: Path, engine: str, **cfg: object) -> dict:
    return prepare_dataset(src, out, PrepareConfig(engine=engine, **cfg), progress=False)  # type: ignore[arg-type]


def same_dataset(a: Path, b: Path) -> None:
    for name in ("interactions.parquet", "users.parquet", "items.parquet"):
        assert pq.read_table(a / name).equals(pq.read_table(b / name)), name
    assert json.loads((a / "stats.json").read_text()) == json.loads((b / "stats.json").read_text())
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["fingerprint"] == mb["fingerprint"] and ma["counts"] == mb["counts"]


rows = st.lists(st.tuples(st.integers(0, 14), st.integers(0, 11), st.one_of(st.none(), st.integers(0, 6))),
                min_size=1, max_size=160)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=rows, k=st.integers(0, 4), min_history=st.integers(0, 3), dedup=st.booleans())
def test_duckdb_and_numpy_paths_give_the_same_dataset(tmp_path_factory: pytest.TempPathFactory,
                                                      data: list[tuple[int, int, int | None]], k: int,
                                                      min_history: int, dedup: bool) -> None:
    tmp = tmp_path_factory.mktemp("eng")
    src = write_lines(tmp / "Toys.jsonl.gz", [review23(f"U{u}", f"I{i}", None if t is None else 1_600_000_000_000 + t,
                                                       f"{u}-{i}-{n}") for n, (u, i, t) in enumerate(data)])
    results = {}
    for engine in ("duckdb", "numpy"):
        try:
            results[engine] = prepared(src, tmp / engine, engine, k_core=k, min_history=min_history, dedup=dedup)
        except Exception as e:  # noqa: BLE001 - both must fail alike (nothing left after k-core)
            results[engine] = type(e).__name__ + str(e).split(":")[-1]
    if isinstance(results["duckdb"], str) or isinstance(results["numpy"], str):
        assert results["duckdb"] == results["numpy"]
        return
    same_dataset(tmp / "duckdb", tmp / "numpy")


def test_a_k_core_cascade_is_followed_to_its_end(tmp_path: Path) -> None:
    # a chain: dropping user A's thin item drops A, which drops B's item, ... down to nothing but the core
    rows = [("core1", "x"), ("core1", "y"), ("core2", "x"), ("core2", "y"),
            ("A", "x"), ("A", "a"), ("B", "a"), ("B", "b"), ("C", "b")]
    src = write_lines(tmp_path / "Toys.jsonl.gz", [review23(u, i, 1_600_000_000_000 + n, "") for n, (u, i) in enumerate(rows)])
    for engine in ("duckdb", "numpy"):
        manifest = prepared(src, tmp_path / engine, engine, k_core=2)
        assert manifest["counts"]["final"] == 4
    same_dataset(tmp_path / "duckdb", tmp_path / "numpy")


def test_several_category_files_make_one_dataset(tmp_path: Path) -> None:
    from test_data import histories

    from llmrec.cli import main

    raw = tmp_path / "raw"
    raw.mkdir()
    toys = [review23("U1", "T1", 1_600_000_000_000, "a"), review23("U2", "T2", 1_600_000_000_001, "b")]
    books = [review23("U1", "B1", 1_599_000_000_000, "c"), review23("U3", "B2", 1_600_000_000_002, "d")]
    write_lines(raw / "Toys.jsonl.gz", toys)
    write_lines(raw / "Books.jsonl.gz", books)
    write_lines(raw / "meta_Toys.jsonl.gz", [{"parent_asin": "T1", "title": "Toy one"}, {"parent_asin": "T2"}])
    write_lines(raw / "meta_Books.jsonl.gz", [{"parent_asin": "B1", "title": "Book one"}])
    assert main(["data", "prepare", str(raw / "Toys.jsonl.gz"), str(raw / "Books.jsonl.gz"), str(tmp_path / "two"),
                 "--quiet"]) == 0
    assert main(["data", "prepare", str(raw), str(tmp_path / "folder"), "--quiet"]) == 0  # a folder of categories
    for ds in ("two", "folder"):
        got = histories(tmp_path / ds)
        assert [x["item_id"] for x in got["U1"]] == ["B1", "T1"]  # one history across files, in time order
        assert set(got) == {"U1", "U2", "U3"}
        titles = dict(zip(*(pq.read_table(tmp_path / ds / "items.parquet").column(c).to_pylist()
                            for c in ("item_id", "title")), strict=True))
        assert titles["T1"] == "Toy one" and titles["B1"] == "Book one"
        manifest = json.loads((tmp_path / ds / "manifest.json").read_text())
        assert len(manifest["source"]["files"]) == 2 and len(manifest["parse_reports"]) == 4


def test_each_stage_shows_a_progress_bar_with_its_counts_and_records_its_seconds(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [("core1", "x"), ("core1", "y"), ("core2", "x"), ("core2", "y"), ("core2", "y"), ("A", "x"), ("A", "a")]
    src = write_lines(tmp_path / "Toys.jsonl.gz", [review23(u, i, 1_600_000_000_000 + n, "") for n, (u, i) in enumerate(rows)])
    manifest = prepare_dataset(src, tmp_path / "ds", PrepareConfig(k_core=2), progress=True)
    err = capsys.readouterr().err
    stages = ["parse", "filter", "dedup", "k-core", "recode", "write", "stats"]
    assert list(manifest["timings"]) == stages and all(s >= 0 for s in manifest["timings"].values())
    last = {s: [line for line in err.replace("\r", "\n").splitlines() if f"ds {s} " in line][-1] for s in stages}
    assert ": 7 lines" in last["parse"]
    assert ": 6 rows" in last["dedup"]  # the repeated (core2, y) is dropped
    assert ": 4 rows" in last["k-core"] and "round(s)" in last["k-core"]  # A and its thin item a go
    assert "2 users, 2 items" in last["write"]
