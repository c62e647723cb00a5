"""Download the raw Amazon Reviews 2023 files of a category.

The McAuley lab publishes, for every category, the reviews (``<Category>.jsonl.gz``) and the
item metadata (``meta_<Category>.jsonl.gz``)::

    {base_url}/review_categories/{Category}.jsonl.gz
    {base_url}/meta_categories/meta_{Category}.jsonl.gz

Downloads go to ``<dest>.part`` and are resumed with an HTTP ``Range`` request when a partial
file is already there. The final size is checked against what the server announced
(``Content-Length`` / ``Content-Range``) and against ``expected_size``, the SHA-256 when one is
known, and only then is the ``.part`` renamed into place with :func:`os.replace`. A file at its
final path has therefore always passed these checks, so it is not downloaded again.

The official host publishes no checksums; if a ``<file>.sha256`` file (``sha256sum`` format)
sits next to a file on the server, :func:`download_category` uses it, otherwise sizes alone are
checked.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

__all__ = [
    "CATEGORIES",
    "OFFICIAL_BASE_URL",
    "SHA256_SUFFIX",
    "DownloadError",
    "category_urls",
    "download_category",
    "download_file",
    "fetch_sha256_sidecar",
    "resolve_category",
]

OFFICIAL_BASE_URL: str = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023/raw"
"""Root of the official raw files; category files live under ``review_categories/`` and
``meta_categories/``."""

SHA256_SUFFIX: str = ".sha256"
"""Suffix of the optional checksum file published next to a data file."""

USER_AGENT: str = "llmrec-downloader/0.1 (+python-urllib)"

CATEGORIES: tuple[str, ...] = (
    "All_Beauty",
    "Amazon_Fashion",
    "Appliances",
    "Arts_Crafts_and_Sewing",
    "Automotive",
    "Baby_Products",
    "Beauty_and_Personal_Care",
    "Books",
    "CDs_and_Vinyl",
    "Cell_Phones_and_Accessories",
    "Clothing_Shoes_and_Jewelry",
    "Digital_Music",
    "Electronics",
    "Gift_Cards",
    "Grocery_and_Gourmet_Food",
    "Handmade_Products",
    "Health_and_Household",
    "Health_and_Personal_Care",
    "Home_and_Kitchen",
    "Industrial_and_Scientific",
    "Kindle_Store",
    "Magazine_Subscriptions",
    "Movies_and_TV",
    "Musical_Instruments",
    "Office_Products",
    "Patio_Lawn_and_Garden",
    "Pet_Supplies",
    "Software",
    "Sports_and_Outdoors",
    "Subscription_Boxes",
    "Tools_and_Home_Improvement",
    "Toys_and_Games",
    "Video_Games",
    "Unknown",
)
"""The 33 named categories of Amazon Reviews 2023 plus ``Unknown`` (34 file pairs in all)."""

_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")
_UNSATISFIED_RANGE_RE = re.compile(r"bytes\s+\*/(\d+)\s*$")


class DownloadError(RuntimeError):
    """A download failed; the message names the URL or file concerned."""


# --------------------------------------------------------------------------------------------
# Categories and URLs


def _category_key(name: str) -> str:
    """Comparison key: case-insensitive, '&' read as 'and', spaces/commas/dashes as '_'."""
    name = name.replace("&", " and ")
    return re.sub(r"[\s,_\-]+", "_", name.strip()).strip("_").casefold()


_CATEGORY_BY_KEY: dict[str, str] = {_category_key(c): c for c in CATEGORIES}


def resolve_category(category: str) -> str:
    """Return the canonical name of ``category`` (e.g. ``"all beauty"`` -> ``"All_Beauty"``).

    Raises DownloadError, with the closest known names, when the category is unknown.
    """
    key = _category_key(category)
    if key in _CATEGORY_BY_KEY:
        return _CATEGORY_BY_KEY[key]
    close = difflib.get_close_matches(key, list(_CATEGORY_BY_KEY), n=3, cutoff=0.6)
    message = f"unknown Amazon Reviews 2023 category {category!r}"
    if close:
        message += "; did you mean " + " or ".join(repr(_CATEGORY_BY_KEY[k]) for k in close) + "?"
    else:
        message += "; known categories: " + ", ".join(CATEGORIES)
    raise DownloadError(message)


def category_urls(
    category: str, base_url: str = OFFICIAL_BASE_URL, include_meta: bool = True
) -> list[tuple[str, str]]:
    """(url, filename) pairs of a category: reviews first, then metadata if ``include_meta``."""
    name = resolve_category(category)
    base = base_url.rstrip("/")
    files = [(f"{base}/review_categories/{name}.jsonl.gz", f"{name}.jsonl.gz")]
    if include_meta:
        files.append((f"{base}/meta_categories/meta_{name}.jsonl.gz", f"meta_{name}.jsonl.gz"))
    return files


# --------------------------------------------------------------------------------------------
# Single files


@dataclass(frozen=True)
class _ContentRange:
    start: int
    end: int
    total: int | None


def _parse_content_range(value: str | None) -> _ContentRange | None:
    if not value:
        return None
    match = _CONTENT_RANGE_RE.match(value.strip())
    if match is None:
        return None
    start, end, total = match.groups()
    return _ContentRange(int(start), int(end), None if total == "*" else int(total))


def _content_length(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        length = int(value.strip())
    except ValueError:
        return None
    return length if length >= 0 else None


def _part_path(dest: Path) -> Path:
    return dest.with_suffix(dest.suffix + ".part")


def _sha256_of(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _normalise_sha256(value: str, what: str) -> str:
    value = value.strip()
    if not _SHA256_RE.fullmatch(value):
        raise DownloadError(f"{what}: {value!r} is not a SHA-256 hex digest")
    return value.lower()


def _is_complete(dest: Path, expected_size: int | None, expected_sha256: str | None) -> bool:
    if expected_size is not None and dest.stat().st_size != expected_size:
        return False
    if expected_sha256 is not None:
        return _sha256_of(dest) == expected_sha256
    if expected_size is not None:
        return True
    # nothing to compare with: only a file this module verified, unchanged since
    return _verified_marker(dest).is_file() and _verified_marker(dest).read_text() == _stamp(dest)


def _verified_marker(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.verified")


def _stamp(dest: Path) -> str:
    st = dest.stat()
    return f"{st.st_size} {st.st_mtime_ns}"


def check_content(path: Path, what: str, gz: bool) -> None:
    """Fail unless ``path`` holds what the destination's name says: a complete gzip stream when ``gz`` (every
    byte is read: an HTML error page or a cut body is refused), JSON lines otherwise (no HTML page)."""
    with path.open("rb") as fh:
        head = fh.read(512)
    if gz:
        if head[:2] != b"\x1f\x8b":
            kind = "an HTML page" if head.lstrip()[:1] == b"<" else "not gzip data"
            raise DownloadError(f"{what}: the server sent {kind}, not the gzip file")
        try:
            with gzip.open(path, "rb") as stream:
                while stream.read(1 << 24):
                    pass
        except (OSError, EOFError, zlib.error) as exc:
            raise DownloadError(f"{what}: the gzip data is damaged or cut short ({exc})") from None
    elif head.lstrip()[:1] not in (b"{", b""):
        raise DownloadError(f"{what}: the server sent {'an HTML page' if head.lstrip()[:1] == b'<' else 'no JSON'}, "
                            "not the file")


def _open(url: str, headers: dict[str, str], timeout: float) -> http.client.HTTPResponse:
    request = urllib.request.Request(
        url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **headers}
    )
    return urllib.request.urlopen(request, timeout=timeout)


def _fetch_into_part(
    url: str,
    part: Path,
    offset: int,
    expected_size: int | None,
    progress: bool,
    chunk_size: int,
    timeout: float,
    desc: str,
    max_bytes: int = 1 << 40,
) -> int | None:
    """Fetch ``url`` into ``part`` (resuming at ``offset``); return the announced total size."""
    for _attempt in range(2):  # a second, plain request if the server mishandles the range
        headers = {"Range": f"bytes={offset}-"} if offset > 0 else {}
        try:
            response = _open(url, headers, timeout)
        except urllib.error.HTTPError as exc:
            content_range = exc.headers.get("Content-Range") if exc.headers else None
            exc.close()
            if exc.code == 416 and offset > 0:
                match = _UNSATISFIED_RANGE_RE.match((content_range or "").strip())
                if match is not None and int(match.group(1)) == offset:
                    return offset  # the .part already holds the whole file
                part.unlink(missing_ok=True)
                offset = 0
                continue
            raise DownloadError(f"HTTP {exc.code} ({exc.reason}) for {url}") from exc
        except urllib.error.URLError as exc:
            raise DownloadError(f"cannot fetch {url}: {exc.reason}") from exc
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise DownloadError(f"cannot fetch {url}: {exc}") from exc

        with response:
            status = response.status
            if status == 206:
                content_range = _parse_content_range(response.headers.get("Content-Range"))
                if content_range is None or content_range.start != offset:
                    part.unlink(missing_ok=True)
                    offset = 0
                    continue
                total = content_range.total
                body_size: int | None = content_range.end - content_range.start + 1
                mode = "ab"
            elif status == 200:
                if "html" in (response.headers.get("Content-Type") or "").lower():
                    raise DownloadError(f"{url}: the server answered with an HTML page, not the file")
                offset = 0  # the server ignored the range: start again from zero
                total = _content_length(response.headers.get("Content-Length"))
                body_size = total
                mode = "wb"
            else:
                raise DownloadError(f"unexpected HTTP status {status} for {url}")

            if total is not None and expected_size is not None and total != expected_size:
                part.unlink(missing_ok=True)
                raise DownloadError(
                    f"{url}: server announces {total} bytes but {expected_size} were expected"
                )

            received = 0
            try:
                with (
                    part.open(mode) as fh,
                    tqdm(
                        total=total,
                        initial=offset,
                        unit="B",
                        unit_scale=True,
                        unit_divisor=1024,
                        desc=desc,
                        disable=not progress,
                        leave=False,
                    ) as bar,
                ):
                    while block := response.read(chunk_size):
                        fh.write(block)
                        received += len(block)
                        bar.update(len(block))
                        if offset + received > max_bytes:
                            raise DownloadError(f"{url}: more than {max_bytes} bytes and still going (an endless "
                                                "body?); stopped")
            except DownloadError:
                part.unlink(missing_ok=True)
                raise
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadError(
                    f"download of {url} interrupted ({exc}); partial data kept in {part}, run again to resume"
                ) from exc
            if body_size is not None and received < body_size:
                raise DownloadError(
                    f"download of {url} ended after {offset + received} of "
                    f"{offset + body_size} bytes; partial data kept in {part}, run again to resume"
                )
            return total
    raise DownloadError(f"{url}: the server answered the range request inconsistently")


def download_file(
    url: str,
    dest: Path,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    progress: bool = True,
    chunk_size: int = 1 << 20,
    timeout: float = 60,
    max_bytes: int = 1 << 40,
) -> Path:
    """Download ``url`` to ``dest`` (resuming a ``.part``), verify it, and return ``dest``.

    A file already at ``dest`` is kept as it is when it matches ``expected_size`` and
    ``expected_sha256`` (or, with neither, when this function verified it and it has not changed since);
    no request is made then. The content must be what the name says (:func:`check_content`); a body over
    ``max_bytes`` is stopped. The size is checked against
    the server's ``Content-Length``/``Content-Range`` total and ``expected_size``, the SHA-256
    against ``expected_sha256``; on a mismatch the ``.part`` is deleted and DownloadError is
    raised. A transfer cut short keeps its ``.part`` so that the next call resumes it.
    """
    dest = Path(dest)
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    if expected_sha256 is not None:
        expected_sha256 = _normalise_sha256(expected_sha256, f"expected checksum of {dest}")
    if dest.is_file() and _is_complete(dest, expected_size, expected_sha256):
        return dest

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)
    offset = part.stat().st_size if part.is_file() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0

    total = _fetch_into_part(url, part, offset, expected_size, progress, chunk_size, timeout, desc=dest.name,
                             max_bytes=expected_size or max_bytes)

    size = part.stat().st_size if part.is_file() else 0
    if total is not None and size != total:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{dest} from {url}: got {size} bytes, the server announced {total}")
    if expected_size is not None and size != expected_size:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{dest} from {url}: got {size} bytes, expected {expected_size}")
    if expected_sha256 is not None:
        actual = _sha256_of(part)
        if actual != expected_sha256:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{dest} from {url}: SHA-256 {actual} does not match the expected {expected_sha256}"
            )
    try:
        check_content(part, f"{dest} from {url}", gz=dest.suffix == ".gz")
    except DownloadError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    _verified_marker(dest).write_text(_stamp(dest))
    return dest


def fetch_sha256_sidecar(url: str, timeout: float = 30) -> str | None:
    """SHA-256 published at ``url + ".sha256"`` (``sha256sum`` format), or None if there is none.

    Checksums are optional: a missing or unreadable sidecar yields None, never an error.
    """
    try:
        with _open(url + SHA256_SUFFIX, {}, timeout) as response:
            text = response.read(4096).decode("ascii", errors="replace")
    except (OSError, ValueError, http.client.HTTPException):  # HTTPError/URLError are OSErrors
        return None
    for line in text.splitlines():
        fields = line.split()
        if fields:
            token = fields[0]
            return token.lower() if _SHA256_RE.fullmatch(token) else None
    return None


# --------------------------------------------------------------------------------------------
# Categories


def download_category(
    category: str,
    out_dir: Path,
    base_url: str = OFFICIAL_BASE_URL,
    include_meta: bool = True,
    progress: bool = True,
    *,
    use_sidecar_checksums: bool = True,
) -> list[Path]:
    """Download the reviews (and metadata) of ``category`` into ``out_dir``; return the paths.

    Files that an earlier call downloaded and verified, unchanged since, are skipped without any request;
    anything else at the destination (an HTML error page, a cut file) is fetched again. When
    ``use_sidecar_checksums`` is set and the server has a ``<file>.sha256``, it is verified.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for url, filename in category_urls(category, base_url=base_url, include_meta=include_meta):
        dest = out_dir / filename
        if not (dest.is_file() and _is_complete(dest, None, None)):
            sha256 = fetch_sha256_sidecar(url) if use_sidecar_checksums else None
            download_file(url, dest, expected_sha256=sha256, progress=progress)
        paths.append(dest)
    return paths
