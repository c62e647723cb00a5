"""``llmrec serve``: a REST API and a web shop page over trained run directories.

settings.py (environment / CLI settings), store.py (the event store: SQLite in WAL mode by default, any
SQLAlchemy URL), host.py (the loaded runs, the catalog, explanations), batching.py (micro-batching of
concurrent requests to one model), schemas.py (request and response bodies), app.py (the FastAPI app and
its routes), static/ (the page).
"""
