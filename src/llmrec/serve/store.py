"""The event store: shoppers' views, add-to-carts and purchases, with the recommendation they came from.

A real embedded database by default (SQLite in WAL mode with a busy timeout, so several uvicorn workers on
one machine share it safely, and a restart loses nothing); any SQLAlchemy URL (PostgreSQL for a deployment
on several machines) works without code changes. A session's cart and purchase events, in order, are its
history for ``POST /session/recommend``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

metadata = MetaData()
events = Table(
    "events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("session_id", String(64), nullable=False, index=True),
    Column("user_id", String(128), nullable=True),
    Column("item_id", String(128), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("recommendation_id", String(64), nullable=True, index=True),
    Column("model", String(128), nullable=True),
)
HISTORY_KINDS = ("cart", "purchase")  # events that make a session's history (views do not)
REMOVE_KIND = "remove"  # takes an item out of the session's history (out of the basket) until it is added again


@dataclass(frozen=True)
class Event:
    session_id: str
    item_id: str
    kind: str
    user_id: str | None = None
    recommendation_id: str | None = None
    model: str | None = None


class EventStore:
    """Events in the database at ``url`` (tables created if missing)."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
        for attempt in range(5):  # several workers may create the tables at once
            try:
                metadata.create_all(self.engine)
                break
            except OperationalError:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def add(self, e: Event) -> int:
        """Store ``e``; its id."""
        with self.engine.begin() as conn:
            res = conn.execute(events.insert().values(ts=time.time(), session_id=e.session_id, user_id=e.user_id,
                                                      item_id=e.item_id, kind=e.kind,
                                                      recommendation_id=e.recommendation_id, model=e.model))
            return int(res.inserted_primary_key[0])

    def history(self, session_id: str) -> list[str]:
        """Item ids of the session's cart and purchase events, oldest first (repeats dropped, first kept;
        an item removed later is dropped until it is added again)."""
        kinds = (*HISTORY_KINDS, REMOVE_KIND)
        q = select(events.c.item_id, events.c.kind).where(events.c.session_id == session_id, events.c.kind.in_(kinds)) \
            .order_by(events.c.id)
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        items: dict[str, None] = {}
        for item, kind in rows:
            if kind == REMOVE_KIND:
                items.pop(item, None)
            else:
                items.setdefault(item, None)
        return list(items)

    def count(self, **where: Any) -> int:
        q = select(events.c.id)
        for k, v in where.items():
            q = q.where(getattr(events.c, k) == v)
        with self.engine.connect() as conn:
            return len(conn.execute(q).all())

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
