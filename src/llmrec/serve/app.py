"""The FastAPI app: routes over the loaded runs, the event store, Prometheus metrics and the page.

Routes stay thin: they validate, translate raw ids, and call :mod:`llmrec.serve.host`. Unknown ids are 404
naming the id; bad parameters 422 naming the field; bodies over the limit 413; no traceback reaches a client.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path as FilePath
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from llmrec.serve import schemas as S
from llmrec.serve.host import RecRequest, ServedModel, Shop, load_models
from llmrec.serve.middleware import BodyLimit, RequestMetrics
from llmrec.serve.settings import ServeSettings
from llmrec.serve.store import Event, EventStore

STATIC = FilePath(__file__).parent / "static"
log = logging.getLogger("llmrec.serve")


class State:
    """Everything the routes read: settings, shop, models, store, metrics, per-session interests."""

    def __init__(self, settings: ServeSettings, shop: Shop, models: dict[str, ServedModel]) -> None:
        self.settings, self.shop, self.models = settings, shop, models
        self.store = EventStore(settings.db_url())
        self.registry = CollectorRegistry()
        self.requests = Counter("llmrec_requests_total", "HTTP requests", ["method", "route", "status", "model"],
                                registry=self.registry)
        self.latency = Histogram("llmrec_request_seconds", "request latency", ["route", "model"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.interests: dict[tuple[str, str], dict[str, Any]] = {}  # (session, model) -> its own phrases
        self.interest_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmrec-interests")


def create_app(settings: ServeSettings | None = None, loaded: tuple[Shop, dict[str, ServedModel]] | None = None) -> FastAPI:
    """The app for ``settings`` (default: from the environment). ``loaded``: runs already loaded (the CLI
    loads them first, so a run that fails to load stops it before it listens)."""
    settings = settings or ServeSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        shop, models = loaded if loaded is not None else load_models(settings)
        app.state.s = State(settings, shop, models)
        gc.collect()
        gc.freeze()  # the loaded models and catalog never become garbage: keep them out of every collection
        try:
            yield
        finally:
            for m in models.values():
                await m.batcher.close()
            app.state.s.interest_pool.shutdown(wait=False, cancel_futures=True)
            app.state.s.store.close()

    app = FastAPI(title="llmrec", version="0.1.0", lifespan=lifespan,
                  description="Next-product recommendations from trained llmrec runs.")
    app.add_middleware(RequestMetrics)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "X-API-Key"])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _routes(app, settings)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    return app


def state(request: Request) -> State:
    return request.app.state.s


def field_error(loc: list[str], msg: str) -> RequestValidationError:
    return RequestValidationError([{"loc": loc, "msg": msg, "type": "value_error"}])


def pick_model(st: State, name: str | None, loc: list[str]) -> ServedModel:
    if name is None:
        return next(iter(st.models.values()))
    if name not in st.models:
        raise field_error(loc, f"unknown model {name!r}; loaded: {', '.join(st.models)}")
    return st.models[name]


def item_index(st: State, item_id: str) -> int:
    i = st.shop.item_index(item_id)
    if i is None:
        raise HTTPException(404, f"unknown item id {item_id!r}")
    return i


def user_index(st: State, user_id: str) -> int:
    u = st.shop.user_index(user_id)
    if u is None:
        raise HTTPException(404, f"unknown user id {user_id!r}")
    return u


async def recommend(st: State, m: ServedModel, history: np.ndarray, user: int | None, k: int, offset: int,
                    category: str | None, exclude_seen: bool = True) -> S.RecommendationOut:
    """The response of one recommendation request (micro-batched with concurrent ones)."""
    t0 = time.perf_counter()
    fetch = min(st.shop.n_items, (offset + k) * (8 if category else 1) + (0 if exclude_seen else len(history)))
    hist = history if exclude_seen else np.empty(0, np.int64)
    ids, scores = await m.batcher.submit(RecRequest(hist, user, fetch))
    keep = [(int(i), float(s)) for i, s in zip(ids, scores, strict=True)
            if i >= 0 and (category is None or st.shop.in_category(int(i), category))][offset : offset + k]
    chosen = np.array([i for i, _ in keep], dtype=np.int64)
    because = m.because(history, chosen)
    shop = st.shop
    items = [S.RecommendedItem(rank=offset + r + 1, item_id=shop.item_ids[i], title=shop.titles[i], brand=shop.brands[i],
                               score=s, because=[S.Because(item_id=shop.item_ids[h], title=shop.titles[h]) for h in b])
             for r, ((i, s), b) in enumerate(zip(keep, because, strict=True))]
    return S.RecommendationOut(recommendation_id=uuid.uuid4().hex, model=m.label, model_type=m.model.name, k=k,
                               offset=offset, latency_ms=1000 * (time.perf_counter() - t0),
                               history=[shop.item_ids[int(i)] for i in history], items=items)


def check_k(st: State, k: int, loc: list[str]) -> None:
    if k > st.settings.max_k:
        raise field_error(loc, f"k must be <= {st.settings.max_k} (the server's max_k), got {k}")


def require_key(request: Request, x_api_key: Annotated[str | None, Header()] = None) -> None:
    key = state(request).settings.api_key
    if key is not None and x_api_key != key.get_secret_value():
        raise HTTPException(401, "missing or wrong X-API-Key header")


def interests_entry(st: State, session: str, m: ServedModel, history: np.ndarray) -> dict[str, Any]:
    """The session's interest phrases for a semantic-ID model, computed off the request path (a background
    thread) for this session's history only; ``status`` is pending until they arrive."""
    key = (session, m.label)
    digest = hashlib.sha256(history.tobytes()).hexdigest()
    entry = st.interests.get(key)
    if entry is None or entry["digest"] != digest:
        entry = {"digest": digest, "status": "pending", "phrases": None}
        st.interests[key] = entry

        def work() -> None:
            try:
                phrases = m.model.interests_of([history])[0] if len(history) else []  # type: ignore[attr-defined]
            except Exception:
                log.exception("interest extraction failed for session %s", session)
                phrases = []
            if st.interests.get(key) is entry:
                entry.update(status="ready", phrases=list(phrases))

        st.interest_pool.submit(work)
    return entry


def _routes(app: FastAPI, settings: ServeSettings) -> None:
    @app.get("/health/live", tags=["health"])
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready", tags=["health"])
    async def ready(request: Request) -> dict[str, Any]:
        st = getattr(request.app.state, "s", None)
        if st is None:
            raise HTTPException(503, "models are still loading")
        return {"status": "ready", "models": list(st.models)}

    @app.get("/models", response_model=list[S.ModelOut], tags=["models"])
    async def models(st: Annotated[State, Depends(state)]) -> list[S.ModelOut]:
        return [S.ModelOut(name=m.label, model_type=m.model.name, run=str(m.run.path), dataset=str(m.run.dataset.path),
                           n_items=m.model.n_items, explains=m.relatedness(np.array([0]), np.array([0])) is not None,
                           interests=hasattr(m.model, "interests_of"), metrics=m.metrics,
                           batching={"enabled": m.batcher.enabled, **m.batcher.stats()}) for m in st.models.values()]

    @app.get("/users/{user_id}/recommend", response_model=S.RecommendationOut, tags=["recommend"])
    async def user_recommend(user_id: str, request: Request, st: Annotated[State, Depends(state)],
                             k: Annotated[int, Query(ge=1)] = 10, model: str | None = None,
                             category: Annotated[str | None, Query(max_length=200)] = None,
                             exclude_seen: bool = True, offset: Annotated[int, Query(ge=0, le=1000)] = 0) -> S.RecommendationOut:
        check_k(st, k, ["query", "k"])
        m = pick_model(st, model, ["query", "model"])
        request.state.model = m.label
        u = user_index(st, user_id)
        return await recommend(st, m, st.shop.dataset.sequences[u], u, k, offset, category, exclude_seen)

    @app.post("/session/recommend", response_model=S.RecommendationOut, tags=["recommend"])
    async def session_recommend(body: S.SessionRecommendRequest, request: Request,
                                st: Annotated[State, Depends(state)]) -> S.RecommendationOut:
        check_k(st, body.k, ["body", "k"])
        if len(body.items) > st.settings.max_history:
            raise field_error(["body", "items"], f"at most {st.settings.max_history} items (max_history), got {len(body.items)}")
        if body.ratings is not None and (len(body.ratings) != len(body.items) or any(not 1 <= r <= 5 for r in body.ratings)):
            raise field_error(["body", "ratings"], "one rating in [1, 5] per item")
        m = pick_model(st, body.model, ["body", "model"])
        request.state.model = m.label
        stored = await asyncio.get_running_loop().run_in_executor(None, st.store.history, body.session_id) \
            if body.session_id else []
        ids = list(dict.fromkeys([*stored, *body.items]))[-st.settings.max_history:]
        history = np.array([item_index(st, i) for i in ids], dtype=np.int64)
        out = await recommend(st, m, history, None, body.k, body.offset, body.category)
        if body.session_id and hasattr(m.model, "interests_of"):
            entry = interests_entry(st, body.session_id, m, history)
            out.interests_status, out.interests = entry["status"], entry["phrases"]
        return out

    @app.get("/sessions/{session_id}/history", response_model=S.SessionHistoryOut, tags=["events"])
    async def session_history(session_id: Annotated[str, Path(max_length=64)],
                              st: Annotated[State, Depends(state)]) -> S.SessionHistoryOut:
        ids = await asyncio.get_running_loop().run_in_executor(None, st.store.history, session_id)
        known = [i for i in (st.shop.item_index(x) for x in ids) if i is not None]
        return S.SessionHistoryOut(session_id=session_id, items=[S.ItemOut(**st.shop.item(i)) for i in known])

    @app.get("/sessions/{session_id}/interests", response_model=S.InterestsOut, tags=["recommend"])
    async def session_interests(session_id: str, model: str, st: Annotated[State, Depends(state)]) -> S.InterestsOut:
        m = pick_model(st, model, ["query", "model"])
        entry = st.interests.get((session_id, m.label))
        if entry is None:
            return S.InterestsOut(session_id=session_id, model=m.label, status="none")
        return S.InterestsOut(session_id=session_id, model=m.label, status=entry["status"], phrases=entry["phrases"])

    @app.get("/items", response_model=list[S.ItemOut], tags=["items"])
    async def items(st: Annotated[State, Depends(state)], q: Annotated[str, Query(max_length=200)] = "",
                    limit: Annotated[int, Query(ge=1, le=100)] = 20) -> list[S.ItemOut]:
        return [S.ItemOut(**st.shop.item(i)) for i in st.shop.search(q, limit)]

    @app.get("/items/{item_id}", response_model=S.ItemOut, tags=["items"])
    async def item(item_id: str, st: Annotated[State, Depends(state)]) -> S.ItemOut:
        return S.ItemOut(**st.shop.item(item_index(st, item_id)))

    @app.get("/items/{item_id}/similar", response_model=list[S.SimilarItem], tags=["items"])
    async def similar(item_id: str, st: Annotated[State, Depends(state)], k: Annotated[int, Query(ge=1)] = 10,
                      model: str | None = None) -> list[S.SimilarItem]:
        check_k(st, k, ["query", "k"])
        m = pick_model(st, model, ["query", "model"])
        i = item_index(st, item_id)
        pairs = await asyncio.get_running_loop().run_in_executor(m.batcher.executor, m.similar, i, k)
        return [S.SimilarItem(item_id=st.shop.item_ids[j], title=st.shop.titles[j], score=s) for j, s in pairs]

    @app.get("/users", response_model=list[S.UserOut], tags=["users"])
    async def users(st: Annotated[State, Depends(state)], limit: Annotated[int, Query(ge=1, le=200)] = 20) -> list[S.UserOut]:
        seqs = st.shop.dataset.sequences
        order = np.argsort([-len(s) for s in seqs], kind="stable")[:limit]
        return [S.UserOut(user_id=st.shop.dataset.user_ids[u], n_items=len(seqs[u])) for u in order]

    @app.get("/users/{user_id}/history", response_model=S.HistoryOut, tags=["users"])
    async def history(user_id: str, st: Annotated[State, Depends(state)],
                      limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> S.HistoryOut:
        seq = st.shop.dataset.sequences[user_index(st, user_id)][-limit:]
        return S.HistoryOut(user_id=user_id, items=[S.ItemOut(**st.shop.item(int(i))) for i in seq])

    @app.post("/events", response_model=S.EventOut, status_code=201, tags=["events"],
              dependencies=[Depends(require_key)])
    async def add_event(body: S.EventRequest, st: Annotated[State, Depends(state)]) -> S.EventOut:
        item_index(st, body.item_id)
        if body.model is not None:
            pick_model(st, body.model, ["body", "model"])
        e = Event(body.session_id, body.item_id, body.kind, body.user_id, body.recommendation_id, body.model)
        return S.EventOut(id=await asyncio.get_running_loop().run_in_executor(None, st.store.add, e))

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def metrics(st: Annotated[State, Depends(state)]) -> Response:
        return Response(generate_latest(st.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")


def app_from_env() -> FastAPI:
    """The app with settings from the environment (``uvicorn --factory llmrec.serve.app:app_from_env``)."""
    return create_app(ServeSettings())
