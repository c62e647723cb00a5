"""Interest extractors: parsing, keyword extractor, OpenAI-compatible endpoint (a fake server on
127.0.0.1), the per-history disk cache, and the model fed by the endpoint."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from llmrec.models.semantic_ids.interests import (
    CachedExtractor,
    CausalLMInterestExtractor,
    ItemText,
    KeywordInterestExtractor,
    OpenAIInterestExtractor,
    build_messages,
    parse_interests,
)

HIST = [ItemText("Pilot G2 Gel Ink Pen, Black, 12 Pack", ("Office Products", "Pens")),
        ItemText("Moleskine Classic Notebook, Ruled", ("Office Products", "Notebooks"), "Moleskine"),
        ItemText("Pilot G2 Gel Pen Refills, Blue", ("Office Products", "Pens"))]


def test_parse_interests() -> None:
    text = "1. Gel pens; 2) Notebooks\n- office organisation, Gel Pens\n* \"stationery\".\n" + "x" * 80
    assert parse_interests(text) == ["gel pens", "notebooks", "office organisation", "stationery"]
    words = ["pens", "inks", "tape", "paper", "glue", "files", "desk"]
    assert parse_interests("; ".join(words), n=5) == words[:5]
    assert parse_interests("") == []
    # echoes of the instruction and bare numbers are not interests (seen from SmolLM2)
    assert parse_interests("A customer bought these products; oldest first; 15200; presentation remotes))") == [
        "presentation remotes"]


def test_prompt_reads_recent_items_only() -> None:
    msgs = build_messages(HIST, max_items=2)
    user = msgs[-1]["content"]
    assert "Moleskine" in user and "Refills" in user and "12 Pack" not in user
    assert "Up to 5 interests?" in user
    assert msgs[2]["role"] == "assistant" and ";" in msgs[2]["content"]  # the worked example


def test_keyword_extractor() -> None:
    catalogue = [*HIST, *(ItemText(f"Stapler model {i}", ("Office Products", "Staplers")) for i in range(20))]
    ex = KeywordInterestExtractor(catalogue, n=5)
    got = ex.extract([HIST])[0]
    assert len(got) == 5 and len(set(got)) == 5
    assert "pens" in got and "pilot" in got  # distinctive and repeated
    assert "office products" not in got  # held by every item: says nothing
    assert ex.extract([HIST]) == ex.extract([HIST])
    assert ex.extract([[]]) == [[]]
    # recency: the latest item's terms outrank an older item's equally rare terms
    older_first = ex.extract([[HIST[1], HIST[2]]])[0]
    assert "refills" in older_first and "ruled" not in older_first
    latest_first = ex.extract([[HIST[2], HIST[1]]])[0]
    assert "ruled" in latest_first and "refills" not in latest_first


class _FakeOpenAI(BaseHTTPRequestHandler):
    requests: ClassVar[list[dict]] = []
    auth: ClassVar[list[str | None]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        type(self).auth.append(self.headers.get("Authorization"))
        if self.path != "/v1/chat/completions":
            self.send_response(404)
            self.end_headers()
            return
        if body["model"] == "broken":
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": "bad model"}')
            return
        n_items = body["messages"][-1]["content"].count("\n") - 3
        reply = {"choices": [{"message": {"role": "assistant",
                                          "content": f"1. Gel pens; 2. Notebooks; 3. items {n_items}"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def fake_server() -> Iterator[str]:
    _FakeOpenAI.requests, _FakeOpenAI.auth = [], []
    server = HTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_extractor_against_fake_server(fake_server: str, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-123")
    ex = OpenAIInterestExtractor(fake_server, "fake-model")
    got = ex.extract([HIST, HIST[:1]])
    assert got[0][:2] == ["gel pens", "notebooks"]
    assert len(_FakeOpenAI.requests) == 2
    req = _FakeOpenAI.requests[0]
    assert req["model"] == "fake-model" and req["temperature"] == 0
    assert "Pilot G2" in req["messages"][-1]["content"]
    assert _FakeOpenAI.auth == ["Bearer sk-test-123"] * 2
    assert "sk-test" not in ex.cache_id

    cached = CachedExtractor(ex, directory=tmp_path / "cache")
    first = cached.extract([HIST, HIST, HIST[:2]])
    assert len(_FakeOpenAI.requests) == 4  # two distinct histories, computed once each
    again = CachedExtractor(OpenAIInterestExtractor(fake_server, "fake-model"),
                            directory=tmp_path / "cache").extract([HIST[:2], HIST])
    assert len(_FakeOpenAI.requests) == 4  # served from disk by a fresh cache object
    assert again == [first[2], first[0]]

    monkeypatch.delenv("OPENAI_API_KEY")
    OpenAIInterestExtractor(fake_server + "/chat/completions", "fake-model").extract([HIST])
    assert _FakeOpenAI.auth[-1] is None  # no key in the environment: no header
    with pytest.raises(RuntimeError, match="HTTP 400"):
        OpenAIInterestExtractor(fake_server, "broken").extract([HIST])


def test_model_with_endpoint_interests(fake_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_semantic_ids import TINY, cycle_split

    from llmrec.models.registry import build_model

    monkeypatch.setenv("LLMREC_CACHE", str(tmp_path))
    torch.set_num_threads(1)
    split = cycle_split()
    m = build_model("semantic-id", {**TINY, "interests": "openai", "openai_url": fake_server,
                                    "openai_model": "fake-model", "interest_stride": 4, "max_epochs": 3}, 20)
    info = m.fit(split, progress=False)
    assert info["interest_extractor"].startswith("openai-")
    n_train = len(_FakeOpenAI.requests)
    assert n_train > 0
    ids, _ = m.recommend(split.test.histories[:4], k=5)
    assert (ids >= 0).all()
    assert len(_FakeOpenAI.requests) > n_train  # test histories asked the endpoint too
    assert list((tmp_path / "interests").iterdir())  # and were cached on disk


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LLMREC_TEST_LLM") != "1", reason="set LLMREC_TEST_LLM=1 (loads SmolLM2, ~1 min)")
def test_local_llm_extractor() -> None:
    ex = CausalLMInterestExtractor(batch_size=2, max_new_tokens=24, num_threads=2)
    got = ex.extract([HIST, HIST[:1]])
    assert len(got) == 2 and all(len(g) <= 5 for g in got) and any(got)
    assert ex.stats["new_tokens"] > 0 and np.isfinite(ex.stats["seconds"])


class _Hostile(BaseHTTPRequestHandler):
    """Redirects (to a second server that records what reaches it), drips, or sends a huge answer."""

    mode: ClassVar[str] = "redirect"
    target: ClassVar[str] = ""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path.startswith("/elsewhere"):
            type(self).reached = self.headers.get("Authorization")  # type: ignore[attr-defined]
            self.send_response(200)
            self.end_headers()
            return
        if self.mode == "redirect":
            self.send_response(307)
            self.send_header("Location", self.target + "/elsewhere/chat/completions")
            self.end_headers()
        elif self.mode == "drip":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(60):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        else:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"x": "' + b"a" * 3_000_000 + b'"}')

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def hostile() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    server.daemon_threads = True
    url = f"http://127.0.0.1:{server.server_address[1]}"
    _Hostile.target, _Hostile.reached = url, None  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield url
    server.shutdown()
    server.server_close()


def test_openai_extractor_never_follows_a_redirect_with_the_key(hostile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    _Hostile.mode = "redirect"
    with pytest.raises(RuntimeError, match="redirect"):
        OpenAIInterestExtractor(hostile + "/v1", "m", retries=0).extract([HIST])
    assert _Hostile.reached is None  # type: ignore[attr-defined]


def test_openai_extractor_has_a_total_deadline_and_a_size_cap(hostile: str) -> None:
    _Hostile.mode = "drip"
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="no answer within"):
        OpenAIInterestExtractor(hostile + "/v1", "m", timeout=2.0, deadline=1.0, retries=3).extract([HIST])
    assert time.monotonic() - t0 < 4.0  # a byte every 0.1 s cannot hold it for the 6 s it would take
    _Hostile.mode = "huge"
    with pytest.raises(RuntimeError, match="over 1048576 bytes"):
        OpenAIInterestExtractor(hostile + "/v1", "m", retries=0).extract([HIST])


def test_openai_key_comes_only_from_the_documented_variable() -> None:
    with pytest.raises(ValueError, match="only from OPENAI_API_KEY"):
        OpenAIInterestExtractor("http://127.0.0.1:1/v1", "m", api_key_env="AWS_SECRET_ACCESS_KEY")
    from llmrec.models.semantic_ids.config import SemanticIDConfig

    with pytest.raises(ValueError, match="only from OPENAI_API_KEY"):
        SemanticIDConfig(openai_api_key_env="HOME")
