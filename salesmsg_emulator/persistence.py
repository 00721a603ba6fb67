"""Optional persistence: the store's JSON snapshot in one row of a SQLite file."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

_SCHEMA = "CREATE TABLE IF NOT EXISTS snapshot (id INTEGER PRIMARY KEY CHECK (id = 1), saved_at REAL, data TEXT)"


class SnapshotFile:
    """Loads and saves one JSON snapshot in ``path`` (created on first save)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        with closing(sqlite3.connect(self.path)) as db:
            db.execute(_SCHEMA)
            row = db.execute("SELECT data FROM snapshot WHERE id = 1").fetchone()
        return json.loads(row[0]) if row else None

    def save(self, data: dict[str, Any], saved_at: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(data, separators=(",", ":"))
        with closing(sqlite3.connect(self.path)) as db, db:
            db.execute(_SCHEMA)
            db.execute("INSERT OR REPLACE INTO snapshot (id, saved_at, data) VALUES (1, ?, ?)", (saved_at, payload))
