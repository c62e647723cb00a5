"""The REST API through FastAPI's TestClient: every route, every bad input, restarts, batching, fuzzing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from llmrec.errors import LlmrecError
from llmrec.serve.app import create_app
from llmrec.serve.batching import MicroBatcher
from llmrec.serve.host import load_models
from llmrec.serve.settings import ServeSettings


def make_settings(runs: dict[str, Path], workdir: Path, **kw: object) -> ServeSettings:
    return ServeSettings(runs=[runs[m] for m in ("sasrec", "itemknn", "popularity", "semantic-id")], workdir=workdir,
                         **kw)  # type: ignore[arg-type]


@pytest.fixture()
def client(served_runs: dict[str, Path], tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(served_runs, tmp_path)), raise_server_exceptions=False) as c:
        yield c


def test_health_and_models(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "ok"}
    assert client.get("/health/ready").json()["models"] == ["sasrec", "itemknn", "popularity", "semantic-id"]
    models = {m["name"]: m for m in client.get("/models").json()}
    assert models["sasrec"]["model_type"] == "sasrec" and models["sasrec"]["explains"]
    assert not models["popularity"]["explains"] and models["semantic-id"]["interests"]
    assert 0.5 < models["sasrec"]["metrics"]["ndcg@10"] <= 1.0  # the run's own metrics.json (test set)


def test_user_recommendations(client: TestClient) -> None:
    history = [it["item_id"] for it in client.get("/users/u0/history").json()["items"]]
    out = client.get("/users/u0/recommend", params={"k": 10, "model": "sasrec"}).json()
    ids = [it["item_id"] for it in out["items"]]
    assert out["model"] == "sasrec" and out["history"] == history and len(out["recommendation_id"]) == 32
    assert len(ids) == len(set(ids)) == min(10, 20 - len(set(history))) and not set(ids) & set(history)
    assert [it["rank"] for it in out["items"]] == list(range(1, len(ids) + 1))
    scores = [it["score"] for it in out["items"]]
    assert scores == sorted(scores, reverse=True)
    # the cycle: the item after the last one bought comes first, explained by history items
    last = int(history[-1].split("-")[1])
    assert ids[0] == f"item-{(last + 1) % 20}" and out["items"][0]["because"]
    # paging and category filters select from the same ranking
    page = client.get("/users/u0/recommend", params={"k": 3, "offset": 2, "model": "sasrec"}).json()
    assert [it["item_id"] for it in page["items"]] == ids[2:5] and page["items"][0]["rank"] == 3
    c1 = client.get("/users/u0/recommend", params={"k": 5, "model": "sasrec", "category": "C1"}).json()
    assert c1["items"] and all(int(it["item_id"].split("-")[1]) % 4 == 1 for it in c1["items"])
    seen = client.get("/users/u0/recommend", params={"k": 20, "model": "itemknn", "exclude_seen": False}).json()
    assert set(history) & {it["item_id"] for it in seen["items"]}
    assert client.get("/users/u0/recommend").json()["model"] == "sasrec"  # the first model by default


def test_session_recommendations_and_events(client: TestClient) -> None:
    body = {"items": ["item-3", "item-4"], "k": 5, "model": "itemknn"}
    out = client.post("/session/recommend", json=body).json()
    ids = [it["item_id"] for it in out["items"]]
    assert ids[0] == "item-5" and not {"item-3", "item-4"} & set(ids)
    assert {b["item_id"] for it in out["items"] for b in it["because"]} <= {"item-3", "item-4"}
    # a session's cart and purchase events are its history; views are not; removes take items out
    for item, kind in (("item-7", "cart"), ("item-8", "view"), ("item-9", "purchase"), ("item-7", "remove")):
        r = client.post("/events", json={"session_id": "s1", "item_id": item, "kind": kind,
                                         "recommendation_id": out["recommendation_id"], "model": "itemknn"})
        assert r.status_code == 201 and r.json()["id"] > 0
    assert [it["item_id"] for it in client.get("/sessions/s1/history").json()["items"]] == ["item-9"]
    s1 = client.post("/session/recommend", json={"session_id": "s1", "k": 3, "model": "itemknn", "items": ["item-1"]}).json()
    assert s1["history"] == ["item-9", "item-1"] and "item-9" not in [it["item_id"] for it in s1["items"]]
    empty = client.post("/session/recommend", json={"k": 3, "model": "popularity"}).json()
    assert len(empty["items"]) == 3 and empty["history"] == []


def test_items_search_similar_and_users(client: TestClient) -> None:
    assert client.get("/items/item-3").json()["title"] == "Product 3"
    found = client.get("/items", params={"q": "product 7"}).json()
    assert found[0]["item_id"] == "item-7"
    assert len(client.get("/items", params={"limit": 5}).json()) == 5
    for model in ("itemknn", "sasrec", "popularity"):
        sims = client.get("/items/item-3/similar", params={"k": 4, "model": model}).json()
        assert len(sims) == 4 and "item-3" not in [s["item_id"] for s in sims]
    assert client.get("/items/item-3/similar", params={"model": "itemknn"}).json()[0]["item_id"] in ("item-4", "item-2")
    users = client.get("/users", params={"limit": 3}).json()
    assert len(users) == 3 and users[0]["n_items"] >= users[-1]["n_items"]


def test_semantic_id_interests_are_per_session_and_off_the_request_path(client: TestClient) -> None:
    for sid, items in (("a", ["item-1", "item-2"]), ("b", ["item-14", "item-15"])):
        out = client.post("/session/recommend", json={"session_id": sid, "items": items, "k": 3, "model": "semantic-id"})
        assert out.status_code == 200 and out.json()["interests_status"] in ("pending", "ready")
    phrases = {}
    for sid in ("a", "b"):
        for _ in range(100):
            got = client.get(f"/sessions/{sid}/interests", params={"model": "semantic-id"}).json()
            if got["status"] == "ready":
                break
            time.sleep(0.05)
        assert got["status"] == "ready" and got["phrases"]
        phrases[sid] = got["phrases"]
    assert phrases["a"] != phrases["b"]  # never shared between sessions
    assert client.get("/sessions/c/interests", params={"model": "semantic-id"}).json()["status"] == "none"


@pytest.mark.parametrize("method,url,kwargs,status,needle", [
    ("get", "/users/nobody/recommend", {}, 404, "nobody"),
    ("get", "/users/nobody/history", {}, 404, "nobody"),
    ("get", "/items/nothing", {}, 404, "nothing"),
    ("get", "/items/nothing/similar", {}, 404, "nothing"),
    ("post", "/session/recommend", {"json": {"items": ["item-1", "ghost"]}}, 404, "ghost"),
    ("post", "/events", {"json": {"session_id": "s", "item_id": "ghost", "kind": "cart"}}, 404, "ghost"),
    ("get", "/users/u0/recommend", {"params": {"k": 0}}, 422, "k"),
    ("get", "/users/u0/recommend", {"params": {"k": 101}}, 422, "max_k"),
    ("get", "/users/u0/recommend", {"params": {"k": "abc"}}, 422, "k"),
    ("get", "/users/u0/recommend", {"params": {"offset": -1}}, 422, "offset"),
    ("get", "/users/u0/recommend", {"params": {"model": "gpt-9"}}, 422, "gpt-9"),
    ("post", "/session/recommend", {"json": {"k": -1}}, 422, "k"),
    ("post", "/session/recommend", {"json": {"model": "gpt-9"}}, 422, "model"),
    ("post", "/session/recommend", {"json": {"items": ["item-1"] * 201}}, 422, "max_history"),
    ("post", "/session/recommend", {"json": {"items": ["item-1"], "ratings": [9]}}, 422, "ratings"),
    ("post", "/session/recommend", {"json": {"items": "item-1"}}, 422, "items"),
    ("post", "/session/recommend", {"json": {"colour": "red"}}, 422, "colour"),
    ("post", "/session/recommend", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "json"),
    ("post", "/events", {"json": {"session_id": "s", "item_id": "item-1", "kind": "steal"}}, 422, "kind"),
    ("post", "/events", {"json": {"session_id": "bad id!", "item_id": "item-1", "kind": "view"}}, 422, "session_id"),
    ("post", "/session/recommend", {"content": b"[" + b"1," * 40000 + b"1]",
                                    "headers": {"content-type": "application/json"}}, 413, "bytes"),
])
def test_bad_input_gets_a_clear_4xx(client: TestClient, method: str, url: str, kwargs: dict, status: int,
                                    needle: str) -> None:
    r = getattr(client, method)(url, **kwargs)
    assert r.status_code == status, r.text
    assert needle in r.text and "Traceback" not in r.text


def test_no_traceback_reaches_a_client(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    model = client.app.state.s.models["sasrec"].model  # type: ignore[attr-defined]
    monkeypatch.setattr(model, "recommend", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("secret detail")))
    r = client.get("/users/u0/recommend", params={"model": "sasrec"})
    assert r.status_code == 500 and r.json() == {"detail": "internal error"}
    assert client.get("/users/u0/recommend", params={"model": "itemknn"}).status_code == 200  # the server lives on


def test_events_survive_a_restart_and_need_the_key_when_one_is_set(served_runs: dict[str, Path], tmp_path: Path) -> None:
    s = make_settings(served_runs, tmp_path, api_key="sesame")
    event = {"session_id": "keep", "item_id": "item-2", "kind": "purchase"}
    with TestClient(create_app(s)) as c:
        assert c.post("/events", json=event).status_code == 401
        assert c.post("/events", json=event, headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.post("/events", json=event, headers={"X-API-Key": "sesame"}).status_code == 201
        assert c.get("/users/u0/recommend").status_code == 200  # reads need no key
    assert (tmp_path / "events.db").exists()
    with TestClient(create_app(s)) as c:  # a new server on the same database
        assert [it["item_id"] for it in c.get("/sessions/keep/history").json()["items"]] == ["item-2"]


def test_metrics_count_requests_per_route_and_model(client: TestClient) -> None:
    for _ in range(3):
        client.get("/users/u0/recommend", params={"model": "itemknn"})
    client.get("/users/nobody/recommend", params={"model": "itemknn"})
    text = client.get("/metrics").text
    assert 'llmrec_requests_total{method="GET",model="itemknn",route="/users/{user_id}/recommend",status="200"} 3.0' in text
    assert 'status="404"' in text and "llmrec_request_seconds_bucket" in text


def test_a_run_that_cannot_load_stops_the_server(served_runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(LlmrecError, match=r"cannot load run .*missing"):
        load_models(ServeSettings(runs=[served_runs["sasrec"], tmp_path / "missing"]))
    with pytest.raises(LlmrecError, match="no run directories"):
        load_models(ServeSettings(runs=[]))


def test_micro_batching_shares_forward_passes_and_keeps_results() -> None:
    calls: list[int] = []

    def square(xs: list[int]) -> list[int]:
        calls.append(len(xs))
        time.sleep(0.01)
        return [x * x for x in xs]

    async def burst(enabled: bool) -> tuple[list[int], MicroBatcher]:
        b: MicroBatcher[int, int] = MicroBatcher(square, window_s=0.005, max_batch=16, enabled=enabled)
        out = await asyncio.gather(*(b.submit(i) for i in range(40)))
        await b.close()
        return list(out), b

    out, b = asyncio.run(burst(True))
    assert out == [i * i for i in range(40)] and b.requests == 40
    assert b.batches <= 4 and max(calls) == 16  # 40 requests in batches of at most 16
    calls.clear()
    out, b = asyncio.run(burst(False))
    assert out == [i * i for i in range(40)] and b.batches == 40 and set(calls) == {1}


def test_batched_and_single_requests_give_the_same_lists(served_runs: dict[str, Path], tmp_path: Path) -> None:
    s = make_settings(served_runs, tmp_path)
    shop, models = load_models(s)
    m = models["sasrec"]
    from llmrec.serve.host import RecRequest

    reqs = [RecRequest(shop.dataset.sequences[u], u if u % 2 else None, 10) for u in range(12)]
    together = m.score_batch(reqs)
    for r, (ids, _) in zip(reqs, together, strict=True):
        np.testing.assert_array_equal(m.score_batch([r])[0][0], ids)


def test_fuzzing_the_openapi_document_finds_no_server_error(client: TestClient) -> None:
    import schemathesis

    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 12
    for op in operations:
        @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def no_5xx(case: object) -> None:
            kwargs = case.as_transport_kwargs(base_url="http://testserver")  # type: ignore[attr-defined]
            r = client.request(kwargs["method"], kwargs["url"], params=kwargs.get("params"),
                               headers={k: v for k, v in kwargs.get("headers", {}).items() if k.lower() != "connection"},
                               content=kwargs.get("data") if isinstance(kwargs.get("data"), (bytes, str)) else None,
                               json=kwargs.get("json"))
            assert r.status_code < 500, (kwargs, r.text)

        no_5xx()


def test_several_workers_share_the_event_store(served_runs: dict[str, Path], tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from llmrec.serve.store import EventStore

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llmrec.cli", "serve", str(served_runs["itemknn"]), "--port", str(port),
                             "--workers", "2", "--workdir", str(tmp_path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(base + "/health/ready", timeout=2):
                    break
            except OSError:
                time.sleep(0.3)

        def post(i: int) -> int:
            body = json.dumps({"session_id": "shared", "item_id": f"item-{i % 20}", "kind": "view"}).encode()
            req = urllib.request.Request(base + "/events", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(post, range(60))) == {201}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert EventStore(f"sqlite:///{tmp_path / 'events.db'}").count(session_id="shared") == 60


def test_serve_command_stops_on_a_run_that_cannot_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmrec.cli import main

    assert main(["serve", str(tmp_path / "no-such-run")]) == 2
    assert "cannot load run" in capsys.readouterr().err
