"""Request and response bodies of the API (separate request and response schemas, with limits)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ItemId = str
SessionId = str


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionRecommendRequest(Strict):
    """An anonymous shopper's ad-hoc history (oldest first); with ``session_id`` the session's stored cart
    and purchase events come first. History items are never recommended back."""

    session_id: SessionId | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    items: list[ItemId] = Field(default_factory=list, description="item ids, oldest first")
    ratings: list[float] | None = Field(None, description="a 1-5 rating per item (stored with the request only)")
    k: int = Field(10, ge=1)
    offset: int = Field(0, ge=0, le=1000)
    model: str | None = Field(None, description="a loaded model's name (GET /models); default the first")
    category: str | None = Field(None, max_length=200, description="only items of this category")


class EventRequest(Strict):
    """A shopper's action on an item, with the recommendation it came from (for attribution)."""

    session_id: SessionId = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    item_id: ItemId = Field(min_length=1, max_length=128)
    kind: Literal["view", "cart", "purchase", "remove"] = Field(
        description="view; cart and purchase add the item to the session's history; remove takes it out")
    user_id: str | None = Field(None, max_length=128)
    recommendation_id: str | None = Field(None, max_length=64)
    model: str | None = Field(None, max_length=128)


class ItemOut(BaseModel):
    item_id: ItemId
    title: str
    brand: str | None = None
    categories: list[str] = Field(default_factory=list)
    popularity: int = 0


class Because(BaseModel):
    item_id: ItemId
    title: str


class RecommendedItem(BaseModel):
    rank: int
    item_id: ItemId
    title: str
    brand: str | None = None
    score: float
    because: list[Because] = Field(default_factory=list, description="history items that explain it")


class RecommendationOut(BaseModel):
    recommendation_id: str
    model: str
    model_type: str
    k: int
    offset: int
    latency_ms: float
    history: list[ItemId]
    items: list[RecommendedItem]
    interests: list[str] | None = Field(None, description="the session's interest phrases (semantic-ID)")
    interests_status: Literal["none", "pending", "ready"] = "none"


class SimilarItem(BaseModel):
    item_id: ItemId
    title: str
    score: float


class ModelOut(BaseModel):
    name: str
    model_type: str
    run: str
    dataset: str
    n_items: int
    explains: bool
    interests: bool
    metrics: dict[str, float | int | str | None] | None
    batching: dict[str, float | int | bool]


class UserOut(BaseModel):
    user_id: str
    n_items: int


class HistoryOut(BaseModel):
    user_id: str
    items: list[ItemOut]


class EventOut(BaseModel):
    id: int


class SessionHistoryOut(BaseModel):
    session_id: str
    items: list[ItemOut]


class InterestsOut(BaseModel):
    session_id: str
    model: str
    status: Literal["none", "pending", "ready"]
    phrases: list[str] | None = None
