"""Hardening, record layer: bad records are skipped and reported with their line (fatal with --strict), valid
but unusual files are read, and a fuzz of the readers on corrupted JSON lines."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_data import assert_no_leftovers, histories, prepare, review18, review23, write_lines

from llmrec.cli import main
from llmrec.errors import DataError


def examples(report: dict[str, Any]) -> list[list[Any]]:
    """(line, reason) pairs of a parse report, as lists (the manifest in memory holds tuples)."""
    return [list(e) for e in report["examples"]]


def good(n: int = 6) -> list[dict[str, Any]]:
    """Users U0..U2 with two reviews each (millisecond timestamps)."""
    return [review23(f"U{i % 3}", f"I{i}", 1_600_000_000_000 + i, f"text {i}") for i in range(n)]


@pytest.mark.parametrize("value,why", [
    (float("nan"), "rating is not a finite number"), (float("inf"), "rating is not a finite number"),
    (-2.0, "rating is not a finite number in [1, 5]"), (7.0, "rating is not a finite number in [1, 5]"),
])
def test_bad_ratings_are_malformed_lines(tmp_path: Path, value: float, why: str) -> None:
    rows = good()
    rows[2] = {**rows[2], "rating": value}  # json.dumps writes NaN / Infinity literally
    src = write_lines(tmp_path / "Toys.jsonl.gz", rows)
    manifest = prepare(src, tmp_path / "ds", min_rating=1.0)
    report = manifest["parse_reports"][0]
    assert report["bad_lines"] == 1 and examples(report)[0][0] == 3 and why in examples(report)[0][1]
    ratings = [x["rating"] for h in histories(tmp_path / "ds").values() for x in h]
    assert all(math.isfinite(r) and 1 <= r <= 5 for r in ratings) and len(ratings) == 5
    with pytest.raises(DataError, match=r"Toys.jsonl.gz:3: field rating"):
        prepare(src, tmp_path / "strict", strict=True)
    assert_no_leftovers(tmp_path / "strict")


@pytest.mark.parametrize("bad_id", [["U0"], {"id": "U0"}])
@pytest.mark.parametrize("field", ["user_id", "parent_asin"])
def test_a_list_or_object_is_no_id(tmp_path: Path, bad_id: Any, field: str) -> None:
    rows = good()
    rows[4] = {**rows[4], field: bad_id}
    src = write_lines(tmp_path / "Toys.jsonl.gz", rows)
    report = prepare(src, tmp_path / "ds")["parse_reports"][0]
    assert report["bad_lines"] == 1 and examples(report)[0] == [5, f"field {field} is not a string"]
    users = set(histories(tmp_path / "ds"))
    assert users <= {"U0", "U1", "U2"}
    with pytest.raises(DataError, match=f"Toys.jsonl.gz:5: field {field} is not a string"):
        prepare(src, tmp_path / "strict", strict=True)


def test_sequence_format_ids_must_be_strings(tmp_path: Path) -> None:
    src = write_lines(tmp_path / "sequences.jsonl", [{"user_id": "a", "item_ids": ["x", "y"]},
                                                     {"user_id": ["b"], "item_ids": ["x", "y"]},
                                                     {"user_id": "c", "item_ids": ["x", ["y"]]},
                                                     {"user_id": "d", "item_ids": ["y", "x"]}])
    report = prepare(src, tmp_path / "ds")["parse_reports"][0]
    assert [e[0] for e in examples(report)] == [2, 3]
    assert set(histories(tmp_path / "ds")) == {"a", "d"}


def test_timestamps_in_seconds_are_stored_as_milliseconds(tmp_path: Path) -> None:
    t = 1_600_000_000  # seconds
    rows = [review23("U", "A", t * 1000 + 5000, "ms, later"), review23("U", "B", t + 1, "seconds, earlier"),
            review23("U", "C", t * 1000 + 9000, "ms, latest")]
    src = write_lines(tmp_path / "Toys.jsonl.gz", rows)
    prepare(src, tmp_path / "ds")
    got = histories(tmp_path / "ds")["U"]
    assert [x["item_id"] for x in got] == ["B", "A", "C"]  # one clock for the whole file
    assert [x["timestamp"] for x in got] == [(t + 1) * 1000, t * 1000 + 5000, t * 1000 + 9000]
    (tmp_path / "raw18").mkdir()
    src18 = write_lines(tmp_path / "raw18" / "Cat.json.gz", [review18("U", "A", t), review18("U", "B", t * 1000 + 1)])
    prepare(src18, tmp_path / "ds18")
    assert [x["timestamp"] for x in histories(tmp_path / "ds18")["U"]] == [t * 1000, t * 1000 + 1]


def test_negative_timestamp_is_a_malformed_line(tmp_path: Path) -> None:
    rows = good()
    rows[1] = {**rows[1], "timestamp": -5}
    report = prepare(write_lines(tmp_path / "Toys.jsonl.gz", rows), tmp_path / "ds")["parse_reports"][0]
    assert examples(report)[0] == [2, "field timestamp is negative"]


def test_metadata_that_matches_nothing_is_an_error(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    src = write_lines(raw / "Toys.jsonl.gz", good())
    write_lines(raw / "meta_Toys.jsonl.gz", [{"parent_asin": "OTHER1", "title": "x"}, {"parent_asin": "OTHER2"}])
    with pytest.raises(DataError, match=r"meta_Toys.jsonl.gz: none of its item ids matches any of the \d+ items"):
        prepare(src, tmp_path / "ds")
    assert_no_leftovers(tmp_path / "ds")


def test_a_2018_five_core_file_finds_its_category_metadata(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    src = write_lines(raw / "Beauty_5.json.gz", [review18(f"U{i % 2}", f"A{i}", 1_400_000_000 + i) for i in range(4)])
    write_lines(raw / "meta_Beauty.json.gz", [{"asin": f"A{i}", "title": f"Title {i}"} for i in range(4)])
    manifest = prepare(src, tmp_path / "ds")
    assert manifest["source"]["metadata"].endswith("meta_Beauty.json.gz")
    assert manifest["counts"]["items_with_metadata"] == 4


def test_a_path_with_glob_characters_is_one_file(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    src = write_lines(raw / "Toys*.jsonl.gz", good(6))
    write_lines(raw / "Toys-other.jsonl.gz", [review23("X", "Z", 1, "must not be merged in")] * 3)
    prepare(src, tmp_path / "ds")
    assert set(histories(tmp_path / "ds")) == {"U0", "U1", "U2"}


def test_one_non_utf8_byte_is_one_reported_line(tmp_path: Path) -> None:
    lines = [json.dumps(r).encode() for r in good()]
    lines[3] = lines[3].replace(b"text 3", b"text \xff 3")
    src = tmp_path / "Toys.jsonl.gz"
    src.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    report = prepare(src, tmp_path / "ds")["parse_reports"][0]
    assert examples(report) == [[4, "line is not valid UTF-8"]] and report["rows"] == 5


def test_a_very_long_valid_line_is_read(tmp_path: Path) -> None:
    rows = good()
    rows[0] = {**rows[0], "text": "long review " * 400_000}  # about 5 MB on one line
    prepare(write_lines(tmp_path / "Toys.jsonl.gz", rows), tmp_path / "ds")
    assert len(histories(tmp_path / "ds")["U0"][0]["review"]) > 4_000_000


# --- fuzz: random corruptions of JSON lines ---------------------------------------------------------------------

CORRUPTIONS = {
    "truncate": lambda s: s[: len(s) // 2],
    "garbage": lambda s: "%%%" + s,
    "nan_rating": lambda s: s.replace('"rating": 4.0', '"rating": NaN'),
    "list_user": lambda s: s.replace('"user_id": "', '"user_id": ["', 1).replace('", "helpful', '"], "helpful', 1),
    "drop_user": lambda s: s.replace('"user_id"', '"uid"', 1),
    "empty_object": lambda s: "{}",
    "number_line": lambda s: "12345",
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(4, 30), hits=st.lists(st.tuples(st.integers(0, 29), st.sampled_from(sorted(CORRUPTIONS))),
                                            max_size=12),
       strict=st.booleans())
def test_fuzz_readers_report_every_bad_line_or_fail_cleanly(tmp_path_factory: pytest.TempPathFactory, n: int,
                                                            hits: list[tuple[int, str]], strict: bool) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")
    lines = [json.dumps(review23(f"U{i % 4}", f"I{i % 7}", 1_600_000_000_000 + i, "t", rating=4.0,
                                 helpful_vote=0)) for i in range(n)]
    bad: set[int] = set()
    for idx, kind in hits:
        if idx < n:
            changed = CORRUPTIONS[kind](lines[idx])
            if changed != lines[idx]:
                lines[idx] = changed
                bad.add(idx + 1)
    bad = {b for b in bad if lines[b - 1].strip()}  # a line truncated to nothing is a blank line: skipped, not bad
    src = tmp / "Toys.jsonl.gz"
    src.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    out = tmp / "ds"
    code = main(["data", "prepare", str(src), str(out), "--quiet"] + (["--strict"] if strict else []))
    if code == 0:
        manifest = json.loads((out / "manifest.json").read_text())
        report = manifest["parse_reports"][0]
        assert report["bad_lines"] == len(bad) and {e[0] for e in report["examples"]} == set(sorted(bad)[:20]), \
            (n, hits, lines)
        assert not strict or not bad
    else:
        assert code == 2
        assert_no_leftovers(out)
        assert strict and bad or len(bad) * 2 > n or len(bad) == n

