"""Streaming readers for the Amazon raw files and the sequence format, built on DuckDB.

Each reader scans a JSON Lines file (plain or gzipped) line by line inside DuckDB, so memory
stays bounded whatever the file size, and writes a normalized Parquet file:

- interactions: ``line_no, bad, user_id, item_id, ts (unix ms or NULL), rating, review, verified``,
  one row per interaction in the order of the file (and of the list, in the sequence format): a row's
  index in the Parquet file is its place in the source, which orders a user's items where there is no
  timestamp. The fast reader (a file with no malformed line) leaves ``line_no`` NULL, as it never needs
  to report a line and numbering lines would cost a pass that holds the whole file;
- items: ``line_no, bad, item_id, title, brand, categories (list), description`` plus format-specific extras.

Malformed lines (invalid JSON, missing or wrongly typed required fields) are counted and
reported with their line numbers (column ``bad`` holds the reason, NULL for good rows, so
consumers read ``WHERE bad IS NULL``); ``strict=True`` makes the first one fatal.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import duckdb

from llmrec.errors import DataError

Format = Literal["sequences", "amazon2023", "amazon2018"]

# --- the record rules, one place for every reader --------------------------------------------
# A record is bad (skipped and reported with its line number; fatal with --strict) when an id is not a
# string or integer (a list or an object is no id), a rating is not a finite number in [1, 5], or a
# timestamp is negative. Timestamps below 1e11 are taken as seconds and stored as milliseconds, so a
# file that mixes both keeps every history in time order.
SCALAR = "('VARCHAR', 'BIGINT', 'UBIGINT')"
MAX_LINE_BYTES = 64 * 1024 * 1024  # longest line a reader accepts (a very long but valid line is fine)


ITEM_IDS_NOT_SCALAR = ("NOT coalesce(list_bool_and(list_transform(TRY_CAST(try(json_extract(line, '$.item_ids')) "
                       f"AS JSON[]), lambda x: json_type(x) IN {SCALAR})), true)")


def _looks_structured(column: str) -> str:
    """SQL: the text of ``column`` (read as VARCHAR by the fast reader) starts like a JSON list or object."""
    return f"coalesce(left({column}, 1) IN ('[', '{{'), false)"


def id_is_bad(path: str) -> str:
    """SQL: the JSON value at ``path`` of ``line`` is present but not a string or integer."""
    return f"coalesce(try(json_type(line, '{path}')) NOT IN {SCALAR}, false)"


def rating_is_bad(value: str) -> str:
    """SQL: rating text ``value`` is present but not a finite number in [1, 5]."""
    r = f"TRY_CAST({value} AS DOUBLE)"
    return f"({value} IS NOT NULL AND ({r} IS NULL OR NOT isfinite({r}) OR {r} < 1 OR {r} > 5))"


def ts_is_bad(value: str) -> str:
    """SQL: timestamp text ``value`` is present but not a non-negative integer."""
    return f"({value} IS NOT NULL AND coalesce(TRY_CAST({value} AS BIGINT) < 0, true))"


def ts_ms(value: str) -> str:
    """SQL: an integer timestamp in seconds or milliseconds, as unix milliseconds."""
    return f"(CASE WHEN {value} < 100000000000 THEN {value} * 1000 ELSE {value} END)"

FORMATS: tuple[str, ...] = ("sequences", "amazon2023", "amazon2018")
MAX_REPORTED_BAD_LINES = 20


@dataclass
class ParseReport:
    """What a reader saw in one file."""

    file: str
    lines: int = 0
    rows: int = 0
    bad_lines: int = 0
    examples: list[tuple[int, str]] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{self.file}: {self.lines} lines, {self.rows} rows, {self.bad_lines} malformed"
        if self.examples:
            s += " (" + "; ".join(f"line {n}: {why}" for n, why in self.examples[:5]) + ")"
        return s


def _sql_str(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def check_file(path: Path) -> None:
    """Fail clearly on a missing, empty or truncated/corrupt gzip file."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as f:
                if not f.read(1):
                    raise DataError(f"{path}: file is empty (an empty gzip stream)")
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not a readable gzip file ({e})") from None


def _run(con: duckdb.DuckDBPyConnection, sql: str) -> list[tuple]:
    """Execute ``sql`` and fetch every row (leaves no unfinished result on the connection)."""
    return con.execute(sql).fetchall()


def _newline(path: Path) -> str:
    """The line terminator of ``path`` as a DuckDB ``new_line`` option, from its first line.

    DuckDB's single-character mode splits at '\\r' as well as '\\n', so a CRLF file read that
    way yields an extra empty row per line and every later line number would be off.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(1 << 20)
    except (OSError, EOFError, zlib.error):
        return "\\n"  # unreadable: the scan itself reports it
    nl = head.find(b"\n")
    return "\\r\\n" if nl > 0 and head[nl - 1 : nl] == b"\r" else "\\n"


def _lines_source(path: Path) -> str:
    return (
        f"(SELECT row_number() OVER () AS line_no, line FROM read_csv({_sql_str(path)}, "
        "columns={'line': 'VARCHAR'}, header=false, delim=chr(1), quote='', escape='', "
        f"new_line='{_newline(path)}', auto_detect=false, strict_mode=false, max_line_size={MAX_LINE_BYTES}))"
    )


# Per format: (json paths extracted once per line, SELECT list over v[...], the
# conditions that make a line malformed, as (sql condition, reason) pairs).
_REVIEW_SPECS: dict[str, tuple[list[str], str, list[tuple[str, str]]]] = {
    "amazon2023": (
        ["$.user_id", "$.parent_asin", "$.asin", "$.timestamp", "$.rating", "$.title", "$.text",
         "$.verified_purchase"],
        f"""v[1] AS user_id, coalesce(v[2], v[3]) AS item_id, {ts_ms("TRY_CAST(v[4] AS BIGINT)")} AS ts,
           TRY_CAST(v[5] AS DOUBLE) AS rating,
           nullif(concat_ws('. ', nullif(v[6], ''), nullif(v[7], '')), '') AS review,
           TRY_CAST(v[8] AS BOOLEAN) AS verified""",
        [("v[1] IS NULL", "missing field user_id"),
         (id_is_bad("$.user_id"), "field user_id is not a string"),
         ("coalesce(v[2], v[3]) IS NULL", "missing field parent_asin"),
         (id_is_bad("$.parent_asin"), "field parent_asin is not a string"),
         (id_is_bad("$.asin"), "field asin is not a string"),
         ("v[4] IS NOT NULL AND TRY_CAST(v[4] AS BIGINT) IS NULL", "field timestamp is not an integer"),
         (ts_is_bad("v[4]"), "field timestamp is negative"),
         ("v[5] IS NOT NULL AND TRY_CAST(v[5] AS DOUBLE) IS NULL", "field rating is not a number"),
         (rating_is_bad("v[5]"), "field rating is not a finite number in [1, 5]")],
    ),
    "amazon2018": (
        ["$.reviewerID", "$.asin", "$.unixReviewTime", "$.overall", "$.summary", "$.reviewText",
         "$.verified"],
        f"""v[1] AS user_id, v[2] AS item_id, {ts_ms("TRY_CAST(v[3] AS BIGINT)")} AS ts,
           TRY_CAST(v[4] AS DOUBLE) AS rating,
           nullif(concat_ws('. ', nullif(v[5], ''), nullif(v[6], '')), '') AS review,
           TRY_CAST(v[7] AS BOOLEAN) AS verified""",
        [("v[1] IS NULL", "missing field reviewerID"),
         (id_is_bad("$.reviewerID"), "field reviewerID is not a string"),
         ("v[2] IS NULL", "missing field asin"),
         (id_is_bad("$.asin"), "field asin is not a string"),
         ("v[3] IS NOT NULL AND TRY_CAST(v[3] AS BIGINT) IS NULL", "field unixReviewTime is not an integer"),
         (ts_is_bad("v[3]"), "field unixReviewTime is negative"),
         ("v[4] IS NOT NULL AND TRY_CAST(v[4] AS DOUBLE) IS NULL", "field overall is not a number"),
         (rating_is_bad("v[4]"), "field overall is not a finite number in [1, 5]")],
    ),
}

# Fast path for review files: DuckDB's own JSON reader parses each line straight into typed
# columns, about a third less CPU than extracting fields from every line as text. It cannot say
# which lines are malformed, so it is all or nothing: any line it rejects (invalid JSON, a value of
# the wrong type) or a row missing a required field sends the file to the line-by-line path above,
# which counts and reports each malformed line. Per format: (columns read, SELECT list over them,
# producing the same columns and types as ``_REVIEW_SPECS``, ``line_no`` NULL).
# The rows that break a record rule are counted after the pass, and any such row sends the file to the
# line-by-line path. Read as text, a list or an object id becomes its JSON text: a value that starts with
# '[' or '{' is taken as one (a real id that does only costs the careful path, which checks JSON types).
_FAST_REVIEW_SPECS: dict[str, tuple[dict[str, str], str]] = {
    "amazon2023": (
        {"user_id": "VARCHAR", "parent_asin": "VARCHAR", "asin": "VARCHAR", "timestamp": "BIGINT",
         "rating": "DOUBLE", "title": "VARCHAR", "text": "VARCHAR", "verified_purchase": "BOOLEAN"},
        f"""user_id, coalesce(parent_asin, asin) AS item_id,
           {ts_ms('"timestamp"')} AS ts, rating,
           nullif(concat_ws('. ', nullif(title, ''), nullif("text", '')), '') AS review,
           verified_purchase AS verified,
           ({_looks_structured("user_id")} OR {_looks_structured("parent_asin")} OR {_looks_structured("asin")}
            OR "timestamp" < 0 OR NOT coalesce(isfinite(rating) AND rating BETWEEN 1 AND 5, rating IS NULL)) AS broken""",
    ),
    "amazon2018": (
        {"reviewerID": "VARCHAR", "asin": "VARCHAR", "unixReviewTime": "BIGINT", "overall": "DOUBLE",
         "summary": "VARCHAR", "reviewText": "VARCHAR", "verified": "BOOLEAN"},
        f""""reviewerID" AS user_id, asin AS item_id, {ts_ms('"unixReviewTime"')} AS ts,
           overall AS rating,
           nullif(concat_ws('. ', nullif(summary, ''), nullif("reviewText", '')), '') AS review, verified,
           ({_looks_structured('"reviewerID"')} OR {_looks_structured("asin")}
            OR "unixReviewTime" < 0 OR NOT coalesce(isfinite(overall) AND overall BETWEEN 1 AND 5, overall IS NULL))
           AS broken""",
    ),
}

_ITEM_SPECS: dict[str, tuple[list[str], str, list[tuple[str, str]]]] = {
    "sequences": (
        ["$.item_id", "$.title", "$.brand", "$.categories", "$.description"],
        """v[1] AS item_id, v[2] AS title, v[3] AS brand,
           TRY_CAST(try(json_extract(line, '$.categories')) AS VARCHAR[]) AS categories, v[5] AS description""",
        [("v[1] IS NULL", "missing field item_id"), (id_is_bad("$.item_id"), "field item_id is not a string")],
    ),
    "amazon2023": (
        ["$.parent_asin", "$.title", "$.store", "$.categories", "$.description", "$.main_category",
         "$.price", "$.features", "$.average_rating", "$.rating_number"],
        """v[1] AS item_id, v[2] AS title, v[3] AS brand,
           TRY_CAST(try(json_extract(line, '$.categories')) AS VARCHAR[]) AS categories,
           nullif(array_to_string(TRY_CAST(try(json_extract(line, '$.description')) AS VARCHAR[]), ' '), '')
             AS description,
           v[6] AS main_category, v[7] AS price,
           nullif(array_to_string(TRY_CAST(try(json_extract(line, '$.features')) AS VARCHAR[]), ' '), '') AS features,
           TRY_CAST(v[9] AS DOUBLE) AS average_rating, TRY_CAST(v[10] AS BIGINT) AS rating_number""",
        [("v[1] IS NULL", "missing field parent_asin"),
         (id_is_bad("$.parent_asin"), "field parent_asin is not a string")],
    ),
    "amazon2018": (
        ["$.asin", "$.title", "$.brand", "$.category", "$.description", "$.price", "$.main_cat"],
        """v[1] AS item_id, v[2] AS title, v[3] AS brand,
           TRY_CAST(try(json_extract(line, '$.category')) AS VARCHAR[]) AS categories,
           coalesce(nullif(array_to_string(TRY_CAST(try(json_extract(line, '$.description')) AS VARCHAR[]), ' '), ''),
                    CASE WHEN try(json_type(line, '$.description')) = 'VARCHAR' THEN v[5] END) AS description,
           v[6] AS price, v[7] AS main_category""",
        [("v[1] IS NULL", "missing field asin"), (id_is_bad("$.asin"), "field asin is not a string")],
    ),
}


def _stage(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    paths: list[str],
    select: str,
    checks: list[tuple[str, str]],
    out: Path,
    strict: bool,
) -> ParseReport:
    """Scan ``path`` once, parsing each line a single time, into Parquet file ``out``.

    ``out`` has ``line_no``, ``bad`` (NULL for a good line, else the reason it is malformed)
    and the ``select`` columns. ``select`` may read ``line`` (guard JSON calls with ``try``),
    ``v`` (the list of values at ``paths``, as strings) and ``line_no``.
    """
    check_file(path)
    try:
        return _stage_once(con, path, path, paths, select, checks, out, strict)
    except _NotUtf8:
        clean = out.with_suffix(".utf8.jsonl")
        try:
            _replace_invalid_utf8(path, clean)
            return _stage_once(con, path, clean, paths, select, checks, out, strict)
        finally:
            clean.unlink(missing_ok=True)


class _NotUtf8(Exception):
    pass


INVALID_UTF8 = "\u0002llmrec: invalid utf-8"  # stands in for a line that is not UTF-8 (never valid JSON)


def _replace_invalid_utf8(path: Path, out: Path) -> None:
    """Copy ``path`` (plain or gzipped) to plain ``out``, each line that is not valid UTF-8 replaced by
    :data:`INVALID_UTF8`, so that it is reported as a malformed line with its number and the rest is read."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as src, open(out, "wb") as dst:
        for raw in src:
            try:
                raw.decode("utf-8")
                dst.write(raw)
            except UnicodeDecodeError:
                dst.write(INVALID_UTF8.encode() + (b"\r\n" if raw.endswith(b"\r\n") else b"\n"))


def _stage_once(con: duckdb.DuckDBPyConnection, path: Path, source: Path, paths: list[str], select: str,
                checks: list[tuple[str, str]], out: Path, strict: bool) -> ParseReport:
    """:func:`_stage` of the lines of ``source`` (``path`` or its UTF-8-clean copy), reported as ``path``."""
    plist = "[" + ", ".join(f"'{p}'" for p in paths) + "]"
    reason = f"CASE WHEN line = '{INVALID_UTF8}' THEN 'line is not valid UTF-8' WHEN v IS NULL THEN 'invalid JSON' "
    reason += " ".join(f"WHEN {cond} THEN '{why}'" for cond, why in checks) + " END"
    try:
        _run(
            con,
            f"""COPY (SELECT line_no, {reason} AS bad, {select}
                FROM (SELECT line_no, line, try(json_extract_string(line, {plist})) AS v
                      FROM {_lines_source(source)} WHERE trim(line) <> ''))
                TO {_sql_str(out)} (FORMAT parquet)""",
        )
        report = ParseReport(file=str(path))
        ((n_lines, n_bad),) = _run(con, f"SELECT count(*), count(bad) FROM read_parquet({_sql_str(out)})")
        report.lines, report.bad_lines, report.rows = int(n_lines), int(n_bad), int(n_lines - n_bad)
        if n_lines == 0:
            raise DataError(f"{path}: file has no lines")
        if n_bad:
            report.examples = [
                (int(n), str(why))
                for n, why in _run(
                    con,
                    f"SELECT line_no, bad FROM read_parquet({_sql_str(out)}) WHERE bad IS NOT NULL "
                    f"ORDER BY line_no LIMIT {MAX_REPORTED_BAD_LINES}",
                )
            ]
            n, why = report.examples[0]
            if strict:
                raise DataError(f"{path}:{n}: {why} (--strict stops at the first malformed line)")
            if n_bad * 2 > n_lines:
                raise DataError(
                    f"{path}: wrong schema: {n_bad} of {n_lines} lines are malformed "
                    f"(first at line {n}: {why}); is this the right format?"
                )
    except duckdb.Error as e:
        out.unlink(missing_ok=True)
        if "Invalid unicode" in str(e) and source == path:
            raise _NotUtf8 from None
        raise DataError(f"{path}: could not be read ({str(e).splitlines()[0]})") from None
    except DataError:
        out.unlink(missing_ok=True)
        raise
    return report


def _stage_reviews_fast(con: duckdb.DuckDBPyConnection, path: Path, fmt: str, out: Path) -> ParseReport | None:
    """The all-or-nothing fast pass (see ``_FAST_REVIEW_SPECS``): its report, or None (``out``
    removed) when some line needs the line-by-line path. One streaming pass: the rows keep the file's
    order (``preserve_insertion_order``) and ``line_no`` is NULL, since numbering the lines with a window
    would hold the whole file in memory; line numbers only matter in the slow path's reports.
    """
    columns, select = _FAST_REVIEW_SPECS[fmt]
    cols = "{" + ", ".join(f"'{name}': '{typ}'" for name, typ in columns.items()) + "}"
    staged = out  # written once, with the extra column ``broken`` (readers of it select columns by name)
    try:
        _run(
            con,
            f"""COPY (SELECT CAST(NULL AS BIGINT) AS line_no, CAST(NULL AS VARCHAR) AS bad, {select}
                      FROM read_json({_sql_str(path)}, format='newline_delimited', records=true,
                                     columns={cols}, auto_detect=false, maximum_object_size={MAX_LINE_BYTES}))
                TO {_sql_str(staged)} (FORMAT parquet)""",
        )
        ((n, n_missing),) = _run(
            con,
            f"SELECT count(*), count(*) FILTER (WHERE user_id IS NULL OR item_id IS NULL OR broken) "
            f"FROM read_parquet({_sql_str(staged)})",
        )
    except duckdb.Error:
        out.unlink(missing_ok=True)
        return None
    if n == 0 or n_missing:
        out.unlink(missing_ok=True)
        return None
    return ParseReport(file=str(path), lines=int(n), rows=int(n))


def stage_reviews(
    con: duckdb.DuckDBPyConnection, path: Path, fmt: Format, out: Path, strict: bool = False, fast: bool = True
) -> ParseReport:
    """Normalize a review / sequence file into an interactions Parquet file at ``out``.

    Review files are first read with the fast all-or-nothing pass (``fast=False`` skips it); a
    file with any malformed line is then read line by line, which reports each one.
    """
    if fmt == "sequences":
        paths = ["$.user_id", "$.item_ids"]
        checks = [
            ("v[1] IS NULL", "missing field user_id"),
            (id_is_bad("$.user_id"), "field user_id is not a string"),
            ("v[2] IS NULL", "missing field item_ids"),
            ("TRY_CAST(try(json_extract(line, '$.item_ids')) AS VARCHAR[]) IS NULL",
             "field item_ids is not a list of strings"),
            (ITEM_IDS_NOT_SCALAR, "field item_ids is not a list of strings"),
        ]
        select = "v[1] AS user_id, TRY_CAST(try(json_extract(line, '$.item_ids')) AS VARCHAR[]) AS item_ids"
        tmp = out.with_suffix(".lists.parquet")
        report = _stage(con, path, paths, select, checks, tmp, strict)
        try:
            _run(
                con,
                f"""COPY (SELECT line_no, bad, user_id, item_ids[i] AS item_id, CAST(NULL AS BIGINT) AS ts,
                             CAST(NULL AS DOUBLE) AS rating, CAST(NULL AS VARCHAR) AS review,
                             CAST(NULL AS BOOLEAN) AS verified
                          FROM read_parquet({_sql_str(tmp)}),
                               range(1, CAST(coalesce(len(item_ids), 0) + 1 AS BIGINT)) AS r(i)
                          WHERE bad IS NULL ORDER BY line_no, i) TO {_sql_str(out)} (FORMAT parquet)""",
            )
        finally:
            tmp.unlink(missing_ok=True)
        report.rows = int(_run(con, f"SELECT count(*) FROM read_parquet({_sql_str(out)})")[0][0])
        return report
    if fmt not in _REVIEW_SPECS:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    check_file(path)
    report = _stage_reviews_fast(con, path, fmt, out) if fast else None
    if report is not None:
        return report
    paths, select, checks = _REVIEW_SPECS[fmt]
    return _stage(con, path, paths, select, checks, out, strict)


def stage_items(
    con: duckdb.DuckDBPyConnection, path: Path, fmt: Format, out: Path, strict: bool = False
) -> ParseReport:
    """Normalize an item metadata file into an items Parquet file at ``out``."""
    if fmt not in _ITEM_SPECS:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    paths, select, checks = _ITEM_SPECS[fmt]
    return _stage(con, path, paths, select, checks, out, strict)
