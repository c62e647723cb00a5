"""Tests of llmrec.data.download against a local HTTP server (no network)."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llmrec.data.download import (
    CATEGORIES,
    DownloadError,
    category_urls,
    download_category,
    download_file,
    resolve_category,
)

CATEGORY = "All_Beauty"
REVIEWS_PATH = f"/review_categories/{CATEGORY}.jsonl.gz"
META_PATH = f"/meta_categories/meta_{CATEGORY}.jsonl.gz"


def _fixture_gzip(path: Path, n_lines: int, seed: int) -> bytes:
    lines = [
        json.dumps({"user_id": f"U{seed}_{i}", "parent_asin": f"B{i * 7919 % 10007:05d}", "rating": i % 5})
        for i in range(n_lines)
    ]
    path.write_bytes(gzip.compress("\n".join(lines).encode(), mtime=0))
    return path.read_bytes()


@dataclass
class Server:
    """A local file server; ``files`` maps URL paths to bytes, ``log`` records requests."""

    base_url: str
    files: dict[str, bytes]
    log: list[dict[str, object]] = field(default_factory=list)
    ignore_range: bool = False
    extra_length: int = 0  # added to Content-Length: the server lies about the size
    range_cap: int | None = None  # answer a range with at most this many bytes
    send_length: bool = True  # False: no Content-Length, the body ends when the connection closes

    def requests_for(self, path: str) -> list[dict[str, object]]:
        return [r for r in self.log if r["path"] == path]


def _make_handler(state: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            range_header = self.headers.get("Range")
            entry: dict[str, object] = {"path": self.path, "range": range_header, "sent": 0}
            state.log.append(entry)
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404, "Not Found")
                return
            size = len(body)
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
            if match and not state.ignore_range:
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if state.range_cap is not None:
                    end = min(end, start + state.range_cap - 1)
                chunk = body[start : end + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                chunk = body
                self.send_response(200)
            self.send_header("Content-Type", "application/gzip")
            if state.send_length:
                self.send_header("Content-Length", str(len(chunk) + state.extra_length))
            self.end_headers()
            self.wfile.write(chunk)
            entry["sent"] = len(chunk)

    return Handler


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    fixtures = tmp_path / "served"
    fixtures.mkdir()
    files = {
        REVIEWS_PATH: _fixture_gzip(fixtures / f"{CATEGORY}.jsonl.gz", 400, seed=1),
        META_PATH: _fixture_gzip(fixtures / f"meta_{CATEGORY}.jsonl.gz", 150, seed=2),
    }
    state = Server(base_url="", files=files)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    httpd.daemon_threads = True
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


# --------------------------------------------------------------------------------------------
# Categories


def test_categories_are_the_official_list() -> None:
    assert len(CATEGORIES) == 34  # 33 named categories + "Unknown"
    assert len(set(CATEGORIES)) == len(CATEGORIES)
    assert {"All_Beauty", "Video_Games", "Unknown", "CDs_and_Vinyl"} <= set(CATEGORIES)


def test_category_urls_official_layout_and_name_matching() -> None:
    official = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023/raw"
    assert category_urls("all beauty") == [
        (f"{official}/review_categories/All_Beauty.jsonl.gz", "All_Beauty.jsonl.gz"),
        (f"{official}/meta_categories/meta_All_Beauty.jsonl.gz", "meta_All_Beauty.jsonl.gz"),
    ]
    assert category_urls("VIDEO_games", base_url="http://h/x/", include_meta=False) == [
        ("http://h/x/review_categories/Video_Games.jsonl.gz", "Video_Games.jsonl.gz")
    ]
    assert resolve_category("Arts, Crafts & Sewing") == "Arts_Crafts_and_Sewing"


def test_unknown_category_suggests_close_matches(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="did you mean 'All_Beauty'"):
        category_urls("All_Beuty")
    with pytest.raises(DownloadError, match="did you mean 'Video_Games'"):
        download_category("Vidoe Games", tmp_path, base_url="http://127.0.0.1:9", progress=False)
    with pytest.raises(DownloadError, match="known categories: All_Beauty, Amazon_Fashion"):
        resolve_category("zzzz")
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# Downloads


def test_full_category_download(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "out"
    paths = download_category(CATEGORY, out, base_url=server.base_url, progress=True)
    assert paths == [out / f"{CATEGORY}.jsonl.gz", out / f"meta_{CATEGORY}.jsonl.gz"]
    assert paths[0].read_bytes() == server.files[REVIEWS_PATH]
    assert paths[1].read_bytes() == server.files[META_PATH]
    assert not list(out.glob("*.part"))
    assert all(r["range"] is None for r in server.requests_for(REVIEWS_PATH))
    # the optional checksum files were looked for and their absence tolerated
    assert server.requests_for(REVIEWS_PATH + ".sha256")


def test_resume_partial_download(server: Server, tmp_path: Path) -> None:
    body = server.files[REVIEWS_PATH]
    dest = tmp_path / "reviews.jsonl.gz"
    n = len(body) // 3
    _part(dest).write_bytes(body[:n])
    download_file(server.base_url + REVIEWS_PATH, dest, progress=False, chunk_size=512)
    assert dest.read_bytes() == body
    assert not _part(dest).exists()
    (request,) = server.requests_for(REVIEWS_PATH)
    assert request["range"] == f"bytes={n}-"
    assert request["sent"] == len(body) - n  # only the missing tail travelled


def test_resume_of_complete_part_answered_416(server: Server, tmp_path: Path) -> None:
    body = server.files[META_PATH]
    dest = tmp_path / "meta.jsonl.gz"
    _part(dest).write_bytes(body)
    download_file(server.base_url + META_PATH, dest, expected_size=len(body), progress=False)
    assert dest.read_bytes() == body
    assert [r["range"] for r in server.requests_for(META_PATH)] == [f"bytes={len(body)}-"]


def test_server_ignoring_range_restarts_from_zero(server: Server, tmp_path: Path) -> None:
    server.ignore_range = True
    body = server.files[REVIEWS_PATH]
    dest = tmp_path / "reviews.jsonl.gz"
    _part(dest).write_bytes(b"\xff" * 100)  # wrong bytes: appending to them would corrupt the file
    download_file(server.base_url + REVIEWS_PATH, dest, progress=False, chunk_size=512)
    assert dest.read_bytes() == body
    assert server.requests_for(REVIEWS_PATH)[0]["range"] == "bytes=100-"


@pytest.mark.parametrize("send_length", [True, False], ids=["content-length", "no-content-length"])
def test_wrong_expected_size_raises_and_leaves_nothing(
    server: Server, tmp_path: Path, send_length: bool
) -> None:
    server.send_length = send_length
    body = server.files[REVIEWS_PATH]
    dest = tmp_path / "reviews.jsonl.gz"
    with pytest.raises(DownloadError, match=re.escape(REVIEWS_PATH)):
        download_file(server.base_url + REVIEWS_PATH, dest, expected_size=len(body) + 1, progress=False)
    assert not dest.exists()
    assert not _part(dest).exists()


def test_lying_content_length_raises(server: Server, tmp_path: Path) -> None:
    server.extra_length = 10  # announces 10 bytes more than it sends, then closes
    body = server.files[REVIEWS_PATH]
    dest = tmp_path / "reviews.jsonl.gz"
    with pytest.raises(DownloadError, match=re.escape(REVIEWS_PATH)):
        download_file(server.base_url + REVIEWS_PATH, dest, progress=False)
    assert not dest.exists()
    # a transfer cut short is kept for a later resume, and holds exactly what was received
    assert _part(dest).read_bytes() == body


def test_short_range_answer_raises(server: Server, tmp_path: Path) -> None:
    server.range_cap = 100  # a 206 covering less than was asked: the file would be incomplete
    body = server.files[REVIEWS_PATH]
    dest = tmp_path / "reviews.jsonl.gz"
    _part(dest).write_bytes(body[:50])
    with pytest.raises(DownloadError, match="announced"):
        download_file(server.base_url + REVIEWS_PATH, dest, progress=False)
    assert not dest.exists()
    assert not _part(dest).exists()


def test_wrong_checksum_raises_and_leaves_nothing(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "meta.jsonl.gz"
    with pytest.raises(DownloadError, match="SHA-256"):
        download_file(server.base_url + META_PATH, dest, expected_sha256="0" * 64, progress=False)
    assert not dest.exists()
    assert not _part(dest).exists()
    good = hashlib.sha256(server.files[META_PATH]).hexdigest()
    download_file(server.base_url + META_PATH, dest, expected_sha256=good.upper(), progress=False)
    assert dest.read_bytes() == server.files[META_PATH]


def test_sidecar_checksum_is_used(server: Server, tmp_path: Path) -> None:
    good = hashlib.sha256(server.files[REVIEWS_PATH]).hexdigest()
    server.files[REVIEWS_PATH + ".sha256"] = f"{good}  {CATEGORY}.jsonl.gz\n".encode()
    server.files[META_PATH + ".sha256"] = f"{'a' * 64}  meta_{CATEGORY}.jsonl.gz\n".encode()
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match="SHA-256"):
        download_category(CATEGORY, out, base_url=server.base_url, progress=False)
    assert (out / f"{CATEGORY}.jsonl.gz").read_bytes() == server.files[REVIEWS_PATH]
    assert not (out / f"meta_{CATEGORY}.jsonl.gz").exists()


def test_404_raises_naming_the_url(server: Server, tmp_path: Path) -> None:
    url = server.base_url + "/review_categories/Nope.jsonl.gz"
    with pytest.raises(DownloadError, match="404") as info:
        download_file(url, tmp_path / "nope.jsonl.gz", progress=False)
    assert url in str(info.value)
    assert not (tmp_path / "nope.jsonl.gz").exists()


def test_connection_error_raises_naming_the_url(tmp_path: Path) -> None:
    url = "http://127.0.0.1:1/meta.jsonl.gz"  # nothing listens on port 1
    with pytest.raises(DownloadError) as info:
        download_file(url, tmp_path / "meta.jsonl.gz", progress=False, timeout=2)
    assert url in str(info.value)


def test_complete_file_is_skipped_without_request(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "out"
    paths = download_category(CATEGORY, out, base_url=server.base_url, progress=False)
    n_requests = len(server.log)
    assert download_category(CATEGORY, out, base_url=server.base_url, progress=False) == paths
    assert len(server.log) == n_requests  # verified by the first call and unchanged: no request
    for name in (f"{CATEGORY}.jsonl.gz", f"meta_{CATEGORY}.jsonl.gz"):
        (out / name).write_bytes(b"already here")  # changed since: fetched and verified again
    download_category(CATEGORY, out, base_url=server.base_url, progress=False)
    assert len(server.log) > n_requests and (out / f"{CATEGORY}.jsonl.gz").read_bytes() != b"already here"
    server.log.clear()
    dest = out / f"{CATEGORY}.jsonl.gz"
    dest.write_bytes(b"already here")
    assert download_file(server.base_url + REVIEWS_PATH, dest, expected_size=12, progress=False) == dest
    assert server.log == []
    # the wrong size for an existing file means it is fetched again
    body = server.files[REVIEWS_PATH]
    download_file(server.base_url + REVIEWS_PATH, dest, expected_size=len(body), progress=False)
    assert dest.read_bytes() == body
    assert len(server.log) == 1



def test_an_html_error_page_is_not_kept_as_the_file(server: Server, tmp_path: Path) -> None:
    server.files[REVIEWS_PATH] = b"<!doctype html><html><body>Service unavailable</body></html>"
    dest = tmp_path / "reviews.jsonl.gz"
    with pytest.raises(DownloadError, match="HTML page"):
        download_file(server.base_url + REVIEWS_PATH, dest, progress=False)
    assert not dest.exists() and not _part(dest).exists()


def test_a_cut_gzip_without_length_is_not_kept(server: Server, tmp_path: Path) -> None:
    server.files[REVIEWS_PATH] = server.files[REVIEWS_PATH][:-40]  # the end of the stream is missing
    server.send_length = False  # and nothing says how long the body should have been
    dest = tmp_path / "reviews.jsonl.gz"
    with pytest.raises(DownloadError, match="damaged or cut short"):
        download_file(server.base_url + REVIEWS_PATH, dest, progress=False)
    assert not dest.exists()
    # ... and a later call does not skip it as finished
    with pytest.raises(DownloadError):
        download_category(CATEGORY, tmp_path / "out", base_url=server.base_url, progress=False)


def test_an_endless_body_is_stopped(server: Server, tmp_path: Path) -> None:
    server.send_length = False
    dest = tmp_path / "reviews.jsonl.gz"
    with pytest.raises(DownloadError, match="still going"):
        download_file(server.base_url + REVIEWS_PATH, dest, progress=False, max_bytes=1000)
    assert not dest.exists() and not _part(dest).exists()
