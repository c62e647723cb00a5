"""Settings of the service, from ``LLMREC_*`` environment variables or the ``llmrec serve`` options.

Nothing secret has a default: the API key (``LLMREC_API_KEY``), if set, is required in the
``X-API-Key`` header of writes (``POST /events``); without one, writes are open (a local demo).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServeSettings(BaseSettings):
    """What ``llmrec serve`` runs with (env prefix ``LLMREC_``; lists as JSON, e.g. ``LLMREC_RUNS='["a"]'``)."""

    model_config = SettingsConfigDict(env_prefix="LLMREC_", extra="ignore")

    runs: list[Path] = Field(default_factory=list, description="trained run directories to serve")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workdir: Path = Path("work/serve")  # the event database lives here (unless database_url says otherwise)
    database_url: str = ""  # SQLAlchemy URL; "" = sqlite:///<workdir>/events.db (WAL mode)
    api_key: SecretStr | None = None
    cors_origins: list[str] = Field(default_factory=list)  # none: CORS off
    max_k: int = Field(100, ge=1, le=1000)  # largest k a request may ask for
    max_history: int = Field(200, ge=1, le=10000)  # longest ad-hoc history a request may send
    max_body_bytes: int = Field(64 * 1024, ge=1024)  # larger request bodies get 413
    microbatch: bool = True  # concurrent requests to one model share forward passes
    # how long a batch waits for more requests; 0: it takes those that queued while the model was busy
    batch_window_ms: float = Field(0.0, ge=0.0, le=100.0)
    batch_max: int = Field(256, ge=1)  # requests in one forward pass at most

    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.workdir / 'events.db').resolve()}"
